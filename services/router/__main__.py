"""python -m services.router — the Router service (default port 50052)."""

from sophia.router.v1 import router_pb2, router_pb2_grpc

from libs.config import load_config_or_exit
from libs.server import run_service
from libs.tls import CallerPolicy, Identity
from services.router.servicer import RouterServicer

# Plans and outcomes belong to the Gateway's requests; operators may look and reload.
CALLERS = CallerPolicy(
    router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    {
        "Route": {Identity.GATEWAY},
        "ReportOutcome": {Identity.GATEWAY},
        "GetProviderHealth": {Identity.GATEWAY, Identity.OPERATOR},
        "ListModels": {Identity.GATEWAY, Identity.OPERATOR},
        "ReloadConfig": {Identity.GATEWAY, Identity.OPERATOR},
    },
)


def main() -> None:
    config = load_config_or_exit()
    servicer = RouterServicer(config)

    def register(server):
        router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
        return [router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name]

    run_service("router", config, register, callers=CALLERS)


if __name__ == "__main__":
    main()
