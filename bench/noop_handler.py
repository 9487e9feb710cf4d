"""A TorchServe handler that parses the JSON body and answers a fixed tiny document.

It is the latency baseline of ``bench/serving_latency.py`` (archive: ``serving_support.build_noop_archive``):
the same HTTP path, frontend queue, worker socket and JSON decoding as the real handler, but no model
work. The file is self-contained (TorchServe imports it directly from the ``.mar``); it is not part
of the wheel.
"""

from __future__ import annotations

import json

from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException


class NoopHandler(BaseHandler):
    """Decodes each request's JSON body and answers ``{"ok": true, "instances": n}``."""

    def initialize(self, context):
        """Marks the handler ready; there is no model to load.

        Args:
            context: TorchServe's ``ts.context.Context`` (unused beyond bookkeeping).
        """
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        """Answers every request of the batch.

        Args:
            data: TorchServe's batch, one dict per request holding ``body`` or ``data``.
            context: TorchServe's ``ts.context.Context``.

        Returns:
            One JSON-serialisable dict per request.

        Raises:
            PredictionException: 400 when a body is not valid JSON.
        """
        answers = []
        for request in data:
            body = request.get("body") if request.get("body") is not None else request.get("data")
            if isinstance(body, (bytes, bytearray)):
                try:
                    body = json.loads(body)
                except ValueError as error:
                    raise PredictionException(f"invalid JSON: {error}", 400) from error
            instances = body.get("instances") if isinstance(body, dict) else None
            answers.append({"ok": True, "instances": len(instances) if isinstance(instances, list) else 1})
        return answers
