"""The embedded synthetic data set: MovieLens-100K layout, generated deterministically.

Ratings come from a generative model designed so that the cold-start questions MetaRec asks have
measurable answers:

* each user's genre taste is partly predicted by age, gender and occupation (a feature-only prior
  beats the global mean), plus a strong individual component (adapting on a few of the user's own
  ratings beats the prior);
* a low-rank individual taste over item latent factors and a per-user bias add more signal that only
  the user's own ratings reveal;
* items have a quality bias that also drives their popularity (who rates what);
* rating counts per user are mostly 20-100 with about 6 % heavy users; release dates span 1970-1998,
  so the newest items form a natural date-based cold split.

The files are ``u.data`` (user, item, rating, timestamp; tab-separated), ``u.user``
(id|age|gender|occupation|zip) and ``u.item`` (id|title|release date|video date|url|19 genre flags,
latin-1), readable with the shipped ``movielens-100k`` (or ``synthetic``) config.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip
PRESETS: dict[str, dict[str, int]] = {
    "default": {"n_users": 600, "n_items": 400},
    "tiny": {"n_users": 120, "n_items": 80},
}
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
FIRST_YEAR, LAST_YEAR = 1970, 1998
# Rating period, as in MovieLens-100K (Sep 1997 - Apr 1998).
RATING_START = int(dt.datetime(1997, 9, 20, tzinfo=dt.UTC).timestamp())
RATING_END = int(dt.datetime(1998, 4, 22, tzinfo=dt.UTC).timestamp())
LATENT_RANK = 4
# Readable titles: a word per latent taste direction and sign, and a noun per genre, so a title says
# something about the item (as real titles do) without drawing from the random stream.
TITLE_WORDS = (("Silent", "Loud"), ("Last", "First"), ("Dark", "Bright"), ("Lost", "Found"))
GENRE_NOUNS = ("Story", "Mission", "Journey", "Dream", "Family", "Party", "Heist", "Truth", "Heart",
               "Kingdom", "Shadow", "Night", "Song", "Secret", "Affair", "Planet", "Trap", "Front", "Trail")  # fmt: skip


def _rating_counts(rng: np.random.Generator, n_users: int, n_items: int) -> np.ndarray:
    """Mostly 20-100 ratings per user (log-uniform), about 6 % heavy users with 100-250."""
    counts = np.exp(rng.uniform(np.log(20), np.log(100), n_users))
    heavy = rng.random(n_users) < 0.06
    counts[heavy] = rng.uniform(101, 250, heavy.sum())
    # Small catalogues cannot hold that many distinct ratings per user.
    return np.minimum(np.round(counts).astype(np.int64), int(0.7 * n_items))


def generate_ratings_arrays(n_users: int, n_items: int, seed: int = 0) -> dict[str, np.ndarray | list[str]]:
    """Draws the whole synthetic data set as arrays (no files).

    Args:
        n_users: number of users (ids 1..n_users).
        n_items: number of items (ids 1..n_items).
        seed: random seed; the same seed gives identical arrays.

    Returns:
        A dict with user arrays ``age`` (int), ``gender`` (str list), ``occupation`` (str list),
        ``zip`` (str list); item arrays ``genre_flags`` (int8[n_items, 19]), ``release`` (datetime.date
        list), ``title`` (str list); rating arrays ``user`` (int32, 1-based), ``item`` (int32,
        1-based), ``rating`` (int8, 1-5), ``timestamp`` (int64); and ``user_taste`` (float[n_users, 19],
        the true genre taste, for tests).
    """
    if n_users < 1 or n_items < 10:
        raise ValueError(f"synthetic data needs n_users >= 1 and n_items >= 10, got {n_users}, {n_items}")
    rng = np.random.default_rng(seed)
    n_genres = len(GENRES)

    # Users: age, gender, occupation, zip.
    age = np.clip(np.round(rng.gamma(5.0, 4.8, n_users) + 10), 7, 73).astype(np.int64)
    is_female = rng.random(n_users) < 0.3
    occupation_idx = rng.integers(0, len(OCCUPATIONS), n_users)
    zips = rng.integers(1000, 99999, n_users)

    # Genre taste = feature-driven part (shared loadings) + strong individual part.
    age_std = (age - 33.0) / 12.0
    age_loading = rng.normal(0, 0.35, n_genres)
    gender_loading = rng.normal(0, 0.35, n_genres)
    occupation_loading = rng.normal(0, 0.3, (len(OCCUPATIONS), n_genres))
    feature_taste = (
        age_std[:, None] * age_loading[None, :]
        + np.where(is_female, 1.0, -1.0)[:, None] * gender_loading[None, :]
        + occupation_loading[occupation_idx]
    )
    individual_taste = rng.normal(0, 0.6, (n_users, n_genres))
    user_taste = feature_taste + individual_taste
    user_bias = rng.normal(0, 0.35, n_users)
    user_latent = rng.normal(0, 0.45, (n_users, LATENT_RANK))

    # Items: 1-3 genres (never "unknown"), release date, quality, latent factors.
    n_item_genres = rng.choice([1, 2, 3], n_items, p=[0.45, 0.4, 0.15])
    genre_keys = rng.random((n_items, n_genres - 1))
    genre_rank = np.argsort(np.argsort(-genre_keys, axis=1), axis=1)
    genre_flags = np.zeros((n_items, n_genres), dtype=np.int8)
    genre_flags[:, 1:] = (genre_rank < n_item_genres[:, None]).astype(np.int8)
    # More recent years are more frequent (as in MovieLens).
    year = np.clip(np.round(LAST_YEAR - rng.exponential(7.0, n_items)), FIRST_YEAR, LAST_YEAR).astype(int)
    day_of_year = rng.integers(0, 365, n_items)
    release = [
        dt.date(int(y), 1, 1) + dt.timedelta(days=int(d)) for y, d in zip(year, day_of_year, strict=True)
    ]
    quality = rng.normal(0, 0.45, n_items)
    item_latent = rng.normal(0, 0.45, (n_items, LATENT_RANK))
    popularity = 1.2 * quality + rng.normal(0, 0.8, n_items)

    # Which items each user rates: popularity-weighted sampling without replacement (Gumbel top-k).
    counts = _rating_counts(rng, n_users, n_items)
    gumbel = rng.gumbel(size=(n_users, n_items))
    order = np.argsort(-(popularity[None, :] + gumbel), axis=1)
    rated = np.arange(n_items)[None, :] < counts[:, None]
    chosen = np.zeros((n_users, n_items), dtype=bool)
    np.put_along_axis(chosen, order, rated, axis=1)
    user_index, item_index = np.nonzero(chosen)

    # Score -> integer rating 1-5.
    flags = genre_flags[item_index].astype(np.float64)
    genre_affinity = (user_taste[user_index] * flags).sum(1) / np.sqrt(flags.sum(1))
    score = (
        3.3
        + user_bias[user_index]
        + quality[item_index]
        + 0.9 * genre_affinity
        + (user_latent[user_index] * item_latent[item_index]).sum(1)
        + rng.normal(0, 0.45, user_index.size)
    )
    rating = np.clip(np.round(score), 1, 5).astype(np.int8)

    # Timestamps: each user starts at a random time and rates over a few days to weeks.
    first = rng.integers(RATING_START, RATING_END - 30 * 86400, n_users)
    span = rng.exponential(5 * 86400, n_users)
    timestamp = first[user_index] + np.round(rng.random(user_index.size) * span[user_index]).astype(np.int64)
    # Shuffle the rows so the file is not grouped by user (like u.data).
    perm = rng.permutation(user_index.size)

    return {
        "age": age,
        "gender": ["F" if f else "M" for f in is_female],
        "occupation": [OCCUPATIONS[i] for i in occupation_idx],
        "zip": [f"{z:05d}" for z in zips],
        "genre_flags": genre_flags,
        "release": release,
        "title": _titles(item_latent, genre_flags, year),
        "user": (user_index[perm] + 1).astype(np.int32),
        "item": (item_index[perm] + 1).astype(np.int32),
        "rating": rating[perm],
        "timestamp": timestamp[perm].astype(np.int64),
        "user_taste": user_taste,
    }


def _titles(item_latent: np.ndarray, genre_flags: np.ndarray, year: np.ndarray) -> list[str]:
    """Titles like "The Dark Heist 12 (1995)": the strongest latent direction and the first genre."""
    strongest = np.abs(item_latent).argmax(axis=1)
    titles = []
    for i, (axis, y) in enumerate(zip(strongest, year, strict=True)):
        word = TITLE_WORDS[axis % len(TITLE_WORDS)][int(item_latent[i, axis] > 0)]
        genres = np.flatnonzero(genre_flags[i])
        noun = GENRE_NOUNS[int(genres[0]) if genres.size else 0]
        titles.append(f"The {word} {noun} {i + 1} ({y})")
    return titles


def generate_synthetic(
    out_dir: str | Path, n_users: int = 600, n_items: int = 400, seed: int = 0, preset: str | None = None
) -> Path:
    """Writes the synthetic data set in MovieLens-100K layout.

    Args:
        out_dir: directory to write ``u.data``, ``u.user``, ``u.item`` and ``u.genre`` into (created).
        n_users: number of users.
        n_items: number of items.
        seed: random seed; the same arguments give byte-identical files.
        preset: ``default`` (600 x 400) or ``tiny`` (120 x 80); overrides n_users / n_items.

    Returns:
        The output directory.

    Raises:
        ValueError: unknown preset or sizes too small.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
        n_users, n_items = PRESETS[preset]["n_users"], PRESETS[preset]["n_items"]
    data = generate_ratings_arrays(n_users, n_items, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    lines = [
        f"{u}\t{i}\t{r}\t{t}\n"
        for u, i, r, t in zip(
            data["user"].tolist(), data["item"].tolist(), data["rating"].tolist(), data["timestamp"].tolist(),
            strict=True,
        )
    ]  # fmt: skip
    (out / "u.data").write_text("".join(lines), encoding="utf-8")

    users = [
        f"{u + 1}|{a}|{g}|{o}|{z}\n"
        for u, (a, g, o, z) in enumerate(
            zip(data["age"].tolist(), data["gender"], data["occupation"], data["zip"], strict=True)
        )
    ]
    (out / "u.user").write_text("".join(users), encoding="utf-8")

    items = []
    for i, (title, release, flags) in enumerate(
        zip(data["title"], data["release"], data["genre_flags"].tolist(), strict=True)
    ):
        date_text = f"{release.day:02d}-{MONTHS[release.month - 1]}-{release.year}"
        url = "http://example.invalid/synthetic/" + str(i + 1)
        items.append(f"{i + 1}|{title}|{date_text}||{url}|" + "|".join(map(str, flags)) + "\n")
    (out / "u.item").write_bytes("".join(items).encode("latin-1"))
    (out / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)), encoding="utf-8")
    return out
