"""A client's task_type is refused where the request is translated unless the cost ledger would take the
usage record it ends up in: answered and then never billed is not an outcome."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import yaml
from google.protobuf import json_format
from sophia.gateway.v1 import gateway_pb2 as pb

from libs.config import REPO_ROOT
from libs.errors import InvalidArgument
from services.gateway.api import translate
from services.ledger.usage import UsageEvent, validate_event


def chat(task_type: str):
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "task_type": task_type}
    return translate.chat_request(json_format.ParseDict(body, pb.ChatCompletionParams()))


def billable(task_type: str) -> None:
    """Raises as the ledger does when it refuses a usage record with this task type."""
    event = UsageEvent(
        request_id="r", tenant_id="t", model_id="m", input_tokens=1, output_tokens=1, task_type=task_type
    )
    validate_event(event, datetime.now(UTC))


def test_the_longest_task_type_accepted_is_one_the_ledger_bills():
    billable(chat("t" * 64).task_type)
    with pytest.raises(InvalidArgument) as raised:
        chat("t" * 65)
    assert raised.value.field == "task_type"
    assert "at most 64 characters" in raised.value.problem
    with pytest.raises(InvalidArgument):
        billable("t" * 65)  # the ledger's bound, which the Gateway's keeps to


def test_only_labels_like_the_classifiers_task_types_are_taken():
    for task_type in ("poésie", "code\n", "a\tb", "two words", "x" * 200):
        with pytest.raises(InvalidArgument) as raised:
            chat(task_type)
        assert raised.value.field == "task_type"
        assert "A-Z a-z 0-9 . _ : -" in raised.value.problem
    examples = yaml.safe_load((REPO_ROOT / "config" / "router_examples.yaml").read_text())
    for task_type in [*examples["task_types"], "team.legal:review-2"]:
        assert chat(task_type).task_type == task_type
    assert chat("").task_type == ""  # none: the Router classifies the prompt
