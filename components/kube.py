"""Kubernetes API clients for the components that drive the cluster (PyTorchJob launcher, deploy step).

In a pod the service account's in-cluster config is used; elsewhere (``make fidelity`` against the fake
API server, a workstation) the kubeconfig named by ``KUBECONFIG``. ``kubernetes`` is imported lazily:
the components import this module at compile time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _load_config() -> None:
    from kubernetes import config

    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()
    else:
        # Named explicitly: the client reads KUBECONFIG only once, when it is imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


def custom_objects_api() -> Any:
    """Returns a ``kubernetes.client.CustomObjectsApi`` (PyTorchJobs, InferenceServices)."""
    from kubernetes import client

    _load_config()
    return client.CustomObjectsApi()


def apps_api() -> Any:
    """Returns a ``kubernetes.client.AppsV1Api`` (Deployments)."""
    from kubernetes import client

    _load_config()
    return client.AppsV1Api()


def launcher_pod() -> tuple[str, str]:
    """Returns the name and uid of the pod this runs in (downward API env ``POD_NAME``/``POD_UID``).

    The pipeline sets both on the tasks that create cluster objects; outside a pod they are empty.
    """
    return os.environ.get("POD_NAME", ""), os.environ.get("POD_UID", "")


def current_namespace(default: str = "kubeflow") -> str:
    """Returns the namespace of the pod this runs in (service account mount), or ``default``.

    Args:
        default: Namespace used outside a cluster.
    """
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return default
