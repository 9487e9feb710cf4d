"""TorchServe handler for MetaRec: a thin adapter from TorchServe's batch API to the request protocol.

Routing: ``POST /predictions/<model>`` recommends; ``POST /predictions/<model>/<version>/adapt``
(TorchServe passes the suffix in the ``url_path`` request header) adapts to a new user's support
ratings first, ``.../feedback`` appends a user's ratings, ``.../forget`` erases a user's stored
ratings and state; any other suffix answers 404 (:data:`metarec.serving.routes.ROUTES`). ``GET
/models/<model>?customized=true`` on the management API returns the model card.

Batching and errors: TorchServe hands the handler several HTTP requests at once (``batchSize``).
Each is validated on its own (:func:`metarec.serving.routes.answer_batch`); the valid ones run
together and an invalid one gets its own 4xx status through ``context.set_response_status``, so one
bad request never fails its batch neighbours. ``PredictionException`` is not used for per-request
problems because TorchServe applies its status to every request of the batch. Bodies arrive raw
(``decode_input_request=false``) so that only the limited parser ever decodes them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler

from metarec.recommender import Recommender
from metarec.serving.bodies import row_body
from metarec.serving.requests import RequestParser
from metarec.serving.routes import answer_batch, dumps_strict
from metarec.serving_settings import RequestLimits
from metarec.state.open import STATE_OFF, keeps_no_state, open_store, redacted_url

logger = logging.getLogger(__name__)

# The per-user state store: this environment variable (the Redis overlay sets it), else an SQLite
# file in the server's working directory (see default_state_url); STATE_OFF keeps no per-user state.
STATE_URL_ENV = "METAREC_STATE_URL"
STATE_FILE = "metarec-state.sqlite"
JSON_CONTENT_TYPE = "application/json"
# Seconds a client should wait before retrying a 503 (the user-state store was unavailable).
RETRY_AFTER_S = 1


def handler_limits(model_yaml_config: dict[str, Any] | None) -> RequestLimits:
    """Reads the ``handler:`` section of model-config.yaml (written by packaging).

    Args:
        model_yaml_config: The parsed model-config.yaml (``context.model_yaml_config``), or None.

    Returns:
        The request limits.

    Raises:
        ValueError: An unknown key or a bad value in the section.
    """
    return RequestLimits.from_dict((model_yaml_config or {}).get("handler") or {})


def default_state_url() -> str:
    """The embedded store: an SQLite file in the working directory TorchServe was started from (shared
    by its worker processes), or in the temporary directory when that one is read-only (a container)."""
    folder = Path.cwd()
    if not os.access(folder, os.W_OK):
        folder = Path(tempfile.gettempdir())
    return f"sqlite:///{folder / STATE_FILE}"


def open_state_store(state_url: str, limits: RequestLimits):
    """Opens the user-state store ``METAREC_STATE_URL`` names; a failure names the variable.

    The stores' own errors show the URL redacted (:func:`metarec.state.open.redacted_url`): the worker
    logs the traceback of a failed ``initialize``.

    Args:
        state_url: The store URL (with its credentials).
        limits: The request limits (``state_window``, ``state_ttl_s``).

    Returns:
        The store.

    Raises:
        ValueError: The URL names no store that can be opened.
    """
    try:
        return open_store(state_url, limits.state_window, ttl_s=limits.state_ttl_s)
    except ValueError as error:
        raise ValueError(f"{STATE_URL_ENV}: {error}") from None


def request_header(context, index: int, name: str) -> str | None:
    """A request header of one request of the batch, its name matched case-insensitively (TorchServe
    passes the names as the client spelled them; its own per-part entries are dicts and skipped)."""
    properties = context.request_processor[index].get_request_properties() or {}
    wanted = name.lower()
    for key, value in properties.items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None


class MetaRecHandler(BaseHandler):
    """Serves a MetaRec archive: recommend for known or new users, adapt to a support set."""

    def __init__(self):
        super().__init__()
        self.recommender: Recommender | None = None
        self.parser: RequestParser | None = None

    def initialize(self, context):
        """Loads the Recommender from the unpacked archive.

        Args:
            context: TorchServe's ``ts.context.Context``; ``system_properties["model_dir"]`` is the
                unpacked archive, ``model_yaml_config`` the parsed model-config.yaml.
        """
        self.context = context
        self.manifest = context.manifest
        limits = handler_limits(getattr(context, "model_yaml_config", None))
        torch.set_num_threads(limits.torch_threads)
        gpu_id = context.system_properties.get("gpu_id")  # TorchServe assigns one per worker on GPU nodes
        use_gpu = gpu_id is not None and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{gpu_id}" if use_gpu else "cpu")
        model_dir = context.system_properties["model_dir"]
        state_url = os.environ.get(STATE_URL_ENV) or default_state_url()
        keeps_state = not keeps_no_state(state_url)
        self.recommender = Recommender.from_dir(
            model_dir,
            device=self.device,
            store=open_state_store(state_url, limits) if keeps_state else None,
            window=limits.state_window,
        )
        self.parser = RequestParser(self.recommender, limits)
        if keeps_state:
            # Never log a password (in the credentials or a ?password= query): the redacted URL.
            logger.info("MetaRec user state in %s, retention %s s (0: forever)", redacted_url(state_url),
                        limits.state_ttl_s)  # fmt: skip
        else:
            logger.info("MetaRec keeps no per-user state (%s=%s): feedback and forget answer 404, known users "
                        "are served from the archive's history", STATE_URL_ENV, STATE_OFF)  # fmt: skip
        logger.info("MetaRec model loaded from %s with limits %s", model_dir, limits.to_dict())
        self.initialized = True

    def handle(self, data, context):
        """Answers one TorchServe batch.

        Args:
            data: One dict per HTTP request, its body under ``body`` (or ``data``); a request whose
                body TorchServe split into form fields is answered 415 (:func:`~metarec.serving.bodies.row_body`).
            context: TorchServe's ``ts.context.Context`` (request headers, response statuses).

        Returns:
            One JSON string per request; failed requests carry their status in the context.
        """
        self.context = context
        if self._is_describe():
            return [dumps_strict(self.describe_handle())]
        bodies = [
            row_body(row, request_header(context, index, "Content-Type")) for index, row in enumerate(data)
        ]
        routes = [context.get_request_header(index, "url_path") for index in range(len(data))]
        answers = []
        for index, (status, text) in enumerate(answer_batch(self.parser, bodies, routes)):
            if status != HTTPStatus.OK:
                context.set_response_status(status, HTTPStatus(status).phrase, index)
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                context.set_response_header(index, "Retry-After", str(RETRY_AFTER_S))
            context.set_response_content_type(index, JSON_CONTENT_TYPE)
            answers.append(text)
        return answers

    def describe_handle(self):
        """Returns the model card (shown by ``GET /models/<model>?customized=true``)."""
        return self.recommender.describe()
