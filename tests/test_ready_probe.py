"""The pods' readiness / startup probe (``python -m metarec.ready_probe``) against a real TorchServe.

TorchServe's ``/ping`` answers 200 before any worker has loaded the model and for ~300 s while workers
fail to load; the probe must say "not ready" in both cases and "ready" once a worker is READY. One
TorchServe, started the way the image does (``--foreground``, ``load_models=all``, management on a Unix
socket), serves two tiny archives: ``gated`` (its ``initialize`` waits for a file the test creates) and
``broken`` (its ``initialize`` raises, as the real handler does on ``METAREC_STATE_URL=bogus://typo``).
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from metarec import ready_probe
from metarec.serve_local import free_port
from metarec.torchserve_config import DEPLOYED_MANAGEMENT_SOCKET, format_properties, server_properties

REPO_ROOT = Path(__file__).resolve().parents[1]

GATED_HANDLER = """import os, time
from ts.torch_handler.base_handler import BaseHandler


class GatedHandler(BaseHandler):
    def initialize(self, context):
        while not os.path.exists(os.environ["PROBE_TEST_GATE"]):
            time.sleep(0.2)
        self.initialized = True

    def handle(self, data, context):
        return ["{}" for _ in data]
"""
BROKEN_HANDLER = """from ts.torch_handler.base_handler import BaseHandler


class BrokenHandler(BaseHandler):
    def initialize(self, context):
        raise ValueError("unknown state store URL 'bogus://typo'")

    def handle(self, data, context):
        return ["{}" for _ in data]
"""


def _probe(socket_path: Path, model: str) -> subprocess.CompletedProcess:
    """Runs the probe as the kubelet does (a fresh interpreter, exit status)."""
    return subprocess.run(
        [sys.executable, "-m", "metarec.ready_probe", "--socket", str(socket_path), "--model", model],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _ping(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def test_probe_default_socket_is_the_deployed_one():
    assert ready_probe.DEFAULT_SOCKET == DEPLOYED_MANAGEMENT_SOCKET


def test_probe_is_stdlib_only_and_starts_without_torch():
    """The kubelet runs it every few seconds: no third-party import, torch never loaded."""
    tree = ast.parse(Path(ready_probe.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported
    done = subprocess.run(
        [sys.executable, "-c", "import sys, metarec.ready_probe; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'metarec')))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "['metarec', 'metarec.ready_probe']"


def test_probe_is_not_ready_without_a_management_socket(tmp_path):
    done = _probe(tmp_path / "absent.sock", "metarec")
    assert done.returncode == 1 and "unreachable" in done.stderr


def test_the_serving_image_ships_the_probe():
    """The image installs the metarec package from src/ (images/serving.Dockerfile), and the pods'
    readiness and startup probes run this module; liveness stays on /ping."""
    dockerfile = (REPO_ROOT / "images/serving.Dockerfile").read_text()
    assert "COPY src/ src/" in dockerfile
    assert Path(ready_probe.__file__).resolve() == REPO_ROOT / "src/metarec/ready_probe.py"
    deployment = yaml.safe_load((REPO_ROOT / "manifests/serving/base/deployment.yaml").read_text())
    isvc = yaml.safe_load((REPO_ROOT / "manifests/serving/overlays/kserve/inferenceservice.yaml").read_text())
    containers = [
        deployment["spec"]["template"]["spec"]["containers"][0],
        isvc["spec"]["predictor"]["model"],
    ]
    for container in containers:
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["exec"]["command"][:3] == ["python", "-m", "metarec.ready_probe"], probe
        assert container["livenessProbe"]["httpGet"]["path"] == "/ping"


@pytest.mark.slow
def test_probe_follows_the_workers_not_ping(tmp_path):
    bin_dir = Path(sys.executable).parent
    torchserve, archiver = bin_dir / "torchserve", bin_dir / "torch-model-archiver"
    if not (torchserve.exists() and archiver.exists()):
        pytest.skip("TorchServe or torch-model-archiver is not installed")
    store, work = tmp_path / "model-store", tmp_path / "w"
    for folder in (store, work / "tmp", work / "logs"):
        folder.mkdir(parents=True)
    for name, text in (("gated", GATED_HANDLER), ("broken", BROKEN_HANDLER)):
        handler = tmp_path / f"{name}_handler.py"
        handler.write_text(text)
        subprocess.run(
            [str(archiver), "--model-name", name, "--version", "1.0", "--handler", str(handler), "--export-path", str(store)],
            check=True, timeout=120,
        )  # fmt: skip
    ports = {name: free_port() for name in ("inference", "metrics", "grpc_inference", "grpc_management")}
    socket_path = work / "tmp" / "mgmt.sock"
    properties = server_properties(
        inference_address=f"http://127.0.0.1:{ports['inference']}",
        metrics_address=f"http://127.0.0.1:{ports['metrics']}",
        management_socket=str(socket_path),
        model_store=str(store),
        workflow_store=str(work / "no-workflows"),
        token_auth=False,
        extra={
            "load_models": "all",
            "default_workers_per_model": 1,
            "grpc_inference_port": ports["grpc_inference"],
            "grpc_management_port": ports["grpc_management"],
        },
    )
    config = tmp_path / "config.properties"
    config.write_text(format_properties(properties))
    gate = tmp_path / "gate"
    env = dict(os.environ, TMPDIR=str(work / "tmp"), TEMP=str(work / "tmp"), LOG_LOCATION=str(work / "logs"))
    env.update(METRICS_LOCATION=str(work / "logs"), PROBE_TEST_GATE=str(gate))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    server = subprocess.Popen(
        [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    inference = f"http://127.0.0.1:{ports['inference']}"
    try:
        deadline = time.monotonic() + 120
        while _ping(inference) != 200 and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.5)
        assert _ping(inference) == 200, "TorchServe never answered /ping"
        # /ping says Healthy, yet no worker has loaded either model.
        deadline = time.monotonic() + 60
        while (
            "statuses" not in (gated := _probe(socket_path, "gated")).stderr and time.monotonic() < deadline
        ):
            time.sleep(0.5)  # until the model is registered (before: 404 from the management API)
        assert gated.returncode == 1 and "no worker of gated READY" in gated.stderr, gated
        assert _probe(socket_path, "broken").returncode == 1
        gate.touch()
        deadline = time.monotonic() + 120
        while (gated := _probe(socket_path, "gated")).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert gated.returncode == 0 and "READY" in gated.stdout, gated
        # The broken model keeps failing to load while /ping still says Healthy: the probe says no.
        time.sleep(5)
        broken = _probe(socket_path, "broken")
        assert broken.returncode == 1 and "no worker of broken READY" in broken.stderr, broken
        assert _ping(inference) == 200
        assert "bogus://typo" in (work / "logs" / "model_log.log").read_text()  # it did try, and failed
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
