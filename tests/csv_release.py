"""Writes a small MovieLens CSV release (ratings.csv, movies.csv, tags.csv) with learnable structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
# Words that go with each genre, in titles and in tags (as real titles and tags do).
GENRE_WORDS = ("Mission", "Party", "Letters", "Haunting", "Wedding", "Planet")
TAG_WORDS = ("explosions", "funny", "moving", "scary", "romantic", "space")


def write_csv_release(root: Path, n_users: int = 150, n_movies: int = 80, seed: int = 0) -> Path:
    """Writes the three files into ``root`` and returns it.

    Every rated (user, movie) pair is also tagged with probability 1/2 by that user with a tag naming
    the pair (``u<user>m<movie>``), so a test can tell exactly which tags reached the model.
    """
    rng = np.random.default_rng(seed)
    genre = rng.integers(0, len(GENRES), n_movies)
    year = rng.integers(1980, 2011, n_movies)
    quality = rng.normal(0, 0.5, n_movies)
    movies = pd.DataFrame(
        {
            "movieId": np.arange(1, n_movies + 1) * 3,  # sparse ids, as in real releases
            "title": [
                f"The {GENRE_WORDS[g]} {i + 1} ({y})"
                for i, (g, y) in enumerate(zip(genre, year, strict=True))
            ],
            "genres": [GENRES[g] for g in genre],
        }
    )
    taste = rng.normal(0, 1.0, (n_users, len(GENRES)))
    ratings, tags = [], []
    for user in range(n_users):
        for movie in rng.choice(n_movies, int(rng.integers(20, 40)), replace=False):
            score = 3.0 + taste[user, genre[movie]] + quality[movie] + rng.normal(0, 0.3)
            rating = float(np.clip(np.round(score * 2) / 2, 0.5, 5.0))
            movie_id = int(movies["movieId"].iloc[movie])
            ratings.append((user + 1, movie_id, rating, 1_000_000 + 1000 * user + int(movie)))
            if rng.random() < 0.5:
                tags.append((user + 1, movie_id, f"u{user + 1}m{movie_id}", 2_000_000))
            if rng.random() < 0.3:
                tags.append((user + 1, movie_id, TAG_WORDS[genre[movie]], 2_000_001))
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(ratings, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(
        root / "ratings.csv", index=False
    )
    movies.to_csv(root / "movies.csv", index=False)
    pd.DataFrame(tags, columns=["userId", "movieId", "tag", "timestamp"]).to_csv(
        root / "tags.csv", index=False
    )
    return root
