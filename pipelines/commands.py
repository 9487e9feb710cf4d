"""The ``metarec run-local`` and ``metarec compile`` sub-commands, plugged into the core command line.

The core ``metarec.cli`` never imports this package (the mapped folders depend on the core, not the other
way round): ``pyproject.toml`` names :func:`register` under the ``metarec.commands`` entry points, and the
core command line calls every such entry point with its sub-command parsers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metarec.pipelines.compile import add_compile_arguments


def register(commands) -> None:
    """Adds ``run-local`` and ``compile`` to the ``metarec`` command line.

    Args:
        commands: The sub-parsers object of the ``metarec`` parser (``add_subparsers()``).
    """
    run = commands.add_parser("run-local", help="run the whole pipeline on this machine (kfp.local)")
    run.add_argument(
        "--data", default="synthetic", help="raw data: a directory, a gs:// prefix or 'synthetic' (default)"
    )
    run.add_argument(
        "--dataset-config", help="data-set config: shipped name (movielens-100k ...) or YAML file"
    )
    run.add_argument("--config", help="run config YAML, merged on top of the shipped run-local.yaml")
    run.add_argument("--output", help="output folder (default: runs/<timestamp>)")
    run.set_defaults(handler=cmd_run_local)

    comp = commands.add_parser(
        "compile", help="compile the pipeline variants and the components into --output"
    )
    add_compile_arguments(comp)
    comp.add_argument(
        "--no-components", action="store_true", help="do not compile the components to OUTPUT/components"
    )
    comp.set_defaults(handler=cmd_compile)


def cmd_run_local(args: argparse.Namespace) -> int:
    """``metarec run-local``: the whole pipeline under kfp.local."""
    from metarec.pipelines.local_run import run_local
    from metarec.pipelines.run_config import load_run_config

    from metarec.cli import (
        _check_data,
        _check_dataset_config,
        _default_output_dir,
        _write_latest_pointer,
        format_summary,
    )

    run_config = load_run_config(args.config)
    _check_data(args.data)
    _check_dataset_config(args.dataset_config)
    output_dir = Path(args.output) if args.output else _default_output_dir()
    print(
        f"metarec run-local: data={args.data} methods={','.join(run_config['methods'])} output={output_dir}"
    )

    def progress(line: str) -> None:
        # Not print(): kfp.local swaps builtins.print for an indenting one while tasks run.
        sys.stdout.write(f"  {line}\n")
        sys.stdout.flush()

    result = run_local(
        run_config, output_dir, data_uri=args.data, dataset_config=args.dataset_config, progress=progress
    )
    pointer = _write_latest_pointer(result)
    print(format_summary(result))
    print(f"Latest-run pointer: {pointer}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """``metarec compile``: every pipeline variant and every component, all under ``--output``.

    The committed ``components/*/component.yaml`` are never touched here (they name the default
    registry; ``python -m metarec.components.build`` regenerates them), so compiling for another
    registry leaves the working tree clean.
    """
    from metarec.pipelines.compile import VARIANTS, compile_all

    paths = compile_all(
        args.output, args.gpu_type, args.gpus, args.pytorchjob_nodes, tuple(args.variant or VARIANTS)
    )
    if not args.no_components:
        from metarec.components.build import compile_components

        paths += compile_components(Path(args.output) / "components")
    for path in paths:
        print(path)
    return 0
