"""python -m services.inference — the ModelInference service (default port 50055)."""

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


def main() -> None:
    config = load_config_or_exit()
    servicer = InferenceServicer(config.inference)

    def register(server):
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        return [inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]

    run_service(
        "inference", config, register, start=servicer.load_models, stop=servicer.close, callers=CALLERS
    )


if __name__ == "__main__":
    main()
