"""python -m services.mcp [--stdio] — Sophia's tools for MCP clients, a thin client of the Gateway.

Without arguments: streamable HTTP on `mcp.host:mcp.port` at /mcp (the edge routes /mcp to it); each
request authenticates with its own `Authorization: Bearer` key. With --stdio: one client on stdin/stdout
(desktop agents), acting with the key in SOPHIA_API_KEY. The Gateway's address comes from the config.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import anyio
import uvicorn

from libs.config import Config, load_config_or_exit
from libs.logs import register_secret, setup_logging
from libs.tls import cert_dir
from services.mcp.access import StdioCaller, http_caller
from services.mcp.gateway import GatewayClient
from services.mcp.server import build_server, http_app

log = logging.getLogger(__name__)


def gateway_client(config: Config) -> GatewayClient:
    return GatewayClient(
        config.services.gateway.address,
        config.mcp.gateway_timeout_seconds,
        cert_dir(config.tls) if config.tls.gateway_public_tls else None,
    )


def serve_stdio(config: Config) -> None:
    key = os.environ.get("SOPHIA_API_KEY", "")
    register_secret(key)
    gateway = gateway_client(config)
    server = build_server(gateway, StdioCaller(gateway, key), config.routing.default_embedding_model)

    async def run() -> None:
        try:
            await server.run_stdio_async()
        finally:
            await gateway.close()

    anyio.run(run)


def serve_http(config: Config) -> None:
    gateway = gateway_client(config)
    server = build_server(gateway, http_caller, config.routing.default_embedding_model)
    app = http_app(server, gateway)
    settings = uvicorn.Config(
        app,
        host=config.mcp.host,
        port=config.mcp.port,
        # Our JSON log lines on stderr (setup_logging), not uvicorn's own format.
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(config.server.drain_seconds),
    )
    log.info("MCP server on http://%s:%d/mcp", config.mcp.host, config.mcp.port)

    async def run() -> None:
        try:
            await uvicorn.Server(settings).serve()
        finally:
            await gateway.close()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.mcp", description=__doc__.splitlines()[0])
    parser.add_argument("--stdio", action="store_true", help="serve one client on stdin/stdout")
    stdio = parser.parse_args().stdio
    config = load_config_or_exit()
    # Logs go to stderr either way: over stdio, stdout carries the protocol.
    setup_logging("mcp", config.telemetry.log_level)
    if stdio:
        serve_stdio(config)
    else:
        serve_http(config)


if __name__ == "__main__":
    main()
