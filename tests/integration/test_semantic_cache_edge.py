"""The semantic cache and the Router's classification as a client sees them: through the edge, with the
unmodified OpenAI SDK, against the whole mesh (real cache service, real Router, the local model).

Each test module run uses tenants of its own (keys made through the admin API), so entries other tests
left in the session's cache never answer here.
"""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY

FRANCE = "What is the capital of France?"
FRANCE_REWORDED = "Tell me France's capital city."


def tenant_client(mesh, tenant: str) -> openai.OpenAI:
    created = httpx.post(
        f"{mesh.edge_url}/admin/v1/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"tenant_id": tenant, "name": "semantic-cache-test"},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    return openai.OpenAI(
        base_url=f"{mesh.edge_url}/v1", api_key=created.json()["secret"], max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def client(mesh) -> openai.OpenAI:
    return tenant_client(mesh, f"semantic-{uuid.uuid4().hex[:8]}")


def ask(client: openai.OpenAI, question: str, **options):
    """(the completion, its response headers) for a cacheable question (temperature 0)."""
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=24,
        **options,
    )
    return raw.parse(), raw.headers


def test_a_reworded_question_is_answered_from_the_semantic_layer_at_no_cost(client):
    first, headers = ask(client, FRANCE)
    assert headers["x-sophia-cache"] == "miss"
    _, exact = ask(client, FRANCE)
    assert (exact["x-sophia-cache"], exact["x-sophia-cache-layer"]) == ("hit", "exact")
    assert "x-sophia-cache-similarity" not in exact
    second, semantic = ask(client, FRANCE_REWORDED)
    assert (semantic["x-sophia-cache"], semantic["x-sophia-cache-layer"]) == ("hit", "semantic")
    assert 0.5 < float(semantic["x-sophia-cache-similarity"]) < 1.0
    assert float(semantic["x-sophia-cost-usd"]) == 0
    assert second.choices[0].message.content == first.choices[0].message.content


def test_a_cached_answer_streams_as_several_chunks(client):
    first, _ = ask(client, FRANCE)  # in the cache since the test above, or stored now
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": FRANCE_REWORDED}],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-sophia-cache"] == "hit"
    chunks = list(raw.parse())
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, pieces
    assert "".join(pieces) == first.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("Which vitamins are water-soluble?", "Which vitamins are NOT water-soluble?"),
        ("Reset the PIN for account 48213", "Reset the PIN for account 48231"),
    ],
    ids=["negation", "number"],
)
def test_a_different_question_that_reads_alike_is_not_served(client, stored, asked):
    ask(client, stored)
    assert ask(client, stored)[1]["x-sophia-cache"] == "hit"  # the entry is there
    assert ask(client, asked)[1]["x-sophia-cache"] == "miss"


def test_another_tenant_never_gets_the_entry_even_for_the_identical_question(mesh, client):
    ask(client, FRANCE)
    other = tenant_client(mesh, f"semantic-other-{uuid.uuid4().hex[:8]}")
    assert ask(other, FRANCE)[1]["x-sophia-cache"] == "miss"


def test_no_store_is_answered_but_not_kept(client):
    question = f"Name one primary colour ({uuid.uuid4().hex[:6]})."
    _, headers = ask(client, question, extra_headers={"Cache-Control": "no-store"})
    assert headers["x-sophia-cache"] == "miss"
    assert ask(client, question)[1]["x-sophia-cache"] == "miss"  # nothing was stored
    assert ask(client, question)[1]["x-sophia-cache"] == "hit"


def test_no_cache_bypasses_the_cache(client):
    ask(client, FRANCE)
    _, headers = ask(client, FRANCE, extra_headers={"Cache-Control": "no-cache"})
    assert headers["x-sophia-cache"] == "bypass"


def test_an_automatic_route_says_the_task_type_difficulty_and_reason(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Translate 'good morning' into French."}],
        max_tokens=8,
    )
    headers = raw.headers
    assert headers["x-sophia-task-type"] == "translation"
    assert headers["x-sophia-difficulty"] in ("simple", "complex")
    assert headers["x-sophia-route-reason"]
