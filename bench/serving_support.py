"""What the serving benchmarks share: the demo archive, the no-op baseline archive, HTTP load helpers.

The demo model builder lives with the tests (``tests/demo_model.py``, not in the wheel); this module
puts that folder on ``sys.path``. Run the benchmarks from the repository root with the project venv.
"""

from __future__ import annotations

import argparse
import http.client
import io
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import yaml

from metarec.packaging import MODEL_CONFIG_FILE, model_config_yaml, run_archiver
from metarec.serve_local import ServerInfo, model_workers, start_server
from metarec.serving.handler import STATE_URL_ENV
from metarec.serving_settings import ServingSettings

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

from fuzz_requests import run_fuzz  # noqa: E402  (tests/ is on the path from here on)

__all__ = ["run_fuzz"]


def build_metarec_archive(workdir: Path, data: str, meta_steps: int) -> Path:
    """Builds the demo archive (preprocess, meta-train, evaluate, package) and returns its folder."""
    from demo_model import build_demo_archive

    print(f"building the archive from {data} ...", file=sys.stderr)
    return build_demo_archive(workdir, data, meta_steps)["archive_dir"]


def start_metarec(archive_dir: Path, workdir: Path, state_url: str | None = None) -> ServerInfo:
    """Starts TorchServe on the archive with its user state where the benchmark says.

    Never the caller's ``METAREC_STATE_URL`` (a shell pointed at a real store would get the bench's
    made-up users): a SQLite file in ``workdir`` unless ``state_url`` is given.
    """
    url = state_url or f"sqlite:///{Path(workdir).resolve() / 'bench-state.sqlite'}"
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return start_server(archive_dir, workdir, 0, 0, timeout_s=300, environment={STATE_URL_ENV: url})


def add_archive_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every serving benchmark that serves the MetaRec archive."""
    parser.add_argument("--archive-dir", help="build_archive output to serve (default: build the demo one)")
    parser.add_argument("--meta-steps", type=int, default=100, help="meta-training steps of the built model")


def archive_for(args: argparse.Namespace, workdir: Path, data: str = "synthetic") -> Path:
    """``--archive-dir`` if given, else the demo archive built under ``workdir``."""
    return (
        Path(args.archive_dir)
        if args.archive_dir
        else build_metarec_archive(workdir / "build", data, args.meta_steps)
    )


def load(
    info: ServerInfo, requests: list[tuple[str, bytes]], concurrency: int, stop: threading.Event | None = None
) -> dict:
    """Sends ``(path, body)`` requests from ``concurrency`` threads, each on a keep-alive connection.

    Args:
        info: The server.
        requests: What to send; split evenly across the threads.
        concurrency: Client threads.
        stop: None = send every request once; else each thread cycles through its share until set.

    Returns:
        ``{"latencies_ms": [...], "errors": n, "wall_s": s}`` (errors: non-200 or connection failures).
    """
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def worker(share: list[tuple[str, bytes]]) -> None:
        connection = connect(info, 60)
        index = 0
        while (index < len(share)) if stop is None else not stop.is_set():
            path, body = share[index % len(share)]
            index += 1
            started = time.perf_counter()
            try:
                ok = post(connection, info, path, body)[0] == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = connect(info, 60)
            with lock:
                latencies.append((time.perf_counter() - started) * 1000.0)
                errors[0] += 0 if ok else 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(requests[i::concurrency],)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies_ms": latencies, "errors": errors[0], "wall_s": time.perf_counter() - started}


def build_noop_archive(
    output_dir: Path, model_name: str = "noop", settings: ServingSettings | None = None
) -> Path:
    """Builds an archive of ``bench/noop_handler.py`` with the same worker/batch settings.

    Args:
        output_dir: The archive goes to ``<output_dir>/model-store/<model_name>.mar``.
        model_name: Archive name.
        settings: Serving settings (only worker and batching keys matter).

    Returns:
        Path of the archive.
    """
    settings = settings or ServingSettings()
    with tempfile.TemporaryDirectory(prefix="metarec-noop-") as stage:
        config_file = Path(stage) / MODEL_CONFIG_FILE
        document = model_config_yaml(settings)
        document.pop("handler")
        config_file.write_text(yaml.safe_dump(document, sort_keys=False))
        return run_archiver(
            model_name,
            settings.version,
            BENCH_DIR / "noop_handler.py",
            Path(output_dir) / "model-store",
            config_file=config_file,
        )


def catalogue_ids(archive_dir: Path, model_name: str = "metarec") -> tuple[list[str], list[str]]:
    """Item ids and user ids packed in the archive."""
    with zipfile.ZipFile(archive_dir / "model-store" / f"{model_name}.mar") as mar:
        items = pd.read_parquet(io.BytesIO(mar.read("items.parquet")))["item_id"].astype(str).tolist()
        users = pd.read_parquet(io.BytesIO(mar.read("users.parquet")))["user_id"].astype(str).tolist()
    return items, users


def connect(info: ServerInfo, timeout_s: float = 30.0) -> http.client.HTTPConnection:
    """A keep-alive connection to the inference API."""
    url = urlparse(info.inference_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)


def post(
    connection: http.client.HTTPConnection, info: ServerInfo, path: str, body: bytes
) -> tuple[int, bytes]:
    """POSTs one body on a kept-alive connection; returns ``(status, answer bytes)``."""
    connection.request(
        "POST", path, body=body, headers={"Content-Type": "application/json", **info.inference_headers()}
    )
    response = connection.getresponse()
    return response.status, response.read()


def worker_identity(info: ServerInfo) -> set[tuple]:
    """The (id, pid, start time) of every worker: a restart changes it."""
    return {(w["id"], w["pid"], w["startTime"]) for w in model_workers(info)}
