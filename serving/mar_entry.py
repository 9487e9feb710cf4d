"""The handler file packed into the ``.mar``: TorchServe imports it from the unpacked archive.

TorchServe takes the one class *defined in this file* as the handler, so the installed handler is
subclassed here rather than re-exported; the code itself stays in the installed ``metarec``
package (same interpreter as the worker), which keeps the archive small and the code tested.
"""

from metarec.serving.handler import MetaRecHandler


class MetaRecArchiveHandler(MetaRecHandler):
    """The installed :class:`metarec.serving.handler.MetaRecHandler`, unchanged."""
