"""The subscription URL (`GET /sub/<token>`) and the share links the bot shows as text and QR code.

Client apps (v2rayN, Hiddify, Streisand, ...) poll the URL: the body is the v2rayN format (base64 of
the links, one per line) and two headers tell them when to poll again and what to show as usage and
expiry. The token is the user's random `sub_token` (192 bits); a reissue replaces it, so an old URL
answers 404 from then on. An expired or revoked subscription answers a valid, empty list with its
expiry, so apps show "expired" instead of an error.

Devices (`vpnd.services.devices`): apps that send `x-hwid` take a slot of the plan's device limit at
their first fetch; a new device over the limit, a subscription over its traffic quota, and (with
`[devices] missing_hwid = "deny"`) an app without a device id get a valid, empty list whose profile
title and `announce` header (base64, as Happ and v2RayTun read them) say why and what to do. Every
fetch runs the check: nothing is cached in front of it (`cache-control: no-store`).

A person who opens the URL in a browser gets an account page instead (`vpnd.account_page`: status,
expiry, traffic, devices, QR code, per-app import buttons); `wants_account_page` tells a browser from
an app by its headers, `?format=raw` forces the body. A browser is not a device: it takes no slot.
An unknown token is the same 404 either way, and the same rate limit applies.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import math
import re
import time
from collections import OrderedDict
from functools import partial

import attrs

from vpnd.account_page import (
    PAGE_HEADERS,
    AccountFacts,
    PageLinks,
    account_status,
    language_from_accept,
    platform_of,
    render_account_page,
    renew_link,
    wants_account_page,
)
from vpnd.app import App
from vpnd.config import Config
from vpnd.db.subscriptions import Subscription
from vpnd.devices import BadDeviceId, read_device
from vpnd.quota import limits_of
from vpnd.services.devices import AccountFetch, Fetch, fetch_account, fetch_subscription
from vpnd.texts import Texts
from vpnd.web import Request, Response, Router
from vpnd.xray.links import build_vless_reality_link, subscription_body, subscription_userinfo_header

#: Hours between client refreshes (the `profile-update-interval` header).
PROFILE_UPDATE_INTERVAL_HOURS = 12
#: Per-token limit: a burst of this many requests, then one more every `REFILL_SECONDS`.
RATE_BURST = 10
RATE_REFILL_SECONDS = 6.0
#: Retry-After while a configuration gap keeps keys from being built.
KEY_PENDING_RETRY_SECONDS = 300
#: Tokens remembered by the limiter; the least recently seen is forgotten beyond this.
RATE_MAX_TOKENS = 10_000

log = logging.getLogger("vpnd.subscription_url")

_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
#: What a subscription token looks like (the import pages, `vpnd.connect_page`, check it the same way).
TOKEN_PATTERN = _TOKEN


def user_links(config: Config, subscription: Subscription, language: str | None = None) -> list[str]:
    """The share links of a subscription, whatever its status: one VLESS + REALITY link per server
    its plan may use, named by the server's location in `language` (default: the bot's).

    Raises ValueError when an `[xray]` link setting is invalid (the writer's readiness check
    "xray" reports that at start).
    """
    language = language or config.telegram.default_language
    return [
        build_vless_reality_link(
            uuid=str(subscription.uuid),
            host=node.host,
            port=node.port,
            public_key=node.public_key,
            short_id=node.short_id,
            sni=node.sni,
            fingerprint=node.fingerprint,
            flow=node.flow,
            name=node.label(language),
        )
        for node in config.nodes_for_plan(subscription.plan_code)
    ]


@attrs.define(eq=False)
class TokenRateLimiter:
    """Token buckets per key, in bounded memory (least recently used keys are forgotten)."""

    burst: int = RATE_BURST
    refill_seconds: float = RATE_REFILL_SECONDS
    max_keys: int = RATE_MAX_TOKENS
    _buckets: OrderedDict[str, tuple[float, float]] = attrs.field(factory=OrderedDict)

    def acquire(self, key: str, now: float) -> float:
        """Take one request for `key`: 0 when allowed, else the seconds until the next one is."""
        tokens, updated = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) / self.refill_seconds)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) * self.refill_seconds

    def __len__(self) -> int:
        return len(self._buckets)


def _base64(text: str) -> str:
    return "base64:" + base64.b64encode(text.encode()).decode("ascii")


@attrs.frozen
class Refusal:
    """Why a fetch gets no links although the subscription is active, in the user's language."""

    title: str
    announce: str
    #: The device limit refused it (v2RayTun also reads `x-hwid-limit: true`, as Remnawave sends it).
    device_limit: bool = False


def refusal_of(config: Config, texts: Texts, fetch: Fetch, device_sent: bool) -> Refusal | None:
    """Why this fetch gets no links although the subscription is active (None: it gets them)."""
    language = fetch.language or config.telegram.default_language
    if fetch.traffic_blocked:
        return Refusal(
            texts.get(language, "devices.sub_traffic_title"), texts.get(language, "devices.sub_traffic_text")
        )
    if not device_sent and config.devices.missing_hwid == "deny":
        return Refusal(
            texts.get(language, "devices.sub_no_hwid_title"), texts.get(language, "devices.sub_no_hwid_text")
        )
    admission = fetch.admission
    if admission is not None and not admission.served:
        values = {"used": admission.used, "limit": admission.limit}
        return Refusal(
            texts.get(language, "devices.sub_limit_title", **values),
            texts.get(language, "devices.sub_limit_text", **values),
            device_limit=True,
        )
    return None


