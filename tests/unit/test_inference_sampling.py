"""Per-sequence sampling inside a batch: greedy rows, seeded rows, the top_p nucleus."""

import pytest
import torch

from services.inference.sampling import GenerationParams, Sampler, choose_tokens

VOCABULARY = 1000


def sampler(**params) -> Sampler:
    return Sampler(GenerationParams(max_tokens=1, **params), "cpu")


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCABULARY, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax():
    logits = random_logits(4)
    assert choose_tokens(logits, [sampler() for _ in range(4)]) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6])
def test_tiny_temperatures_sample_greedily_instead_of_overflowing(temperature: float):
    # logits / 1e-38 overflows float32: without the greedy cut-off softmax gives NaN and sampling fails.
    logits = torch.tensor([[3.0, 9.5, -2.0, 9.4]])
    chooser = sampler(temperature=temperature, seed=1)
    assert [choose_tokens(logits, [chooser])[0] for _ in range(5)] == [1] * 5


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    logits = random_logits(6, seed=3)

    def draws(companions: list[Sampler], row: int) -> list[int]:
        seeded = sampler(temperature=1.0, top_p=0.9, seed=42)
        batch = [*companions[:row], seeded, *companions[row:]]
        rows = torch.cat([logits[1 : 1 + row], logits[:1], logits[1 + row : len(batch)]])
        return [choose_tokens(rows, batch)[row] for _ in range(20)]

    alone = draws([], 0)
    in_a_batch = draws([sampler(), sampler(temperature=0.7, seed=1), sampler(temperature=1.3)], 2)
    assert in_a_batch == alone
    assert len(set(alone)) > 1  # it really samples


def test_different_seeds_draw_differently():
    logits = random_logits(1)
    by_seed = {
        seed: tuple(choose_tokens(logits, [chooser])[0] for _ in range(20))
        for seed in (1, 2)
        for chooser in [sampler(temperature=1.0, seed=seed)]
    }
    assert by_seed[1] != by_seed[2]


def test_top_p_keeps_only_the_nucleus():
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probabilities.log()[None]
    chooser = sampler(temperature=1.0, top_p=0.75, seed=0)
    drawn = {choose_tokens(logits, [chooser])[0] for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reach 0.75; the rest is cut


def test_a_wide_nucleus_reaches_beyond_the_first_candidates():
    # Flat logits: top_p 0.99 needs nearly the whole vocabulary, past the partial top-k shortcut.
    logits = torch.zeros(1, VOCABULARY)
    chooser = sampler(temperature=1.0, top_p=0.99, seed=5)
    drawn = {choose_tokens(logits, [chooser])[0] for _ in range(400)}
    assert max(drawn) > 256 and len(drawn) > 250
