"""Run a StreamConsumer on its own: `python tests/consume_main.py --redis-url URL --run RUN --store DIR --consumer NAME`.

Polls the stream into the store (and runs the janitor now and then) until the store holds --until batches, or
forever. The trainer embeds StreamConsumer; this runs it in a process of its own for the crash tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.batch_contract import BatchContract
from shared.config import StreamConfig
from shared.stream import connect_redis
from trainer.consumer import StreamConsumer
from trainer.store import SyntheticStore


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="consume_main.py", description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--run", required=True, help="stream keys are dfkd:{run}:*")
    parser.add_argument("--group", default="trainers")
    parser.add_argument("--store", required=True, type=Path, help="the SyntheticStore directory")
    parser.add_argument("--consumer", required=True, help="consumer name; reuse it after a restart")
    parser.add_argument("--until", type=int, default=None, help="stop once the store holds this many batches")
    parser.add_argument("--fingerprint", default=None, help="dead-letter batches from any other teacher")
    parser.add_argument("--max-deliveries", type=int, default=5)
    parser.add_argument("--claim-idle-ms", type=int, default=30_000)
    parser.add_argument("--claim-every-s", type=float, default=5.0, help="how often the janitor runs")
    parser.add_argument("--block-ms", type=int, default=1000)
    parser.add_argument("--batch-entries", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = StreamConfig(redis_url=args.redis_url, run=args.run, group=args.group)
    contract = dataclasses.replace(BatchContract.from_stream(config), fingerprint=args.fingerprint)
    store = SyntheticStore(args.store, contract)
    consumer = StreamConsumer(connect_redis(args.redis_url), config, args.consumer, store,
                              contract=contract, max_deliveries=args.max_deliveries,
                              claim_idle_ms=args.claim_idle_ms, block_ms=args.block_ms,
                              batch_entries=args.batch_entries)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True  # finish the current poll: never leave a batch half handled on a polite stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    next_claim = 0.0
    backoff = 0.1
    grouped = False
    while not stopping and (args.until is None or len(store) < args.until):
        try:
            if not grouped:
                consumer.ensure_group()
                grouped = True
            consumer.poll()
            if time.monotonic() >= next_claim:
                consumer.claim_stale()
                next_claim = time.monotonic() + args.claim_every_s
            backoff = 0.1
        except (RedisConnectionError, RedisTimeoutError) as error:
            print(f"consume_main: Redis unavailable ({error}); retrying in {backoff:.1f}s", file=sys.stderr)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
    print(f"consume_main: {len(store)} batches in {store.root}; this run stored {consumer.stored}, "
          f"duplicates {consumer.duplicates}, dead-lettered {consumer.dead_lettered}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
