"""Choosing the next token for every sequence of a batch, each with its own sampling settings.

Greedy rows take the argmax of the whole batch at once. Sampled rows share one softmax, then each draws
from its own seeded `torch.Generator`, so a seeded request gets the same tokens in any batch, and
concurrent requests neither share nor disturb each other's random state. A request run alone goes
through the same function with a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Below this temperature sampling is greedy: logits / T overflows float32 to inf (then NaN) for tiny T,
# and at T this small the softmax already puts all the mass on the top token.
GREEDY_BELOW_TEMPERATURE = 1e-3
# Nucleus sampling looks at this many most likely tokens first (a partial top-k is much cheaper than
# sorting the whole vocabulary); only when they hold less than top_p of the mass is the full sort needed.
_NUCLEUS_CANDIDATES = 256


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not stop for stop in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class Sampler:
    """One sequence's sampling settings and random state (none for greedy decoding)."""

    def __init__(self, params: GenerationParams, device: str) -> None:
        self.greedy = params.greedy
        self.temperature = params.temperature
        self.top_p = params.top_p
        self._generator: torch.Generator | None = None
        if not self.greedy:
            self._generator = torch.Generator(device=device)
            if params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(params.seed)

    def draw(self, probabilities: torch.Tensor) -> int:
        """One token id from `probabilities` (one row, float32), within the top_p nucleus."""
        if self.top_p >= 1:
            return int(torch.multinomial(probabilities, 1, generator=self._generator))
        candidates = min(_NUCLEUS_CANDIDATES, probabilities.numel())
        top_probabilities, top_ids = probabilities.topk(candidates)
        if candidates < probabilities.numel() and float(top_probabilities.sum()) < self.top_p:
            top_probabilities, top_ids = probabilities.sort(descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p; the first always stays.
        mass_before = top_probabilities.cumsum(dim=-1) - top_probabilities
        top_probabilities = top_probabilities.masked_fill(mass_before >= self.top_p, 0)
        choice = torch.multinomial(top_probabilities, 1, generator=self._generator)
        return int(top_ids[choice])


def choose_tokens(logits: torch.Tensor, samplers: Sequence[Sampler]) -> list[int]:
    """The next token of each row of `logits` (rows × vocabulary), row i chosen by `samplers[i]`."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    sampled = [row for row, sampler in enumerate(samplers) if not sampler.greedy]
    if sampled:
        temperatures = torch.tensor([samplers[row].temperature for row in sampled], device=logits.device)
        probabilities = torch.softmax(logits[sampled] / temperatures[:, None], dim=-1)
        for index, row in enumerate(sampled):
            chosen[row] = samplers[row].draw(probabilities[index])
    return chosen
