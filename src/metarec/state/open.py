"""Opening a user-state store from a URL (the one place that may need the Redis client).

Kept apart from the interface so that code which only takes a store (the Recommender, packaging) does
not depend on the ``redis`` package; the serving image installs it with the ``serving`` extra.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from metarec.state.store import DEFAULT_WINDOW, UserStateStore

# The state URL of a server that keeps no per-user state: the multi-replica serving manifests' default,
# where one SQLite file per pod would not be shared (docs/realtime.md#erasure).
STATE_OFF = "none"


def keeps_no_state(url: str) -> bool:
    """Whether a state URL is :data:`STATE_OFF` (any case, spaces around it ignored)."""
    return url.strip().lower() == STATE_OFF


def open_store(url: str, window: int = DEFAULT_WINDOW, ttl_s: float | None = None) -> UserStateStore:
    """Opens the store a URL names.

    Args:
        url: ``sqlite:///absolute/path.db`` (or ``sqlite:relative/path.db``) for the embedded store,
            ``redis://host:port/db`` (``rediss://`` for TLS) for Redis.
        window: Most items whose (latest) ratings are kept per user.
        ttl_s: Retention: seconds a user's ratings and state are kept after their last write (None or
            0: forever).

    Returns:
        The store.

    Raises:
        ValueError: An unknown scheme.
    """
    if url.startswith("sqlite:"):
        from metarec.state.sqlite_store import SqliteStateStore

        return SqliteStateStore(sqlite_path(url), window, ttl_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from metarec.state.redis_store import RedisStateStore

        return RedisStateStore(url, window, ttl_s=ttl_s)
    # Never the URL itself: a mistyped scheme (REDIS://) must not put the password into the worker's log.
    raise ValueError(
        f"unknown state store URL {redacted_url(url)!r}; use sqlite:///path.db or redis://host:port/db"
    )


def sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite:`` URL names (None for any other URL)."""
    if not url.startswith("sqlite:"):
        return None
    path = url[len("sqlite:") :]
    return Path(path[2:] if path.startswith("//") else path)


def redacted_url(url: str) -> str:
    """A state URL as logs and error messages may show it: without its password.

    The password in the user part becomes ``***`` and a query string (redis-py also reads
    ``?password=...``) becomes ``?***``. A password holding a URL-reserved character (``/``, ``?``,
    ``#``, ``@``) spills into the path, query or fragment, or into the port: such a URL is shown as its
    scheme alone.

    Args:
        url: The store URL (``METAREC_STATE_URL``), possibly with credentials.

    Returns:
        The URL without any secret.
    """
    scheme = url.split(":", 1)[0].strip() if ":" in url else ""
    unparsable = f"{scheme}:(URL not shown: it does not parse, e.g. a password holding / ? # or @)"
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError when a password's character cut the host part short
    except ValueError:
        return unparsable
    if "@" in parts.path or parts.fragment:
        return unparsable
    if "@" not in parts.netloc and not parts.query:
        return url  # nothing secret (kept as written: sqlite:///path would lose a slash)
    netloc = parts.netloc
    if "@" in netloc:  # the user name stays (it is no secret): redis://user:***@host, redis://:***@host
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    # The scheme as written (urlsplit lowercases it): an error about a mistyped one must show it.
    return urlunsplit(parts._replace(scheme=scheme, netloc=netloc, query="***" if parts.query else ""))
