"""python -m services.inference — the ModelInference service (default port 50055)."""

import os

# torch's OpenMP threads otherwise spin while they wait for work, taking the cores from the gRPC threads
# that feed them and from whatever else runs on the host (a decode step took 6x longer on the 2-core
# development machine). Read when torch loads, so set before anything imports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio
import signal
import time

from sophia.inference.v1 import inference_pb2, inference_pb2_grpc

from libs.config import load_config_or_exit
from libs.server import run_service
from libs.tls import CallerPolicy, Identity
from services.inference.servicer import InferenceServicer

# Generation spends the GPU for the Gateway's requests; the cache may embed prompts itself.
CALLERS = CallerPolicy(
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    {
        "Generate": {Identity.GATEWAY},
        "GenerateStream": {Identity.GATEWAY},
        "Embed": {Identity.GATEWAY, Identity.CACHE},
        "ListModels": {Identity.GATEWAY, Identity.OPERATOR},
    },
)
# Answers cut short by a drain end this long before the runtime's grace runs out, so that their last
# message reaches the caller before the runtime cancels what is left.
DRAIN_MARGIN_SECONDS = 1.0


def main() -> None:
    config = load_config_or_exit()
    servicer = InferenceServicer(config.inference)

    async def start() -> None:
        await servicer.load_models()
        _drain_on_sigterm(servicer, config.server.drain_seconds)

    def register(server):
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        return [inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]

    run_service("inference", config, register, start=start, stop=servicer.close, callers=CALLERS)


def _drain_on_sigterm(servicer: InferenceServicer, grace_seconds: float) -> None:
    """On SIGTERM the runtime (libs/server.py) stops taking calls and gives the running ones
    `grace_seconds`; the generations have to know too, so that answers that cannot finish in time end
    with `length` instead of being cut off. The runtime offers no drain hook, so this handler takes
    SIGTERM, starts the drain, and hands the shutdown itself to the runtime's SIGINT handler (the
    runtime treats both signals alike)."""

    def on_sigterm() -> None:
        servicer.drain(time.monotonic() + max(0.0, grace_seconds - DRAIN_MARGIN_SECONDS))
        os.kill(os.getpid(), signal.SIGINT)

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)


if __name__ == "__main__":
    main()
