"""The texts moved to the domain layer: `vpnd.texts` (kept here so older imports keep working)."""

from vpnd.texts import FALLBACK, Html, Texts

__all__ = ["FALLBACK", "Html", "Texts"]
