"""The ``metarec`` command: error paths (one line, non-zero exit), compile, serve's archive lookup."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from metarec import cli
from metarec.pipelines.run_config import load_run_config, pipeline_arguments, validate_run_config


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Each test runs in its own folder: `runs/latest.json` is relative to the working directory."""
    monkeypatch.chdir(tmp_path)


def test_missing_data_directory_fails_with_one_line(capsys, tmp_path):
    status, _, err = _run(capsys, "run-local", "--data", str(tmp_path / "no-such-dir"), "--output", "out")
    assert status != 0
    _assert_one_line_error(err, "metarec run-local: error:", "data directory not found", "no-such-dir")
    assert not Path("out").exists()  # nothing started


def test_data_given_as_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n")
    status, _, err = _run(capsys, "run-local", "--data", str(tmp_path / "u.data"))
    assert status == 1
    _assert_one_line_error(err, "must be a directory")


def test_missing_config_file_fails(capsys):
    status, _, err = _run(capsys, "run-local", "--config", "nope.yaml")
    assert status == 1
    _assert_one_line_error(err, "nope.yaml", "no such file")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("train: {meta_stepz: 3}\n", "unknown key(s) ['meta_stepz'] in section 'train'"),
        ("trian: {}\n", "unknown section(s) ['trian']"),
        ("methods: [maml, protonet]\n", "unknown method(s) ['protonet']"),
        ("methods: [maml, maml]\n", "lists a method twice"),
        ("select: {fail_if_worse: maybe}\n", "fail_if_worse must be true or false"),
        ("train: [1, 2]\n", "section 'train' must be a mapping"),
        ("train: {meta_steps: 3\n", "invalid YAML"),
        ("- just a list\n", "top level must be a mapping"),
        # Checked by a step only after training, hours in on a cluster: the run config must refuse them.
        ("package: {serving: {batch_sise: 3}}\n", "unknown key(s) ['batch_sise']"),
        ("evaluate: {mf_foldin: {factor: [3]}}\n", "unknown keys ['factor']"),
        ("train: {meta_steps: many}\n", "meta_steps must be an integer"),
        ("preprocess: {user_split: alphabetical}\n", "user_split must be one of"),
        ("select: {metric: ndgc@3}\n", "unknown metric 'ndgc@3'"),
        ("select: {scenario: usr_cold}\n", "select.scenario 'usr_cold' is not a scenario"),
        ("select: {metric: ndcg@10}\n", "select.metric 'ndcg@10' is not computed"),
        ("evaluate: {scenarios: [warm]}\n", "select.scenario 'user_cold' is not evaluated"),
        ("package: {model_name: team/model}\n", "package.model_name must be letters"),
    ],
)
def test_bad_run_config_fails_before_running(capsys, tmp_path, content, fragment):
    (tmp_path / "run.yaml").write_text(content)
    status, _, err = _run(capsys, "run-local", "--config", "run.yaml", "--output", "out")
    assert status == 1
    _assert_one_line_error(err, "run config run.yaml", fragment)
    assert not Path("out").exists()


