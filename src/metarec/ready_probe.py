"""Kubernetes readiness / startup probe of a TorchServe pod: ready only when a worker of the model is READY.

TorchServe's ``/ping`` answers 200 "Healthy" seconds after the frontend starts, before any worker has
loaded the model, and keeps answering 200 for ``maxRetryTimeoutInSec`` (300 s) while every worker fails
to load (a bad archive, ``METAREC_STATE_URL=bogus://``). As a readiness probe it let a broken model
become Ready, the rollout (and deploy_model's rollout check) succeed, then every pod go Unready about
five minutes later. So the pods' readiness and startup probes run this module instead (an exec probe):
it asks the REST management API, on its Unix socket (:mod:`metarec.torchserve_config`), for the model's
description and exits 0 only when at least one worker's status is ``READY``. ``/ping`` stays the
liveness probe (is the frontend alive at all).

Standard library only, and ``metarec/__init__`` imports nothing: the kubelet runs this every few
seconds, so it must start in milliseconds (no torch import).

Usage: ``python -m metarec.ready_probe [--socket PATH] [--model NAME] [--timeout S]``; exit 0 = ready,
1 = not ready (the reason on stderr, which the kubelet shows in the pod's events).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys

# Where the deployed config puts the management API (metarec.torchserve_config.DEPLOYED_MANAGEMENT_SOCKET;
# a test keeps the two equal, this module does not import it to stay dependency-free).
DEFAULT_SOCKET = "/tmp/metarec-management.sock"
DEFAULT_MODEL = "metarec"
DEFAULT_TIMEOUT_S = 2.0


class UnixConnection(http.client.HTTPConnection):
    """An HTTP connection over a Unix socket (TorchServe's REST management API)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def unix_request(
    socket_path: str, method: str, path: str, timeout_s: float, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP request over a Unix socket: ``(status, body)``; OSError when the socket refuses."""
    connection = UnixConnection(socket_path, timeout_s)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check(
    socket_path: str = DEFAULT_SOCKET, model: str = DEFAULT_MODEL, timeout_s: float = DEFAULT_TIMEOUT_S
):
    """Returns ``(ready, reason)``: ready when at least one worker of ``model`` is READY.

    Args:
        socket_path: The management API's Unix socket.
        model: Registered model name.
        timeout_s: Socket time-out of the one request.

    Returns:
        Whether the model can answer, and a one-line reason.
    """
    try:
        status, body = unix_request(socket_path, "GET", f"/models/{model}", timeout_s)
    except OSError as error:
        return False, f"management API at {socket_path} unreachable: {error}"
    if status != 200:
        return False, f"GET /models/{model} answered {status}: {body[:200]!r}"
    try:
        versions = json.loads(body)
        workers = [worker for version in versions for worker in version.get("workers", [])]
    except (ValueError, TypeError, AttributeError) as error:
        return False, f"GET /models/{model}: unreadable description ({error})"
    statuses = [str(worker.get("status")) for worker in workers]
    if "READY" in statuses:
        return True, f"{statuses.count('READY')}/{len(statuses)} workers READY"
    return False, f"no worker of {model} READY (statuses: {statuses or 'none'})"


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when ready, 1 when not (the reason on stderr)."""
    parser = argparse.ArgumentParser(
        description="Readiness of a TorchServe model (exit 0 = a worker is READY)."
    )
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="management API Unix socket")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model name")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="socket time-out, seconds")
    args = parser.parse_args(argv)
    ready, reason = check(args.socket, args.model, args.timeout)
    print(reason, file=sys.stdout if ready else sys.stderr)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
