"""The run-configuration reference in docs/pipeline.md states every step's real defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "pipeline.md"
ROW = re.compile(r"^\| `([a-z_0-9]+)` \| `([^`]*)` \|", re.MULTILINE)


def documented_defaults(section: str) -> dict[str, object]:
    """``key -> default`` of the table under ``### `section` ``."""
    text = DOC.read_text()
    start = text.index(f"### `{section}`")
    end = text.find("\n### ", start + 1)
    return {key: yaml.safe_load(value) for key, value in ROW.findall(text[start : end if end > 0 else None])}


@pytest.mark.parametrize(
    "section, module",
    [("preprocess", "metarec.preprocessing"), ("train", "metarec.training")],
)
def test_every_default_is_documented_with_its_value(section, module):
    import importlib

    defaults = importlib.import_module(module).DEFAULTS
    documented = documented_defaults(section)
    # min_ratings / max_ratings share one row; the rest must match key by key.
    shared = {"min_ratings", "max_ratings"} if section == "preprocess" else set()
    assert set(defaults) - shared == set(documented) - shared
    for key in set(documented) - shared:
        assert documented[key] == defaults[key], key
