"""Plan limits as services: the quota rules from the running config, and the quota worker's rounds."""

from __future__ import annotations

import logging
from functools import partial

from vpnd.app import App
from vpnd.db import quota
from vpnd.quota import limits_of

log = logging.getLogger("vpnd.quota")


def quota_rules(app: App) -> quota.QuotaRules:
    """The quota rules over the running config (a reload that changes a plan's limits applies at once)."""
    config = app.config
    return quota.QuotaRules(
        limits_for=partial(limits_of, config),
        texts=app.texts,
        default_language=config.telegram.default_language,
    )
