"""Turning exceptions (and Trio's exception groups) into one readable cause."""

from __future__ import annotations

import trio


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside `exc`, without the Cancelled that a crash causes in siblings."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for inner in exc.exceptions:
            leaves.extend(leaf_exceptions(inner))
        return leaves
    if isinstance(exc, trio.Cancelled):
        return []
    return [exc]


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
