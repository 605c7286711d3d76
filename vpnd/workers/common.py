"""Small pieces the workers share: dates in messages, keyset positions, buttons, plan prices."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import attrs

from vpnd.config import Config
from vpnd.pricing import to_minor
from vpnd.telegram.keyboards import Keyboard, button, keyboard
from vpnd.texts import Texts

#: Before every real `(timestamp, id)` keyset position.
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
START: tuple[dt.datetime, int] = (EPOCH, 0)


def format_date(when: dt.datetime) -> str:
    """How dates appear in messages (the same form the bot's flows use)."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def instant_key(when: dt.datetime) -> str:
    """A timestamp for dedupe keys: the same instant gives the same text whatever the session zone."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def renew_button(texts: Texts, lang: str) -> Keyboard:
    """The "Renew" button: it opens the buy flow (callback `buy`)."""
    return keyboard([button(texts.get(lang, "menu.renew"), "buy")])


def buy_button(texts: Texts, lang: str) -> Keyboard:
    return keyboard([button(texts.get(lang, "menu.buy"), "buy")])


@attrs.frozen
class PlanPrices:
    """The configured plans as parallel arrays for SQL (`unnest(codes, prices)`), prices in minor units."""

    codes: tuple[str, ...]
    prices_minor: tuple[int, ...]
    days: tuple[int, ...]

    @classmethod
    def from_config(cls, config: Config) -> PlanPrices:
        currency = config.payments.currency
        plans = [plan for plan in config.plans if not plan.trial]  # the trial is never charged
        return cls(
            tuple(p.code for p in plans),
            tuple(to_minor(p.price, currency) for p in plans),
            tuple(p.days for p in plans),
        )

    def sql_params(self) -> dict[str, Sequence[object]]:
        return {"plan_codes": list(self.codes), "plan_prices": list(self.prices_minor)}

    def days_of(self, code: str) -> int | None:
        try:
            return self.days[self.codes.index(code)]
        except ValueError:
            return None


@attrs.frozen
class BatchResult:
    """What one keyset batch did: rows looked at, rows acted on, and where the next batch starts."""

    seen: int
    handled: int
    last: tuple[dt.datetime, int] | None
    #: Messages were queued (the outbox sender should wake up).
    queued: bool = False
    #: Who may connect changed (the Xray writer should re-read the database).
    access_changed: bool = False
