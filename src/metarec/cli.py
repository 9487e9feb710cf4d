"""The ``metarec`` command: run the pipeline locally, compile it for Kubeflow, serve the result.

```
metarec run-local [--data PATH_OR_GS_URI] [--dataset-config FILE_OR_NAME] [--config FILE] [--output DIR]
metarec compile [--output DIR] [--gpu-type nvidia-l4] [--gpus N] [--pytorchjob-nodes N] [--variant V]
metarec serve [--model-dir DIR] [--workdir DIR] [--inference-port N] ... | metarec serve --stop
metarec tune (--preprocessed DIR... | --data PATH [--split-seeds N...]) [--method M] [--trials N] [--set KEY=VALUE] [--output DIR]
metarec state forget [--store URL] USER_ID... | metarec state prune [--store URL] --ttl-days DAYS
```

Errors end with one line on stderr and a non-zero exit status; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import traceback
from pathlib import Path

COMMANDS_GROUP = "metarec.commands"  # entry points: callables adding sub-commands

DEFAULT_RUNS_DIR = Path("runs")
LATEST_POINTER = "latest.json"


class CLIError(Exception):
    """An error the user can act on; reported as one line without a traceback."""


# ----------------------------------------------------------------------------------------------------
# run-local


def _check_data(data_uri: str) -> None:
    """Fails early, with a clear message, on data that cannot be read."""
    if not data_uri.strip():
        # Path("") is the current directory: the run would start and fail in preprocess.
        raise CLIError("--data is empty: give a directory, a gs:// prefix or 'synthetic'")
    if data_uri == "synthetic" or data_uri.startswith("synthetic:"):
        return
    from metarec import storage

    if storage.is_gcs(data_uri):
        # StorageError says whether the bucket is missing, unreachable or forbidden.
        if not storage.list_uris(data_uri):
            raise CLIError(f"no data under {data_uri}")
        return
    path = Path(data_uri)
    if not path.exists():
        raise CLIError(f"data directory not found: {data_uri}")
    if not path.is_dir():
        raise CLIError(f"data must be a directory holding the raw files, got a file: {data_uri}")


def _check_dataset_config(dataset_config: str | None) -> None:
    """Parses the data-set config once so that a typo fails before any task starts."""
    if not dataset_config:
        return
    from metarec import storage

    if storage.is_gcs(dataset_config):
        return  # read by the preprocess task itself
    from metarec.data.config import load_dataset_config

    load_dataset_config(dataset_config)


def _default_output_dir() -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return DEFAULT_RUNS_DIR / stamp


def _write_latest_pointer(result) -> Path:
    """Records the run in ``runs/latest.json`` so that ``metarec serve`` finds its archive."""
    DEFAULT_RUNS_DIR.mkdir(parents=True, exist_ok=True)
    pointer = DEFAULT_RUNS_DIR / LATEST_POINTER
    pointer.write_text(
        json.dumps(
            {
                "output_dir": str(result.output_dir),
                "archive_dir": str(result.archive_dir) if result.archive_dir else None,
                "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
            indent=2,
        )
        + "\n"
    )
    return pointer


def _format_number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def format_summary(result) -> str:
    """Renders the end-of-run summary: selection, its scores beside the best baseline's, artifacts.

    Args:
        result: A ``metarec.pipelines.local_run.LocalRunResult``.

    Returns:
        Multi-line text.
    """
    from metarec.metrics import METRIC_NAMES

    selection, evaluation = result.selection, result.evaluation
    lines = [""]
    selected, baseline = selection.get("selected"), selection.get("best_baseline")
    lines.append(f"Selected model: {selected}   ({selection.get('message', '')})")
    scenarios = evaluation.get("scenarios", {})
    for scenario, scores in scenarios.items():
        columns = [name for name in (selected, baseline) if name in scores]
        if not columns:
            continue
        lines.append("")
        lines.append(f"  {scenario:<16}" + "".join(f"{name:>18}" for name in columns))
        for metric in METRIC_NAMES:
            if any(metric in scores[name] for name in columns):
                lines.append(
                    f"  {metric:<16}"
                    + "".join(f"{_format_number(scores[name].get(metric)):>18}" for name in columns)
                )
    lines.append("")
    lines.append("Artifacts:")
    width = max((len(name) for name in result.artifacts), default=0)
    for name, path in result.artifacts.items():
        lines.append(f"  {name:<{width}}  {path}")
    if result.metrics:
        # kfp.local writes no file for Metrics artifacts; run.json keeps their values.
        lines.append(f"  Metrics ({', '.join(result.metrics)}): values in {result.output_dir / 'run.json'}")
    lines.append("")
    lines.append(f"Archive (serve it with `metarec serve`): {result.archive_dir}")
    lines.append(f"Run summary: {result.output_dir / 'run.json'}   log: {result.log_file}")
    lines.append(f"Pipeline wall time: {result.seconds:.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# compile


# ----------------------------------------------------------------------------------------------------
# serve


def _read_latest_pointer() -> dict:
    pointer = DEFAULT_RUNS_DIR / LATEST_POINTER
    if not pointer.is_file():
        raise CLIError(f"no --model-dir given and no {pointer}: run `metarec run-local` first")
    return json.loads(pointer.read_text())


def resolve_archive(model_dir: str | None) -> tuple[Path, Path]:
    """Finds the archive to serve and a default TorchServe work directory.

    Args:
        model_dir: An archive (``config/`` + ``model-store/``), a run-local output folder (holding
            ``run.json``), or None for the latest run (``runs/latest.json``).

    Returns:
        ``(archive_dir, default_workdir)``.

    Raises:
        CLIError: Nothing servable there.
    """
    if model_dir is None:
        latest = _read_latest_pointer()
        if not latest.get("archive_dir"):
            raise CLIError(f"the latest run ({latest.get('output_dir')}) produced no archive")
        return Path(latest["archive_dir"]), Path(latest["output_dir"]) / "torchserve"
    path = Path(model_dir)
    if not path.is_dir():
        raise CLIError(f"model directory not found: {model_dir}")
    if (path / "model-store").is_dir():
        return path, path.parent / "torchserve"
    run_json = path / "run.json"
    if run_json.is_file():
        archive = json.loads(run_json.read_text()).get("archive_dir")
        if archive and (Path(archive) / "model-store").is_dir():
            return Path(archive), path / "torchserve"
    raise CLIError(f"{model_dir} holds no archive (model-store/) and no run.json of a finished run")


def _model_name(archive_dir: Path, requested: str | None) -> str:
    if requested:
        return requested
    archives = sorted((archive_dir / "model-store").glob("*.mar"))
    if len(archives) != 1:
        raise CLIError(f"{archive_dir / 'model-store'} holds {len(archives)} .mar files: pass --model-name")
    return archives[0].stem


def cmd_serve(args: argparse.Namespace) -> int:
    """``metarec serve``: start (or ``--stop``) a local TorchServe on the archive."""
    from metarec import serve_local

    if args.stop:
        if args.workdir:
            workdir = Path(args.workdir)
        else:
            workdir = resolve_archive(args.model_dir)[1]
        stopped = serve_local.stop_server(workdir)
        print(f"stopped TorchServe in {workdir}" if stopped else f"no TorchServe was running in {workdir}")
        return 0
    archive_dir, default_workdir = resolve_archive(args.model_dir)
    workdir = Path(args.workdir) if args.workdir else default_workdir
    if args.no_token_auth:
        # TorchServe 0.12 has one switch for every API: the management socket's 0700 folder is all
        # that protects it then.
        print(
            "warning: token authorisation off for inference AND management (local demos only)",
            file=sys.stderr,
        )
    try:
        info = serve_local.start_server(
            archive_dir,
            workdir,
            inference_port=args.inference_port,
            metrics_port=args.metrics_port,
            model_name=_model_name(archive_dir, args.model_name),
            timeout_s=args.timeout,
            token_auth=not args.no_token_auth,
        )
    except (serve_local.ArchiveError, RuntimeError) as error:
        # The first line is TorchServe's own error (or the archive check's); the log tail follows.
        raise CLIError(f"TorchServe did not start: {error}") from error
    print(f"TorchServe is serving '{info.model_name}' from {archive_dir} (pid {info.pid})")
    print(f"  inference:  {info.inference_url}/predictions/{info.model_name}")
    print(
        f"  management: unix socket {info.management_socket} (curl --unix-socket ... http://localhost/models)"
    )
    print(f"  metrics:    {info.metrics_url}/metrics")
    if info.inference_token:
        print(f"  token authorisation is on: keys in {Path(info.workdir) / serve_local.KEY_FILE}")
    print(f"  stop it with: metarec serve --stop --workdir {info.workdir}")
    return 0


def cmd_demo_request(args: argparse.Namespace) -> int:
    """``metarec demo-request``: a real fast-adapt round trip against a server started by ``serve``."""
    from metarec.demo_request import format_demo, run_demo_request

    workdir = Path(args.workdir) if args.workdir else resolve_archive(args.model_dir)[1]
    print(format_demo(run_demo_request(workdir, k=args.k)))
    return 0


# ----------------------------------------------------------------------------------------------------
# tune


def cmd_tune(args: argparse.Namespace) -> int:
    """``metarec tune``: Optuna search of a meta-learner on validation users (``metarec.tuning``)."""

    import yaml

    from metarec.training import parse_override
    from metarec.tuning import require_optuna, resolve_settings, run_tuning

    require_optuna()  # the bench extra, in no image: say so before preprocessing anything
    fixed = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            fixed[key] = parse_override(value)  # JSON first: YAML 1.1 reads 1e-05 as a string
        except yaml.YAMLError as error:
            # yaml's own message is several lines of parser state: name the flag instead.
            problem = getattr(error, "problem", None) or type(error).__name__
            raise CLIError(f"--set {item!r}: the value is neither JSON nor YAML ({problem})") from None
    output = Path(args.output)
    settings = {"method": args.method, "trials": args.trials, "objective": args.objective, "seed": args.seed,
                "timeout_s": args.timeout, "fixed": fixed, "space": args.space}  # fmt: skip
    resolve_settings(settings)  # refuse bad settings before preprocessing anything
    preprocessed = args.preprocessed
    if preprocessed is None:
        from metarec.preprocessing import run_preprocessing

        _check_data(args.data)
        preprocessed = [str(output / f"preprocessed-seed{seed}") for seed in args.split_seeds]
        for seed, directory in zip(args.split_seeds, preprocessed, strict=True):
            run_preprocessing(args.data, args.dataset_config, {"seed": seed}, directory)
    summary = run_tuning(preprocessed, settings, str(output))
    best, defaults = summary["best"], summary["defaults"]
    print(f"best of {len(summary['trials'])} trials ({summary['objective']}, validation users): "
          f"val MAE {best['val_mae']:.4f}, val nDCG@3 {best['val_ndcg@3']:.4f}  params {best['params']}")  # fmt: skip
    if defaults:
        print(f"current defaults (trial 0): val MAE {defaults['val_mae']:.4f}, "
              f"val nDCG@3 {defaults['val_ndcg@3']:.4f}")  # fmt: skip
    print(f"run config: {summary['run_config']}   all trials: {output / 'tuning.json'}")
    return 0


# ----------------------------------------------------------------------------------------------------
# state


def _store_url(args: argparse.Namespace) -> str:
    from metarec.state.open import keeps_no_state

    url = args.store or os.environ.get("METAREC_STATE_URL")
    if not url:
        raise CLIError("no --store given and METAREC_STATE_URL is not set (sqlite:///path.db, redis://...)")
    if keeps_no_state(url):  # the multi-replica serving manifests without Redis
        raise CLIError("METAREC_STATE_URL=none: this server keeps no per-user state, so there is nothing to "
                       "erase or prune here (docs/realtime.md#erasure)")  # fmt: skip
    return url


def cmd_state_forget(args: argparse.Namespace) -> int:
    """``metarec state forget``: erase users' stored ratings and state (no TorchServe needed)."""
    from metarec.state.lifecycle import forget_users

    for user_id, deleted in forget_users(_store_url(args), args.user_ids).items():
        print(f"{user_id}\t{'deleted' if deleted else 'not stored'}")
    print("note: ratings in a model archive's history.parquet (and the weights trained on them) are not "
          "erased; a model trained without them removes them (docs/realtime.md#erasure)", file=sys.stderr)  # fmt: skip
    return 0


