"""`[referral]` levels and withdraw_min (issue 20): read, validated, and a bad value names the key and the file."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from vpnd.config import ConfigError, ReferralLevel, load_config


def test_levels_are_read_and_percent_is_the_default(write_config: Callable[..., Path]) -> None:
    levels = [{"paying": 0, "percent": 10}, {"paying": 5, "percent": 25}, {"paying": 20, "percent": 45}]
    config = load_config(write_config(referral={"levels": levels, "withdraw_min": "2.50"}), environ={})
    assert config.referral.effective_levels == (ReferralLevel(0, 10), ReferralLevel(5, 25), ReferralLevel(20, 45))
    assert config.referral.withdraw_min == Decimal("2.50")
    plain = load_config(write_config(name="plain.toml", referral={"percent": 7}), environ={})
    assert plain.referral.effective_levels == (ReferralLevel(0, 7),)


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ([{"paying": 0, "percent": 10}, {"paying": 5, "percent": 25}, {"paying": 5, "percent": 45}], "ascending"),
        ([{"paying": 3, "percent": 10}, {"paying": 1, "percent": 25}], "ascending"),
        ([{"paying": 0, "percent": 101}], "from 0 to 100"),
        ([{"paying": -1, "percent": 10}], "zero or a positive"),
        ([{"paying": 0}], "a table"),
        ([{"paying": 0, "percent": 10, "bonus": 1}], "a table"),
        ({"paying": 0, "percent": 10}, "a list"),
    ],
)
def test_bad_levels_name_the_key_and_the_file(write_config: Callable[..., Path], levels: object, message: str) -> None:
    path = write_config(referral={"levels": levels})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    text = str(caught.value)
    assert "[referral].levels" in text and str(path) in text and message in text, text


def test_withdraw_min_must_be_positive(write_config: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match=r"\[referral\]\.withdraw_min"):
        load_config(write_config(referral={"withdraw_min": "0"}), environ={})
