"""vpnd: a Trio daemon that runs a VPN subscription business from a Telegram bot."""

__version__ = "0.1.0"