def subscription_response(
    config: Config,
    subscription: Subscription,
    upload: int,
    download: int,
    *,
    total: int = 0,
    refusal: Refusal | None = None,
) -> Response:
    """The response to a fetch: the links when the subscription is active and nothing refuses them
    (`refusal`: why not, as the profile title and the `announce` header)."""
    now = dt.datetime.now(dt.UTC)
    active = subscription.is_active(now)
    try:
        links = user_links(config, subscription) if active and refusal is None else []
    except ValueError:
        # A configuration gap (e.g. no [xray].public_key yet; start-up alerted the admins): the key
        # is being prepared, so the client app should simply ask again later.
        return Response.text("your key is being prepared\n", 503, [("retry-after", str(KEY_PENDING_RETRY_SECONDS))])
    body = subscription_body(links)
    title = config.xray.link_name if refusal is None else refusal.title
    headers = [
        ("profile-update-interval", str(PROFILE_UPDATE_INTERVAL_HOURS)),
        (
            "subscription-userinfo",
            subscription_userinfo_header(upload, download, total, int(subscription.expires_at.timestamp())),
        ),
        ("profile-title", _base64(title)),
        *([("announce", _base64(refusal.announce))] if refusal is not None else []),
        *([("x-hwid-limit", "true")] if refusal is not None and refusal.device_limit else []),
        ("cache-control", "no-store"),
    ]
    return Response(200, body, headers)


def account_page_response(
    config: Config, texts: Texts, account: AccountFetch, request: Request, bot_username: str = ""
) -> Response:
    """The account page a browser gets at the subscription URL (see `vpnd.account_page`)."""
    fetch = account.fetch
    sub = fetch.subscription
    now = dt.datetime.now(dt.UTC)
    try:
        user_links(config, sub)
    except ValueError:
        key_ready = False  # a configuration gap: the page says "your key is being prepared"
    else:
        key_ready = True
    language = language_from_accept(
        request.header("accept-language"),
        texts.catalogs.keys(),
        fetch.language or config.telegram.default_language,
    )
    plan = config.plan(sub.plan_code) if sub.plan_code else (config.trial_plan if sub.kind == "trial" else None)
    facts = AccountFacts(
        status=account_status(sub.status, sub.expires_at, now, fetch.traffic_blocked, key_ready),
        profile_name=config.xray.link_name,
        plan_title=plan.label(language) if plan is not None else "",
        expires_at=sub.expires_at,
        now=now,
        used_bytes=fetch.upload + fetch.download,
        total_bytes=fetch.total,
        resets_at=fetch.resets_at,
        devices_used=account.devices_used,
        device_limit=fetch.device_limit,
    )
    base = config.http.public_base_url.rstrip("/")
    links = PageLinks(f"{base}/sub/{sub.sub_token}", f"{base}/connect/{sub.sub_token}", renew_link(bot_username))
    platform = platform_of(request.header("user-agent"))
    page = render_account_page(texts, language, facts, links, config.connect.catalog, platform)
    return Response.html(page, 200, PAGE_HEADERS)


def add_subscription_routes(
    router: Router, app: App, *, limiter: TokenRateLimiter | None = None, bot_username: str = ""
) -> None:
    """Serve `GET /sub/{token}` on `router` (the HTTP nursery's): the subscription body for client
    apps, the account page for a browser (`bot_username`: the bot's, for the renew link)."""
    limiter = TokenRateLimiter() if limiter is None else limiter
    not_found = Response.text("not found\n", 404)

    async def subscription(request: Request) -> Response:
        token = request.params["token"]
        if not _TOKEN.fullmatch(token):
            return not_found
        wait = limiter.acquire(token, time.monotonic())
        if wait > 0:
            return Response.text("too many requests\n", 429, [("retry-after", str(math.ceil(wait)))])
        if wants_account_page(
            request.header("accept"),
            request.header("user-agent"),
            request.header("x-hwid"),
            request.query.get("format", [None])[0],
        ):
            limits_for = partial(limits_of, app.config)
            account = await app.db.run(fetch_account, token, limits_for, dt.datetime.now(dt.UTC))
            if account is None:
                return not_found
            return account_page_response(app.config, app.texts, account, request, bot_username)
        try:
            device = read_device(
                request.header("x-hwid"),
                request.header("x-device-os"),
                request.header("x-ver-os"),
                request.header("x-device-model"),
                request.header("user-agent"),
            )
        except BadDeviceId as exc:
            return Response.text(f"{exc}\n", 400)
        config = app.config
        limits = partial(limits_of, config)
        fetch = await app.db.run(fetch_subscription, token, device, limits, dt.datetime.now(dt.UTC))
        if fetch is None:
            return not_found
        refusal = refusal_of(config, app.texts, fetch, device is not None)
        admission = fetch.admission
        if admission is not None and admission.outcome in ("added", "limit", "unrecorded"):
            log.info(
                "event=device_%s user_id=%d used=%d limit=%d",
                admission.outcome,
                fetch.subscription.user_id,
                admission.used,
                admission.limit,
            )
        return subscription_response(
            config, fetch.subscription, fetch.upload, fetch.download, total=fetch.total, refusal=refusal
        )

    router.add("GET", "/sub/{token}", subscription)
