"""Talking to Telegram: the Bot client, outbound rate limits, the update inbox, dispatch and flows."""
