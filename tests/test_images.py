"""Container images: the Dockerfiles are buildable from this repository (no Docker engine here, so they are
checked statically), and every place that names an image (component YAMLs, compiled pipelines, manifests)
names the one ``metarec.images`` gives for this package version."""

from __future__ import annotations

import glob
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from metarec import __version__, images

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "components": REPO_ROOT / "docker/components.Dockerfile",
    "serving": REPO_ROOT / "docker/serving.Dockerfile",
}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """Parses a Dockerfile into ``(INSTRUCTION, arguments)`` pairs.

    Args:
        path: The Dockerfile.

    Returns:
        Instructions in order, continuation lines joined and comment lines dropped.
    """
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        keyword, _, arguments = current.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


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
    extra = {"components": "pipelines", "serving": "serving"}[name]
    assert any(f'".[{extra}]"' in line for line in run_lines), f"the project is not installed with [{extra}]"
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
    compile_module = pytest.importorskip("metarec.pipelines.compile", reason="pipelines not written yet")
    paths = compile_module.compile_all(tmp_path)
    assert paths
    for path in paths:
        documents = [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]
        found = set().union(*(_executor_images(doc) for doc in documents))
        assert found == {images.components_image()}, f"{Path(path).name} names {found}"


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
    ("kustomization", "expected"),
    [
        ("serving/overlays/gke-cpu", "serving"),
        ("serving/overlays/gke-gpu", "serving"),
        ("serving/overlays/kserve", "serving"),
        ("training", "components"),
    ],
)
def test_manifests_name_the_release_images(default_registry, kustomization, expected):
    expected_image = {"serving": images.serving_image, "components": images.components_image}[expected]()
    assert _rendered_images(kustomization) == {expected_image}
