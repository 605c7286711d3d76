"""Sandbox: fake peers (Telegram Bot API, Crypto Pay, Xray) on loopback for tests and the demo."""
