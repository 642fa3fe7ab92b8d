"""Fixtures the semantic cache's unit tests share."""

import pytest


@pytest.fixture(scope="module")
def guards():
    """The cache's question guards with the embedding model's vocabulary, as the service runs them."""
    from tests.cache_doubles import question_guards

    return question_guards()


@pytest.fixture
async def redis(tmp_path):
    """A Redis of the test's own (bytes replies, as the cache uses it), gone with the test."""
    from tests.support import throwaway_redis

    async with throwaway_redis(tmp_path, decode_responses=False) as client:
        yield client
