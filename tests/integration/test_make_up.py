"""`make up` (tools.mesh.up) fails fast and clearly: a busy port is named with the setting that moves it
before anything starts, and a service that exits ends the start-up at once, quoting only this run's log."""

from __future__ import annotations

import socket
import time

import pytest

from tests.support import mesh_environ
from tools.mesh import Mesh, MeshError, up


def test_a_busy_port_is_named_with_its_setting_before_anything_starts(tmp_path):
    mesh = Mesh(tmp_path, mesh_environ())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", mesh.config.services.ledger.port))
        holder.listen()
        with pytest.raises(MeshError) as raised:
            up(mesh, timeout=60)
    message = str(raised.value)
    assert f"port {mesh.config.services.ledger.port} is in use" in message
    assert "SOPHIA__SERVICES__LEDGER__PORT" in message
    assert not mesh.processes, "nothing may start while a port is busy"


def test_a_service_that_exits_ends_the_start_up_at_once_with_this_runs_log(tmp_path):
    # An address nobody can bind: the Router exits right after start.
    mesh = Mesh(tmp_path, mesh_environ({"SOPHIA__SERVICES__ROUTER__HOST": "192.0.2.1"}))
    mesh.log_dir.mkdir(parents=True)
    mesh.log_path("router").write_text("a line from an earlier run\n")
    started = time.monotonic()
    with pytest.raises(MeshError) as raised:
        up(mesh, timeout=600)
    assert time.monotonic() - started < 120, "start-up waited for a timeout instead of the exit"
    message = str(raised.value)
    assert "router exited" in message
    assert "cannot listen on 192.0.2.1" in message
    assert "a line from an earlier run" not in message
    assert not mesh.recorded(), "what was started is stopped again"
