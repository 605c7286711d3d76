"""The account page: what a person's browser gets at the subscription URL instead of the body (pure).

Client apps and browsers fetch the same `GET /sub/<token>`. `wants_account_page` decides which one is
asking from the request's headers alone; `render_account_page` builds the page from plain values, so
both are tested without a server. The route (`vpnd.subscription_url`) loads the values and answers.

The page is one self-contained HTML document: no external resources, no build step, its one inline
style and one inline script allowed by their hashes in a strict Content-Security-Policy (`PAGE_HEADERS`).
Everything interpolated is HTML-escaped here, attribute values included.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import re
from collections.abc import Callable, Collection

import attrs
import segno

from vpnd.connect_apps import Catalog
from vpnd.quota import format_bytes
from vpnd.texts import Html, Texts, language_for

#: The page's text lookup: `t(key, **values)` (values escaped by `Texts.get`).
_Text = Callable[..., str]

#: Apps and tools that fetch subscriptions: any of these names in the User-Agent means "give the body",
#: even inside a browser-like UA (some apps fetch through a WebView or send "Mozilla/5.0 ... Hiddify").
KNOWN_CLIENTS = re.compile(
    r"happ|v2raytun|hiddify|streisand|v2rayn|v2rayng|v2box|clash|mihomo|stash|sing-?box|\bsf[aimt]/|"
    r"shadowrocket|quantumult|surge|\bloon\b|nekobox|nekoray|karing|foxray|incy|throne|husi|exclave|"
    r"outline|\bcurl/|\bwget/|python|httpx|aiohttp|okhttp|go-http-client|java/|dart/|libcurl|"
    r"postman|insomnia|\bbot\b|spider|crawl|preview",
    re.IGNORECASE,
)
#: A browser's User-Agent: "Mozilla/5.0 (...)" and a browser engine token.
_BROWSER = re.compile(r"^Mozilla/5\.0 \(.+\b(AppleWebKit|Gecko|Trident|Presto)/", re.IGNORECASE)


def accepts_html(accept: str | None) -> bool:
    """True when `accept` lists text/html (or application/xhtml+xml) without `q=0`."""
    for item in (accept or "").split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media not in ("text/html", "application/xhtml+xml"):
            continue
        quality = next((p.partition("=")[2] for p in params if p.startswith("q=")), "1")
        try:
            if float(quality) > 0:
                return True
        except ValueError:
            continue
    return False


def wants_account_page(accept: str | None, user_agent: str | None, hwid: str | None, format_: str | None) -> bool:
    """Whether a fetch of the subscription URL gets the account page (True) or the subscription body.

    The page only when ALL of these hold, else the body exactly as client apps always got it:

    1. no `?format=raw` (which forces the body, e.g. for an app that sends a browser's headers);
    2. no `x-hwid` header (only client apps send a device id);
    3. `Accept` lists text/html with a non-zero quality (apps ask for */* or nothing);
    4. the User-Agent looks like a browser's: "Mozilla/5.0 (...)" with an engine token
       (AppleWebKit, Gecko, Trident, Presto) — curl, okhttp, Go and the like do not;
    5. the User-Agent names no known client app or tool (`KNOWN_CLIENTS`: Happ, v2RayTun, Hiddify,
       Streisand, v2rayNG, v2rayN, Clash, sing-box, Shadowrocket, curl, ...) nor a bot or link preview.

    When in doubt the answer is the body: an app that gets a page breaks, a person who gets the body
    only sees text.
    """
    if (format_ or "").strip().lower() == "raw":
        return False
    if hwid:
        return False
    if not accepts_html(accept):
        return False
    agent = (user_agent or "").strip()
    if not _BROWSER.match(agent):
        return False
    return not KNOWN_CLIENTS.search(agent)


def language_from_accept(header: str | None, supported: Collection[str], default: str) -> str:
    """The first of the browser's languages (`Accept-Language`, by quality, then order) that we have a
    catalog for (see `vpnd.texts.language_for`: "ru-RU" → ru, "zh-TW" → zh), else `default`."""
    ranked: list[tuple[float, int, str]] = []
    for index, item in enumerate((header or "").split(",")[:32]):
        tag, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if tag and tag != "*" and quality > 0:
            ranked.append((-quality, index, tag))
    for _, _, tag in sorted(ranked):
        language = language_for(tag, supported, "")
        if language:
            return language
    return default


def platform_of(user_agent: str | None) -> str | None:
    """The catalog platform a browser runs on (its section opens first), or None when unclear."""
    agent = (user_agent or "").lower()
    if "android" in agent:
        return "androidtv" if re.search(r"\b(tv|aft\w*|bravia|smart-tv)\b", agent) else "android"
    if re.search(r"iphone|ipad|ipod", agent):
        return "ios"
    if "windows" in agent:
        return "windows"
    if "macintosh" in agent or "mac os x" in agent:
        return "macos"
    if "linux" in agent or "x11" in agent:
        return "linux"
    return None


#: What the page says about the subscription, in order of precedence.
STATUSES = ("revoked", "expired", "preparing", "over_quota", "active")


def account_status(
    status: str, expires_at: dt.datetime, now: dt.datetime, traffic_blocked: bool, key_ready: bool
) -> str:
    """One of `STATUSES`: revoked, expired, preparing (active but a configuration gap keeps the key
    from being built), over_quota (active, traffic used up), active."""
    if status == "revoked":
        return "revoked"
    if status != "active" or expires_at <= now:
        return "expired"
    if not key_ready:
        return "preparing"
    if traffic_blocked:
        return "over_quota"
    return "active"


@attrs.frozen
class AccountFacts:
    """What the page shows about one subscription."""

    status: str
    #: The profile's name (`[xray].link_name`), the page's heading.
    profile_name: str
    #: The plan's title in the page's language ("" when the plan is no longer configured).
    plan_title: str
    expires_at: dt.datetime
    now: dt.datetime
    used_bytes: int
    #: The period's quota (0: unlimited).
    total_bytes: int
    resets_at: dt.datetime | None
    devices_used: int
    #: 0: unlimited.
    device_limit: int

    @property
    def days_left(self) -> int:
        return max(0, (self.expires_at - self.now).days)


@attrs.frozen
class PageLinks:
    """Where the page points: the subscription URL itself, the import pages, the bot (for renewal)."""

    subscription_url: str
    #: `{public_base_url}/connect/{token}`: "/<app id>" is appended per app.
    connect_base: str
    #: `https://t.me/<bot>` ("" when the bot's username is not known: no renew link).
    renew_url: str = ""


RTL_LANGUAGES = frozenset({"fa", "ar", "he", "ur"})

STYLE = """
:root{color-scheme:light dark;--bg:#f4f5f7;--card:#fff;--fg:#1b1f24;--muted:#5b6472;--line:#dde1e6;
--accent:#2563eb;--accent-fg:#fff;--ok:#15803d;--bad:#b91c1c;--warn:#b45309}
@media (prefers-color-scheme:dark){:root{--bg:#0f1115;--card:#191c22;--fg:#e8eaed;--muted:#9aa3af;
--line:#2c313a;--accent:#3b82f6;--ok:#4ade80;--bad:#f87171;--warn:#fbbf24}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Noto Sans","Vazirmatn",Tahoma,sans-serif}
main{max-width:44rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.5rem 0 1rem;overflow-wrap:anywhere}
h2{font-size:1.1rem;margin:0 0 .75rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:14px;padding:1rem;margin:0 0 1rem}
.status{display:inline-block;font-weight:600;padding:.15rem .7rem;border-radius:999px;border:1px solid currentColor}
.status-active{color:var(--ok)}.status-expired,.status-revoked{color:var(--bad)}
.status-over_quota,.status-preparing{color:var(--warn)}
.facts{list-style:none;margin:.75rem 0 0;padding:0}.facts li{padding:.2rem 0}
.hint{color:var(--muted);margin:.5rem 0 0}
.qr{display:flex;flex-wrap:wrap;gap:1rem;align-items:center}
.qr svg{width:11rem;height:11rem;background:#fff;border-radius:8px;flex:none}
.url{flex:1 1 14rem;min-width:0}
.url input{width:100%;font:inherit;font-size:.85rem;padding:.5rem;border:1px solid var(--line);border-radius:8px;
background:var(--bg);color:var(--fg);direction:ltr}
.btn{display:inline-block;font:inherit;font-size:.95rem;text-decoration:none;cursor:pointer;border-radius:10px;
padding:.45rem .9rem;margin:.25rem .25rem .25rem 0;border:1px solid var(--accent);color:var(--accent);background:none}
.btn-main{background:var(--accent);color:var(--accent-fg)}
details{border-top:1px solid var(--line);padding:.5rem 0}
summary{cursor:pointer;font-weight:600;padding:.25rem 0}
.app{display:flex;flex-wrap:wrap;align-items:center;justify-content:space-between;gap:.25rem;padding:.4rem 0}
.app-name{font-weight:600}
[hidden]{display:none}
"""

SCRIPT = """
(function(){var b=document.getElementById("copy"),i=document.getElementById("sub-url");if(!b||!i)return;
b.hidden=false;b.addEventListener("click",function(){var done=function(){b.textContent=b.dataset.done;};
if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(i.value).then(done,function(){
i.select();document.execCommand("copy");done();});}else{i.select();document.execCommand("copy");done();}});})();
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode("ascii") + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SCRIPT)}; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: The page's headers besides its content type: never cached, never indexed, no referrer to the stores.
PAGE_HEADERS: tuple[tuple[str, str], ...] = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("cache-control", "no-store"),
    ("referrer-policy", "no-referrer"),
    ("x-robots-tag", "noindex, nofollow"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    # The same URL answers apps and browsers differently.
    ("vary", "accept, accept-language, user-agent, x-hwid"),
)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _isolated(value: object, direction: str = "") -> Html:
    """`value` escaped and isolated from the text around it (<bdi>), so a Latin plan title or a date
    keeps its own order inside a right-to-left sentence."""
    attribute = f' dir="{direction}"' if direction else ""
    return Html(f"<bdi{attribute}>{_e(value)}</bdi>")


def _date(when: dt.datetime) -> Html:
    return _isolated(when.astimezone(dt.UTC).strftime("%Y-%m-%d"), "ltr")


def _bytes(count: int) -> Html:
    return _isolated(format_bytes(count), "ltr")


def qr_svg(text: str) -> str:
    """`text` as a QR code, an inline <svg> (dark on white whatever the page's colours, for scanners)."""
    return str(segno.make(text, error="m").svg_inline(scale=4, border=2, omitsize=True, dark="#000", light="#fff"))


def render_account_page(
    texts: Texts,
    language: str,
    facts: AccountFacts,
    links: PageLinks,
    catalog: Catalog,
    platform: str | None = None,
) -> str:
    """The account page in `language`; `platform`'s section (from the browser's UA) opens first."""

    def t(key: str, **values: object) -> str:
        # Texts.get escapes values for element content; the result goes through _e only in attributes.
        return texts.get(language, key, **values)

    direction = "rtl" if language in RTL_LANGUAGES else "ltr"
    status = facts.status
    if status == "revoked":
        facts_items = []  # its expiry no longer means anything
    elif status == "expired":
        facts_items = [t("page.ended", date=_date(facts.expires_at))]
    else:
        facts_items = [t("page.expires", date=_date(facts.expires_at)), t("page.days_left", days=facts.days_left)]
    if facts.plan_title:
        facts_items.insert(0, t("page.plan", plan=_isolated(facts.plan_title)))
    used = _bytes(facts.used_bytes)
    if facts.total_bytes > 0:
        traffic = t("page.traffic", used=used, total=_bytes(facts.total_bytes))
        if facts.resets_at is not None:
            traffic += " · " + t("page.traffic_resets", date=_date(facts.resets_at))
    else:
        traffic = t("page.traffic_unlimited", used=used)
    facts_items.append(traffic)
    if facts.device_limit > 0:
        facts_items.append(t("page.devices", used=facts.devices_used, limit=facts.device_limit))
    else:
        facts_items.append(t("page.devices_unlimited", used=facts.devices_used))

    hint = _status_hint(t, status, links.renew_url)
    parts = [
        "<!doctype html>",
        f'<html lang="{_e(language)}" dir="{direction}">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="robots" content="noindex, nofollow">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(t('page.title'))} · {_e(facts.profile_name)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_e(facts.profile_name)}</h1>",
        '<section class="card" id="status">',
        f'<span class="status status-{_e(status)}" data-status="{_e(status)}">{t(f"page.status.{status}")}</span>',
        '<ul class="facts">',
        *(f"<li>{item}</li>" for item in facts_items),
        "</ul>",
        hint,
        "</section>",
        '<section class="card" id="key">',
        f"<h2>{t('page.url_label')}</h2>",
        '<div class="qr">',
        qr_svg(links.subscription_url),
        '<div class="url">',
        f'<input id="sub-url" type="text" readonly value="{_e(links.subscription_url)}"'
        f' aria-label="{_e(t("page.url_label"))}">',
        f'<button type="button" class="btn btn-main" id="copy" hidden data-done="{_e(t("page.copied"))}">'
        f"{t('page.copy')}</button>",
        f'<p class="hint">{t("page.qr_hint")}</p>',
        "</div>",
        "</div>",
        "</section>",
        _apps_section(t, catalog, links, platform),
        "</main>",
        f"<script>{SCRIPT}</script>",
        "</body>",
        "</html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def _status_hint(t: _Text, status: str, renew_url: str) -> str:
    if status == "active":
        return ""
    text = t(f"page.hint.{status}")
    if not renew_url or status not in ("expired", "over_quota", "revoked"):
        return f'<p class="hint">{text}</p>'
    renew = f'<a class="btn btn-main" id="renew" href="{_e(renew_url)}" rel="noopener noreferrer">{t("page.renew")}</a>'
    return f'<p class="hint">{text}</p>\n<p>{renew}</p>'


def _apps_section(t: _Text, catalog: Catalog, links: PageLinks, platform: str | None) -> str:
    platforms = list(catalog.platforms.items())
    opened = platform if platform in catalog.platforms else platforms[0][0]
    sections = [
        f'<section class="card" id="apps"><h2>{t("page.connect")}</h2>',
        f'<p class="hint">{t("page.connect_hint")}</p>',
    ]
    for platform_id, name in platforms:
        apps = catalog.apps_for(platform_id)
        if not apps:
            continue
        rows = [
            f'<details id="platform-{_e(platform_id)}"{" open" if platform_id == opened else ""}>',
            f"<summary>{_e(name)}</summary>",
        ]
        for app in apps:
            buttons = []
            if app.import_template:
                href = f"{links.connect_base}/{app.id}"
                buttons.append(
                    f'<a class="btn btn-main add" href="{_e(href)}" data-app="{_e(app.id)}">'
                    f"{t('page.add_to', app=_isolated(app.name))}</a>"
                )
            store = app.stores[platform_id]
            buttons.append(
                f'<a class="btn install" href="{_e(store)}" data-app="{_e(app.id)}" rel="noopener noreferrer">'
                f"{t('page.install')}</a>"
            )
            rows.append(
                f'<div class="app"><span class="app-name">{_e(app.name)}</span><span>{"".join(buttons)}</span></div>'
            )
        rows.append("</details>")
        sections.extend(rows)
    sections.append("</section>")
    return "\n".join(sections)


def renew_link(bot_username: str) -> str:
    """The bot's link for renewing ("" when the bot's username is not known)."""
    name = bot_username.strip().lstrip("@")
    return f"https://t.me/{name}" if re.fullmatch(r"[A-Za-z0-9_]{3,64}", name) else ""