def test_run_config_reads_exponent_floats_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string, which the training step then refuses."""
    (tmp_path / "run.yaml").write_text(
        "train: {inner_lr: 1e-3, outer_lr: 2E-4}\npackage: {model_name: '1e3'}\n"
    )
    config = load_run_config(tmp_path / "run.yaml")
    assert config["train"]["inner_lr"] == 0.001 and config["train"]["outer_lr"] == 0.0002
    assert config["package"]["model_name"] == "1e3"  # quoted: still a string


def test_empty_data_fails_before_running(capsys):
    # Path("") is the working directory: the run used to start and fail in preprocess.
    status, _, err = _run(capsys, "run-local", "--data", "", "--output", "out")
    assert status == 1
    _assert_one_line_error(err, "--data is empty")
    assert not Path("out").exists()


def test_tune_set_with_an_unparsable_value_names_the_flag(capsys):
    pytest.importorskip("optuna")
    status, _, err = _run(
        capsys, "tune", "--data", "synthetic:tiny", "--set", "meta_steps={", "--output", "t"
    )
    assert status == 1
    _assert_one_line_error(err, "--set 'meta_steps={'", "neither JSON nor YAML")
    assert "ParserError" not in err
    assert not Path("t").exists()  # refused before preprocessing


def test_unknown_dataset_config_fails(capsys):
    status, _, err = _run(capsys, "run-local", "--dataset-config", "no-such-layout")
    assert status == 1
    _assert_one_line_error(err, "no-such-layout")


def test_debug_shows_the_traceback(capsys, tmp_path):
    status, _, err = _run(capsys, "--debug", "run-local", "--data", str(tmp_path / "missing"))
    assert status == 1
    assert "Traceback" in err and "data directory not found" in err.splitlines()[-1]


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["run-local", "--no-such-flag"])
    assert caught.value.code == 2


def test_compile_writes_every_variant(capsys, tmp_path):
    status, out, _ = _run(
        capsys,
        "compile",
        "--output",
        str(tmp_path / "pl"),
        "--gpu-type",
        "nvidia-a100-80gb",
        "--no-components",
    )
    assert status == 0
    written = sorted(path.name for path in (tmp_path / "pl").iterdir())
    assert written == ["metarec-cpu.yaml", "metarec-gpu.yaml", "metarec-pytorchjob.yaml"]
    assert "nvidia-a100-80gb" in (tmp_path / "pl" / "metarec-gpu.yaml").read_text()
    assert str(tmp_path / "pl" / "metarec-gpu.yaml") in out


def test_serve_without_a_run_says_what_to_do(capsys):
    status, _, err = _run(capsys, "serve")
    assert status == 1
    _assert_one_line_error(err, "runs/latest.json", "metarec run-local")


def test_serve_with_a_folder_holding_no_archive_fails(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    status, _, err = _run(capsys, "serve", "--model-dir", str(tmp_path / "empty"))
    assert status == 1
    _assert_one_line_error(err, "holds no archive")
    status, _, err = _run(capsys, "serve", "--model-dir", str(tmp_path / "missing"))
    _assert_one_line_error(err, "model directory not found")


def _fake_run(tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "runs" / "r1"
    archive = run_dir / "pipeline_root" / "p" / "package-model" / "archive"
    (archive / "model-store").mkdir(parents=True)
    (archive / "model-store" / "metarec.mar").write_bytes(b"mar")
    (run_dir / "run.json").write_text(json.dumps({"archive_dir": str(archive), "output_dir": str(run_dir)}))
    return run_dir, archive


def test_resolve_archive_accepts_archive_run_folder_and_latest(tmp_path):
    run_dir, archive = _fake_run(tmp_path)
    assert cli.resolve_archive(str(archive)) == (archive, archive.parent / "torchserve")
    assert cli.resolve_archive(str(run_dir)) == (archive, run_dir / "torchserve")
    Path("runs").mkdir(exist_ok=True)
    (Path("runs") / cli.LATEST_POINTER).write_text(
        json.dumps({"output_dir": str(run_dir), "archive_dir": str(archive)})
    )
    assert cli.resolve_archive(None) == (archive, run_dir / "torchserve")


def test_serve_delegates_to_serve_local(capsys, tmp_path, monkeypatch):
    from metarec import serve_local

    run_dir, archive = _fake_run(tmp_path)
    calls = {}

    class Info:
        inference_url, management_socket, metrics_url = (
            "http://127.0.0.1:1",
            "/tmp/ts/mgmt.sock",
            "http://127.0.0.1:3",
        )
        model_name, pid, inference_token = "metarec", 42, None
        workdir = str(tmp_path / "ts")

    def fake_start(archive_dir, workdir, **kwargs):
        calls["start"] = (Path(archive_dir), Path(workdir), kwargs)
        return Info()

    monkeypatch.setattr(serve_local, "start_server", fake_start)
    monkeypatch.setattr(
        serve_local, "stop_server", lambda workdir: calls.setdefault("stop", Path(workdir)) is not None
    )
    status, out, err = _run(
        capsys, "serve", "--model-dir", str(run_dir), "--inference-port", "9080", "--no-token-auth"
    )
    assert status == 0 and "token authorisation off for inference AND management" in err
    started_archive, started_workdir, options = calls["start"]
    assert (started_archive, started_workdir) == (archive, run_dir / "torchserve")
    assert (
        options["inference_port"] == 9080
        and options["model_name"] == "metarec"
        and options["token_auth"] is False
    )
    assert "http://127.0.0.1:1/predictions/metarec" in out and "/tmp/ts/mgmt.sock" in out
    status, out, _ = _run(capsys, "serve", "--stop", "--workdir", str(tmp_path / "ts"))
    assert status == 0 and calls["stop"] == tmp_path / "ts"
    # Without the flag token authorisation stays on (the case above alone passed with it always off).
    status, _, err = _run(capsys, "serve", "--model-dir", str(run_dir))
    assert status == 0 and calls["start"][2]["token_auth"] is True
    assert "token authorisation off" not in err


def test_serve_reports_why_the_start_failed_in_one_line(capsys, tmp_path, monkeypatch):
    from metarec import serve_local

    run_dir, _ = _fake_run(tmp_path)

    def failing_start(archive_dir, workdir, **kwargs):
        raise RuntimeError("TorchServe failed: java.net.BindException: Address already in use\n--- log ---")

    monkeypatch.setattr(serve_local, "start_server", failing_start)
    status, _, err = _run(capsys, "serve", "--model-dir", str(run_dir))
    assert status == 1
    assert "did not start: TorchServe failed: java.net.BindException: Address already in use" in err


def test_run_config_merges_user_file_over_the_shipped_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text("train: {meta_steps: 7}\nmethods: [reptile]\nselect: {metric: mae}\n")
    config = load_run_config(tmp_path / "run.yaml")
    shipped = load_run_config(None)
    assert config["methods"] == ["reptile"]
    assert config["train"]["meta_steps"] == 7
    assert config["select"]["metric"] == "mae"
    # Keys the user file does not give keep the shipped values.
    assert config["select"]["scenario"] == shipped["select"]["scenario"] == "user_cold"
    arguments = pipeline_arguments(config, data_uri="/data/ml-100k", dataset_config="movielens-100k")
    assert json.loads(arguments["train_config"])["meta_steps"] == 7
    assert arguments["methods"] == ["reptile"] and arguments["dataset_config"] == "movielens-100k"


def test_validate_fills_select_and_package_defaults():
    config = validate_run_config({})
    assert config["methods"] == ["maml", "fomaml", "reptile"]
    assert config["select"] == {"metric": "ndcg@3", "scenario": "user_cold", "fail_if_worse": False}
    assert config["package"]["model_name"] == "metarec"


@pytest.mark.slow
def test_a_failing_task_ends_with_one_line_naming_it(capsys, tmp_path):
    # A data folder without the data set's files: only the preprocess task can find that out (a bad
    # setting would be refused before any task starts).
    (tmp_path / "empty-data").mkdir()
    (tmp_path / "empty-data" / "notes.txt").write_text("no ratings here\n")  # something to fingerprint
    (tmp_path / "small.yaml").write_text("methods: [maml]\n")
    status, out, err = _run(
        capsys, "run-local", "--data", "empty-data", "--config", "small.yaml", "--output", "out"
    )
    assert status == 1
    _assert_one_line_error(err, "task 'preprocess' failed", "not found", "run-local.log")
    assert "Executing task 'preprocess'" in out
    assert not (Path("runs") / cli.LATEST_POINTER).exists()


def test_summary_shows_selected_beside_best_baseline_and_artifacts(tmp_path):
    from metarec.pipelines.local_run import LocalRunResult

    result = LocalRunResult(
        output_dir=tmp_path,
        run_dir=tmp_path / "pipeline_root" / "p",
        log_file=tmp_path / "run-local.log",
        seconds=12.5,
        artifacts={"package-model/archive": tmp_path / "archive", "preprocess/dataset": tmp_path / "ds"},
        evaluation={
            "scenarios": {
                "user_cold": {
                    "reptile": {"mae": 0.71, "ndcg@3": 0.8123},
                    "maml": {"mae": 0.75, "ndcg@3": 0.7},
                    "mf_foldin": {"mae": 0.73, "ndcg@3": 0.7911},
                }
            }
        },
        selection={"selected": "reptile", "best_baseline": "mf_foldin", "message": "selected reptile ..."},
        archive_dir=tmp_path / "archive",
        metrics={"evaluate/metrics": {"user_cold.reptile.mae": 0.71}},
    )
    text = cli.format_summary(result)
    header = next(line for line in text.splitlines() if line.strip().startswith("user_cold"))
    assert header.split() == ["user_cold", "reptile", "mf_foldin"]  # the other candidate is left out
    ndcg = next(line for line in text.splitlines() if line.strip().startswith("ndcg@3"))
    assert ndcg.split() == ["ndcg@3", "0.8123", "0.7911"]
    assert str(tmp_path / "ds") in text and "Pipeline wall time: 12.5 s" in text
    assert "evaluate/metrics" in text and str(tmp_path / "run.json") in text


def test_demo_request_without_a_server_says_what_to_do(capsys, tmp_path):
    status, _, err = _run(capsys, "demo-request", "--workdir", str(tmp_path))
    assert status == 1
    assert len(err.strip().splitlines()) == 1 and "metarec serve" in err


# ----------------------------------------------------------------------------------------------------
# compile leaves the committed component YAMLs alone; the core does not import the mapped folders


def test_compile_writes_components_under_output_only(tmp_path, monkeypatch):
    import hashlib

    root = Path(__file__).resolve().parents[1] / "components"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*/component.yaml")}
    monkeypatch.setenv("METAREC_REGISTRY", "europe-docker.pkg.dev/p/r")
    assert cli.main(["compile", "--output", str(tmp_path), "--variant", "cpu"]) == 0
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*/component.yaml")} == before
    written = sorted(p.parent.name for p in (tmp_path / "components").glob("*/component.yaml"))
    assert written == sorted(p.parent.name for p in before)


def test_component_build_refuses_to_commit_another_registry(monkeypatch):
    from metarec.components import build

    monkeypatch.setenv("METAREC_REGISTRY", "europe-docker.pkg.dev/p/r")
    with pytest.raises(SystemExit):
        build.main([])


@pytest.mark.parametrize("module", ["metarec.cli", "metarec.packaging"])
def test_core_modules_do_not_import_the_mapped_folders(module):
    """The core stays framework-neutral: pipelines/ and serving/ plug into it, never the reverse."""
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec(module).origin).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    mapped = ("metarec.pipelines", "metarec.serving")  # not metarec.serving_settings: that one is core
    leaks = sorted(
        name for name in imported if name in mapped or name.startswith(tuple(f"{m}." for m in mapped))
    )
    assert not leaks, f"{module} imports {leaks}"


def test_run_local_and_compile_come_from_the_pipelines_entry_point():
    parser = cli.build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert {"run-local", "compile", "serve"} <= set(commands.choices)


def test_ctrl_c_during_server_start_stops_what_was_started(tmp_path, monkeypatch):
    # KeyboardInterrupt is no Exception: start_server's clean-up used to miss it, and Ctrl-C during
    # `metarec serve` left the frontend and its workers holding the ports.
    from metarec import serve_local

    stopped = []
    monkeypatch.setattr(serve_local, "check_archive", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve_local, "_torchserve_executable", lambda: "torchserve")
    monkeypatch.setattr(serve_local.subprocess, "run", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve_local, "stop_server", lambda workdir: stopped.append(Path(workdir)))

    def interrupted(workdir):
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_local, "_frontend_pid", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve_local.start_server(tmp_path / "archive", tmp_path / "ts", 0, 0)
    assert stopped == [tmp_path / "ts", tmp_path / "ts"]  # leftovers before the start, then the start


def test_state_forget_erases_users_from_the_store_without_a_server(capsys, tmp_path, monkeypatch):
    """On-call's erasure: the named users' ratings and state are gone, other users stay."""
    from metarec.state import Rating
    from metarec.state.open import open_store

    url = f"sqlite:///{tmp_path / 'state.sqlite'}"
    store = open_store(url)
    store.append("gone", [Rating("1", 4.0)])
    store.put_state("gone", b"state", 1)
    store.append("stays", [Rating("2", 3.0)])
    assert cli.main(["state", "forget", "--store", url, "gone", "never-seen"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["gone\tdeleted", "never-seen\tnot stored"]
    assert "history.parquet" in err
    assert store.get("gone") is None and store.get("stays") is not None
    # The store URL may come from the serving environment instead.
    monkeypatch.setenv("METAREC_STATE_URL", url)
    assert cli.main(["state", "forget", "stays"]) == 0 and store.get("stays") is None
    monkeypatch.delenv("METAREC_STATE_URL")
    assert cli.main(["state", "forget", "x"]) == 1
    assert "METAREC_STATE_URL is not set" in capsys.readouterr().err
    # An empty id (a blank shell variable) is refused, not reported as an erasure of nobody.
    assert cli.main(["state", "forget", "--store", url, ""]) == 1
    assert "must not be empty" in capsys.readouterr().err
    # A serving pod of the manifests without Redis keeps no state: said plainly, not "unknown URL".
    monkeypatch.setenv("METAREC_STATE_URL", "none")
    assert cli.main(["state", "forget", "x"]) == 1
    assert "keeps no per-user state" in capsys.readouterr().err
    store.close()


def test_state_prune_deletes_users_not_written_within_the_retention(capsys, tmp_path):
    import sqlite3

    from metarec.state import Rating
    from metarec.state.open import open_store

    path = tmp_path / "state.sqlite"
    store = open_store(f"sqlite:///{path}")
    store.append("old", [Rating("1", 4.0)])
    store.append("recent", [Rating("1", 4.0)])
    with sqlite3.connect(path) as connection:  # "old" last wrote 31 days ago, "recent" 29 (days, not hours)
        connection.execute("UPDATE users SET updated_at = updated_at - 31 * 86400 WHERE user_id = 'old'")
        connection.execute("UPDATE users SET updated_at = updated_at - 29 * 86400 WHERE user_id = 'recent'")
    assert cli.main(["state", "prune", "--store", f"sqlite:///{path}", "--ttl-days", "30"]) == 0
    assert "deleted 1 user(s) not written for 30 days" in capsys.readouterr().out
    assert store.get("old") is None and store.get("recent") is not None
    assert cli.main(["state", "prune", "--store", f"sqlite:///{path}", "--ttl-days", "0"]) == 1
    assert "positive retention" in capsys.readouterr().err
    store.close()


@pytest.mark.parametrize("action", [["forget", "42"], ["prune", "--ttl-days", "30"]])
def test_state_commands_refuse_a_sqlite_store_that_does_not_exist(capsys, tmp_path, action):
    """A mistyped SQLite path must fail: opening it would create an empty store, and forget would then
    report every user "not stored" (exit 0), a false erasure, leaving a stray file and folders behind."""
    missing = tmp_path / "typo" / "state.sqlite"
    assert cli.main(["state", action[0], "--store", f"sqlite:///{missing}", *action[1:]]) == 1
    assert "no SQLite state store" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
