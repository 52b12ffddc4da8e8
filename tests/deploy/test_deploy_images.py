"""The Dockerfiles, checked without a container engine: what they COPY exists (or a documented
build step makes it), they run the installed `vae-serve` as a non-root user on the settings'
ports, and the serving image carries neither torch nor a compiler."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from service.settings import DEFAULT_METRICS_PORT, DEFAULT_PORT

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
# COPY sources that are not in git but made by a step `make image` runs before building:
# path prefix -> that step's make target.
BUILD_OUTPUTS = {"models/": "model"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|[\w.+-]+-dev)\b")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- a small Dockerfile reader: enough for the instructions these files use ----


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    base: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                values[key] = value
        return values


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found


def substitute(text: str, variables: dict[str, str]) -> str:
    """${NAME} and $NAME from ARG defaults; unknown names are left as they are."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def parse(path: Path) -> Dockerfile:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue  # comments (and the syntax directive), also inside continued lines
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG":
            name, _, default = args.partition("=")
            target = stages[-1].args if stages else global_args
            target[name] = substitute(default.strip('"'), global_args | target)
        elif keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = substitute(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return Dockerfile(global_args, stages)


@dataclass
class Copy:
    stage: Stage
    sources: list[str]
    destination: str
    from_stage: str | None


def copies(dockerfile: Dockerfile) -> list[Copy]:
    found = []
    for stage in dockerfile.stages:
        variables = dockerfile.global_args | stage.args
        for keyword in ("COPY", "ADD"):
            for args in stage.all(keyword):
                words = shlex.split(substitute(args, variables))
                flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
                paths = [w for w in words if not w.startswith("--")]
                found.append(Copy(stage, paths[:-1], paths[-1], flags.get("from")))
    return found


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last pattern matching
    the path or one of its parents wins; `!` patterns re-include."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


@pytest.fixture(params=sorted(DOCKERFILES))
def image(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def dockerfile(image: str) -> Dockerfile:
    return parse(DOCKERFILES[image])


def image_build_steps(target: str) -> list[str]:
    """What `make <target>` runs, in order, as `make -n` prints it (no engine, no model)."""
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", target, "CONTAINER_ENGINE=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def in_repository(path: str) -> bool:
    """Whether git tracks `path` (a file, or a directory with tracked files): what a fresh
    clone has, not what happens to lie in this checkout."""
    result = subprocess.run(
        ["git", "ls-files", "--", path], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:  # not a git checkout (e.g. an unpacked source archive)
        return (REPO / path).exists()
    return bool(result.stdout.strip())


def runs_before_build(steps: list[str], make_target: str) -> bool:
    (build,) = [i for i, line in enumerate(steps) if line.startswith("true build ")]
    return f"make --no-print-directory {make_target}" in steps[:build]


# ---- what goes into the image ----


def test_every_copy_source_exists_or_is_built_first(image: str, dockerfile: Dockerfile) -> None:
    steps = image_build_steps("image" if image == "cpu" else f"image-{image}")
    stage_names = [s.name for s in dockerfile.stages]
    for copy in copies(dockerfile):
        if copy.from_stage is not None:
            earlier = stage_names[: stage_names.index(copy.stage.name)]
            assert copy.from_stage in earlier, f"COPY --from={copy.from_stage}: no earlier stage"
            continue
        for source in copy.sources:
            assert "$" not in source, f"{source}: a variable without a default"
            assert not dockerignored(source), f"{source} is excluded by .dockerignore"
            made_by = [t for prefix, t in BUILD_OUTPUTS.items() if source.startswith(prefix)]
            if made_by:
                assert runs_before_build(steps, made_by[0]), f"make runs no {made_by[0]} first"
            else:
                assert in_repository(source), f"{source} is not in the repository (git)"


def test_model_source_picks_a_stage_for_baked_and_mounted(dockerfile: Dockerfile) -> None:
    names = {s.name for s in dockerfile.stages}
    assert {"model-baked", "model-mounted"} <= names
    assert dockerfile.global_args["MODEL_SOURCE"] == "baked"
    assert dockerfile.stage("model").base == "model-baked"
    baked = dockerfile.stage("model-baked")
    (copy,) = [c for c in copies(dockerfile) if c.stage is baked]
    model_name = baked.args["MODEL_NAME"]
    assert copy.sources == [f"models/{model_name}/"]
    assert (
        copy.destination.rstrip("/") == f"{dockerfile.final.env()['VAE_MODEL_REPO']}/{model_name}"
    )


def test_the_context_holds_the_sources_and_not_the_rest() -> None:
    for kept in ("pyproject.toml", "service/settings.py", "export/manifest.py", "models/x/1"):
        assert not dockerignored(kept), kept
    for dropped in (".venv/bin/python", "runs/default/best.pt", ".git/HEAD", "tests/conftest.py"):
        assert dockerignored(dropped), dropped
    assert dockerignored("service/__pycache__/settings.cpython-312.pyc")


# ---- how it runs ----


def test_entrypoint_is_the_installed_vae_serve(dockerfile: Dockerfile) -> None:
    assert PYPROJECT["project"]["scripts"]["vae-serve"] == "service.__main__:main"
    (entrypoint,) = dockerfile.final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["vae-serve"]
    assert dockerfile.final.env()["PATH"].startswith("/opt/venv/bin:")
    assert any(c.sources == ["/opt/venv"] and c.from_stage == "build" for c in copies(dockerfile))


def test_user_is_numeric_non_root_and_the_one_kubernetes_runs(dockerfile: Dockerfile) -> None:
    (user,) = dockerfile.final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric UID lets Kubernetes verify runAsNonRoot"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    deployment = yaml.safe_load((REPO / "deploy/k8s/base/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsUser"] == int(uid)


def test_exposed_ports_are_the_settings_defaults(dockerfile: Dockerfile) -> None:
    exposed = {
        int(p.split("/")[0]) for args in dockerfile.final.all("EXPOSE") for p in args.split()
    }
    assert exposed == {DEFAULT_PORT, DEFAULT_METRICS_PORT}


def test_environment_suits_a_read_only_root_and_large_replies(dockerfile: Dockerfile) -> None:
    env = dockerfile.final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"].startswith("/tmp") and env["TMPDIR"].startswith("/tmp")
    # The allocator defaults measured for large replies, as the Makefile sets them.
    makefile = (REPO / "Makefile").read_text()
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        match = re.search(rf"^export {name} \?= (\d+)$", makefile, re.MULTILINE)
        assert match, f"the Makefile no longer sets {name}"
        assert env[name] == match.group(1), name
    # The model repository is where the Kubernetes config says it is.
    config = (REPO / "deploy/k8s/base/vae-serve.env").read_text()
    assert f"VAE_MODEL_REPO={env['VAE_MODEL_REPO']}\n" in config


# ---- what stays out ----


def test_no_torch_training_extra_or_compiler(dockerfile: Dockerfile) -> None:
    for stage in dockerfile.stages:
        for run in stage.all("RUN"):
            assert "torch" not in run, f"{stage.name}: {run}"
            assert not re.search(r"\[[^\]]*train", run), f"{stage.name} installs the train extra"
            assert not COMPILERS.search(run), f"{stage.name} installs a compiler: {run}"
            # pip installs only the generated serving requirements, and the package without
            # its declared dependencies.
            for command in re.split(r"&&|;", run):
                if "pip install" in command:
                    assert re.search(r"-r requirements\.txt$|--no-deps \.$", command.strip()), (
                        f"{stage.name}: unexpected install: {command.strip()}"
                    )


def test_the_server_imports_without_the_training_dependencies() -> None:
    """What the image build checks with `python -I -c "import service.__main__"`, here with the
    training extra's packages made unimportable."""
    training = [
        re.split(r"[^A-Za-z0-9_-]", d)[0]
        for d in PYPROJECT["project"]["optional-dependencies"]["train"]
    ]
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in training)
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; {block}; import service.__main__"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_serving_requirements_are_the_base_dependencies_only(image: str) -> None:
    requirement = "onnxruntime==1.0" if image == "cpu" else "onnxruntime-gpu==1.0"
    result = subprocess.run(
        [sys.executable, str(DOCKER / "serving_requirements.py"), "pyproject.toml", requirement],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    base = [d for d in PYPROJECT["project"]["dependencies"] if not d.startswith("onnxruntime")]
    assert lines == [*base, requirement]
    assert not any("torch" in line for line in lines)


def test_serving_requirements_refuse_a_wrong_replacement() -> None:
    result = subprocess.run(
        [sys.executable, str(DOCKER / "serving_requirements.py"), "pyproject.toml", "torch"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "expected an onnxruntime" in result.stderr


# ---- ONNX Runtime and CUDA ----


def test_images_pin_one_onnxruntime_that_pyproject_allows() -> None:
    pins = {
        name: parse(path).stage("build").args["ONNXRUNTIME_VERSION"]
        for name, path in DOCKERFILES.items()
    }
    assert len(set(pins.values())) == 1, f"the images pin different ONNX Runtimes: {pins}"
    (spec,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("onnxruntime-gpu")]
    assert SpecifierSet(spec.removeprefix("onnxruntime-gpu")).contains(pins["cpu"])
    for name, wheel in (("cpu", "onnxruntime=="), ("gpu", "onnxruntime-gpu==")):
        runs = " ".join(parse(DOCKERFILES[name]).stage("build").all("RUN"))
        assert f'"{wheel}${{ONNXRUNTIME_VERSION}}"' in runs, (
            f"{name} image does not install {wheel}"
        )


def test_gpu_base_has_the_cuda_major_of_the_wheel() -> None:
    """onnxruntime-gpu needs the CUDA major version it was built with. The wheel in this venv
    tells which one, when it is the version the image pins."""
    build_info = pytest.importorskip("onnxruntime.capi.build_and_package_info")
    gpu = parse(DOCKERFILES["gpu"])
    pinned = gpu.stage("build").args["ONNXRUNTIME_VERSION"]
    if build_info.package_name != "onnxruntime-gpu" or build_info.__version__ != pinned:
        pytest.skip(
            f"the venv has {build_info.package_name} {build_info.__version__}, the image pins "
            f"onnxruntime-gpu {pinned}: cannot tell the CUDA version that one needs"
        )
    match = re.fullmatch(
        r"nvidia/cuda:(\d+)\.[\d.]+-cudnn-runtime-[\w.]+", gpu.global_args["CUDA_IMAGE"]
    )
    assert match, f"not an nvidia/cuda cudnn runtime image: {gpu.global_args['CUDA_IMAGE']}"
    assert match.group(1) == build_info.cuda_version.split(".")[0]
