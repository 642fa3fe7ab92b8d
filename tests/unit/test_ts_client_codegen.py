"""The TypeScript client (clients/ts): its code matches the protos, and TypeScript compiles against it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from libs.config import REPO_ROOT

CLIENT = REPO_ROOT / "clients" / "ts"
NODE_BIN = CLIENT / "node_modules" / ".bin"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_BIN / "protoc-gen-es").exists(),
    reason="Node.js or clients/ts/node_modules is missing (make install)",
)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by its relative path."""
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_checked_in_generated_code_matches_the_protos(tmp_path):
    # Generates with the same template as `make clients`, into a scratch directory.
    generated = subprocess.run(
        [
            str(REPO_ROOT / ".venv" / "bin" / "buf"),
            "generate",
            "--template",
            "clients/ts/buf.gen.yaml",
            "-o",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PATH": f"{NODE_BIN}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr
    fresh, checked_in = tree(tmp_path / "src" / "gen"), tree(CLIENT / "src" / "gen")
    stale = sorted(
        name for name in fresh.keys() | checked_in.keys() if fresh.get(name) != checked_in.get(name)
    )
    assert not stale, f"clients/ts/src/gen is stale for {stale}: run `make clients` and commit the result"


def test_a_typescript_caller_compiles_against_the_generated_declarations():
    # tsconfig.json compiles examples/ (the README's usage) with the generated .d.ts files, strict.
    compiled = subprocess.run(
        [str(NODE_BIN / "tsc"), "--noEmit", "-p", str(CLIENT)], capture_output=True, text=True, timeout=180
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
