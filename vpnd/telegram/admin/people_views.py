"""Admin screens for people (pure): the user list, the audit log, a support member's trial extension.

Lists are keyset pages of `PAGE_SIZE`; their Prev/Next buttons carry the first/last id shown, so a page
is the same whoever presses it later and no OFFSET is ever needed.
"""

from __future__ import annotations

from vpnd.config import SUPPORTED_LANGUAGES
from vpnd.db.admin import AuditEntry, Page, UserDetails, UserRow
from vpnd.roles import TRIAL_EXTENSION_DAYS, Role, allows
from vpnd.telegram import keyboards as kb
from vpnd.telegram.admin.verbs import Verb
from vpnd.telegram.admin.views import T, esc, fmt_time

PAGE_SIZE = 10
#: The trial extensions support is offered (each at most `TRIAL_EXTENSION_DAYS`).
TRIAL_CHOICES = tuple(d for d in (1, 3, 7) if d <= TRIAL_EXTENSION_DAYS)
USER_FILTERS = ("all", "active", "expiring", "expired", "trial", "paid", "banned")


def card_rows(t: T, details: UserDetails, role: Role | None) -> list[list[kb.Button]]:
    """The user card's extra buttons for people work: extend a trial (support's grant), the user's audit."""
    uid = details.user.id
    sub = details.subscription
    rows: list[list[kb.Button]] = []
    if (sub is None or sub.kind == "trial") and allows(role, "extend_trial"):
        rows.append([kb.button(t("admin.trial.button"), Verb.TRIAL_EXTEND.data(uid))])
    if allows(role, "audit"):
        rows.append([kb.button(t("admin.audit.of_user"), Verb.AUDIT.data(f"t{uid}", 0))])
    return rows


def trial_keyboard(t: T, user_id: int, nonce: str) -> kb.Keyboard:
    return kb.keyboard(
        [
            kb.button(t("admin.trial.days", days=d), Verb.TRIAL_EXTEND_CONFIRM.data(user_id, d, nonce))
            for d in TRIAL_CHOICES
        ],
        [kb.button(t("admin.cancel"), Verb.USER.data(user_id))],
    )


# --- the user list ----------------------------------------------------------------------------------


def filters_keyboard(t: T) -> kb.Keyboard:
    filters = [kb.button(t(f"admin.users.filter.{f}"), Verb.USERS.data(f, "-", "a", 0)) for f in USER_FILTERS]
    languages = [kb.button(code, Verb.USERS.data("all", code, "a", 0)) for code in SUPPORTED_LANGUAGES]
    return kb.keyboard(
        *(filters[i : i + 2] for i in range(0, len(filters), 2)),
        languages,
        [kb.button(t("admin.back"), Verb.MENU.data())],
    )


def users_text(t: T, filter_name: str, language: str | None, page: Page[UserRow]) -> str:
    head = t("admin.users.title", filter=esc(t(f"admin.users.filter.{filter_name}")), language=esc(language or "*"))
    return head if page.rows else f"{head}\n\n{t('admin.users.empty')}"


def _user_label(t: T, row: UserRow) -> str:
    name = " ".join(p for p in (row.first_name[:20], f"@{row.username}" if row.username else "") if p)
    if row.banned:
        state = t("admin.users.filter.banned")
    elif row.kind is None:
        state = "—"
    else:
        state = f"{t(f'admin.users.filter.{row.kind}')} → {row.expires_at:%Y-%m-%d}" if row.expires_at else row.kind
    return f"{row.id} · {name} · {state}"[:64]


def users_keyboard(t: T, filter_name: str, language: str | None, page: Page[UserRow]) -> kb.Keyboard:
    lang = language or "-"
    turns: list[kb.Button] = []
    if page.rows and page.more_before:
        turns.append(kb.button(t("admin.page.prev"), Verb.USERS.data(filter_name, lang, "b", page.rows[0].id)))
    if page.rows and page.more_after:
        turns.append(kb.button(t("admin.page.next"), Verb.USERS.data(filter_name, lang, "a", page.rows[-1].id)))
    return kb.keyboard(
        *([kb.button(_user_label(t, row), Verb.USER.data(row.id))] for row in page.rows),
        turns,
        [kb.button(t("admin.users.filters"), Verb.USERS_FILTERS.data()), kb.button(t("admin.back"), Verb.MENU.data())],
    )


# --- the audit log ----------------------------------------------------------------------------------
# One filter at a time travels in the buttons (64 bytes hold no more): "-" none, "a<action>",
# "d<admin id>" or "t<target>"; the cursor is signed: 0 the newest, +id older than id, -id newer than id.

_FILTER_KEYS = {"action": "a", "admin": "d", "target": "t"}


def audit_filters(spec: str) -> tuple[str | None, int | None, str | None]:
    """(action, admin id, target) of a filter spec."""
    kind, value = spec[:1], spec[1:]
    return (value if kind == "a" else None, int(value) if kind == "d" else None, value if kind == "t" else None)


def audit_text(t: T, spec: str, page: Page[AuditEntry]) -> str:
    action, admin, target = (str(f) if f is not None else "*" for f in audit_filters(spec))
    head = t("admin.audit.title", action=esc(action), admin=esc(admin), target=esc(target))
    if not page.rows:
        return f"{head}\n\n{t('admin.audit.empty')}"
    lines = [
        f"<code>#{e.id}</code> {esc(fmt_time(e.created_at))} · {e.admin_id} · <b>{esc(e.action)}</b>"
        f"{' → ' + esc(e.target) if e.target else ''} · {esc(e.result)}"
        for e in page.rows
    ]
    return head + "\n\n" + "\n".join(lines)


def audit_keyboard(t: T, spec: str, page: Page[AuditEntry]) -> kb.Keyboard:
    turns: list[kb.Button] = []
    if page.rows and page.more_after:  # newer rows
        turns.append(kb.button(t("admin.page.prev"), Verb.AUDIT.data(spec, -page.rows[0].id)))
    if page.rows and page.more_before:  # older rows
        turns.append(kb.button(t("admin.page.next"), Verb.AUDIT.data(spec, page.rows[-1].id)))
    return kb.keyboard(
        turns,
        [kb.button(t("admin.audit.filter"), Verb.AUDIT_FILTER.data()), kb.button(t("admin.back"), Verb.MENU.data())],
    )


def parse_audit_filter(text: str) -> str:
    """ "action=grant", "admin=123", "target=456" or "-" → the filter spec. ValueError for anything else."""
    text = text.strip()
    if text == "-":
        return "-"
    key, sep, value = text.partition("=")
    if not sep or key.strip() not in _FILTER_KEYS:
        raise ValueError(text[:40])
    spec = _FILTER_KEYS[key.strip()] + value.strip()
    Verb.AUDIT.data(spec, 0)  # ValueError unless the buttons can carry it
    return spec
