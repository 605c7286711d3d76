"""`[terms]`: what an operator may write, and the clear error (file and key) for what they may not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vpnd.config import ConfigError, load_config


def load(write_config: Callable[..., Path], **terms: Any) -> Any:
    return load_config(write_config(terms=terms), environ={}).terms


def test_defaults_off_and_a_text_per_language_with_fallback(write_config: Callable[..., Path]) -> None:
    assert load(write_config).enabled is False
    terms = load(
        write_config,
        enabled=True,
        version="2026-12-01",
        terms_text={"en": " Be nice. ", "ru": "Берегите сеть."},
        privacy_url="https://shop.example.test/privacy",
    )
    assert terms.text("terms", "ru", "en") == "Берегите сеть."
    assert terms.text("terms", "zh", "en") == "Be nice."  # no Chinese text: the default language's
    assert terms.text("privacy", "en", "en") == "" and terms.privacy_url == "https://shop.example.test/privacy"
    # One string is every language's text.
    assert load(write_config, enabled=True, version="1", terms_text="Hi").text("terms", "fa", "en") == "Hi"


@pytest.mark.parametrize(
    ("terms", "key", "fragment"),
    [
        ({"enabled": True, "terms_text": "x"}, "[terms].version", "required"),
        ({"enabled": True, "version": "v1"}, "[terms].terms_text", "terms_text or terms_url is required"),
        ({"version": "2026 12"}, "[terms].version", "letters, digits"),
        ({"version": "v:1"}, "[terms].version", "letters, digits"),
        ({"version": "x" * 33}, "[terms].version", "letters, digits"),
        ({"terms_url": "http://shop.example.test/terms"}, "[terms].terms_url", "https://"),
        ({"privacy_url": "javascript:alert(1)"}, "[terms].privacy_url", "https://"),
        ({"privacy_url": "https://a b"}, "[terms].privacy_url", "https://"),
        ({"terms_text": {"xx": "hi"}}, "[terms].terms_text", "one of"),
        ({"terms_text": 5}, "[terms].terms_text", "a string or a table"),
        (
            {"enabled": True, "version": "1", "terms_text": "a", "terms_url": "https://x.test/t"},
            "[terms].terms_url",
            "not both",
        ),
        (
            {"enabled": True, "version": "1", "terms_text": "a" * 2000, "privacy_text": {"en": "b" * 1600}},
            "[terms].terms_text",
            "fit one message",
        ),
    ],
)
def test_refused_with_the_file_and_the_key(
    write_config: Callable[..., Path], terms: dict[str, Any], key: str, fragment: str
) -> None:
    path = write_config(terms=terms)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert error.value.key == key and error.value.file == str(path)
    assert fragment in str(error.value)
