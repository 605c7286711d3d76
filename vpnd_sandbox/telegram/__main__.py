"""``python -m vpnd_sandbox.telegram``: serve a fresh fake Telegram (see :func:`vpnd_sandbox.telegram.web.main`)."""

from vpnd_sandbox.telegram.web import main

main()
