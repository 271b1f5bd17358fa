"""End-to-end tests run `rota up` exactly as the README does: the in-memory cluster.

The test runner exports the private servers' addresses for the integration tests; the CLI
would take them as defaults, so they are hidden from these tests' subprocesses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

_SERVER_VARS = ("ROTA_ZK", "ROTA_AMQP_URL")


@pytest.fixture(scope="package", autouse=True)
def _in_memory_cluster() -> Iterator[None]:
    saved = {var: os.environ.pop(var) for var in _SERVER_VARS if var in os.environ}
    yield
    os.environ.update(saved)
