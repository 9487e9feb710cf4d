"""A real ``redis-server`` for tests (:mod:`metarec.state.local_redis`), one per test module.

Tests skip with a reason when the binary is absent (``apt-get install -y redis-server``; ``.ci/run``
installs it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from metarec.state.local_redis import start_redis, stop_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """The URL of a real Redis server running for the test module."""
    try:
        url, process = start_redis(tmp_path_factory.mktemp("redis"))
    except FileNotFoundError as error:
        pytest.skip(str(error))
    try:
        yield url
    finally:
        stop_redis(process)