def cmd_state_prune(args: argparse.Namespace) -> int:
    """``metarec state prune``: apply the retention to the store now."""
    from metarec.state.lifecycle import prune_store

    url = _store_url(args)
    count = prune_store(url, args.ttl_days * 24 * 3600)
    if url.startswith("sqlite:"):
        print(f"deleted {count} user(s) not written for {args.ttl_days:g} days")
    else:
        print(f"gave {count} user(s) stored without a time to live one of {args.ttl_days:g} days "
              "(Redis expires the others itself)")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of the ``metarec`` command."""
    from importlib.metadata import entry_points

    parser = argparse.ArgumentParser(
        prog="metarec", description="Meta-learned cold-start recommenders on Kubeflow."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # run-local and compile come from the pipelines package (entry point group metarec.commands): the
    # core never imports the mapped folders, they plug into it.
    for entry_point in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry_point.load()(commands)

    serve = commands.add_parser("serve", help="serve the latest (or a given) archive with a local TorchServe")
    serve.add_argument(
        "--model-dir", help="archive folder or run-local output folder (default: the latest run)"
    )
    serve.add_argument("--workdir", help="TorchServe work folder (default: <run>/torchserve)")
    serve.add_argument("--model-name", help="model name (default: the single .mar in model-store/)")
    serve.add_argument("--inference-port", type=int, default=8080)
    serve.add_argument("--metrics-port", type=int, default=8082)
    serve.add_argument("--timeout", type=float, default=120, help="seconds to wait for the model to be ready")
    serve.add_argument(
        "--no-token-auth",
        action="store_true",
        help="turn TorchServe token authorisation off (local demos only)",
    )
    serve.add_argument(
        "--stop", action="store_true", help="stop the server started in --workdir (default: the latest run's)"
    )
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser(
        "demo-request", help="ask the running server to fast-adapt to a new user who loves one genre"
    )
    demo.add_argument(
        "--workdir", help="TorchServe work folder given to `metarec serve` (default: the latest run's)"
    )
    demo.add_argument(
        "--model-dir", help="run-local output folder whose server to ask (default: the latest run)"
    )
    demo.add_argument("--k", type=int, default=10, help="items to rank")
    demo.set_defaults(handler=cmd_demo_request)
    tune = commands.add_parser("tune", help="search a meta-learner's hyper-parameters on validation users")
    source = tune.add_mutually_exclusive_group(required=True)
    source.add_argument("--preprocessed", nargs="+", help="preprocessing output(s): a trial scores the mean")
    source.add_argument("--data", help="raw data (directory, gs:// or synthetic): preprocessed first")
    tune.add_argument("--split-seeds", type=int, nargs="+", default=[0], help="split seeds for --data")
    tune.add_argument("--dataset-config", help="data-set config for --data")
    tune.add_argument("--method", default="reptile", choices=["maml", "fomaml", "reptile"])
    tune.add_argument("--trials", type=int, default=12, help="Optuna trials (trial 0 = training's defaults)")
    tune.add_argument("--objective", default="ndcg@3", choices=["ndcg@3", "mae"], help="validation metric")
    tune.add_argument("--space", nargs="+", help="search only these names of metarec.tuning.SEARCH_SPACE")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="training setting fixed in every trial (YAML value), e.g. meta_steps=150")  # fmt: skip
    tune.add_argument("--seed", type=int, default=0, help="training and sampler seed")
    tune.add_argument("--timeout", type=float, default=None, help="seconds after which no trial starts")
    tune.add_argument("--output", default="runs/tune", help="folder for tuning.json and best-run-config.yaml")
    tune.set_defaults(handler=cmd_tune)
    state = commands.add_parser("state", help="erase users from the user-state store, apply its retention")
    actions = state.add_subparsers(dest="action", required=True, metavar="ACTION")
    store_help = "the store, e.g. sqlite:///path/metarec-state.sqlite or redis://:pw@host:6379/0 (default: $METAREC_STATE_URL)"
    forget = actions.add_parser("forget", help="erase users' stored feedback, ratings and adapted state")
    forget.add_argument("--store", help=store_help)
    forget.add_argument("user_ids", nargs="+", metavar="USER_ID")
    forget.set_defaults(handler=cmd_state_forget)
    prune = actions.add_parser(
        "prune", help="delete users not written for --ttl-days (SQLite); give Redis keys without one the TTL"
    )
    prune.add_argument("--store", help=store_help)
    prune.add_argument("--ttl-days", type=float, required=True, help="the retention (state_ttl_s / 86400)")
    prune.set_defaults(handler=cmd_state_prune)
    for sub in [*commands.choices.values(), *actions.choices.values()]:
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
        )
    return parser


def _one_line(error: BaseException) -> str:
    """The error as one line; the type is named unless the message is meant for users as is."""
    text = " | ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    if not text or not isinstance(error, (CLIError, ValueError, OSError, RuntimeError)):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def main(argv: list[str] | None = None) -> int:
    """Runs the ``metarec`` command.

    Args:
        argv: Arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on an error, 2 on a usage error, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("METAREC_DEBUG") == "1"
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"metarec {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure becomes one line; --debug shows where it came from
        if debug:
            traceback.print_exc()
        print(f"metarec {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
