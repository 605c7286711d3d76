"""The import page (`GET /connect/<token>/<app>`): hands the subscription to a client app in one tap.

The bot's "Add to <app>" buttons (and the account page's) open it: Telegram's URL buttons take only
http(s) links, so this page is what opens the app's own link (`happ://add/...`, `v2rayng://install-sub?...`),
by a meta refresh and an "Open in <app>" button. It also shows the subscription URL to copy (selectable
text; a Copy button when scripts run) and where to get the app. A plain page: no build step, no outside
resources, a strict Content-Security-Policy (the one inline style and script allowed by their hashes),
no caching, no referrer. Every value put into it is HTML-escaped, attributes included.

An unknown token (one lookup by `sub_token`) or app answers 404 with a page that repeats nothing of the
request; each token is rate-limited like the subscription URL. The language comes from Accept-Language.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import time

from vpnd.app import App
from vpnd.connect_apps import Catalog, ClientApp
from vpnd.db import subscriptions
from vpnd.key_message import subscription_url
from vpnd.subscription_url import TOKEN_PATTERN, TokenRateLimiter
from vpnd.texts import Texts, language_for
from vpnd.web import Request, Response, Router

#: Languages written right to left.
RTL_LANGUAGES = frozenset({"fa"})

STYLE = (
    "body{font-family:system-ui,-apple-system,sans-serif;margin:0;background:#f4f5f7;color:#1c1e21}"
    "main{max-width:32rem;margin:2rem auto;padding:1.5rem;background:#fff;border-radius:12px}"
    "h1{font-size:1.3rem;margin-top:0}"
    ".open{display:block;text-align:center;padding:.9rem;border-radius:10px;background:#2a7de1;color:#fff;"
    "text-decoration:none;font-weight:600;margin:1rem 0}"
    "code{display:block;user-select:all;-webkit-user-select:all;word-break:break-all;padding:.6rem;"
    "background:#eef0f3;border-radius:8px}"
    "button{margin-top:.5rem;padding:.5rem 1rem;border:0;border-radius:8px;background:#dfe3e8;font:inherit}"
    "ul{padding-left:1.2rem}"
)
SCRIPT = (
    '(function(){var b=document.getElementById("copy"),u=document.getElementById("url");'
    "if(!b||!u||!navigator.clipboard)return;b.hidden=false;"
    'b.addEventListener("click",function(){navigator.clipboard.writeText(u.textContent).then(function(){'
    'b.textContent=b.getAttribute("data-copied")})})})();'
)


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode("ascii") + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src {_sha256(STYLE)}; script-src {_sha256(SCRIPT)}; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("cache-control", "no-store"),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
)


def page_language(accept_language: str | None, supported: tuple[str, ...], default: str) -> str:
    """The first language of an Accept-Language header (by q, then order) that we have, else `default`."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate((accept_language or "").split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                continue
        if tag and tag != "*" and quality > 0:
            ranked.append((-quality, index, tag))
    for _, _, tag in sorted(ranked):
        language = language_for(tag, supported, "")
        if language:
            return language
    return default


def _e(value: str) -> str:
    return html.escape(value, quote=True)


def _page(lang: str, title: str, body: str, *, refresh_to: str | None = None) -> str:
    direction = "rtl" if lang in RTL_LANGUAGES else "ltr"
    refresh = f'<meta http-equiv="refresh" content="0;url={_e(refresh_to)}">' if refresh_to else ""
    return (
        f'<!doctype html><html lang="{_e(lang)}" dir="{direction}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta name="referrer" content="no-referrer">{refresh}<title>{title}</title>'
        f"<style>{STYLE}</style></head><body><main>{body}</main><script>{SCRIPT}</script></body></html>"
    )


def import_page(texts: Texts, lang: str, catalog: Catalog, app: ClientApp, sub_url: str, profile_name: str) -> str:
    """The page for `app` (pure): open it with the import link, copy the URL, get the app."""
    name = app.name
    link = app.import_link(sub_url, profile_name)
    # texts.get escapes the values it puts in (element content); _e is for attributes and raw values.
    parts = [f"<h1>{texts.get(lang, 'connect.page_opening' if link else 'connect.page_title', app=name)}</h1>"]
    if link:
        open_text = texts.get(lang, "connect.page_open", app=name)
        parts.append(f'<a class="open" id="open" href="{_e(link)}">{open_text}</a>')
        parts.append(f"<p>{texts.get(lang, 'connect.page_manual')}</p>")
    else:
        parts.append(f"<p>{texts.get(lang, 'connect.page_no_import', app=name)}</p>")
    parts.append(
        f'<code id="url">{_e(sub_url)}</code><button type="button" id="copy" hidden '
        f'data-copied="{_e(texts.get(lang, "connect.page_copied"))}">{texts.get(lang, "connect.page_copy")}</button>'
    )
    by_store: dict[str, list[str]] = {}
    for platform, store in app.stores.items():
        by_store.setdefault(store, []).append(catalog.platforms.get(platform, platform))
    stores = "".join(
        f'<li><a href="{_e(store)}" rel="noreferrer noopener">{texts.get(lang, "connect.page_get", app=name)}</a>'
        f" — {_e(', '.join(platforms))}</li>"
        for store, platforms in by_store.items()
    )
    parts.append(f"<ul>{stores}</ul>")
    return _page(lang, texts.get(lang, "connect.page_title", app=name), "".join(parts), refresh_to=link)


def not_found_page(texts: Texts, lang: str) -> str:
    text = texts.get(lang, "connect.page_not_found")
    return _page(lang, text, f"<p>{text}</p>")


def add_connect_routes(router: Router, app: App, *, limiter: TokenRateLimiter | None = None) -> None:
    """Serve `GET /connect/{token}/{app}` (HEAD too) on `router` (the HTTP nursery's)."""
    limiter = TokenRateLimiter() if limiter is None else limiter

    def answer(page: str, status: int = 200) -> Response:
        return Response.html(page, status, HEADERS)

    async def connect(request: Request) -> Response:
        config = app.config
        texts = app.texts
        lang = page_language(request.header("accept-language"), tuple(texts.catalogs), config.telegram.default_language)
        token = request.params["token"]
        client_app = config.connect.catalog.app(request.params["app"])
        if not TOKEN_PATTERN.fullmatch(token) or client_app is None:
            return answer(not_found_page(texts, lang), 404)
        wait = limiter.acquire(token, time.monotonic())
        if wait > 0:
            return Response.text("too many requests\n", 429, [("retry-after", str(math.ceil(wait)))])
        sub = await app.db.run(subscriptions.get_by_token, token)
        if sub is None:
            return answer(not_found_page(texts, lang), 404)
        sub_url = subscription_url(config.http.public_base_url, sub.sub_token)
        return answer(import_page(texts, lang, config.connect.catalog, client_app, sub_url, config.xray.link_name))

    router.add("GET", "/connect/{token}/{app}", connect)
