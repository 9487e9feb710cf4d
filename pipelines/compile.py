"""Compiles every pipeline variant to KFP IR YAML.

``python -m metarec.pipelines.compile --output build/pipelines [--gpu-type nvidia-l4]`` (``metarec
compile`` does the same and also regenerates the component YAMLs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Kept here, not imported from metarec_pipeline, so that `metarec --help` does not import kfp.
VARIANTS = ("gpu", "cpu", "pytorchjob")


def pipeline_filename(variant: str) -> str:
    """Returns the file name of a compiled variant, e.g. ``metarec-gpu.yaml``.

    Args:
        variant: ``gpu``, ``cpu`` or ``pytorchjob``.
    """
    return f"metarec-{variant}.yaml"


def compile_pipeline(options, output_path: str | Path) -> Path:
    """Compiles one variant.

    Args:
        options: Compile-time options (``metarec.pipelines.metarec_pipeline.PipelineOptions``).
        output_path: Destination YAML file (parent folders are created).

    Returns:
        The written path.
    """
    from kfp import compiler

    from metarec.pipelines.metarec_pipeline import build_pipeline

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        build_pipeline(options), str(output_path), pipeline_name=options.pipeline_name
    )
    return output_path


def compile_all(
    output_dir: str | Path,
    gpu_type: str = "nvidia-l4",
    gpus_per_task: int = 1,
    pytorchjob_nodes: int = 2,
    variants: tuple[str, ...] = VARIANTS,
) -> list[Path]:
    """Compiles every variant into ``output_dir``.

    Args:
        output_dir: Destination folder.
        gpu_type: GKE accelerator label value for the GPU node selector (empty: no selector).
        gpus_per_task: GPUs per meta-train task / PyTorchJob pod.
        pytorchjob_nodes: Pods per PyTorchJob.
        variants: Variants to compile.

    Returns:
        The written paths.
    """
    from metarec.pipelines.metarec_pipeline import PipelineOptions

    return [
        compile_pipeline(
            PipelineOptions(
                variant=variant,
                gpu_type=gpu_type,
                gpus_per_task=gpus_per_task,
                pytorchjob_nodes=pytorchjob_nodes,
            ),
            Path(output_dir) / pipeline_filename(variant),
        )
        for variant in variants
    ]


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the compile options shared by this module and ``metarec compile``.

    Args:
        parser: Parser (or sub-parser) to extend.
    """
    parser.add_argument("--output", default="build/pipelines", help="folder for the pipeline YAMLs")
    parser.add_argument(
        "--gpu-type",
        default="nvidia-l4",
        help="GKE accelerator (cloud.google.com/gke-accelerator) of the GPU node pool, e.g. nvidia-l4, "
        "nvidia-tesla-t4, nvidia-a100-80gb; '' for no node selector",
    )
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per meta-train task / PyTorchJob pod")
    parser.add_argument("--pytorchjob-nodes", type=int, default=2, help="pods per PyTorchJob")
    parser.add_argument(
        "--variant", choices=VARIANTS, action="append", help="variant(s) to compile (default: all)"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: Arguments (None: ``sys.argv``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compile_arguments(parser)
    args = parser.parse_args(argv)
    paths = compile_all(
        args.output, args.gpu_type, args.gpus, args.pytorchjob_nodes, tuple(args.variant or VARIANTS)
    )
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
