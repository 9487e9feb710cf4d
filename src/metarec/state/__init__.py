"""Per-user serving state: the ratings window and the adapted state, shared by every worker.

One small interface (:class:`~metarec.state.store.UserStateStore`) with two implementations: SQLite
(embedded, one node, safe across TorchServe's worker processes) and Redis (shared by every replica).
:func:`metarec.state.open.open_store` picks one from a URL.
"""

from metarec.state.store import Rating, StoredUser, StoreUnavailableError, UserStateStore

__all__ = ["Rating", "StoreUnavailableError", "StoredUser", "UserStateStore"]
