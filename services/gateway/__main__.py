"""python -m services.gateway — the Gateway service (default port 50051)."""

from sophia.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from libs.config import load_config_or_exit
from libs.server import run_service
from services.gateway.auth import KeyRing
from services.gateway.providers.registry import build_providers
from services.gateway.routing import Routing
from services.gateway.servicer import GatewayServicer


def main() -> None:
    config = load_config_or_exit()
    keys = KeyRing(config.auth)
    opened = {}

    def register(server):
        # gRPC aio channels belong to the event loop they are made in, so clients are built here, inside it.
        opened["providers"] = build_providers(config)
        opened["routing"] = Routing(config)
        servicer = GatewayServicer(config, keys, opened["routing"], opened["providers"])
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
        return [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name]

    async def close():
        await opened["routing"].close()
        for provider in opened["providers"].values():
            await provider.close()

    run_service("gateway", config, register, stop=close)


if __name__ == "__main__":
    main()
