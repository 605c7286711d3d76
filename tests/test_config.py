"""Configuration: the documented example loads, and every mistake is named precisely (exit 2)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.keys import PUBLIC_KEY
from vpnd.config import SECTION_READERS, ConfigError, load_config, render_effective

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vpnd", *args], capture_output=True, text=True, timeout=60, env=env)


def test_example_config_loads_and_documents_every_key() -> None:
    config = load_config(REPO / "config.toml", environ={})
    assert [p.code for p in config.plans] == ["m1", "m3"]
    text = (REPO / "config.toml").read_text()
    for section, readers in SECTION_READERS.items():
        assert f"[{section}]" in text, section
        for key in readers:
            assert re.search(rf"^{key} = ", text, re.M), f"[{section}].{key} is not documented in config.toml"


def test_check_config_prints_effective_config_with_secrets_masked(write_config: Callable[..., Path]) -> None:
    path = write_config(
        telegram={"token": "123456:SECRET-TOKEN-VALUE", "admin_ids": [1, 2]},
        database={"dsn": "postgresql://vpnd:hunter2-password@db.internal/vpnd"},
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "SECRET-TOKEN" not in result.stdout and "hunter2" not in result.stdout
    assert "postgresql://vpnd:***@db.internal/vpnd" in result.stdout
    assert "admin_ids = [1, 2]" in result.stdout
    assert "OK" in result.stderr


def test_secrets_from_environment_and_credentials(write_config: Callable[..., Path], tmp_path: Path) -> None:
    path = write_config(telegram={"token": "from-file"})
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "telegram_token").write_text("from-credential\n")
    (creds / "database_dsn").write_text("postgresql://c@/x\n")
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.telegram.token == "from-credential"
    assert config.database.dsn == "postgresql://c@/x"
    config = load_config(path, environ={"CREDENTIALS_DIRECTORY": str(creds), "VPND_TELEGRAM_TOKEN": "from-env"})
    assert config.telegram.token == "from-env"


CASES = [
    ('[http]\nlisten = "8080"\n', '[http].listen: expected "host:port", got "8080"'),
    ("[http]\nlisten = 8080\n", '[http].listen: expected "host:port", got 8080'),
    ('[http]\nlisten = "[::1]:99999"\n', "[http].listen: expected a port between 0 and 65535"),
    ('[telegram]\npoll_timeout = "25"\n', '[telegram].poll_timeout: expected an integer, got "25"'),
    ("[telegram]\nmax_concurrent_updates = 0\n", "[telegram].max_concurrent_updates: expected a value from 1 to 1000"),
    ('[telegram]\nadmin_ids = [1, "x"]\n', '[telegram].admin_ids: item 1: expected an integer, got "x"'),
    ('[telegram]\napi_base_url = "api.telegram.org"\n', "[telegram].api_base_url: expected an http:// or https:// URL"),
    ("[shutdown]\ngrace_second = 3\n", "[shutdown].grace_second: unknown key (known: grace_seconds)"),
    ("[nonsense]\nx = 1\n", "[nonsense]: unknown section"),
    ('[log]\nformat = "xml"\n', '[log].format: expected one of "kv", "json", got "xml"'),
    ("[database]\npool_min = 5\npool_max = 2\n", "[database].pool_min: expected at most pool_max (2), got 5"),
    ("[database]\nmigrate_on_start = 1\n", "[database].migrate_on_start: expected true or false, got 1"),
    ("[telegram\ntoken = 1\n", "invalid TOML"),
    ('[[plans]]\ncode = "m1"\ndays = 30\nprice = "abc"\ncurrency = "USD"\n', "[[plans]][0].price: expected a decimal"),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "-1"\ncurrency = "USD"\n',
        "[[plans]][0].price: expected a positive value",
    ),
    ('[[plans]]\ncode = "m1"\nprice = "1"\ncurrency = "USD"\n', "[[plans]][0].days: missing required key"),
    (
        '[[plans]]\ncode = "a"\ndays = 1\nprice = "1"\ncurrency = "USD"\n'
        '[[plans]]\ncode = "a"\ndays = 2\nprice = "2"\ncurrency = "USD"\n',
        '[[plans]][1].code: duplicate plan code "a"',
    ),
    ("[cryptopay]\nenabled = true\n", "[cryptopay].token: required when [cryptopay].enabled = true"),
    ("[xray]\nenabled = true\n", "[xray].public_key: REALITY public key must be 43 characters"),
    (
        f'[xray]\nenabled = true\npublic_key = "{PUBLIC_KEY}"\nshort_id = "zz"\n',
        "[xray].short_id: REALITY short id must be hex digits",
    ),
    ('[payments]\nnotify_chat_id = "@sales"\n', '[payments].notify_chat_id: expected an integer, got "@sales"'),
    ("[payments]\nnotify_chat_id = -1e13\n", "[payments].notify_chat_id: expected an integer, got -10000000000000.0"),
    (
        "[payments]\nnotify_chat_id = 10000000000000000\n",
        "[payments].notify_chat_id: expected a Telegram chat id (an integer such as -1001234567890)",
    ),
    ('[xray]\napi_prefix = "v3."\n', '[xray].api_prefix: expected one of "xray.", "v2ray.core.", got "v3."'),
    ("[telegram_payments]\nenabled = true\n", "[telegram_payments].provider_token: required when"),
    ('[telegram_payments]\ncurrency = "RUR"\n', "[telegram_payments].currency: expected an ISO 4217 code Telegram"),
    ("[telegram_payments]\nvat_code = 0\n", "[telegram_payments].vat_code: expected a value from 1 to 12"),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\nprices = { JPY = "499.5" }\n',
        "[[plans]][0].prices.JPY: expected a price in whole JPY minor units",
    ),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\nprices = { RUB = "-1" }\n',
        "[[plans]][0].prices: RUB: expected a positive value",
    ),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\nprices = { rouble = "1" }\n',
        '[[plans]][0].prices: expected an ISO 4217 currency code, got "rouble"',
    ),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\nprices = "299 RUB"\n',
        "[[plans]][0].prices: expected a table of currencies",
    ),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\ntraffic_reset = "weekly"\n',
        '[[plans]][0].traffic_reset: expected one of "never", "monthly", "per_period", got "weekly"',
    ),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\ndevices = -1\n',
        "[[plans]][0].devices: expected a value from 0 to 1000",
    ),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\ntraffic_gb = 1.5\n',
        "[[plans]][0].traffic_gb: expected an integer, got 1.5",
    ),
    (
        '[[plans]]\ncode = "t"\ndays = 3\ntrial = true\nvisible = true\n'
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\n',
        "[[plans]][0].visible: a trial plan is never sold",
    ),
    (
        '[[plans]]\ncode = "t"\ndays = 3\ntrial = true\n[[plans]]\ncode = "u"\ndays = 3\ntrial = true\n'
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\n',
        "[[plans]][1].trial: only one plan can be the trial",
    ),
    (
        '[[plans]]\ncode = "t"\ndays = 3\ntrial = true\n',
        "[[plans]]: expected at least one plan for sale",
    ),
    ('[[traffic_packs]]\ncode = "p"\nprice = "1"\ncurrency = "USD"\n', "[[traffic_packs]][0].gb: missing required key"),
    (
        '[[traffic_packs]]\ncode = "p"\ngb = 0\nprice = "1"\ncurrency = "USD"\n',
        "[[traffic_packs]][0].gb: expected a value from 1 to 1000000",
    ),
    (
        '[[traffic_packs]]\ncode = "p"\ngb = 10\nprice = "1"\ncurrency = "USD"\nsize = 3\n',
        "[[traffic_packs]][0].size: unknown key",
    ),
    (
        '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\n'
        '[[traffic_packs]]\ncode = "m1"\ngb = 10\nprice = "1"\ncurrency = "USD"\n',
        '[[traffic_packs]][0].code: "m1" is also a plan\'s code',
    ),
    ("[trial]\ntraffic_gb = -5\n", "[trial].traffic_gb: expected a value from 0 to 1000000"),
]


@pytest.mark.parametrize(("text", "message"), CASES)
def test_config_errors_name_file_key_and_expectation(
    write_config: Callable[..., Path], text: str, message: str
) -> None:
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_cli_config_error_exit_2_without_traceback(write_config: Callable[..., Path]) -> None:
    path = write_config('[http]\nlisten = "8080"\n')
    for command in ("check-config", "run", "migrate"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 2, (command, result.stderr)
        assert f'{path}: [http].listen: expected "host:port", got "8080"' in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_file_and_missing_secrets(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "absent.toml: file not found" in result.stderr
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("VPND_")}
    result = run_cli("run", "--config", str(write_config()), env=env)
    assert result.returncode == 2
    assert "[database].dsn: required" in result.stderr


def test_render_effective_round_trips(write_config: Callable[..., Path]) -> None:
    config = load_config(REPO / "config.toml", environ={})
    path = write_config(render_effective(config))
    again = load_config(path, environ={})
    assert again.plans == config.plans and again.traffic_packs == config.traffic_packs
    assert again.http == config.http and again.workers == config.workers


def test_the_trial_is_a_plan_from_trial_or_from_a_plan_marked_trial(write_config: Callable[..., Path]) -> None:
    sold = '[[plans]]\ncode = "m1"\ndays = 30\nprice = "4.99"\ncurrency = "USD"\ndevices = 3\ntraffic_gb = 100\n'
    config = load_config(write_config("[trial]\ndays = 5\ndevices = 1\ntraffic_gb = 2\n" + sold), environ={})
    trial = config.trial_plan
    assert (trial.code, trial.days, trial.devices, trial.traffic_gb, trial.visible) == ("trial", 5, 1, 2, False)
    assert config.plan("trial") == trial and [p.code for p in config.sale_plans] == ["m1"]
    assert config.plan("m1") is not None and config.plan("m1").traffic_limit_bytes == 100 * 2**30  # type: ignore[union-attr]

    marked = '[[plans]]\ncode = "free"\ndays = 2\ntrial = true\ntraffic_gb = 1\nnodes = ["local"]\n'
    config = load_config(write_config("[trial]\ndays = 5\n" + marked + sold), environ={})
    assert config.trial_plan.code == "free" and config.trial_plan.days == 2 and not config.trial_plan.visible
    assert [p.code for p in config.sale_plans] == ["m1"]
