"""API parameters as the real service coerces them (strings, numbers, lists, booleans), refusing the
rest with its error names."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from vpnd_sandbox.cryptopay.records import FakeApiError


def param_str(params: Mapping[str, Any], key: str, *, max_len: int | None = None) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FakeApiError(400, f"{key.upper()}_INVALID")
    text = str(value)
    if max_len is not None and len(text.encode("utf-8") if key == "payload" else text) > max_len:
        raise FakeApiError(400, f"{key.upper()}_TOO_LONG")
    return text


def param_int(params: Mapping[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise FakeApiError(400, f"{key.upper()}_INVALID")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise FakeApiError(400, f"{key.upper()}_INVALID")


def param_bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "1"}:
        return True
    if isinstance(value, str) and value.lower() in {"false", "0"}:
        return False
    raise FakeApiError(400, f"{key.upper()}_INVALID")


def param_list(params: Mapping[str, Any], key: str) -> list[str] | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list):
        items = [str(item).strip() for item in value if not isinstance(item, bool | dict | list)]
        if len(items) != len(value):
            raise FakeApiError(400, f"{key.upper()}_INVALID")
    else:
        raise FakeApiError(400, f"{key.upper()}_INVALID")
    if not items or any(not item for item in items):
        raise FakeApiError(400, f"{key.upper()}_INVALID")
    return items


def param_amount(params: Mapping[str, Any]) -> Decimal:
    value = params.get("amount")
    if value is None or isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FakeApiError(400, "AMOUNT_INVALID")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise FakeApiError(400, "AMOUNT_INVALID") from None
    if not amount.is_finite() or amount <= 0:
        raise FakeApiError(400, "AMOUNT_INVALID")
    return amount
