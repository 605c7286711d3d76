"""QR codes as PNG images (pure): the key photo after a trial or a payment, and "QR code" in My subscription."""

from __future__ import annotations

import io

import segno


def qr_png(text: str) -> bytes:
    """`text` as a QR code PNG (error correction M, 6 px modules, a 2-module quiet zone)."""
    buffer = io.BytesIO()
    segno.make(text, error="m").save(buffer, kind="png", scale=6, border=2)
    return buffer.getvalue()
