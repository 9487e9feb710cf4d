"""Loads a benchmark script from ``bench/`` as a module (``bench/`` is neither a package nor in the wheel)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """Imports ``bench/<name>.py``.

    Args:
        name: The script's name without ``.py``.

    Returns:
        The module; call its ``main(argv)`` as the command line would.
    """
    # The serving benches import their shared helpers (serving_support) as top-level modules, as they
    # do when run as scripts from bench/.
    if str(BENCH_DIR) not in sys.path:
        sys.path.append(str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
