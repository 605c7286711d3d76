"""Secrets out of sight: masking for `vpnd check-config`, and the strings the log redactor hides.

DSNs are parsed, not pattern-matched, in both of libpq's forms:

* **URL** (`postgresql://user:password@host:port/db?password=...`): the user info ends at the
  *last* `@`, so a password with a raw `@` in it (which libpq itself would split at
  the first `@`, taking the rest for the host) is masked whole. A `password=` query parameter is
  masked too.
* **key=value** (`host=db password='it''s secret' dbname=vpnd`): values are read the way libpq reads
  them (single quotes, backslash escapes), so a quoted password with spaces or quotes is masked whole.

A DSN that cannot be parsed is masked entirely. The log redactor gets every form a password can take
in a log line: as written, percent-decoded, and — for a password with a raw `@` — the "host" libpq
would make of its tail (it appears in connection errors).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import unquote

import psycopg

if TYPE_CHECKING:
    from vpnd.config import Config

MASK = "***"
_URL_SCHEME = re.compile(r"^postgres(?:ql)?://", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"(?<=[?&])(password=)([^&]*)", re.IGNORECASE)


def mask_secret(value: str) -> str:
    """`***` for any secret that is set (nothing of it is shown), "" for one that is not."""
    return MASK if value else ""


def mask_telegram_token(token: str) -> str:
    """Keep the bot id (the public part before ":"), hide the rest."""
    bot_id, colon, _ = token.partition(":")
    return f"{bot_id}:{MASK}" if colon and bot_id.isdigit() else mask_secret(token)


class _Unparsable(ValueError):
    pass


def _url_password_span(dsn: str) -> tuple[int, int] | None:
    """Where the password of a URL DSN is (start, end in `dsn`), or None when it has none."""
    start = _URL_SCHEME.match(dsn)
    assert start is not None
    at = dsn.rfind("@", start.end())
    if at < 0:
        return None
    colon = dsn.find(":", start.end(), at)
    if colon < 0:
        return None
    return colon + 1, at


def _kv_values(dsn: str) -> list[tuple[str, int, int, str]]:
    """(key, start, end, value) of each `key=value` pair, read as libpq reads them."""
    pairs: list[tuple[str, int, int, str]] = []
    i, n = 0, len(dsn)
    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            return pairs
        key_start = i
        while i < n and dsn[i] != "=" and not dsn[i].isspace():
            i += 1
        key = dsn[key_start:i]
        while i < n and dsn[i].isspace():
            i += 1
        if not key or i >= n or dsn[i] != "=":
            raise _Unparsable(dsn)
        i += 1
        while i < n and dsn[i].isspace():
            i += 1
        start, value = i, list[str]()
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise _Unparsable(dsn)
                if dsn[i] == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                elif dsn[i] == "'":
                    i += 1
                    break
                else:
                    value.append(dsn[i])
                    i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                else:
                    value.append(dsn[i])
                    i += 1
        pairs.append((key.lower(), start, i, "".join(value)))


def mask_dsn(dsn: str) -> str:
    """The DSN with its password hidden; what helps an operator (user, host, database) stays."""
    if not dsn:
        return ""
    if _URL_SCHEME.match(dsn):
        span = _url_password_span(dsn)
        masked = dsn if span is None else dsn[: span[0]] + MASK + dsn[span[1] :]
        return _QUERY_PASSWORD.sub(lambda m: m.group(1) + MASK, masked)
    try:
        pairs = _kv_values(dsn)
    except _Unparsable:
        return MASK
    out, last = [], 0
    for key, start, end, _value in pairs:
        if key == "password":
            out.append(dsn[last:start] + MASK)
            last = end
    out.append(dsn[last:])
    return "".join(out)


def dsn_secret_forms(dsn: str) -> list[str]:
    """Every form the DSN's password can take in a log line (for the redactor); [] without one."""
    forms: list[str] = []
    if not dsn:
        return forms
    if _URL_SCHEME.match(dsn):
        span = _url_password_span(dsn)
        if span is not None:
            raw = dsn[span[0] : span[1]]
            forms += [raw, unquote(raw)]
            if "@" in raw:
                # libpq splits at the first "@": the tail of the password becomes part of the host.
                try:
                    host = psycopg.conninfo.conninfo_to_dict(dsn).get("host")
                except psycopg.ProgrammingError:
                    host = None
                if isinstance(host, str) and "@" in host:
                    forms.append(host)
        for match in _QUERY_PASSWORD.finditer(dsn):
            forms += [match.group(2), unquote(match.group(2))]
    else:
        try:
            pairs = _kv_values(dsn)
        except _Unparsable:
            return [dsn]
        for key, start, end, value in pairs:
            if key == "password":
                forms += [dsn[start:end], value]
    return [form for form in dict.fromkeys(forms) if form]


def configured_secrets(config: Config) -> list[str]:
    """Every secret of the configuration, in every form it may be logged (for `logs.Redactor`)."""
    secrets = [config.telegram.token, config.cryptopay.token, config.metrics.password, config.metrics.token]
    secrets += [config.telegram_payments.provider_token, config.yookassa.secret_key]
    secrets += dsn_secret_forms(config.database.dsn)
    return [secret for secret in secrets if secret]
