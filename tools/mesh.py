"""Starts and stops the whole mesh on one host: Redis, the five services, the MCP server and the Envoy edge.

`python -m tools.mesh up|down|status` backs `make up` / `make down`; the integration tests and the
benchmark drive the same `Mesh` class on free ports. Ports and addresses come from the config (so
`SOPHIA__...` overrides and `SOPHIA_REDIS_URL` apply); processes, logs and Redis data live under one
state folder (`var/` for `make up`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.config import REPO_ROOT, Config, ConfigError, TlsMode, load_config
from libs.telemetry import PROMETHEUS_PORT_OFFSETS
from libs.tls import Identity, MeshCredentials, TlsError, cert_dir, load_credentials, server_name_options
from tools import certs

# Start order: the Gateway last, once what it calls is up.
SERVICES = ("inference", "router", "cache", "ledger", "gateway")
# The MCP server (services/mcp) is a client of the Gateway's public port over HTTP, not a mesh service:
# no certificate, readiness over HTTP. The edge routes /mcp to it.
COMPONENTS = ("redis", *SERVICES, "mcp", "envoy")
VENV_BIN = REPO_ROOT / ".venv" / "bin"
ENVOY_DIR = REPO_ROOT / "deploy" / "envoy"
DESCRIPTOR = REPO_ROOT / "build" / "sophia.pb"


class MeshError(Exception):
    pass


class Mesh:
    def __init__(self, state_dir: Path, environ: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.environ = dict(os.environ if environ is None else environ)
        self.environ.setdefault("PYTHONUNBUFFERED", "1")
        # A mesh's certificates live in its state folder, like its logs and Redis data (var/certs for
        # `make up`); an explicit SOPHIA__TLS__DIR still wins.
        self.environ.setdefault("SOPHIA__TLS__DIR", str(self.state_dir / "certs"))
        self.config: Config = load_config(environ=self.environ)
        self.log_dir = self.state_dir / "log"
        self.pid_file = self.state_dir / "run" / "mesh.json"
        self.processes: dict[str, subprocess.Popen] = {}
        self._log_offsets: dict[str, int] = {}

    # --- addresses -------------------------------------------------------------------------------

    @property
    def redis_port(self) -> int:
        return urllib.parse.urlparse(self.config.redis.url).port or 6379

    @property
    def edge_url(self) -> str:
        return f"http://{self.config.edge.host}:{self.config.edge.port}"

    @property
    def mcp_url(self) -> str:
        """The MCP server itself (clients use the edge's /mcp)."""
        return f"http://{self.config.mcp.host}:{self.config.mcp.port}"

    def address(self, service: str) -> str:
        return getattr(self.config.services, service).address

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    # --- certificates ----------------------------------------------------------------------------

    @property
    def cert_dir(self) -> Path:
        return cert_dir(self.config.tls)

    def credentials(self, identity: Identity) -> MeshCredentials | None:
        """`identity`'s certificate and key in this mesh; None when it runs in plaintext."""
        return load_credentials(self.config.tls, identity)

    def blocking_channel(self, service: str, identity: Identity = Identity.OPERATOR) -> grpc.Channel:
        """A channel to `service` calling as `identity` (the Gateway's public port needs no certificate)."""
        server = Identity(service)
        credentials = self.credentials(identity)
        if credentials is None or (server is Identity.GATEWAY and not self.config.tls.gateway_public_tls):
            return grpc.insecure_channel(self.address(service))
        if server is Identity.GATEWAY:
            channel_credentials = grpc.ssl_channel_credentials(root_certificates=credentials.ca)
        else:
            channel_credentials = credentials.channel()
        return grpc.secure_channel(self.address(service), channel_credentials, server_name_options(server))

    # --- starting --------------------------------------------------------------------------------

    def _command(self, component: str) -> list[str]:
        if component == "redis":
            data = self.state_dir / "redis"
            data.mkdir(parents=True, exist_ok=True)
            return [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--dir",
                str(data),
                "--appendonly",
                "yes",
                # The ledger's records live here: an acknowledged record must survive kill -9 of Redis,
                # so every write is fsynced (Redis groups the writes of one event-loop turn per fsync;
                # fsync costs about 0.2 ms on the development machine).
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
            ]
        if component == "envoy":
            return [
                str(VENV_BIN / "envoy"),
                "-c",
                str(self._render_envoy()),
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]
        return [sys.executable, "-m", f"services.{component}"]

    def _render_envoy(self) -> Path:
        template = string.Template((ENVOY_DIR / "envoy.template.yaml").read_text())
        gateway = self.config.services.gateway
        edge = self.config.edge
        retry_after_ms = self.config.gateway.overload_retry_after_ms
        rendered = template.substitute(
            LISTEN_HOST=edge.host,
            LISTEN_PORT=edge.port,
            ADMIN_PORT=edge.admin_port,
            GATEWAY_HOST=gateway.host,
            GATEWAY_PORT=gateway.port,
            MCP_HOST=self.config.mcp.host,
            MCP_PORT=self.config.mcp.port,
            DESCRIPTOR_PATH=DESCRIPTOR,
            ENVOY_DIR=ENVOY_DIR,
            MAX_BODY_BYTES=edge.max_body_bytes,
            REQUEST_TIMEOUT=f"{edge.request_timeout_seconds}s",
            REQUEST_HEADERS_TIMEOUT=f"{edge.request_headers_timeout_seconds}s",
            IDLE_TIMEOUT=f"{edge.idle_timeout_seconds}s",
            PER_CONNECTION_BUFFER_BYTES=edge.per_connection_buffer_bytes,
            MAX_CONNECTIONS=edge.max_connections,
            MAX_HEAP_BYTES=edge.max_heap_bytes,
            MAX_GATEWAY_REQUESTS=self.config.gateway.max_inflight_requests,
            RETRY_AFTER_MS=retry_after_ms,
            RETRY_AFTER_SECONDS=-(-retry_after_ms // 1000),  # whole seconds, rounded up
        )
        path = self.state_dir / "envoy.yaml"
        path.write_text(rendered)
        return path

    def start(self, component: str, *, detach: bool = False) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if component in SERVICES and self.config.tls.mode is TlsMode.MTLS:
            certs.ensure(self.cert_dir)
        with open(self.log_path(component), "ab") as log:
            # Logs are appended across runs; errors quote only what this run wrote.
            self._log_offsets[component] = log.tell()
            process = subprocess.Popen(
                self._command(component),
                cwd=REPO_ROOT,
                env=self.environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Detached processes outlive `make up` and ignore the terminal's Ctrl-C.
                start_new_session=detach,
            )
        self.processes[component] = process
        return process

    # --- readiness -------------------------------------------------------------------------------

    def is_ready(self, component: str) -> bool:
        if component == "redis":
            return _redis_ping(self.redis_port)
        if component == "envoy":
            return _edge_reaches_gateway(self.edge_url)
        if component == "mcp":
            return _http_ok(f"{self.mcp_url}/healthz")
        with self.blocking_channel(component) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, components, timeout: float) -> None:
        pending = list(components)
        deadline = time.monotonic() + timeout
        while pending:
            for component in list(pending):
                process = self.processes.get(component)
                if process is not None and process.poll() is not None:
                    raise MeshError(
                        f"{component} exited with code {process.returncode}\n{self.tail(component)}"
                    )
                if self.is_ready(component):
                    pending.remove(component)
            if pending and time.monotonic() > deadline:
                logs = "\n".join(f"--- {c} ---\n{self.tail(c)}" for c in pending)
                raise MeshError(f"not healthy after {timeout:.0f}s: {', '.join(pending)}\n{logs}")
            if pending:
                time.sleep(0.2)

    def tail(self, component: str, lines: int = 40) -> str:
        try:
            with open(self.log_path(component), "rb") as log:
                log.seek(self._log_offsets.get(component, 0))
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(nothing logged)"

    def listening_ports(self) -> dict[int, str]:
        """Every port the mesh listens on → what it is and which setting moves it."""
        ports = {
            getattr(self.config.services, service).port: (
                f"{service} gRPC (SOPHIA__SERVICES__{service.upper()}__PORT)"
            )
            for service in SERVICES
        }
        ports[self.config.edge.port] = "edge (SOPHIA__EDGE__PORT)"
        ports[self.config.mcp.port] = "MCP server (SOPHIA__MCP__PORT)"
        ports[self.config.edge.admin_port] = "Envoy admin (SOPHIA__EDGE__ADMIN_PORT)"
        ports[self.redis_port] = "Redis (SOPHIA_REDIS_URL)"
        base = self.config.telemetry.prometheus_base_port
        if base:
            for service, offset in PROMETHEUS_PORT_OFFSETS.items():
                ports[base + offset] = f"{service} metrics (SOPHIA__TELEMETRY__PROMETHEUS_BASE_PORT)"
        return ports

    def busy_ports(self) -> list[str]:
        """The mesh's ports that something else already holds, each with the setting that moves it."""
        busy = []
        for port, what in sorted(self.listening_ports().items()):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    busy.append(f"port {port} is in use: {what}")
        return busy

    # --- stopping --------------------------------------------------------------------------------

    def stop(self, component: str, timeout: float = 20.0) -> int | None:
        process = self.processes.pop(component, None)
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop_all(self) -> None:
        for component in reversed(COMPONENTS):
            self.stop(component)

    # --- `make up` / `make down` bookkeeping ----------------------------------------------------

    def record(self) -> None:
        entries = {name: {"pid": p.pid, "started": _start_time(p.pid)} for name, p in self.processes.items()}
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(json.dumps(entries, indent=2))

    def recorded(self) -> dict[str, dict]:
        try:
            return json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return {}


def _start_time(pid: int) -> str:
    """The kernel's start time of `pid`: with the pid it identifies one process, even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22 (starttime) comes after the parenthesised command name, which may itself hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:  # HTTPError (e.g. 503 until the Gateway serves) included
        return False


def _edge_reaches_gateway(edge_url: str) -> bool:
    """The edge is ready once it forwards to a healthy Gateway: no key → 401 from the Gateway, not 503."""
    try:
        urllib.request.urlopen(f"{edge_url}/v1/models", timeout=2)
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False
    return True


def up(mesh: Mesh, timeout: float) -> None:
    running = {name for name, entry in mesh.recorded().items() if _alive(entry)}
    if running:
        raise MeshError(f"already running: {', '.join(sorted(running))} (make down first)")
    busy = mesh.busy_ports()
    if busy:
        raise MeshError("cannot start, move these ports with the setting named:\n  " + "\n  ".join(busy))
    try:
        # Each step fails as soon as a process exits, quoting only this run's log lines; the edge starts
        # last, once the Gateway behind it serves.
        for component in ("redis", *SERVICES, "mcp"):
            mesh.start(component, detach=True)
            mesh.record()
            if component == "redis":
                mesh.wait_ready([component], timeout)
        mesh.wait_ready((*SERVICES, "mcp"), timeout)
        mesh.start("envoy", detach=True)
        mesh.record()
        mesh.wait_ready(["envoy"], timeout)
    except MeshError:
        # Nothing was served yet, so there is nothing to drain: stop what started without waiting long.
        down(mesh, timeout=3.0)
        raise
    edge = mesh.edge_url
    dev_key = os.environ.get("SOPHIA_DEV_KEY", "sk-sophia-dev")
    gateway = mesh.address("gateway")
    print(f"""Sophia is up.
  REST (OpenAI-compatible)  {edge}/v1
  MCP (streamable HTTP)     {edge}/mcp   (docs/mcp.md; the server itself: {mesh.mcp_url}/mcp)
  gRPC Gateway              {gateway}   (.venv/bin/grpcurl -plaintext {gateway} list)
  Router                    {mesh.address("router")}
  SemanticCache             {mesh.address("cache")}
  CostLedger                {mesh.address("ledger")}
  ModelInference            {mesh.address("inference")}
  Redis                     127.0.0.1:{mesh.redis_port}
  Envoy admin               http://127.0.0.1:{mesh.config.edge.admin_port}
  Logs                      {mesh.log_dir}/
  Certificates              {mesh.cert_dir}/   (internal services take only mTLS callers, see README)

Try:
  curl -s {edge}/v1/chat/completions -H 'Authorization: Bearer {dev_key}' \\
       -H 'Content-Type: application/json' \\
       -d '{{"model":"auto","messages":[{{"role":"user","content":"What is the capital of France?"}}]}}'
""")


def _alive(entry: dict) -> bool:
    return bool(entry.get("started")) and _start_time(entry["pid"]) == entry["started"]


def down(mesh: Mesh, timeout: float = 30.0) -> None:
    """Stops exactly the processes `up` recorded: same pid *and* same start time (no pid reuse)."""
    entries = mesh.recorded()
    for name in reversed(COMPONENTS):
        entry = entries.get(name)
        if entry and _alive(entry):
            os.kill(entry["pid"], signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(entry) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(entry):
                os.kill(entry["pid"], signal.SIGKILL)
            print(f"stopped {name} (pid {entry['pid']})")
    mesh.pid_file.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    try:
        mesh = Mesh(REPO_ROOT / "var")
        if command == "up":
            up(mesh, timeout=float(os.environ.get("SOPHIA_UP_TIMEOUT", "600")))
        elif command == "down":
            down(mesh)
        elif command == "status":
            for name in COMPONENTS:
                entry = mesh.recorded().get(name)
                state = "running" if entry and _alive(entry) else "stopped"
                print(f"{name:10} {state:8} {'pid ' + str(entry['pid']) if entry else ''}")
        else:
            print("usage: python -m tools.mesh up|down|status", file=sys.stderr)
            return 2
    except (MeshError, ConfigError, TlsError) as exc:
        print(f"sophia: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
