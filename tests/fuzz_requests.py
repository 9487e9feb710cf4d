"""Fuzzing a live server: hostile bodies with valid canary requests interleaved (issue 13).

:func:`fuzz_bodies` makes a deterministic stream of hostile requests: the known bad and hostile
cases, byte-level mutations of valid bodies, random JSON (deep, huge numbers, NaN literals, long
strings, odd unicode) and structurally plausible requests with wrong values. :func:`run_fuzz` sends
them from several threads so that they share TorchServe batches with canaries, and counts what the
issue's targets are about. Used by ``tests/test_serving_http.py`` (bounded) and ``bench/serving_fuzz.py``.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
from collections import Counter
from collections.abc import Iterator
from urllib.parse import urlparse

from serving_cases import BAD_REQUESTS, GOOD_SUPPORT

CANARIES = [
    ("", json.dumps({"user_id": "3", "k": 5}).encode(), 5),
    ("adapt", json.dumps({"support": GOOD_SUPPORT, "k": 5}).encode(), 5),
    ("", json.dumps({"instances": [{"user": {"age": 30, "gender": "F"}, "k": 3}]}).encode(), 3),
]
_VALID = [
    json.dumps({"user_id": "7", "k": 4, "exclude": ["1"]}),
    json.dumps({"support": GOOD_SUPPORT, "steps": 2}),
]
_WEIRD_TEXT = ["\u0085", "\u2028", "\ud7ff", "\x00", "é", "💥", "\\", '"', "[", "{", "1e309", "-0", "NaN"]


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 6 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 10 ** rng.randrange(1, 60), rng.randrange(-1000, 1000)])
    if kind == 2:
        return rng.choice([0.5, -1e-300, 1e300, 1.7976931348623157e308, rng.uniform(-1e6, 1e6)])
    if kind in (3, 4, 5):
        size = rng.choice([0, 1, 5, 40, 1000, 20_000])
        return "".join(rng.choice(_WEIRD_TEXT + ["a", "7", " "]) for _ in range(size))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = [
        "user_id",
        "user",
        "k",
        "support",
        "steps",
        "candidates",
        "exclude",
        "instances",
        "item_id",
        "rating",
        "age",
    ]
    return {
        rng.choice(keys + ["x" * rng.randrange(1, 50)]): _random_json(rng, depth + 1)
        for _ in range(rng.randrange(5))
    }


def _plausible(rng: random.Random) -> dict:
    values = [None, -1, 0, 3, 10**30, 1e308, "5", "inf", "", [], {}, "x" * 5000, True, 2.5]
    request: dict = {}
    if rng.random() < 0.5:
        request["user_id"] = rng.choice(["1", "7", 3, "999999", "", "\u0085" * 1000, 1.5, None])
    else:
        request["user"] = {
            rng.choice(["age", "gender", "occupation", "zip", "unknown"]): rng.choice(
                values + ["M", "writer", 25]
            )
            for _ in range(rng.randrange(4))
        }
    for field in ("k", "steps", "candidates", "exclude"):
        if rng.random() < 0.4:
            request[field] = rng.choice(values + [["1", "2"], ["nope"], [str(i) for i in range(1, 200)]])
    if rng.random() < 0.6:
        request["support"] = [
            {
                "item_id": rng.choice(["1", "2", "3", "4", 5, "nope", None]),
                "rating": rng.choice(values + [1, 5, 4.5]),
            }
            for _ in range(rng.choice([0, 1, 3, 20, 150]))
        ]
    return request


def _mutate(rng: random.Random, text: str) -> bytes:
    data = bytearray(text.encode())
    for _ in range(rng.randrange(1, 6)):
        operation = rng.randrange(4)
        position = rng.randrange(len(data) + 1)
        if operation == 0 and data:
            data[min(position, len(data) - 1)] = rng.randrange(256)
        elif operation == 1:
            data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif operation == 2:
            del data[position : position + rng.randrange(1, 20)]
        else:
            data = data[:position]
    return bytes(data)


def fuzz_bodies(n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """Yields ``n`` hostile ``(route, body)`` pairs, the same ones for the same seed."""
    rng = random.Random(seed)
    cases = [(route, body) for _, route, body, _, _ in BAD_REQUESTS]
    for index in range(n):
        kind = index % 5
        route = rng.choice(["", "adapt", "adapt", "explain", "/adapt/", "x" * 300])
        if kind == 0:
            yield cases[(index // 5) % len(cases)]
        elif kind == 1:
            yield route, _mutate(rng, rng.choice(_VALID))
        elif kind == 2:
            if rng.random() < 0.2:
                levels = rng.choice([9, 50, 2000])
                yield route, ('{"user": ' + "[" * levels + "]" * levels + "}").encode()
            else:
                body = _random_json(rng)
                yield route, json.dumps(body, allow_nan=True, ensure_ascii=rng.random() < 0.5).encode()
        elif kind == 3:
            yield route, json.dumps(_plausible(rng), allow_nan=True).encode()
        else:
            literal = rng.choice(["NaN", "Infinity", "-Infinity", "9" * 400, "1e999", "-1e400", "0x10"])
            yield route, f'{{"user": {{"age": {literal}}}}}'.encode()


def _strict_json(data: bytes):
    return json.loads(data, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


def run_fuzz(info, n: int, seed: int = 0, concurrency: int = 8, canary_every: int = 4) -> dict:
    """Sends ``n`` fuzz requests with a canary after every ``canary_every`` of them.

    Args:
        info: The running server (``ServerInfo``).
        n: Fuzz requests to send.
        seed: Seed of the fuzz stream.
        concurrency: Client threads (so that fuzz requests and canaries share batches).
        canary_every: A canary is interleaved after this many fuzz requests.

    Returns:
        ``{"requests", "hostile", "by_status", "5xx", "non_json_200", "canaries", "canaries_failed",
        "max_answer_bytes", "connection_errors"}``: ``requests`` counts every request sent (the ``hostile``
        ones, ``n``, plus the ``canaries``).
    """
    url = urlparse(info.inference_url)
    headers = {"Content-Type": "application/json", **info.inference_headers()}
    work: list[tuple[str, bytes, int | None]] = []
    for index, (route, body) in enumerate(fuzz_bodies(n, seed)):
        work.append((route, body, None))
        if index % canary_every == canary_every - 1:
            work.append(CANARIES[(index // canary_every) % len(CANARIES)])
    stats = Counter()
    statuses: Counter = Counter()
    largest = [0]
    lock = threading.Lock()

    def path_for(route: str) -> str:
        return f"/predictions/{info.model_name}" + (f"/1.0/{route}" if route else "")

    def worker(share) -> None:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        for route, body, canary_k in share:
            try:
                connection.request("POST", path_for(route), body=body, headers=headers)
                response = connection.getresponse()
                status, data = response.status, response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
                status, data = None, b""
            document = None
            with lock:
                statuses[str(status) if status else "connection_error"] += 1
                largest[0] = max(largest[0], len(data))
                if status and status >= 500:
                    stats["5xx"] += 1
                if status == 200:
                    try:
                        document = _strict_json(data)
                    except ValueError:
                        stats["non_json_200"] += 1
                if canary_k is not None:
                    stats["canaries"] += 1
                    ok = status == 200 and document is not None
                    if ok:
                        items = (
                            document["predictions"][0]["items"]
                            if "predictions" in document
                            else document["items"]
                        )
                        ok = len(items) == canary_k
                    stats["canaries_failed"] += 0 if ok else 1
        connection.close()

    threads = [threading.Thread(target=worker, args=(work[i::concurrency],)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "requests": len(work),
        "hostile": len(work) - stats["canaries"],
        "by_status": dict(sorted(statuses.items())),
        "5xx": stats["5xx"],
        "non_json_200": stats["non_json_200"],
        "canaries": stats["canaries"],
        "canaries_failed": stats["canaries_failed"],
        "max_answer_bytes": largest[0],
        "connection_errors": statuses["connection_error"],
    }
