"""Plan limits as services: the quota rules from the running config, and the quota worker's rounds."""

from __future__ import annotations

import logging
from functools import partial

from vpnd.app import App
from vpnd.config import Config
from vpnd.db import quota
from vpnd.quota import limits_of
from vpnd.texts import Texts

log = logging.getLogger("vpnd.quota")


def quota_rules(app: App) -> quota.QuotaRules:
    """The quota rules over the running config (a reload that changes a plan's limits applies at once)."""
    return rules_for_config(app.config, app.texts)


def rules_for_config(config: Config, texts: Texts) -> quota.QuotaRules:
    quotas = [plan.traffic_limit_bytes for plan in (*config.plans, config.trial_plan) if plan.traffic_limit_bytes]
    return quota.QuotaRules(
        limits_for=partial(limits_of, config),
        texts=texts,
        default_language=config.telegram.default_language,
        # No plan with a quota: a bound no usage reaches (a plan given one later is seen at the next reading).
        smallest_quota=min(quotas, default=2**62),
    )
