"""Shared plumbing for every Sophia service: config, server bootstrap, client channels, telemetry, logging."""

import pathlib
import sys

# Generated protobuf modules import each other as top-level `sophia.*` packages, so the folder they are
# generated into (by `make gen`) has to be importable before any service touches a stub.
_GENERATED = pathlib.Path(__file__).resolve().parent / "gen"
if str(_GENERATED) not in sys.path:
    sys.path.insert(0, str(_GENERATED))
