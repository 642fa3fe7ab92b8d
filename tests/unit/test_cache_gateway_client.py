"""The Gateway's cache client: scope and question of a request, the tenant modes, the opt-outs."""

import pytest
from sophia.cache.v1 import cache_pb2 as pb

from libs.breaker import DependencyBreaker
from libs.config import CacheConfig, CacheMode
from services.gateway.domain import ChatRequest, Completion, Message
from services.gateway.serving.response_cache import (
    ResponseCache,
    answer_end,
    looks_like_refusal,
    split_request,
)


def request(*messages, **fields) -> ChatRequest:
    fields.setdefault("temperature", 0.0)
    return ChatRequest(model=fields.pop("model", "m"), messages=tuple(messages), **fields)


USER = Message("user", "What is the capital of France?")
SYSTEM = Message("system", "Answer briefly.")


async def _probe() -> None:
    return None


@pytest.fixture
def cache():
    config = CacheConfig(tenant_modes={"quiet": CacheMode.OFF, "strict": CacheMode.EXACT})
    return ResponseCache(None, config, True, DependencyBreaker("cache", _probe))


def test_the_question_is_the_last_user_message_and_the_rest_is_scope():
    scope, question, is_question = split_request(request(SYSTEM, USER))
    assert question == USER.content and is_question
    assert scope == split_request(request(SYSTEM, Message("user", "capital of france??")))[0]


@pytest.mark.parametrize(
    "other",
    [
        request(Message("system", "Answer at length."), USER),
        request(USER),
        request(SYSTEM, Message("user", "Hi"), Message("assistant", "Hello"), USER),
        request(SYSTEM, USER, model="other"),
        request(SYSTEM, USER, temperature=0.0, max_tokens=5),
        request(SYSTEM, USER, seed=7),
        request(SYSTEM, USER, response_format={"type": "json_object"}),
        request(SYSTEM, USER, tools=({"type": "function", "function": {"name": "f"}},)),
    ],
)
def test_anything_but_the_question_changes_the_scope(other):
    assert split_request(other)[0] != split_request(request(SYSTEM, USER))[0]


def test_an_automatic_plans_preference_and_task_type_change_its_scope_an_explicit_models_do_not():
    auto = request(SYSTEM, USER, model="auto")
    for routing in ({"model_preference": "quality"}, {"task_type": "code"}):
        assert split_request(request(SYSTEM, USER, model="auto", **routing))[0] != split_request(auto)[0]
        assert split_request(request(SYSTEM, USER, **routing))[0] == split_request(request(SYSTEM, USER))[0]


def test_a_tool_result_is_never_a_question():
    scope, _question, is_question = split_request(request(USER, Message("tool", "42", tool_call_id="c1")))
    assert not is_question and '"last"' in scope


def test_modes_and_opt_outs(cache):
    assert cache.key("t", request(USER)).semantic
    assert not cache.key("t", request(USER), semantic_allowed=False).semantic
    assert cache.key("quiet", request(USER)) is None
    assert not cache.key("strict", request(USER)).semantic
    assert cache.key("t", request(USER, use_cache=False)) is None
    assert cache.key("t", request(USER, temperature=0.7)) is None
    assert cache.key("t", request(USER, temperature=None)) is None  # unset counts as 1
    assert not cache.key("t", request(USER), store=False).store
    tools = ({"type": "function", "function": {"name": "f"}},)
    assert not cache.key("t", request(USER, tools=tools)).semantic


def test_answer_end_marks_truncated_and_refused_answers():
    done = Completion("Paris.", "stop", 5, 2)
    assert answer_end(done) == pb.ANSWER_END_COMPLETE
    assert answer_end(Completion("Paris is", "length", 5, 2)) == pb.ANSWER_END_TRUNCATED
    assert (
        answer_end(Completion("I'm sorry, but I can't help with that.", "stop", 5, 9))
        == pb.ANSWER_END_REFUSAL
    )
    assert looks_like_refusal("I cannot assist with this request.")
    assert not looks_like_refusal("I can help: Paris is the capital.")
