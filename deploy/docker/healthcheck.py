"""Container health check: `python deploy/docker/healthcheck.py SERVICE` exits 0 when SERVICE serves.

SERVICE is gateway, router, cache, ledger or inference (a grpc.health.v1 Check of its own port, over
mutual TLS with the container's own certificate for the internal services, which accept nothing else),
or edge (the Envoy edge answers and reaches a Gateway: a request without a key gets the Gateway's 401),
or mcp (the MCP server's /healthz answers 200: it serves and its Gateway does).
The configuration is the service's own (`$SOPHIA_CONFIG` and `SOPHIA__...`), so the check follows the
port and TLS settings the service runs with. Docker's HEALTHCHECK and compose use it; Kubernetes probes
the Gateway natively and runs this for the services that take only mTLS (kubelet's gRPC probe has no TLS).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

# The image's /app (the repository root here), so that `libs` imports without PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.config import Config, ConfigError, load_config
from libs.tls import Identity, TlsError, load_credentials, server_name_options

SERVICES = ("gateway", "router", "cache", "ledger", "inference")
TIMEOUT_SECONDS = 2.0


class Unhealthy(Exception):
    """The component does not serve; the message says what was seen."""


def check_service(config: Config, service: str) -> None:
    port = getattr(config.services, service).port
    # The check runs inside the service's container: its port on loopback, whatever address it binds.
    address = f"127.0.0.1:{port}"
    identity = Identity(service)
    credentials = load_credentials(config.tls, identity)
    if credentials is None or (identity is Identity.GATEWAY and not config.tls.gateway_public_tls):
        channel = grpc.insecure_channel(address)
    elif identity is Identity.GATEWAY:
        public = grpc.ssl_channel_credentials(root_certificates=credentials.ca)
        channel = grpc.secure_channel(address, public, server_name_options(identity))
    else:
        channel = grpc.secure_channel(address, credentials.channel(), server_name_options(identity))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            raise Unhealthy(f"{service} at {address}: {exc.code().name} {exc.details()}") from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        raise Unhealthy(f"{service} at {address}: {status}")


def check_edge(config: Config) -> None:
    url = f"http://127.0.0.1:{config.edge.port}/v1/models"
    try:
        urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        # 401 comes from a Gateway (the edge forwarded the call); 503 means no Gateway behind it.
        if exc.code != 401:
            raise Unhealthy(f"edge at {url}: HTTP {exc.code}, expected the Gateway's 401") from None
        return
    except OSError as exc:
        raise Unhealthy(f"edge at {url}: {exc}") from None
    raise Unhealthy(f"edge at {url}: answered a request without a key")


def check_mcp(config: Config) -> None:
    url = f"http://127.0.0.1:{config.mcp.port}/healthz"
    try:
        urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        raise Unhealthy(f"mcp at {url}: HTTP {exc.code}") from None
    except OSError as exc:
        raise Unhealthy(f"mcp at {url}: {exc}") from None


def main(argv: list[str]) -> int:
    components = (*SERVICES, "edge", "mcp")
    if len(argv) != 1 or argv[0] not in components:
        print(f"usage: healthcheck.py {{{','.join(components)}}}", file=sys.stderr)
        return 2
    try:
        config = load_config()
        if argv[0] == "edge":
            check_edge(config)
        elif argv[0] == "mcp":
            check_mcp(config)
        else:
            check_service(config, argv[0])
    except (Unhealthy, ConfigError, TlsError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
