# syntax=docker/dockerfile:1.7
# MetaRec serving image: TorchServe 0.12 on a Java 17 runtime, the MetaRec handler and core package.
#
# Build from the repository root:
#   docker build -f images/serving.Dockerfile -t ghcr.io/metarec/metarec-serving:0.1.0 .
# GPU node pool: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128, tag <version>-cuda
# The tag must be the package version: metarec.images.serving_image() and manifests/ name it.
#
# Layout: config /home/model-server/config.properties (Kubernetes mounts its ConfigMap over it), model
# store /home/model-server/model-store, logs /home/model-server/logs. Ports: 8080 inference, 8082
# metrics; the management API (8081) listens on 127.0.0.1 only and is not exposed.

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
    HOME=/home/model-server \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib

RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/metarec
COPY requirements/constraints.txt requirements/constraints.txt
# What this image installs: the one list `make fidelity` replays in a clean venv.
COPY images/serving.extras images/serving.extras
COPY pyproject.toml setup.py README.md ./
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/
COPY serving/ serving/
RUN grep -v '^torch==' requirements/constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt ".[$(grep -v '^#' images/serving.extras)]" \
    && pip check \
    && python -c "import metarec.storage, ts, torch; print('ok')" \
    && rm -rf /tmp/constraints.txt /opt/metarec/build

RUN groupadd --gid "${UID}" model-server \
    && useradd --uid "${UID}" --gid "${UID}" --create-home --home-dir /home/model-server \
        --shell /usr/sbin/nologin model-server \
    && mkdir -p /home/model-server/model-store /home/model-server/logs \
    && chown -R model-server:model-server /home/model-server
COPY --chown=${UID}:${UID} images/serving/config.properties /home/model-server/config.properties

USER ${UID}:${UID}
WORKDIR /home/model-server
EXPOSE 8080 8082
# tini is PID 1: a bare PID 1 ignores SIGTERM (the pod would wait out its grace period), and -g forwards
# the signal to the whole group, so the Java frontend shuts down cleanly too.
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
# --foreground keeps TorchServe in the foreground under tini; --ncs: no config snapshots (the root
# filesystem is read-only in Kubernetes). Models: every archive in the model store (load_models=all).
CMD ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "/home/model-server/config.properties"]
