"""Runs the whole pipeline on this machine with ``kfp.local`` (what ``metarec run-local`` does).

Every task runs as a subprocess of the current Python (``SubprocessRunner(use_venv=False)``): nothing
is installed, the editable ``metarec`` package is imported as is. kfp.local's own output (task logs,
executor inputs) goes to ``<output>/run-local.log``; only task start/finish lines are echoed.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from metarec.pipelines.run_config import pipeline_arguments

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
PROGRESS_LINE = re.compile(
    r"(Executing task|Task '.*' finished with status|Pipeline '.*' finished with status)"
)
FAILED_TASK = re.compile(r"Task '(?P<task>[^']+)' finished with status FAILURE")
ERROR_LINE = re.compile(r"^\s*(?P<type>[A-Za-z_][\w.]*(Error|Exception|Exit)): (?P<message>.+)$")
LOG_NAME = "run-local.log"
SUMMARY_NAME = "run.json"


class LocalRunError(RuntimeError):
    """A task of the local run failed; the message names the task and its error."""


@dataclass
class LocalRunResult:
    """What a local run produced.

    Attributes:
        output_dir: The run's output folder.
        run_dir: kfp.local's folder for this pipeline run (under ``<output_dir>/pipeline_root``).
        log_file: Full kfp.local log.
        seconds: Wall time of the pipeline run.
        artifacts: ``"<task>/<output>"`` (``meta-train[maml]/model`` inside the loop) -> local path.
        evaluation: The evaluation document.
        selection: The selection summary (selected, metric, value, best_baseline ...).
        archive_dir: The packaged archive (``config/config.properties`` + ``model-store/<name>.mar``).
        metrics: ``"<task>/<output>"`` -> the values logged to that Metrics artifact.
    """

    output_dir: Path
    run_dir: Path
    log_file: Path
    seconds: float
    artifacts: dict[str, Path] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    archive_dir: Path | None = None
    metrics: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        """Returns a JSON-serialisable summary (written to ``<output_dir>/run.json``)."""
        return {
            "output_dir": str(self.output_dir),
            "run_dir": str(self.run_dir),
            "log_file": str(self.log_file),
            "seconds": round(self.seconds, 1),
            "archive_dir": str(self.archive_dir) if self.archive_dir else None,
            "selection": self.selection,
            "artifacts": {name: str(path) for name, path in self.artifacts.items()},
            "metrics": self.metrics,
        }


class _ProgressStream(io.TextIOBase):
    """File-like sink: writes everything to the log, passes task start/finish lines to ``progress``."""

    def __init__(self, log, progress: Callable[[str], None] | None):
        self._log = log
        self._progress = progress
        self._pending = ""
        # progress may print: it must reach the real terminal, not come back here.
        self._stdout, self._stderr = sys.stdout, sys.stderr

    def write(self, text: str) -> int:
        self._log.write(text)
        if self._progress is not None:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                clean = ANSI_ESCAPE.sub("", line).strip()
                if PROGRESS_LINE.search(clean) and "outputs:" not in clean:
                    with contextlib.redirect_stdout(self._stdout), contextlib.redirect_stderr(self._stderr):
                        self._progress(re.sub(r"^[\d:.]+ - \w+ - ", "", clean))
        return len(text)

    def flush(self) -> None:
        self._log.flush()


@contextlib.contextmanager
def restore_print_and_logging():
    """Puts back ``builtins.print`` and the root logger's handlers and level after a run.

    kfp.local swaps both per task and restores them on exit; two loop iterations running in threads
    interleave those swaps, which can leave an indenting print or a handler on a closed log file behind.
    """
    root = logging.getLogger()
    saved_print, saved_handlers, saved_level = builtins.print, root.handlers[:], root.level
    try:
        yield
    finally:
        builtins.print = saved_print
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def failure_reason(log_text: str) -> tuple[str | None, str | None]:
    """Finds the failed task and the last error line before its failure in a kfp.local log.

    Args:
        log_text: The log written during the run.

    Returns:
        ``(task name or None, "ErrorType: message" or None)``.
    """
    clean = ANSI_ESCAPE.sub("", log_text)
    failed = FAILED_TASK.search(clean)
    if not failed:
        return None, None
    error = None
    for line in clean[: failed.start()].splitlines():
        match = ERROR_LINE.match(line)
        if match:
            error = f"{match.group('type').rsplit('.', 1)[-1]}: {match.group('message').strip()}"
    return failed.group("task"), error


def _task_key(run_dir: Path, task_dir: Path) -> str:
    """``preprocess`` or ``meta-train[maml]`` (loop iterations named by the method they trained)."""
    relative = task_dir.relative_to(run_dir)
    if len(relative.parts) == 1:
        return relative.parts[0]
    model_json = task_dir / "model" / "model.json"
    label = relative.parts[0].rsplit("-", 1)[-1]
    if model_json.is_file():
        label = json.loads(model_json.read_text()).get("method", label)
    return f"{relative.parts[-1]}[{label}]"


def collect_outputs(run_dir: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """Lists every task output of a kfp.local run folder.

    Args:
        run_dir: ``<pipeline_root>/<pipeline>-<timestamp>``.

    Returns:
        ``(artifacts, metrics)``: ``"<task>/<output>"`` -> path of each artifact file or folder, and
        ``"<task>/<output>"`` -> logged values of each Metrics artifact (kfp.local writes no file for
        those; their values live in the task's ``executor_output.json``).
    """
    artifacts: dict[str, Path] = {}
    metrics: dict[str, dict] = {}
    for executor_output in sorted(run_dir.rglob("executor_output.json")):
        task_dir = executor_output.parent
        key = _task_key(run_dir, task_dir)
        for entry in sorted(task_dir.iterdir()):
            if entry.name != "executor_output.json":
                artifacts[f"{key}/{entry.name}"] = entry
        document = json.loads(executor_output.read_text())
        for name, value in (document.get("artifacts") or {}).items():
            for artifact in value.get("artifacts", []):
                if artifact.get("metadata") and not (task_dir / name).exists():
                    metrics[f"{key}/{name}"] = artifact["metadata"]
    return artifacts, metrics


def run_local(
    run_config: dict,
    output_dir: str | Path,
    data_uri: str = "synthetic",
    dataset_config: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LocalRunResult:
    """Runs the CPU pipeline under kfp.local and gathers what it wrote.

    Args:
        run_config: Validated run config (``metarec.pipelines.run_config.load_run_config``).
        output_dir: Output folder (created): ``pipeline_root/``, ``run-local.log``, ``run.json``.
        data_uri: Raw data: ``synthetic``, ``synthetic:tiny``, a local directory or a gs:// prefix.
        dataset_config: Data-set config name or file (None: default for the data).
        progress: Called with one line per task start/finish (None: silent).

    Returns:
        The run's artifacts, evaluation, selection and archive.

    Raises:
        LocalRunError: A task failed (the message names it and quotes its error).
    """
    from kfp import local

    from metarec.pipelines.metarec_pipeline import PipelineOptions, build_pipeline

    output_dir = Path(output_dir).resolve()
    pipeline_root = output_dir / "pipeline_root"
    workspace = output_dir / ".kfp-workspace"
    for folder in (pipeline_root, workspace):
        folder.mkdir(parents=True, exist_ok=True)
    log_file = output_dir / LOG_NAME
    summary_file = output_dir / SUMMARY_NAME
    # run.json names an archive for `metarec serve --model-dir`: an earlier run's must not stay beside
    # this run's log when this run fails or is interrupted (its own run folder stays under pipeline_root).
    summary_file.unlink(missing_ok=True)
    before = set(pipeline_root.iterdir())

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        workspace_root=str(workspace),
    )
    # No retries here: they are for preempted cluster nodes. kfp.local honours them, so a training error
    # (or a Ctrl-C, which reaches the task subprocesses too) would retrain twice more, after 60 s and
    # 120 s back-offs, before the run reported anything.
    pipeline = build_pipeline(PipelineOptions(variant="cpu", train_retries=0))
    arguments = pipeline_arguments(run_config, data_uri=data_uri, dataset_config=dataset_config)
    started = time.monotonic()
    with open(log_file, "w", encoding="utf-8", buffering=1) as log, restore_print_and_logging():
        stream = _ProgressStream(log, progress)
        try:
            with (
                contextlib.redirect_stdout(stream),
                contextlib.redirect_stderr(stream),
                warnings.catch_warnings(),
            ):
                # Expected locally: resource settings are ignored and the image is not a "python" one.
                warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
                warnings.filterwarnings("ignore", message="You may be attemping to run a task")
                pipeline(**arguments)
        except RuntimeError as error:
            log.flush()
            task, reason = failure_reason(log_file.read_text(encoding="utf-8"))
            if task is None:
                raise LocalRunError(f"the local pipeline run failed: {error} (log: {log_file})") from error
            raise LocalRunError(
                f"task '{task}' failed: {reason or 'see the log'} (full log: {log_file})"
            ) from error
    seconds = time.monotonic() - started

    new_runs = sorted(set(pipeline_root.iterdir()) - before, key=lambda path: path.stat().st_mtime)
    if not new_runs:
        raise LocalRunError(
            f"the pipeline finished but wrote nothing under {pipeline_root} (log: {log_file})"
        )
    run_dir = new_runs[-1]
    artifacts, metrics = collect_outputs(run_dir)
    result = LocalRunResult(
        output_dir=output_dir,
        run_dir=run_dir,
        log_file=log_file,
        seconds=seconds,
        artifacts=artifacts,
        metrics=metrics,
    )
    if "evaluate/evaluation" in artifacts:
        result.evaluation = json.loads(artifacts["evaluate/evaluation"].read_text())
    if "select-model/selection" in artifacts:
        result.selection = json.loads(artifacts["select-model/selection"].read_text())
    result.archive_dir = artifacts.get("package-model/archive")
    summary_file.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    with contextlib.suppress(OSError):
        workspace.rmdir()  # kfp.local empties it; keep the output folder tidy
    return result
