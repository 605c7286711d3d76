"""Money as values: an integer number of a currency's minor units, and how to show it (pure, no I/O).

How many decimals a currency has is the one fact everything here turns on: 499 is "4.99 USD" but
"499 JPY" and "0.499 KWD". Fiat follows ISO 4217's minor-unit exponents (most currencies 2, the
yen, won, dong and a dozen others 0, the Gulf dinars 3); Telegram Stars (XTR) are whole stars; the
crypto assets Crypto Pay sells in are kept in the units its amounts are written in. An amount is
formatted in one place (`format_money`) so the menu, the buy flow, invoices and the admin views agree.
"""

from __future__ import annotations

from decimal import Decimal

STARS_CURRENCY = "XTR"

#: ISO 4217 currencies whose minor unit is not 1/100 (the list 4217 publishes, "Minor unit" column).
_ISO_4217_EXPONENTS: dict[str, int] = {
    **dict.fromkeys("BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
    **dict.fromkeys("CLF UYW".split(), 4),
}

#: Crypto assets Crypto Pay invoices in, with the decimals of the amounts it writes for them.
_CRYPTO_EXPONENTS: dict[str, int] = {
    "USDT": 6,
    "USDC": 6,
    "TON": 9,
    "BTC": 8,
    "LTC": 8,
    "TRX": 6,
    "BNB": 8,
    "ETH": 9,
}

_EXPONENTS: dict[str, int] = {**_ISO_4217_EXPONENTS, **_CRYPTO_EXPONENTS, STARS_CURRENCY: 0}

#: The fiat currencies Telegram Payments take (core.telegram.org/bots/payments/currencies.json). Telegram's
#: `exp` for each is its ISO 4217 minor unit (CLP ISK JPY KRW PYG UGX VND 0, KWD 3, the rest 2), so
#: `minor_exponent` gives the amounts `sendInvoice` wants.
TELEGRAM_CURRENCIES = frozenset(
    "AED AFN ALL AMD ARS AUD AZN BAM BDT BGN BND BOB BRL BYN CAD CHF CLP CNY COP CRC CZK DKK DOP DZD EGP ETB "
    "EUR GBP GEL GTQ HKD HNL HRK HUF IDR ILS INR ISK JMD JPY KES KGS KRW KWD KZT LBP LKR MAD MDL MNT MUR MVR "
    "MXN MYR MZN NGN NIO NOK NPR NZD PAB PEN PHP PKR PLN PYG QAR RON RSD RUB SAR SEK SGD THB TJS TRY TTD TWD "
    "TZS UAH UGX USD UYU UZS VND YER ZAR".split()
)


def minor_exponent(currency: str) -> int:
    """How many decimal places the currency's minor unit has (USD: 2, JPY: 0, KWD: 3, TON: 9)."""
    return _EXPONENTS.get(currency.upper(), 2)


def from_minor(minor: int, currency: str) -> Decimal:
    """499 → `Decimal("4.99")` for USD, `Decimal("499")` for JPY (exact; the inverse of `to_minor`)."""
    exponent = minor_exponent(currency)
    return Decimal(minor).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))


def format_money(minor: int, currency: str) -> str:
    """499, "USD" → "4.99 USD"; 500, "JPY" → "500 JPY"; 1234, "KWD" → "1.234 KWD"; 250, "XTR" → "250 ⭐"."""
    if currency.upper() == STARS_CURRENCY:
        return f"{minor} ⭐"
    return f"{from_minor(minor, currency)} {currency}"
