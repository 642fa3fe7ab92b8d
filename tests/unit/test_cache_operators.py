"""Operators, exponents and the case of quoted text in the false-hit guards, on pairs written for these
tests (none is from the evaluation sets). These pairs share every word and embed as near-duplicates, so
the guards are all that keeps one's answer from being served for the other."""

import pytest

from services.cache.guards import Veto
from tests.cache_doubles import veto


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("What is 9 + 4?", "What is 9 * 4?"),
        ("Compute 15 % 4 in Python", "Compute 15 / 4 in Python"),
        ("What does 9 // 4 return?", "What does 9 / 4 return?"),
        ("Is 8 >= 8 true?", "Is 8 > 8 true?"),
        ("Why is null == undefined but not null === undefined?", "Why is null != undefined?"),
        ("Delete rows WHERE qty <= 5", "Delete rows WHERE qty >= 5"),
        ("What does x ?? y return in C#?", "What does x?.y return in C#?"),
        ("What does a-b mean here?", "What does a+b mean here?"),
        ("Is x = -4 a root of the polynomial?", "Is x = 4 a root of the polynomial?"),
        ("What does if (!ready) do?", "What does if (ready) do?"),
        ("What does 3^2 evaluate to in Python?", "What does 3*2 evaluate to in Python?"),
        ("Is false or true truthy?", "Is false and true truthy?"),
        ("Simplify p and q", "Simplify p xor q"),
        ("List the invoices that are overdue and disputed", "List the invoices that are overdue or disputed"),
        ("What is 5³?", "What is 53?"),
        ("Factor y² - 1", "Factor y2 - 1"),
    ],
)
def test_a_different_operator_or_exponent_is_another_question(guards, first, second):
    assert veto(guards, first, second) is not None
    assert veto(guards, second, first) is not None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("What is 9 + 4?", "what is 9+4"),
        ("How do I turn on two-factor login?", "How do I turn on two factor login?"),
        (
            "In Gmail go to Settings > Filters to block a sender?",
            "In Gmail go to Settings -> Filters to block a sender?",
        ),
        ("Is the office closed on 2025-01-01??", "Is the office closed on 2025-01-01?"),
        ("What is ¾ of 12?", "What is 3/4 of 12?"),
        (
            "What is the area of a 3 m² tile in square meters?",
            "What is the area of a 3 square m tile in square meters?",
        ),
        ("How much water is in H₂O's formula?", "How much water is in H2O's formula?"),
        ("What does the ?? operator do?", "What does the `??` operator do?"),
        ("Which is cheaper, AWS or GCP?", "Between AWS and GCP, which is cheaper?"),
        ("How do I export contacts and deals?", "How do I export contacts & deals?"),
        ("Which shops sell R&D kits?", "which shops sell r&d kits"),
    ],
)
def test_the_same_question_typed_differently_passes(guards, first, second):
    assert veto(guards, first, second) is None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Uppercase the word 'Paris'", "Uppercase the word 'paris'"),
        ("Is the username 'JohnDoe' taken?", "Is the username 'johndoe' taken?"),
    ],
)
def test_quoted_text_in_another_case_is_another_question(guards, first, second):
    assert veto(guards, first, second) == Veto.QUOTED


def test_quoted_text_typed_all_in_one_case_says_nothing_by_its_case(guards):
    assert veto(guards, "Translate 'Good Night' into Spanish", "translate 'good night' into spanish") is None
    assert veto(guards, "TRANSLATE 'GOOD NIGHT' INTO SPANISH", "Translate 'Good Night' into Spanish") is None
