"""Paths and helpers shared by the deployment checks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from libs.config import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
VENV_BIN = REPO_ROOT / ".venv" / "bin"
# The services, each with its own entry point `python -m services.<name>`.
SERVICES = ("gateway", "router", "cache", "ledger", "inference")
# Which image runs which service (deploy/docker/Dockerfile targets): torch and FAISS only in `ml`.
SERVICE_IMAGES = {
    "gateway": "core",
    "ledger": "core",
    "router": "ml",
    "cache": "ml",
    "inference": "ml",
    "mcp": "mcp",
}


class ToolMissing(Exception):
    """A validator binary is not installed (make install puts them in .venv/bin)."""


def tool(name: str) -> str:
    """The path of a validator installed by `make install`."""
    path = VENV_BIN / name
    if not path.exists():
        raise ToolMissing(f"{path} is missing: run make install")
    return str(path)


def run(command: list[str], *, cwd: Path = REPO_ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "NO_COLOR": "1"}
    )


def load_yaml_documents(text: str) -> list[Any]:
    return [document for document in yaml.safe_load_all(text) if document is not None]


def relative(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
