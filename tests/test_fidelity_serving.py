"""The serving phase of ``images/fidelity.py`` (``images/fidelity_serving.py``) runs what the pod runs, moved only where it must be.

Fast checks of how it derives the pod's command, config and environment from the image and manifests
(``make fidelity`` runs them for real): a rewrite that dropped a deployed setting, left a pod path or a
``0.0.0.0`` listener, or ran another command than the image's CMD would check something else than the pod.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location(
        "fidelity_serving", REPO_ROOT / "images" / "fidelity_serving.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_config_is_the_pods_with_only_paths_and_ports_moved(fidelity, tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "t"
    ports = {"inference": 40001, "metrics": 40002, "grpc_inference": 40003, "grpc_management": 40004}
    text = fidelity.serving_config(home, tmp, ports)
    config = _properties(text)
    deployed = _properties(fidelity.SERVING_CONFIG.read_text())
    assert config["inference_address"] == "http://127.0.0.1:40001"
    assert config["metrics_address"] == "http://127.0.0.1:40002"
    assert (config["grpc_inference_port"], config["grpc_management_port"]) == ("40003", "40004")
    assert config["management_address"] == f"unix:{tmp}/metarec-management.sock"
    assert config["model_store"] == f"{home}/archive/model-store"
    moved = {"inference_address", "metrics_address", "management_address", "model_store", "workflow_store"}
    # Every other deployed setting (load_models, token auth, limits, ...) is kept as it is.
    assert {k: v for k, v in config.items() if k in deployed and k not in moved} == {
        k: v for k, v in deployed.items() if k not in moved
    }
    assert set(deployed) <= set(config)
    assert "0.0.0.0" not in text and "/home/model-server" not in text
    assert "unix:/tmp/metarec-management.sock" not in text  # the pod's socket path, shared by every server


def test_model_store_is_where_fetch_model_downloads(fidelity, tmp_path):
    """The config's model store is inside the init container's download target, as in the pod."""
    pod = yaml.safe_load(fidelity.SERVING_DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    (fetch,) = [c for c in pod["initContainers"] if c["name"] == "fetch-model"]
    move = fidelity.pod_path_mover(tmp_path / "home", tmp_path / "t")
    target = move(fetch["command"][fetch["command"].index("$(MODEL_URI)") + 1])
    config = _properties(fidelity.serving_config(tmp_path / "home", tmp_path / "t", dict.fromkeys(
        ("inference", "metrics", "grpc_inference", "grpc_management"), 1)))  # fmt: skip
    assert config["model_store"] == f"{target}/model-store"


def test_command_is_the_images_cmd(fidelity, tmp_path):
    config = tmp_path / "config.properties"
    command = fidelity.serving_command(config)
    assert command == ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(config)]


def test_pod_paths_move_and_nothing_else(fidelity, tmp_path):
    move = fidelity.pod_path_mover(tmp_path / "h", tmp_path / "t")
    assert move("/home/model-server/logs") == f"{tmp_path}/h/logs"
    assert move("/tmp") == f"{tmp_path}/t"
    assert move("unix:/tmp/x.sock") == f"unix:{tmp_path}/t/x.sock"
    assert move("/tmpfoo") == "/tmpfoo" and move("/home/model-serverx") == "/home/model-serverx"
    env = fidelity.serving_image_env(move)
    assert env["LOG_LOCATION"] == f"{tmp_path}/h/logs" and env["HOME"] == f"{tmp_path}/h"
    assert env["XDG_CACHE_HOME"] == f"{tmp_path}/t/.cache" and env["PYTHONUNBUFFERED"] == "1"


def test_a_worker_import_error_is_fatal_at_once(fidelity, tmp_path):
    """A handler that cannot import in the image ends the wait in seconds, naming the module."""
    (tmp_path / "model_log.log").write_text(
        "INFO W-9000-metarec_1.0-stdout MODEL_LOG - loading\n"
        "INFO W-9000-metarec_1.0-stdout MODEL_LOG - ModuleNotFoundError: No module named 'redis'\n"
        "INFO W-9000 Backend worker process died.\n"
    )
    assert "No module named 'redis'" in fidelity._fatal_line(tmp_path)
    (tmp_path / "model_log.log").write_text(
        "INFO W-9000-metarec_1.0-stdout MODEL_LOG - MetaRec model loaded\n"
    )
    assert fidelity._fatal_line(tmp_path) is None
