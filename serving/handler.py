"""TorchServe handler for MetaRec: a thin adapter from TorchServe's batch API to the Recommender.

Routing: ``POST /predictions/<model>`` recommends; ``POST /predictions/<model>/<version>/adapt``
(TorchServe passes the suffix in the ``url_path`` request header) adapts to a new user's support
ratings first; any other suffix answers 404. ``GET /models/<model>?customized=true`` on the
management API returns the model card (:meth:`MetaRecHandler.describe_handle`).

Batching and errors: TorchServe hands the handler several HTTP requests at once (``batchSize``).
Each is validated on its own; the valid ones run together (one forward pass for the recommend
requests, one vectorised adaptation for the adapt requests) and an invalid one gets its own 4xx
status through ``context.set_response_status`` with a JSON body ``{"code", "type", "message"}``,
so one bad request never fails its batch neighbours. ``PredictionException`` is not used for
per-request problems because TorchServe applies its status to every request of the batch; an
unexpected internal error still surfaces as TorchServe's 503 without killing the worker.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from metarec.recommender import DEFAULT_SETTINGS, Recommender

logger = logging.getLogger(__name__)

# Keys of model-config.yaml's ``handler:`` section besides the Recommender's serving limits.
HANDLER_ONLY_KEYS = frozenset({"torch_threads", "state_url"})
# The per-user state store: this environment variable (the Redis overlay sets it), else the
# ``state_url`` of model-config.yaml, else an SQLite file in the server's working directory.
STATE_URL_ENV = "METAREC_STATE_URL"
STATE_FILE = "metarec-state.sqlite"
JSON_CONTENT_TYPE = "application/json"


def handler_settings(model_yaml_config: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
    """Reads the ``handler:`` section of model-config.yaml.

    Args:
        model_yaml_config: The parsed model-config.yaml (``context.model_yaml_config``), or None.

    Returns:
        ``(recommender_settings, torch_threads)``.

    Raises:
        ValueError: An unknown key in the section (a typo would otherwise be ignored silently).
    """
    section = dict((model_yaml_config or {}).get("handler") or {})
    unknown = sorted(set(section) - set(DEFAULT_SETTINGS) - HANDLER_ONLY_KEYS)
    if unknown:
        raise ValueError(f"model-config.yaml handler: unknown key(s) {unknown}")
    # One thread per worker by default: several workers share few cores, and the per-request
    # tensors are small enough that intra-op threading only adds contention.
    torch_threads = int(section.pop("torch_threads", 1))
    return section, torch_threads


def default_state_url() -> str:
    """The embedded store: an SQLite file in the working directory TorchServe was started from (shared
    by its worker processes), or in the temporary directory when that one is read-only (a container)."""
    folder = Path.cwd()
    if not os.access(folder, os.W_OK):
        folder = Path(tempfile.gettempdir())
    return f"sqlite:///{folder / STATE_FILE}"


class MetaRecHandler(BaseHandler):
    """Serves a MetaRec archive: recommend for known or new users, adapt to a support set."""

    def __init__(self):
        super().__init__()
        self.recommender: Recommender | None = None

    def initialize(self, context):
        """Loads the Recommender from the unpacked archive.

        Args:
            context: TorchServe's ``ts.context.Context``; ``system_properties["model_dir"]`` is the
                unpacked archive, ``model_yaml_config`` the parsed model-config.yaml.
        """
        self.context = context
        self.manifest = context.manifest
        settings, torch_threads = handler_settings(getattr(context, "model_yaml_config", None))
        torch.set_num_threads(torch_threads)
        self.device = torch.device("cpu")
        model_dir = context.system_properties["model_dir"]
        state_url = os.environ.get(STATE_URL_ENV) or settings.pop("state_url", None) or default_state_url()
        settings.pop("state_url", None)
        self.recommender = Recommender.from_dir(
            model_dir, device=self.device, state_url=state_url, **settings
        )
        logger.info("MetaRec user state in %s", state_url.split("@")[-1])  # never log a password
        logger.info("MetaRec model loaded from %s with settings %s", model_dir, self.recommender.settings)
        self.initialized = True

    def handle(self, data, context):
        """Answers one TorchServe batch.

        Args:
            data: One dict per HTTP request, its body under ``body`` (or ``data``).
            context: TorchServe's ``ts.context.Context`` (request headers, response statuses).

        Returns:
            One JSON string per request; failed requests carry their 4xx status in the context.
        """
        self.context = context
        if self._is_describe():
            return [json.dumps(self.describe_handle())]
        bodies = [row.get("body") if row.get("body") is not None else row.get("data") for row in data]
        routes = [context.get_request_header(index, "url_path") for index in range(len(data))]
        answers = []
        for index, (status, document) in enumerate(self.recommender.answer_batch(bodies, routes)):
            if status != HTTPStatus.OK:
                context.set_response_status(status, HTTPStatus(status).phrase, index)
            context.set_response_content_type(index, JSON_CONTENT_TYPE)
            answers.append(json.dumps(document))
        return answers

    def describe_handle(self):
        """Returns the model card (shown by ``GET /models/<model>?customized=true``)."""
        return self.recommender.describe()
