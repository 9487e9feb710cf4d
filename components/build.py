"""Compiles every component to its committed ``components/<name>/component.yaml``.

Run ``python -m metarec.components.build`` after changing a component; a test fails when a committed
YAML differs from a fresh compile. ``metarec compile --output DIR`` writes them under ``DIR/components``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

COMPONENTS_DIR = Path(__file__).resolve().parent
# Folder name -> the component function in its component.py (same name).
COMPONENT_NAMES = (
    "fingerprint_data",
    "preprocess",
    "meta_train",
    "evaluate",
    "select_model",
    "package_model",
    "meta_train_pytorchjob",
    "deploy_model",
)
YAML_NAME = "component.yaml"


def load_component(name: str):
    """Returns the component object defined in ``components/<name>/component.py``.

    Args:
        name: Component folder name, one of ``COMPONENT_NAMES``.

    Raises:
        ValueError: Unknown component name.
    """
    if name not in COMPONENT_NAMES:
        raise ValueError(f"unknown component {name!r} (known: {', '.join(COMPONENT_NAMES)})")
    module = importlib.import_module(f"metarec.components.{name}.component")
    return getattr(module, name)


def compiled_command(name: str, executor_input: dict, yaml_path: str | Path | None = None) -> list[str]:
    """Returns the container command a KFP backend runs for a compiled component.

    Args:
        name: Component folder name.
        executor_input: The executor input (what the backend substitutes for ``{{$}}``).
        yaml_path: Compiled YAML (default: the committed ``components/<name>/component.yaml``).

    Returns:
        ``command + args`` of the component's container, the executor input in place.
    """
    import json

    import yaml

    spec = yaml.safe_load(Path(yaml_path or COMPONENTS_DIR / name / YAML_NAME).read_text())
    (executor,) = spec["deploymentSpec"]["executors"].values()
    container = executor["container"]
    args = [json.dumps(executor_input) if arg == "{{$}}" else arg for arg in container["args"]]
    return list(container["command"]) + args


def compile_component(name: str, output_path: str | Path) -> Path:
    """Compiles one component to a YAML file.

    Args:
        name: Component folder name.
        output_path: Destination YAML file (parent folders are created).

    Returns:
        The written path.
    """
    from kfp import compiler

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(load_component(name), str(output_path))
    return output_path


def compile_components(output_root: str | Path = COMPONENTS_DIR) -> list[Path]:
    """Compiles every component to ``<output_root>/<name>/component.yaml``.

    Args:
        output_root: Root folder; the default rewrites the committed YAMLs next to the sources.

    Returns:
        The written paths, in ``COMPONENT_NAMES`` order.
    """
    return [compile_component(name, Path(output_root) / name / YAML_NAME) for name in COMPONENT_NAMES]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m metarec.components.build [--output-root DIR]``.

    Args:
        argv: Arguments (None: ``sys.argv``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-root", default=str(COMPONENTS_DIR), help="root folder of <name>/component.yaml"
    )
    args = parser.parse_args(argv)
    from metarec import images

    if Path(args.output_root).resolve() == COMPONENTS_DIR and images.registry() != images.DEFAULT_REGISTRY:
        parser.error(
            f"the committed component YAMLs name {images.DEFAULT_REGISTRY}; unset METAREC_REGISTRY "
            f"({images.registry()}) or pass --output-root"
        )
    for path in compile_components(args.output_root):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
