"""Provider API keys: several in turn, a refused one set aside, a rotated key file taken up without a
restart — against the fake provider over real HTTP."""

from __future__ import annotations

import logging

import pytest

from libs.config import ProviderConfig
from services.gateway.domain import ChatRequest, Message, Target
from services.gateway.providers.anthropic import AnthropicProvider
from services.gateway.providers.base import ProviderError
from services.gateway.providers.keys import ProviderKeys
from services.gateway.providers.openai import OpenAICompatibleProvider
from tests.fakes.provider import FakeProvider

TARGET = Target(model_id="test-model", provider="fake", provider_model="fake-model-v1")
OLD, NEW, OTHER = "key-old-0f3a9c", "key-new-7b21de", "key-other-5e8c4a"


def ask(text: str) -> ChatRequest:
    return ChatRequest(model="test-model", messages=(Message("user", text),))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake():
    with FakeProvider() as provider:
        yield provider


def make(kind: str, fake: FakeProvider, **keys) -> OpenAICompatibleProvider | AnthropicProvider:
    url = fake.openai_base_url if kind == "openai" else fake.anthropic_base_url
    config = ProviderConfig(type=kind, base_url=url, **keys)
    return OpenAICompatibleProvider("fake", config) if kind == "openai" else AnthropicProvider("fake", config)


def sent_keys(fake: FakeProvider, since: int) -> list[str]:
    keys = []
    for request in list(fake.requests)[since:]:
        headers = request.headers
        keys.append(headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer "))
    return keys


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_refused_key_is_set_aside_and_the_next_one_answers(fake, tmp_path, caplog, kind):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# rotated monthly\n{OLD}\n\n{NEW}\n")
    fake.api_key = NEW  # the provider has revoked OLD
    provider = make(kind, fake, api_key_file=str(key_file))
    before = len(fake.requests)
    try:
        with caplog.at_level(logging.WARNING):
            answers = [await provider.complete(TARGET, ask(f"question {i}")) for i in range(4)]
    finally:
        await provider.close()
    assert all(answer.text for answer in answers)
    # OLD was refused once, then set aside: every later request goes straight to NEW.
    assert sent_keys(fake, before).count(OLD) == 1
    assert sent_keys(fake, before)[-3:] == [NEW, NEW, NEW]
    warnings = [r.getMessage() for r in caplog.records if "refused API key" in r.getMessage()]
    assert warnings == [
        "provider fake refused API key #1 of 2 (HTTP 401); it is set aside while others remain"
    ]
    assert OLD not in caplog.text and NEW not in caplog.text


async def test_keys_are_used_in_turn(fake, monkeypatch):
    monkeypatch.setenv("SOPHIA_TEST_KEYS", f"{OLD}, {NEW}")
    provider = make("openai", fake, api_key_env="SOPHIA_TEST_KEYS")
    before = len(fake.requests)
    try:
        for i in range(4):
            await provider.complete(TARGET, ask(f"q{i}"))
    finally:
        await provider.close()
    assert sorted(sent_keys(fake, before)) == sorted([OLD, NEW, OLD, NEW])


async def test_a_rotated_key_file_is_taken_up_without_a_restart(fake, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"{OLD}\n")
    fake.api_key = OLD
    provider = make("openai", fake, api_key_file=str(key_file))
    clock = Clock()
    provider._keys = ProviderKeys("fake", provider._config, clock=clock)
    try:
        await provider.complete(TARGET, ask("before"))
        key_file.write_text(f"{NEW}\n")  # the Secret is rotated; the provider accepts only the new key
        fake.api_key = NEW
        clock.now += 1.5  # the file is looked at again at most once a second
        before = len(fake.requests)
        answer = await provider.complete(TARGET, ask("after"))
    finally:
        await provider.close()
    assert answer.text and sent_keys(fake, before) == [NEW]


async def test_when_every_key_is_refused_the_error_names_no_key(fake, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"{OLD}\n{NEW}\n")
    fake.api_key = OTHER
    provider = make("openai", fake, api_key_file=str(key_file))
    before = len(fake.requests)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(TARGET, ask("anyone?"))
    finally:
        await provider.close()
    assert (caught.value.status, caught.value.retryable) == ("FAILED_PRECONDITION", False)
    assert OLD not in caught.value.message and NEW not in caught.value.message
    assert sorted(sent_keys(fake, before)) == sorted([OLD, NEW])  # each tried once, no loop
