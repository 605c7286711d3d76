"""SIGHUP: re-read `config.toml` and apply what can change while vpnd runs.

The file is read and validated by the same loader as at start (`load_config`, secrets from the
environment and credentials included). A broken file changes nothing: the error is logged with the
file and key, and the running configuration stays. Otherwise the new configuration is merged into
the running one key by key:

- keys in `LIVE_KEYS` (and `[[plans]]`, `[[nodes]]`) take the new value: readers consult `app.config` each time
  they use it, `app.reload_hooks` retune what was built from it (the outbound rate limiter, the log
  level), and `app.config_reloaded` wakes the periodic workers so they re-read their period;
- every other key keeps its running value, and a changed one is logged as needing a restart.

Each changed key is logged on its own line, never with its value (some are secrets).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import attrs

from vpnd.app import App
from vpnd.config import SECTION_CLASSES, Config, ConfigError, check_whole, load_config
from vpnd.logs import quote

log = logging.getLogger("vpnd.reload")

#: Keys applied without a restart (every reader reads them at use, or a reload hook retunes it).
LIVE_KEYS: dict[str, frozenset[str]] = {
    "telegram": frozenset(
        {
            "admin_ids",
            "admin_roles",
            "rate_per_second",
            "per_chat_per_second",
            "support_contact",
            "default_language",
            "max_concurrent_updates",
            "handler_timeout_seconds",
            "max_pending_per_chat",
            "flood_notice_interval_seconds",
            "pending_alert_seconds",
        }
    ),
    "log": frozenset({"level"}),
    "shutdown": frozenset({"grace_seconds"}),
    "trial": frozenset({"enabled", "days", "devices", "traffic_gb"}),
    "referral": frozenset({"percent", "levels", "withdraw_min"}),
    "payments": frozenset(
        {"purchase_ttl_minutes", "min_price", "topup_presets", "topup_min", "topup_max", "notify_chat_id"}
    ),
    "cryptopay": frozenset({"poll_interval", "accepted_assets"}),
    "yookassa": frozenset({"poll_interval", "notify_networks", "methods", "return_url"}),
    "stars": frozenset({"enabled"}),
    "xray": frozenset({"location", "link_name", "traffic_interval", "rotate_batch_size", "rotate_interval_seconds"}),
    "workers": frozenset(
        {
            "reminders_interval",
            "trial_interval",
            "quota_interval",
            "expiry_interval",
            "renewal_interval",
            "renewal_window_hours",
            "health_interval",
            "housekeeping_interval",
            "retention_days",
        }
    ),
    "broadcast": frozenset({"paid", "progress_interval", "paid_rate_per_second"}),
    # The apps file is re-read with the configuration: an edited copy shows up as "[connect].catalog".
    "connect": frozenset({"apps_file", "catalog"}),
    "backup": frozenset({"directory", "keep", "interval_hours", "max_age_hours", "pg_dump", "timeout_minutes"}),
    "terms": frozenset({"enabled", "version", "terms_text", "terms_url", "privacy_text", "privacy_url"}),
}


@attrs.frozen
class ReloadResult:
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]


def merge_live(running: Config, new: Config) -> tuple[Config, ReloadResult]:
    """The running config with the live keys of `new`; which keys changed, and how."""
    applied: list[str] = []
    needs_restart: list[str] = []
    sections: dict[str, Any] = {}
    for section in SECTION_CLASSES:
        old_value, new_value = getattr(running, section), getattr(new, section)
        live = LIVE_KEYS.get(section, frozenset())
        updates = {}
        for key, old, fresh in _fields(old_value, new_value):
            if old == fresh:
                continue
            if key in live:
                updates[key] = fresh
                applied.append(f"[{section}].{key}")
            else:
                needs_restart.append(f"[{section}].{key}")
        if updates:
            sections[section] = attrs.evolve(old_value, **updates)
    if running.plans != new.plans:
        applied.append("[[plans]]")
        sections["plans"] = new.plans
    if running.traffic_packs != new.traffic_packs:
        applied.append("[[traffic_packs]]")
        sections["traffic_packs"] = new.traffic_packs
    if running.nodes != new.nodes:
        # The Xray fleet follows: writers start for added nodes, retire removed ones (`vpnd.nurseries.xray`).
        applied.append("[[nodes]]")
        sections["nodes"] = new.nodes
    merged = attrs.evolve(running, **sections)
    return merged, ReloadResult(tuple(applied), tuple(needs_restart))


def _fields(old: Any, new: Any) -> Iterator[tuple[str, object, object]]:
    for field in attrs.fields(type(old)):
        yield field.name, getattr(old, field.name), getattr(new, field.name)


def reload_config(app: App) -> ReloadResult | None:
    """Re-read `app.config.path` and apply it (see the module docstring); None when refused."""
    path = app.config.path
    try:
        new = load_config(path)
        merged, result = merge_live(app.config, new)
        check_whole(path, merged)  # live values next to running restart-only ones must still agree
    except ConfigError as exc:
        log.error("event=reload_failed cause=%s detail=%s", quote(str(exc)), "kept_the_running_configuration")
        return None
    if result.applied:
        app.config = merged
        for hook in app.reload_hooks:
            hook(merged)
        app.config_reloaded.changed()
    for key in result.applied:
        log.info("event=config_key_applied key=%s", key)
    for key in result.needs_restart:
        log.warning("event=config_key_needs_restart key=%s detail=%s", key, "kept_the_running_value_until_restart")
    log.info(
        "event=reloaded config=%s applied=%d needs_restart=%d",
        quote(path),
        len(result.applied),
        len(result.needs_restart),
    )
    return result


def set_log_level(config: Config) -> None:
    """A reload hook: `[log].level` of the new config."""
    logging.getLogger().setLevel(config.log.level.upper())
