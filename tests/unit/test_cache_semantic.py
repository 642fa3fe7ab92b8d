"""The semantic judge: threshold, guards, answer ends and the ambiguity margin, on plain data."""

from libs.config import SemanticCacheConfig
from services.cache.guards import QuestionGuards, Veto
from services.cache.semantic import AnswerEnd, Candidate, IndexedEntry, SemanticJudge

JUDGE = SemanticJudge(
    QuestionGuards(frozenset()), SemanticCacheConfig(similarity_threshold=0.6, ambiguity_margin=0.02)
)
ASKED = "How many legs does a spider have?"


def candidate(question: str, similarity: float, end: str = AnswerEnd.COMPLETE) -> Candidate:
    return Candidate(IndexedEntry(f"key:{question}", "p", end, expires_at=2e9), similarity, question)


def test_the_best_candidate_above_the_threshold_answers():
    verdict = JUDGE.judge(ASKED, [candidate("how many legs do spiders have", 0.95)])
    assert verdict.entry is not None and verdict.similarity == 0.95 and verdict.veto is None


def test_below_the_threshold_is_a_plain_miss():
    verdict = JUDGE.judge(ASKED, [candidate("how many legs do spiders have", 0.5)])
    assert verdict.entry is None and verdict.veto is None


def test_guards_and_answer_ends_veto():
    assert (
        JUDGE.judge(ASKED, [candidate("How many legs does a spider not have?", 0.97)]).veto == Veto.NEGATION
    )
    truncated = candidate("how many legs do spiders have", 0.95, AnswerEnd.TRUNCATED)
    assert JUDGE.judge(ASKED, [truncated]).veto == Veto.TRUNCATED
    refused = candidate("how many legs do spiders have", 0.95, AnswerEnd.REFUSAL)
    assert JUDGE.judge(ASKED, [refused]).veto == Veto.REFUSAL


def test_a_different_runner_up_within_the_margin_makes_it_ambiguous():
    best = candidate("How many legs does a spider have?!", 0.90)
    close_and_different = candidate("How many eyes does a spider have?", 0.89)
    assert JUDGE.judge(ASKED, [best, close_and_different]).veto == Veto.AMBIGUOUS
    far_and_different = candidate("How many eyes does a spider have?", 0.80)
    assert JUDGE.judge(ASKED, [best, far_and_different]).entry is best.entry
    close_and_same = candidate("how many legs do spiders have", 0.895)
    assert JUDGE.judge(ASKED, [best, close_and_same]).entry is best.entry
