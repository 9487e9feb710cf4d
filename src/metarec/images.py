"""Container image names, pinned to the package version, with distinct CPU and CUDA tags.

The registry is configurable with ``METAREC_REGISTRY`` (read when components and pipelines are
compiled); the tag is the package version, with a ``-cuda`` suffix for the build carrying CUDA wheels,
so that a CPU-only step never pulls the multi-GB CUDA image and a GPU step never gets a CPU-only torch.
What each image installs is listed once, in ``images/<name>.extras`` (read by the Dockerfile and by
``make fidelity``).
"""

from __future__ import annotations

import os

from metarec import __version__

DEFAULT_REGISTRY = "ghcr.io/metarec"
CUDA_SUFFIX = "-cuda"


def registry() -> str:
    """Returns the image registry prefix (``METAREC_REGISTRY`` or the default)."""
    return os.environ.get("METAREC_REGISTRY", DEFAULT_REGISTRY).rstrip("/")


def _tag(cuda: bool) -> str:
    return f"{__version__}{CUDA_SUFFIX if cuda else ''}"


def components_image(cuda: bool = False) -> str:
    """Returns the image KFP components run in (the core package, kfp and the model archiver).

    Args:
        cuda: True for the build with CUDA wheels of the pinned torch (GPU training steps only).
    """
    return f"{registry()}/metarec-components:{_tag(cuda)}"


def serving_image(cuda: bool = False) -> str:
    """Returns the TorchServe image holding the handler and the core package.

    Args:
        cuda: True for the build with CUDA wheels (the GPU serving overlay).
    """
    return f"{registry()}/metarec-serving:{_tag(cuda)}"
