"""Helpers for tests that run real processes."""

from __future__ import annotations

from libs.config import REPO_ROOT
from tools.ports import free_port, free_port_block, isolated_environ

__all__ = ["free_port", "free_port_block", "mesh_environ"]


def mesh_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Every port moved to a free one, so tests never meet `make up`; model weights shared across runs."""
    return isolated_environ(
        {
            # Converting the GGUF weights takes a while: every test run reuses `make install`'s conversion.
            "SOPHIA__INFERENCE__WEIGHTS_DIR": str(REPO_ROOT / "var" / "models"),
            **(extra or {}),
        }
    )
