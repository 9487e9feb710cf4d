"""Container images: the Dockerfiles are buildable from this repository (no Docker engine here, so they are
checked statically), and every place that names an image (component YAMLs, compiled pipelines, manifests)
names the one ``metarec.images`` gives for this package version."""

from __future__ import annotations

import glob
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metarec import __version__, images

REPO_ROOT = Path(__file__).resolve().parents[1]
# images/pod_emulation.py (make fidelity's serving phase), on the path as images/fidelity.py puts it: the
# one Dockerfile parser, which that phase also uses for the image's CMD and ENV.
sys.path.insert(0, str(REPO_ROOT / "images"))
import pod_emulation  # noqa: E402

DOCKERFILES = {
    "components": REPO_ROOT / "images/components.Dockerfile",
    "serving": REPO_ROOT / "images/serving.Dockerfile",
}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """The Dockerfile's ``(INSTRUCTION, arguments)`` pairs, parsed as ``images/pod_emulation.py`` parses them
    (continuation lines joined, comment lines dropped)."""
    return pod_emulation.dockerfile_instructions(path.name.removesuffix(".Dockerfile"))


def build_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Returns the default value of every ``ARG NAME=value``.

    Args:
        instructions: Parsed Dockerfile.
    """
    defaults = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, value = arguments.split("=", 1)
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def _expand(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def copy_sources(instructions: list[tuple[str, str]]) -> list[str]:
    """Lists the build-context paths the Dockerfile COPYs or ADDs (``--from`` stages excluded).

    Args:
        instructions: Parsed Dockerfile.

    Returns:
        Source paths relative to the build context (the repository root).
    """
    sources = []
    for keyword, arguments in instructions:
        if keyword not in ("COPY", "ADD"):
            continue
        tokens = shlex.split(arguments)
        if any(token.startswith("--from") for token in tokens):
            continue
        paths = [token for token in tokens if not token.startswith("--")]
        sources += paths[:-1]
    return sources


def _user(instructions) -> str:
    return _expand(
        [arguments for keyword, arguments in instructions if keyword == "USER"][-1], build_args(instructions)
    )


# ----------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_copied_path_exists(name):
    sources = copy_sources(dockerfile_instructions(DOCKERFILES[name]))
    assert "src/" in sources and "pyproject.toml" in sources
    missing = [source for source in sources if not glob.glob(str(REPO_ROOT / source))]
    assert not missing, f"{DOCKERFILES[name].name} copies paths absent from the repository: {missing}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerignore_keeps_copied_paths(name):
    """BuildKit reads ``<Dockerfile>.dockerignore``; a pattern matching a COPY source breaks the build."""
    import fnmatch

    ignore_file = DOCKERFILES[name].with_name(DOCKERFILES[name].name + ".dockerignore")
    assert ignore_file.is_file()
    patterns = [
        p.strip() for p in ignore_file.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert ".git" in patterns and ".venv" in patterns
    for source in copy_sources(dockerfile_instructions(DOCKERFILES[name])):
        top = source.rstrip("/").split("/")[0]
        clashes = [p for p in patterns if fnmatch.fnmatch(source.rstrip("/"), p) or fnmatch.fnmatch(top, p)]
        assert not clashes, f"{ignore_file.name} excludes {source} via {clashes}"


def test_copy_parser_sees_flags_and_stages():
    instructions = [("COPY", "--chown=1:1 a.txt b/ /dst/"), ("COPY", "--from=build /x /y"), ("ADD", "c /z")]
    assert copy_sources(instructions) == ["a.txt", "b/", "c"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_pinned_and_user_not_root(name):
    instructions = dockerfile_instructions(DOCKERFILES[name])
    defaults = build_args(instructions)
    base = _expand(next(arguments for keyword, arguments in instructions if keyword == "FROM"), defaults)
    repository, _, tag = base.partition(":")
    assert repository == "python" and tag.startswith("3.11.") and "slim" in tag, base
    user = _user(instructions).split(":")[0]
    assert user.isdigit() and int(user) != 0, (
        f"USER must be a numeric non-root UID (runAsNonRoot), got {user}"
    )
    entry = " ".join(arguments for keyword, arguments in instructions if keyword in ("CMD", "ENTRYPOINT"))
    assert "pip" not in entry, "nothing may be pip-installed at run time"
    run_lines = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    torch_install = next(line for line in run_lines if "torch==" in line)
    assert '"torch==2.13.0"' in _expand(torch_install, defaults)
    assert "download.pytorch.org/whl/" in _expand(torch_install, defaults)
    # The extras come from the one install spec images/<name>.extras (what `make fidelity` replays).
    spec = f"images/{name}.extras"
    assert any(f"\".[$(grep -v '^#' {spec})]\"" in line for line in run_lines), f"not installed from {spec}"
    assert spec in copy_sources(instructions)
    assert any("pip check" in line for line in run_lines)


def test_serving_image_layout():
    instructions = dockerfile_instructions(DOCKERFILES["serving"])
    exposed = {
        port for keyword, arguments in instructions if keyword == "EXPOSE" for port in arguments.split()
    }
    assert exposed == {"8080", "8082"}
    run_lines = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    assert "openjdk-17-jre-headless" in run_lines
    assert "/home/model-server/model-store" in run_lines
    copies = [shlex.split(arguments) for keyword, arguments in instructions if keyword == "COPY"]
    config_copy = next(tokens for tokens in copies if tokens[-1] == "/home/model-server/config.properties")
    config = dict(
        line.split("=", 1)
        for line in (REPO_ROOT / config_copy[-2]).read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert config["management_address"].startswith("unix:")  # metarec.torchserve_config: no TCP listener
    assert config["inference_address"].endswith(":8080") and config["metrics_address"].endswith(":8082")
    assert config["model_store"] == "/home/model-server/model-store"
    assert config["enable_model_api"] == "false"
    entrypoint = next(arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT")
    assert "tini" in entrypoint and "tini" in run_lines  # PID 1 that forwards SIGTERM
    command = next(arguments for keyword, arguments in instructions if keyword == "CMD")
    assert "/home/model-server/config.properties" in command and "--foreground" in command


def test_image_user_matches_manifests():
    """The pods' runAsUser must be the image's user (file ownership of /home/model-server)."""
    uid = int(_user(dockerfile_instructions(DOCKERFILES["serving"])).split(":")[0])
    deployment = yaml.safe_load((REPO_ROOT / "manifests/serving/base/deployment.yaml").read_text())
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


# ----------------------------------------------------------------------------------------------
# Image names


@pytest.fixture
def default_registry(monkeypatch):
    """Committed YAMLs and manifests use the default registry."""
    monkeypatch.delenv("METAREC_REGISTRY", raising=False)


def _executor_images(document: dict) -> set[str]:
    executors = ((document or {}).get("deploymentSpec") or {}).get("executors") or {}
    return {executor["container"]["image"] for executor in executors.values() if "container" in executor}


def test_image_names_follow_the_package_version(default_registry, monkeypatch):
    assert images.components_image() == f"ghcr.io/metarec/metarec-components:{__version__}"
    assert images.serving_image() == f"ghcr.io/metarec/metarec-serving:{__version__}"
    monkeypatch.setenv("METAREC_REGISTRY", "europe-docker.pkg.dev/p/r/")
    assert images.serving_image() == f"europe-docker.pkg.dev/p/r/metarec-serving:{__version__}"


def _make_push(tmp_path: Path, existing: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`make push` with a stand-in `docker` on PATH (there is no Docker engine here) that logs its calls
    and knows the tags named in ``existing`` as already in the registry."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    log = tmp_path / "docker.log"
    docker = tmp_path / "bin" / "docker"
    docker.parent.mkdir(parents=True)
    docker.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'if [ "$1" = manifest ]; then case " $EXISTING " in *" $3 "*) exit 0;; esac; exit 1; fi\n'
        "exit 0\n"
    )
    docker.chmod(0o755)
    env = {"PATH": f"{docker.parent}:/usr/bin:/bin", "EXISTING": existing, "HOME": str(tmp_path)}
    done = subprocess.run(["make", "-s", "push", "REGISTRY=reg.example/metarec", *extra], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    return done, log.read_text().splitlines() if log.exists() else []


def test_push_never_overwrites_a_released_tag(tmp_path):
    released = f"reg.example/metarec/metarec-serving:{__version__}-cuda"
    done, calls = _make_push(tmp_path, released)
    assert done.returncode != 0
    assert f"{released} already exists: bump __version__" in done.stderr
    assert not [call for call in calls if call.startswith("push")]


def test_push_pushes_every_new_tag(tmp_path):
    done, calls = _make_push(tmp_path, "")
    assert done.returncode == 0, done.stderr
    pushed = {call.split()[1] for call in calls if call.startswith("push")}
    assert pushed == {f"reg.example/metarec/metarec-{image}:{__version__}{suffix}"
                      for image in ("components", "serving") for suffix in ("", "-cuda")}  # fmt: skip
    done, calls = _make_push(tmp_path / "again", f"reg.example/metarec/metarec-serving:{__version__}",
                             "ALLOW_OVERWRITE=1")  # fmt: skip
    assert done.returncode == 0 and len([call for call in calls if call.startswith("push")]) == 4


def test_component_yamls_name_the_components_image(default_registry):
    paths = sorted((REPO_ROOT / "components").glob("*/component.yaml"))
    if not paths:
        pytest.skip("no components/*/component.yaml yet (written by the components part)")
    for path in paths:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        found = set().union(*(_executor_images(doc) for doc in documents))
        assert found == {images.components_image()}, f"{path.relative_to(REPO_ROOT)} names {found}"


@pytest.mark.slow
def test_compiled_pipelines_name_the_components_image(default_registry, tmp_path):
    # A plain import: the pipelines are part of the project, and one that cannot be imported must fail
    # here, not skip as "not written yet".
    from metarec.pipelines import compile as compile_module

    paths = compile_module.compile_all(tmp_path)
    assert paths
    for path in paths:
        documents = [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]
        found = set().union(*(_executor_images(doc) for doc in documents))
        # Only the gpu variant's training step runs the CUDA build; every other step the CPU build.
        expected = {images.components_image()} | (
            {images.components_image(cuda=True)} if "-gpu" in Path(path).name else set()
        )
        assert found == expected, f"{Path(path).name} names {found}"


def _rendered_images(kustomization: str) -> set[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render the manifests")
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO_ROOT / "manifests" / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"^\s*(?:- )?image: (\S+)$", result.stdout, flags=re.MULTILINE))


@pytest.mark.parametrize(
    ("kustomization", "expected", "cuda"),
    [
        ("serving/overlays/gke-cpu", "serving", False),
        ("serving/overlays/gke-gpu", "serving", True),
        ("serving/overlays/kserve", "serving", False),
        ("training-example", "components", True),
        ("katib", "components", False),
    ],
)
def test_manifests_name_the_release_images(default_registry, kustomization, expected, cuda):
    """CPU and CUDA builds have distinct tags; what asks for a GPU names the CUDA one, the rest the CPU one."""
    expected_image = {"serving": images.serving_image, "components": images.components_image}[expected](cuda)
    assert _rendered_images(kustomization) == {expected_image}


def test_cpu_and_cuda_images_have_distinct_tags(default_registry):
    assert images.components_image() != images.components_image(cuda=True)
    assert images.serving_image(cuda=True).endswith(f":{__version__}-cuda")


# ----------------------------------------------------------------------------------------------
# Install specs cover what the code needs (fast; `make fidelity` runs the real thing)


def image_extras(name: str) -> list[str]:
    """The extras of ``images/<name>.extras`` (the Dockerfile installs exactly these)."""
    lines = (REPO_ROOT / "images" / f"{name}.extras").read_text().splitlines()
    text = ",".join(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    return [extra.strip() for extra in text.split(",") if extra.strip()]


def _distribution_closure(requirements: list[str]) -> set[str]:
    """Normalised names of the distributions ``requirements`` pull in, transitively (as installed here)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen: set[str] = set()
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(requirement.name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            child = Requirement(text)
            if child.marker is None or child.marker.evaluate({"extra": ""}):
                pending.append(child)
    return seen


def installed_by(image: str) -> set[str]:
    """Distributions the image installs: torch, the core dependencies and its extras, transitively."""
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = ["torch", *project["dependencies"]]
    for extra in image_extras(image):
        requirements += project["optional-dependencies"][extra]
    return _distribution_closure(requirements)


def _module_file(module: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


# Peer reference models (scikit-surprise, LightFM) are quality-bench references, not part of any image:
# asking the evaluate component for them without the bench extra is a ValueError naming the extra
# (test_peers), so the check does not follow that import.
BENCH_ONLY = frozenset({"metarec.peers"})


def code_needs(entry: Path) -> tuple[set[str], set[str]]:
    """Third-party top-level modules of everything ``entry`` imports from metarec, transitively, and the
    string constants of ``entry`` and the modules it imports directly (where the executables a step runs
    are named: the step function the component calls).

    Every import counts, lazy ones inside functions included: the image must hold what any code path of
    the component may import. The one exception is :data:`BENCH_ONLY`: modules whose packages are a
    bench extra by design and which refuse, naming the extra, when it is absent.
    """
    import ast
    import sys

    modules, strings, done, todo = set(), set(), set(), [(entry, 0)]
    while todo:
        path, depth = todo.pop()
        if path in done:
            continue
        done.add(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and depth <= 1:
                strings.add(node.value)
            for name in names:
                top = name.split(".")[0]
                if top == "metarec":
                    if any(name == m or name.startswith(f"{m}.") for m in BENCH_ONLY):
                        continue
                    found = _module_file(name)
                    if found is not None:
                        todo.append((found, depth + 1))
                    parent = _module_file(name.rsplit(".", 1)[0]) if "." in name else None
                    if parent is not None:
                        todo.append((parent, depth + 1))
                elif top not in sys.stdlib_module_names and top != "__future__":
                    modules.add(top)
    return modules, strings


def _providers() -> tuple[dict[str, set[str]], dict[str, str]]:
    """Module -> distributions, and console script -> distribution, for what is installed here."""
    import importlib.metadata as md

    modules = {m: {d.lower().replace("_", "-") for d in ds} for m, ds in md.packages_distributions().items()}
    scripts = {}
    for dist in md.distributions():
        for entry_point in dist.entry_points:
            if entry_point.group == "console_scripts":
                scripts[entry_point.name] = dist.metadata["Name"].lower().replace("_", "-")
    return modules, scripts


def missing_from_image(image: str, entry: Path) -> list[str]:
    """What the code reachable from ``entry`` imports or executes that the image does not install."""
    installed = installed_by(image) | {"metarec"}
    module_dists, scripts = _providers()
    modules, strings = code_needs(entry)
    missing = [m for m in sorted(modules) if module_dists.get(m) and not module_dists[m] & installed]
    missing += [f"{s} (executable)" for s in sorted(strings & set(scripts)) if scripts[s] not in installed]
    return missing


@pytest.mark.parametrize("component", __import__("metarec.components.build").components.build.COMPONENT_NAMES)
def test_components_image_installs_what_each_component_needs(component):
    missing = missing_from_image("components", REPO_ROOT / "components" / component / "component.py")
    assert not missing, f"{component} needs {missing}, which images/components.extras does not install"


def test_serving_image_installs_what_the_handler_needs():
    assert not missing_from_image("serving", REPO_ROOT / "serving" / "handler.py")


def test_spec_check_catches_a_missing_executable(monkeypatch):
    """The check fails the old spec: package_model runs torch-model-archiver, [pipelines] lacks it."""
    monkeypatch.setattr(sys.modules[__name__], "image_extras", lambda name: ["pipelines"])
    missing = missing_from_image("components", REPO_ROOT / "components" / "package_model" / "component.py")
    assert "torch-model-archiver (executable)" in missing


# ----------------------------------------------------------------------------------------------
# Retargeting to another registry: the documented `kustomize edit set image` lines, run on a copy

SET_IMAGE = re.compile(
    r"^cd (manifests/\S+) && kustomize edit set image (\S+)=REGISTRY/(\S+):VERSION(\S*)", re.MULTILINE
)


def _set_image(folder: Path, name: str, image: str) -> None:
    """What ``kustomize edit set image NAME=NEWNAME:TAG`` does to ``folder/kustomization.yaml``: update the
    ``images:`` entry for NAME, or add one."""
    path = folder / "kustomization.yaml"
    document = yaml.safe_load(path.read_text())
    new_name, new_tag = image.rsplit(":", 1)
    entries = document.setdefault("images", [])
    entry = next((e for e in entries if e["name"] == name), None)
    if entry is None:
        entries.append(entry := {"name": name})
    entry.update(newName=new_name, newTag=new_tag)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def test_documented_registry_retargeting_reaches_every_pod(tmp_path):
    """After the README's one step per kustomization, every overlay names the new registry's images, the
    CUDA tag where a GPU is asked for (before: gke-gpu fell back to the CPU image, the KServe image was a
    literal `images:` did not rewrite, and training-example was never retargeted)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is not installed: cannot render the manifests")
    shutil.copytree(REPO_ROOT / "manifests", tmp_path / "manifests")
    steps = SET_IMAGE.findall((REPO_ROOT / "manifests/README.md").read_text())
    registry, version = "reg.example/team", "9.9.9"
    for folder, name, repository, suffix in steps:
        _set_image(tmp_path / folder, name, f"{registry}/{repository}:{version}{suffix}")
    assert {folder for folder, *_ in steps} >= {
        "manifests/serving/base",
        "manifests/training-example",
        "manifests/katib",
    }
    serving, cuda = f"{registry}/metarec-serving:{version}", f"{registry}/metarec-serving:{version}-cuda"
    expected = {
        "serving/overlays/gke-cpu": {serving},
        "serving/overlays/gke-cpu-redis": {serving},
        "serving/overlays/gke-gpu": {cuda},
        "serving/overlays/kserve": {serving},
        "serving/overlays/kserve-istio": {serving},
        "training-example": {f"{registry}/metarec-components:{version}-cuda"},
        "katib": {f"{registry}/metarec-components:{version}"},
    }
    for kustomization, images_there in expected.items():
        result = subprocess.run(
            ["kubectl", "kustomize", str(tmp_path / "manifests" / kustomization)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        found = set(re.findall(r"^\s*(?:- )?image: (\S+)$", result.stdout, flags=re.MULTILINE))
        assert {image for image in found if "metarec-" in image} == images_there, kustomization
