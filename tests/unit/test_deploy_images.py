"""The images (deploy/docker): lint, Sophia's image policy, pins, and each service's dependencies."""

import os
import shutil
import subprocess
import sys

import pytest

from tools.deploy_check import images
from tools.deploy_check.common import SERVICE_IMAGES

DOCKERFILE = images.DOCKERFILE.read_text()


def test_the_dockerfile_passes_hadolint_policy_and_copy_checks():
    assert images.hadolint() == []
    assert images.check_policy(DOCKERFILE) == []
    assert images.check_copy_sources(DOCKERFILE, images.DOCKERIGNORE.read_text()) == []
    assert images.check_pins() == []


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n")
    problems = images.hadolint(bad)
    assert any("DL3007" in line for line in problems)  # latest tag
    assert any("DL3008" in line for line in problems)  # unpinned apt package


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("USER 10001:10001\nEXPOSE 50051", "EXPOSE 50051"), "target core: no USER"),
        (("USER 10001:10001\nEXPOSE 50051", "USER root\nEXPOSE 50051"), "target core: USER 'root'"),
        (
            ("ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm", "ARG PYTHON_IMAGE=python:3.11-slim"),
            "not pinned",
        ),
        (('CMD ["python", "-m", "services.gateway"]', ""), "target core: no CMD"),
    ],
)
def test_the_policy_refuses_root_unpinned_and_incomplete_targets(edit, expected):
    old, new = edit
    assert old in DOCKERFILE
    problems = images.check_policy(DOCKERFILE.replace(old, new, 1))
    assert any(expected in problem for problem in problems), problems


def test_a_copy_of_a_missing_or_ignored_file_is_reported():
    missing = DOCKERFILE.replace("COPY config/ config/", "COPY configs/ config/", 1)
    assert any(
        "COPY configs/" in p for p in images.check_copy_sources(missing, images.DOCKERIGNORE.read_text())
    )
    ignore = images.DOCKERIGNORE.read_text().replace("!config/\n", "")
    assert any("excluded" in p for p in images.check_copy_sources(DOCKERFILE, ignore))


def test_the_ignore_file_keeps_secrets_and_the_venv_out_of_the_build_context():
    ignore = images.DOCKERIGNORE.read_text()
    for path in (".venv/bin/python", "var/certs/ca-key.pem", "deploy/compose/secrets.env", ".git/config"):
        assert not images.sent_to_builder(path, ignore), path
    for path in ("libs/config.py", "services/gateway/__main__.py", "deploy/docker/healthcheck.py"):
        assert images.sent_to_builder(path, ignore), path


def test_a_pin_that_differs_from_requirements_txt_is_reported(tmp_path):
    root = tmp_path
    shutil.copytree(images.REPO_ROOT / "deploy" / "docker", root / "deploy" / "docker")
    shutil.copy(images.REPO_ROOT / "requirements.txt", root / "requirements.txt")
    shutil.copy(images.REPO_ROOT / "Makefile", root / "Makefile")
    core = root / "deploy" / "docker" / "requirements-core.txt"
    core.write_text(core.read_text().replace("redis==8.1.0", "redis==7.0.0"))
    (root / "deploy" / "docker" / "Dockerfile").write_text(
        DOCKERFILE.replace("torch==2.13.0", "torch==2.12.0")
    )
    problems = images.check_pins(root)
    assert any("redis==7.0.0" in p for p in problems)
    assert any("torch==2.12.0" in p for p in problems)


@pytest.mark.parametrize("service", sorted(SERVICE_IMAGES))
def test_each_service_imports_only_what_its_image_installs(service):
    assert images.check_service_dependencies(service) == []


def test_a_missing_dependency_and_torch_in_the_core_image_are_reported(tmp_path):
    docker = tmp_path / "deploy" / "docker"
    shutil.copytree(images.REPO_ROOT / "deploy" / "docker", docker)
    core = docker / "requirements-core.txt"
    core.write_text(core.read_text().replace("httptools==0.9.0\n", "") + "torch\n")
    problems = images.check_service_dependencies("gateway", tmp_path)
    assert any(p.startswith("gateway imports httptools") for p in problems), problems
    assert "the core image would carry torch" in problems


def test_the_protos_stage_generates_everything_from_only_what_it_copies(tmp_path):
    """The build's `protos` stage, replayed: its COPY sources alone, then its generator."""
    _, stages = images.parse_stages(DOCKERFILE)
    protos = next(stage for stage in stages if stage.name == "protos")
    for arguments in protos.arguments("COPY"):
        *sources, destination = arguments.split()
        for source in sources:
            path = images.REPO_ROOT / source
            target = tmp_path / destination / (path.name if not source.endswith("/") else "")
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    assert protos.arguments("RUN")[-1] == "PY=python bash scripts/gen_protos.sh"
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        ["bash", "scripts/gen_protos.sh"],
        cwd=tmp_path,
        env={**environ, "PY": sys.executable},
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    for generated in (
        "libs/gen/sophia/gateway/v1/gateway_pb2.py",
        "build/sophia.pb",
        "deploy/envoy/edge_schema.lua",
    ):
        assert (tmp_path / generated).is_file(), generated


def test_the_data_files_the_config_names_and_the_build_time_weights_are_checked():
    text = images.DOCKERFILE.read_text()
    assert images.check_data_files(text) == []
    assert "config/router_examples.npz" in images.config_data_files()
    without_config = text.replace("COPY config/ config/\n", "")
    assert without_config != text
    problems = images.check_data_files(without_config)
    assert "image ml lacks config/flags.yaml (config/sophia.yaml reads it)" in problems, problems
    assert "image core lacks config/router_examples.npz (config/sophia.yaml reads it)" in problems, problems
    unprepared = text.replace("RUN python -m services.inference.prepare", "RUN true")
    problems = images.check_data_files(unprepared)
    assert problems == ["no weights stage runs python -m services.inference.prepare"], problems
