"""The one strict settings parser every step and the model use."""

import dataclasses
from typing import Literal

import pytest

from metarec.settings import Settings


@dataclasses.dataclass(frozen=True)
class _Example(Settings):
    section = "example"
    steps: int = 5
    lr: float = 0.1
    mode: Literal["a", "b"] = "a"
    hidden: tuple[int, ...] = (4, 2)
    prior: float | None = None
    flag: bool = False

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError("example settings: steps must be >= 0")


def test_defaults_and_overrides():
    s = _Example.from_dict({"lr": 1, "hidden": [8]}, steps=3)
    assert (s.steps, s.lr, s.hidden, s.prior) == (3, 1.0, (8,), None)
    assert isinstance(s.lr, float)
    assert s.to_dict()["hidden"] == [8]
    assert _Example.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"stepz": 1}, r"unknown key\(s\) \['stepz'\]"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"steps": True}, "steps must be an integer"),
        ({"flag": 1}, "flag must be true or false"),
        ({"mode": "c"}, "mode must be one of"),
        ({"hidden": 3}, "hidden must be a list"),
        ({"prior": "x"}, "prior must be a number"),
        ({"steps": -1}, "steps must be >= 0"),
    ],
)
def test_refuses_bad_values_by_name(values, message):
    with pytest.raises(ValueError, match=message):
        _Example.from_dict(values)


def test_replace_validates():
    with pytest.raises(ValueError, match="steps must be >= 0"):
        _Example().replace(steps=-2)
