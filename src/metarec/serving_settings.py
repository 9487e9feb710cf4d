"""Serving settings: the request limits the handler enforces and the package-level TorchServe settings.

One source for every limit: packaging writes :class:`RequestLimits` into the archive's
``model-config.yaml`` (``handler:`` section), the handler reads it back from there, the model card
shows it, and :class:`ServingSettings` (the ``package.serving`` config) extends it with workers,
batching, ports and token authorisation. Both parse strictly (:meth:`metarec.settings.Settings.from_dict`).
"""

from __future__ import annotations

import dataclasses

from metarec.settings import Settings


@dataclasses.dataclass(frozen=True)
class RequestLimits(Settings):
    """What one HTTP request may hold; anything beyond is refused with a 4xx for that request alone.

    Attributes:
        max_support: Ratings in one adapt request (more: 413).
        max_steps: Inner steps of one adapt request (a larger request is capped).
        default_k: Items returned when a request gives no ``k``.
        max_k: Largest ``k`` accepted.
        max_instances: Requests in one KServe v1 body (more: 413).
        max_body_bytes: Largest request body (more: 413). TorchServe's own ``max_request_size`` is set
            to 8 times this, so the handler (not Netty, whose 413 has an empty body) answers up to there.
        max_json_depth: Deepest nesting of arrays/objects (a valid request needs 4).
        max_number_chars: Longest number literal in the body (a 309-digit integer overflows a float).
        feature_z_limit: A numeric user feature must lie within ``mean ± feature_z_limit × std`` of its
            training distribution (schema.json), else 400; 10 admits every plausible value while
            refusing magnitudes that saturate the model (e.g. age 1e20).
        max_quote_chars: Longest prefix of any input value quoted back in an error message.
        torch_threads: Intra-op threads per worker (several workers share few cores).
        max_feedback: Ratings in one feedback request (more: 413).
        state_window: Ratings kept per user in the state store and shipped per known user in the
            archive's history (the newest); a user's support set is at most this large.
        max_user_id_chars: Longest ``user_id`` (more: 400); it keys the state store and its log lines.
        max_explained: Instances of one body that may ask for ``explain`` (more: 413). An explanation
            costs a worker 30-100 ms of CPU (the Shapley split of the prior over 2^groups coalitions
            and the per-rating shares of every inner step), the rest of a request under 1 ms, so a
            batch of ``batch_size`` bodies must stay well inside ``response_timeout_s``: 8 bodies x
            4 x 0.1 s = 3.2 s against 30 s (docs/serving.md).
        state_ttl_s: Retention of the state store: seconds a user's stored ratings and state are kept
            after the user's last write (feedback, an adapt that stores, a recomputed state); 0 keeps
            them forever. 90 days by default: it bounds the store by the users active in that time (the
            Redis deployment refuses every write once its memory cap is reached), and feedback older
            than that says little about a returning user, whom their history (if any) and the prior
            still serve (docs/realtime.md#retention).
    """

    section = "serving limits"

    max_support: int = 100
    max_steps: int = 10
    default_k: int = 10
    max_k: int = 100
    max_instances: int = 64
    max_body_bytes: int = 1 << 20
    max_json_depth: int = 8
    max_number_chars: int = 40
    feature_z_limit: float = 10.0
    max_quote_chars: int = 40
    torch_threads: int = 1
    max_feedback: int = 100
    state_window: int = 200
    max_user_id_chars: int = 256
    max_explained: int = 4
    state_ttl_s: int = 90 * 24 * 3600

    def validate(self) -> None:
        """Every limit must be positive (the retention may be 0: forever)."""
        for field in dataclasses.fields(self):
            if field.name == "state_ttl_s":
                if self.state_ttl_s < 0:
                    raise ValueError(
                        f"{self.section}: state_ttl_s must be >= 0 (0: forever), got {self.state_ttl_s!r}"
                    )
                continue
            if getattr(self, field.name) <= 0:
                raise ValueError(
                    f"{self.section}: {field.name} must be > 0, got {getattr(self, field.name)!r}"
                )

    def limits(self) -> RequestLimits:
        """Returns just the request limits (drops the package-level fields of a subclass)."""
        names = [field.name for field in dataclasses.fields(RequestLimits)]
        return RequestLimits(**{name: getattr(self, name) for name in names})


@dataclasses.dataclass(frozen=True)
class ServingSettings(RequestLimits):
    """The ``package.serving`` settings: request limits plus TorchServe workers, batching and ports.

    Attributes:
        version: Model version in TorchServe (URL ``/predictions/<name>/<version>/adapt``).
        min_workers: Workers started per model (one per core on a 2-core pod).
        max_workers: Most workers per model.
        batch_size: Requests handed to one handler call (adapted together in one pass).
        max_batch_delay_ms: How long a worker waits to fill a batch.
        response_timeout_s: TorchServe's per-request time-out.
        job_queue_size: Requests queued per model before TorchServe answers 503.
        model_store: Model store of the archive's ``config.properties`` (KServe mounts storageUri
            at /mnt/models).
        inference_port: Inference port of the archive's ``config.properties``.
        metrics_port: Metrics port of the archive's ``config.properties``.
        token_auth: TorchServe token authorisation in the archive's ``config.properties``.
    """

    section = "package serving"

    version: str = "1.0"
    min_workers: int = 2
    max_workers: int = 2
    batch_size: int = 8
    max_batch_delay_ms: int = 5
    response_timeout_s: int = 30
    job_queue_size: int = 100
    model_store: str = "/mnt/models/model-store"
    inference_port: int = 8085
    metrics_port: int = 8082
    token_auth: bool = False

    def validate(self) -> None:
        """Limits and counts positive (batch delay may be 0), max_workers >= min_workers."""
        self.limits().validate()
        for name in ("min_workers", "max_workers", "batch_size", "response_timeout_s", "job_queue_size",
                     "inference_port", "metrics_port"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{self.section}: {name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"{self.section}: max_batch_delay_ms must be >= 0")
        if self.max_workers < self.min_workers:
            raise ValueError(f"{self.section}: max_workers must be >= min_workers")


def check_model_name(name: object) -> str:
    """Checks a served model name: the ``.mar`` file stem and a URL path segment.

    Args:
        name: The name.

    Returns:
        The name.

    Raises:
        ValueError: Not a non-empty string of letters, digits, ``-`` or ``_``.
    """
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"model_name must be letters, digits, '-' or '_', got {name!r}")
    return name
