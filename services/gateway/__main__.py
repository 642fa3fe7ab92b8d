"""python -m services.gateway — the Gateway service (default port 50051), with its AdminService and
InsightService."""

from sophia.gateway.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    insight_pb2,
    insight_pb2_grpc,
)

from libs.config import load_config_or_exit
from libs.server import run_service
from services.gateway.app import GatewayApp


def main() -> None:
    app = GatewayApp(load_config_or_exit())

    def register(server):
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(app.open(), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(app.admin(), server)
        insight_pb2_grpc.add_InsightServiceServicer_to_server(app.insight(), server)
        return [
            gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            insight_pb2.DESCRIPTOR.services_by_name["InsightService"].full_name,
        ]

    run_service("gateway", app.config, register, start=app.start, stop=app.close)


if __name__ == "__main__":
    main()
