"""Container image names, pinned to the package version.

The registry is configurable with ``METAREC_REGISTRY`` (read when components and pipelines are
compiled); the tag is always the package version so that a compiled pipeline, its components and
the manifests name the same build.
"""

from __future__ import annotations

import os

from metarec import __version__

DEFAULT_REGISTRY = "ghcr.io/metarec"


def registry() -> str:
    """Returns the image registry prefix (``METAREC_REGISTRY`` or the default)."""
    return os.environ.get("METAREC_REGISTRY", DEFAULT_REGISTRY).rstrip("/")


def components_image() -> str:
    """Returns the image every KFP component runs in (the core package and kfp installed)."""
    return f"{registry()}/metarec-components:{__version__}"


def serving_image() -> str:
    """Returns the TorchServe image holding the handler and the core package."""
    return f"{registry()}/metarec-serving:{__version__}"
