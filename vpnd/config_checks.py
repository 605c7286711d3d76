"""Configuration gaps that do not stop vpnd but that an operator must hear about.

With `[xray] enabled = true` every link setting is checked when the config loads (a bad one is a
configuration error). With Xray managed elsewhere (`enabled = false`) the bot still hands out keys,
so a missing or invalid link setting — typically an empty `[xray].public_key` on a first run — is
a *gap*: `vpnd check-config` and start-up name the key, the admins are alerted, and users asking
for their key are told politely that it is being prepared instead of hitting an error.

The example REALITY key pair below is what the shipped `config.toml` and `vpnd sandbox` use, so a
first run works end to end. It is public, so it protects nothing: production operators generate
their own pair with `xray x25519` (the private key goes into the Xray template's
`realitySettings.privateKey`, the public key into `[xray].public_key`); check-config warns while
the example key is configured.
"""

from __future__ import annotations

from vpnd.config import Config, ConfigError, _check_link_settings

#: The example key pair (base64url X25519, as `xray x25519` prints it). Never use it in production.
EXAMPLE_REALITY_PRIVATE_KEY = "kNnjykfzTAq9byFQF__n034w5r_2_ezk11GmaoIrNHA"
EXAMPLE_REALITY_PUBLIC_KEY = "a9_1m-kb7XzjHqpTAeKPMhtu4xbxl4xHxXyYp6qVSmk"

KEY_PENDING_HINT = 'users are told "your key is being prepared" until it is set'


def link_settings_gap(config: Config) -> ConfigError | None:
    """The first `[xray]` link setting users' keys cannot be built with (the error names the key);
    None also when `[xray]` is not a server users get links for (only `[[nodes]]`, checked at load)."""
    if config.xray.as_node() not in config.vpn_nodes:
        return None
    try:
        _check_link_settings(config.path, config.xray, "[xray]")
    except ConfigError as exc:
        return exc
    return None


def config_warnings(config: Config) -> list[str]:
    """What `check-config` and start-up warn about (each names the file and the key)."""
    warnings = []
    gap = link_settings_gap(config)
    if gap is not None:
        hint = "generate a key pair with `xray x25519`; " if gap.key == "[xray].public_key" else ""
        warnings.append(f"{gap}; {hint}{KEY_PENDING_HINT}")
    if config.xray.public_key == EXAMPLE_REALITY_PUBLIC_KEY:
        warnings.append(
            f"{config.path}: [xray].public_key: this is the public example key from config.toml; anyone can "
            "know its private key: generate your own pair with `xray x25519` before real users connect"
        )
    return warnings
