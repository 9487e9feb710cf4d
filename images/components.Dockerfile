# syntax=docker/dockerfile:1.7
# MetaRec components image: the core package, kfp and kfp-kubernetes, torch. Every KFP component and the
# PyTorchJob trainer (torchrun -m metarec.training) run in it. Nothing is pip-installed at run time.
#
# Build from the repository root (the context must hold pyproject.toml, setup.py, src/, components/ ...):
#   docker build -f images/components.Dockerfile -t ghcr.io/metarec/metarec-components:0.1.0 .
# GPU node pool (CUDA wheels of the same torch release):
#   docker build -f images/components.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t ...:0.1.0-cuda .
# Tags: <version> for the CPU build, <version>-cuda for the CUDA build (metarec.images.components_image(cuda=...)).

# Pinned by tag (Debian bookworm); pin by digest too once the registry is reachable.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG UID=10001

# Caches go to /tmp and logs to their own folder: pods run with a read-only root filesystem and
# emptyDir volumes on those paths. TorchServe reads LOG_LOCATION / METRICS_LOCATION.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/metarec \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib

# tini as PID 1 forwards SIGTERM (a bare PID 1 ignores it) when the image runs its default command.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the PyTorch index: resolving it through PyPI would pull the multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/metarec
COPY requirements/constraints.txt requirements/constraints.txt
# What this image installs: the one list `make fidelity` replays in a clean venv.
COPY images/components.extras images/components.extras
COPY pyproject.toml setup.py README.md ./
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/
COPY serving/ serving/
# The constraints file pins torch to the CPU build; drop that line so a CUDA build stays in place.
RUN grep -v '^torch==' requirements/constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt ".[$(grep -v '^#' images/components.extras)]" \
    && pip check \
    && python -c "import metarec, metarec.storage, metarec.images, kfp, torch; print(metarec.images.components_image())" \
    && rm -rf /tmp/constraints.txt /opt/metarec/build

RUN groupadd --gid "${UID}" metarec \
    && useradd --uid "${UID}" --gid "${UID}" --create-home --home-dir /home/metarec --shell /usr/sbin/nologin metarec
# Numeric user: Kubernetes can only verify runAsNonRoot against a numeric UID.
USER ${UID}:${UID}
WORKDIR /home/metarec
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
CMD ["python", "-m", "metarec.cli", "--help"]
