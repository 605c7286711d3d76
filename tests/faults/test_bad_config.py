"""Random and mutated `config.toml` files: a ConfigError naming the file (exit 2), never a traceback.

Most examples go through `vpnd.config.load_config` in-process (hypothesis, hundreds of files); a few
representative bad files go through the real command line (`python -m vpnd check-config` and `run`),
which must exit 2 with a one-line `vpnd: <file>: ...` message on stderr and no traceback.

Strategies: whole documents built from the known sections and keys (and unknown ones) with values of
every TOML type; a valid base config with one known key set to a random value (the readers'
corners); the reference `config.toml` with random edits; raw text and bytes.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.keys import PUBLIC_KEY
from vpnd.config import SECTION_READERS, Config, ConfigError, load_config, render_effective
from vpnd.pricing import min_price_minor, plan_offer, topup_presets_minor

REPO = Path(__file__).resolve().parents[2]
REFERENCE = (REPO / "config.toml").read_text()
PLAN_KEYS = ["code", "title", "days", "price", "currency", "stars", "prices"]
SETTINGS = settings(
    max_examples=int(os.environ.get("VPND_FUZZ_EXAMPLES", "1000")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- writing TOML ---------------------------------------------------------------------------------


def toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(document: dict[str, Any]) -> str:
    """Top-level keys as `"key" = value` (tables inline): tomllib reads back the same dict."""
    return "\n".join(f"{toml_string(key)} = {toml_value(value)}" for key, value in document.items()) + "\n"


# --- strategies -----------------------------------------------------------------------------------

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 65535, 65536, 2**31, 10**6]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "127.0.0.1:8080",
            "[::1]:0",
            "8080",
            "http://x",
            "https://a.b/c",
            "4.99",
            "1e999",
            "NaN",
            "xray.",
            "en",
            "ru",
            "json",
            "kv",
            "debug",
            "-1",
            "0x10",
            " 5 ",
        ]
    ),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
    st.dates(),
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=8,
)
any_key = st.text(max_size=12)


def section_table(section: str) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from(sorted(SECTION_READERS[section])) | any_key
    return st.dictionaries(keys, values, max_size=6)


plan = st.dictionaries(st.sampled_from(PLAN_KEYS) | any_key, values, max_size=7)
sections = st.sampled_from(sorted(SECTION_READERS))
documents = st.fixed_dictionaries(
    {},
    optional={
        **{name: section_table(name) | values for name in SECTION_READERS},
        "plans": st.lists(plan, max_size=3) | values,
    },
) | st.dictionaries(any_key, values, max_size=4)

BASE: dict[str, Any] = {
    "telegram": {"token": "1:x", "admin_ids": [1]},
    "database": {"dsn": "postgresql://vpnd@/vpnd"},
    "xray": {
        "enabled": True,
        "public_key": PUBLIC_KEY,
        "short_id": "0123abcd",
        "host": "vpn.example.com",
    },
    "cryptopay": {"enabled": True, "token": "1:y"},
    "plans": [{"code": "m1", "title": "1 month", "days": 30, "price": "4.99", "currency": "USD", "stars": 250}],
}


@st.composite
def one_key_changed(draw: st.DrawFn) -> dict[str, Any]:
    """The valid base with one known key (a section's, or a plan's) set to a random value."""
    document = {name: (dict(v) if isinstance(v, dict) else [dict(p) for p in v]) for name, v in BASE.items()}
    if draw(st.booleans()):
        section = draw(sections)
        key = draw(st.sampled_from(sorted(SECTION_READERS[section])))
        document.setdefault(section, {})[key] = draw(values)
    else:
        document["plans"][0][draw(st.sampled_from(PLAN_KEYS))] = draw(values)
    return document


@st.composite
def edited_reference(draw: st.DrawFn) -> str:
    """The reference config.toml with a few random edits (deletions, insertions, replaced lines)."""
    text = REFERENCE
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "line"]))
        at = draw(st.integers(0, len(text)))
        if kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 30)) :]
        elif kind == "insert":
            text = (
                text[:at]
                + draw(st.text(max_size=20) | st.sampled_from(["[", "]", '"', "=", "\n[x]\n", "#"]))
                + text[at:]
            )
        else:
            lines = text.splitlines()
            index = draw(st.integers(0, len(lines) - 1))
            key = lines[index].split("=", 1)[0].strip() if "=" in lines[index] else "k"
            lines[index] = f"{key} = {toml_value(draw(values))}"
            text = "\n".join(lines) + "\n"
    return text


files = st.one_of(
    documents.map(toml_document),
    one_key_changed().map(toml_document),
    edited_reference(),
    st.text(max_size=200),
    st.binary(max_size=200),
)

# --- the property ---------------------------------------------------------------------------------


@attrs.frozen
class Checked:
    config: Config | None
    error: str | None


def floats_of(config: Config) -> Iterator[tuple[str, float]]:
    for field in attrs.fields(Config):
        section = getattr(config, field.name)
        if attrs.has(type(section)):
            for inner in attrs.fields(type(section)):
                value = getattr(section, inner.name)
                if isinstance(value, float):
                    yield f"[{field.name}].{inner.name}", value


def load(content: str | bytes) -> Checked:
    """load_config on a temp file: a Config, or a ConfigError naming the file — anything else fails."""
    with tempfile.TemporaryDirectory(prefix="vpnd-fuzz-") as tmp:
        path = Path(tmp) / "config.toml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        try:
            config = load_config(path, environ={})
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(f"{path}: "), message
            assert message.strip() and "Traceback" not in message
            return Checked(None, message)
        render_effective(config)  # what `vpnd check-config` prints must not fail either
        return Checked(config, None)


@SETTINGS
@given(files)
def test_random_config_files_give_config_error_or_config_never_a_crash(content: str | bytes) -> None:
    load(content)


@SETTINGS
@example(toml_document({**BASE, "telegram": {**BASE["telegram"], "handler_timeout_seconds": math.nan}}))
@given(one_key_changed().map(toml_document))
def test_accepted_configs_hold_only_finite_numbers(content: str) -> None:
    checked = load(content)
    if checked.config is not None:
        for name, value in floats_of(checked.config):
            assert math.isfinite(value), f"{name} = {value} was accepted"


@SETTINGS
@example(toml_document({**BASE, "plans": [{**BASE["plans"][0], "price": "0.001"}]}))
@given(one_key_changed().map(toml_document))
def test_accepted_configs_have_usable_prices(content: str) -> None:
    checked = load(content)
    if checked.config is None:
        return
    payments = checked.config.payments
    for plan in checked.config.plans:
        offer = plan_offer(plan)
        assert 0 <= offer.price_minor and 0 <= plan.stars < 2**31, plan
        assert all(plan_offer(plan, currency).price_minor > 0 for currency in plan.prices), plan
    topup_presets_minor(payments)
    min_price_minor(payments, payments.currency)


# --- the command line -----------------------------------------------------------------------------

CLI_CASES: dict[str, bytes] = {
    "invalid TOML": b'[telegram\ntoken = "x"\n',
    "not UTF-8": b'[telegram]\ntoken = "\xff\xfe"\n',
    "unknown section": b"[telegrma]\ntoken = 'x'\n",
    "unknown key": b"[shutdown]\ngrace_second = 3\n",
    "wrong type": b"[http]\nlisten = 8080\n",
    "out of range": b"[telegram]\npoll_timeout = 99\n",
    "bad plan": b'[[plans]]\ncode = "M 1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\n',
    "card currency Telegram does not take": b'[telegram_payments]\ncurrency = "XTR"\n',
    "section not a table": b"telegram = 5\n",
    "empty file, run needs a token": b"",
}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vpnd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("VPND_")},
    )


def assert_config_exit(result: subprocess.CompletedProcess[str], path: Path) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-2000:]
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith(f"vpnd: {path}: "), first


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_refuses_bad_config_with_exit_2_and_one_message(name: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(CLI_CASES[name])
    command = "run" if name.startswith("empty file") else "check-config"
    assert_config_exit(run_cli(command, "--config", str(path)), path)


def test_cli_missing_and_unreadable_config_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert_config_exit(run_cli("run", "--config", str(missing)), missing)
    assert_config_exit(run_cli("check-config", "--config", str(tmp_path)), tmp_path)  # a directory


def test_cli_deeply_nested_toml_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("x = " + "[" * 1000 + "]" * 1000 + "\n")
    assert_config_exit(run_cli("check-config", "--config", str(path)), path)


def test_cli_nan_interval_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[cryptopay]\npoll_interval = nan\n")
    assert_config_exit(run_cli("check-config", "--config", str(path)), path)
