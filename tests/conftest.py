import pytest

import libs  # noqa: F401  (puts the generated stubs on the import path)
from tests.support import throwaway_redis


@pytest.fixture
async def redis_client(tmp_path):
    """A real Redis of the test's own (strings decoded), answering."""
    async with throwaway_redis(tmp_path) as client:
        yield client
