"""python -m tools.compare_continuous_batching — the measurement that chose ModelInference's stepping loop
over transformers' own continuous batching (`generate_batch`), same model, same process, same prompts.

16 prompts, 64 tokens each, greedy, float32, on the CPU threads torch picks; each side runs twice and the
wall time of the whole batch gives tokens/s. Printed, not asserted: figures depend on the machine.
"""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the service sets it (services/inference/__main__.py)

import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig

from libs.config import REPO_ROOT, GenerationSchedulerKind, load_config
from services.inference.engine import ChatModel, load_chat_model
from services.inference.sampling import GenerationParams
from services.inference.scheduler import build_scheduler

QUESTIONS = (
    "What is the capital of France?", "Explain photosynthesis briefly.", "Give three uses of copper.",
    "Why is the sky blue?", "What does a compiler do?", "Name two planets with rings.",
    "How do vaccines work?", "What is a prime number?", "Describe a cat in one sentence.",
    "What is the boiling point of water?", "Who wrote Hamlet?", "What is machine learning?",
    "How do bees make honey?", "What is inflation?", "Why do leaves change colour?", "What is DNA?",
)  # fmt: skip
MAX_TOKENS = 64


def run_stepping_loop(model: ChatModel, prompts: list[list[int]]) -> int:
    """The service's own scheduler, built from the reference config as `python -m services.inference`
    builds it."""

    async def generate_all() -> int:
        config = load_config().inference.model_copy(update={"scheduler": GenerationSchedulerKind.CONTINUOUS})
        scheduler = build_scheduler(config, model)
        params = GenerationParams(max_tokens=MAX_TOKENS)

        async def one(prompt: list[int]) -> int:
            return sum([1 async for _ in scheduler.stream(prompt, params, None)])

        try:
            return sum(await asyncio.gather(*(one(prompt) for prompt in prompts)))
        finally:
            await scheduler.close()

    return asyncio.run(generate_all())


def run_transformers(model: ChatModel, prompts: list[list[int]]) -> int:
    # generate_batch refuses the stepping loop's attention; the model's stock one is what it is built for.
    model.model.set_attn_implementation("sdpa")
    config = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    outputs = model.model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    return sum(len(output.generated_tokens) for output in outputs.values())


def main() -> None:
    config = load_config().inference
    model = load_chat_model(config.chat_model, REPO_ROOT / config.weights_dir, "cpu")
    prompts = [model.prompt_token_ids([{"role": "user", "content": question}]) for question in QUESTIONS]
    print(f"{len(prompts)} prompts x {MAX_TOKENS} tokens, greedy, float32, {torch.get_num_threads()} threads")
    runs: list[tuple[str, Callable[[ChatModel, list[list[int]]], int]]] = [
        ("stepping loop (ModelInference)", run_stepping_loop),
        ("transformers generate_batch", run_transformers),
    ]
    for name, run in runs:
        for _ in range(2):
            started = time.perf_counter()
            tokens = run(model, prompts)
            wall = time.perf_counter() - started
            print(f"  {name:<32} {wall:6.2f} s  {tokens:5d} tokens  {tokens / wall:6.1f} tokens/s"
                  f"  (load {os.getloadavg()[0]:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
