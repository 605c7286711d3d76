"""Configuration: `config.toml` loaded into frozen attrs values.

Every section is a frozen attrs class; `load_config(path)` parses the file, applies defaults, takes
secrets from the environment or systemd credentials, and validates everything at once. Any problem
raises `ConfigError` whose message names the file, the key path and what was expected, e.g.::

    config.toml: [http].listen: expected "host:port", got "8080"

The keys are a public interface: operators and outside tools rely on them. `config.toml` at the
repository root documents every key with its default.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

import attrs

from vpnd.connect_apps import Catalog, CatalogError, load_catalog

T = TypeVar("T")

#: Secrets that may come from the environment or `$CREDENTIALS_DIRECTORY/<credential>`.
#: (section, key) -> (environment variable, systemd credential name)
SECRET_SOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("telegram", "token"): ("VPND_TELEGRAM_TOKEN", "telegram_token"),
    ("database", "dsn"): ("VPND_DATABASE_DSN", "database_dsn"),
    ("cryptopay", "token"): ("VPND_CRYPTOPAY_TOKEN", "cryptopay_token"),
    ("yookassa", "secret_key"): ("VPND_YOOKASSA_SECRET_KEY", "yookassa_secret_key"),
    ("metrics", "password"): ("VPND_METRICS_PASSWORD", "metrics_password"),
    ("metrics", "token"): ("VPND_METRICS_TOKEN", "metrics_token"),
    ("telegram_payments", "provider_token"): ("VPND_TELEGRAM_PAYMENTS_TOKEN", "telegram_payments_token"),
}

#: Languages with a catalog in `vpnd/locales/` (the first is the fallback for a missing text).
SUPPORTED_LANGUAGES = ("en", "ru", "uk", "fa", "zh", "tr")


class ConfigError(Exception):
    """A configuration problem, with a message fit to show an operator as is."""

    def __init__(self, file: str, key: str | None, message: str) -> None:
        self.file = file
        self.key = key
        self.detail = message
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + message)


# --- values -----------------------------------------------------------------------------------


@attrs.frozen
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class TelegramConfig:
    token: str = ""
    api_base_url: str = "https://api.telegram.org"
    admin_ids: tuple[int, ...] = ()
    #: Staff below the owners (`admin_ids`): Telegram user id → "admin" or "support" (`vpnd.roles`).
    admin_roles: Mapping[int, str] = attrs.field(factory=dict)
    poll_timeout: int = 25
    max_concurrent_updates: int = 20
    handler_timeout_seconds: float = 30.0
    rate_per_second: float = 25.0
    per_chat_per_second: float = 1.0
    poll_dead_after_seconds: float = 120.0
    support_contact: str = "@support"
    default_language: str = "en"
    max_pending_per_chat: int = 20
    flood_notice_interval_seconds: float = 60.0
    pending_alert_seconds: float = 30.0


@attrs.frozen
class DatabaseConfig:
    dsn: str = ""
    pool_min: int = 2
    pool_max: int = 10
    statement_timeout_ms: int = 15000
    connect_timeout_seconds: float = 10.0
    migrate_on_start: bool = True
    migration_lock_timeout_seconds: float = 60.0


@attrs.frozen
class HttpConfig:
    listen: HostPort = HostPort("127.0.0.1", 8080)
    public_base_url: str = "http://127.0.0.1:8080"
    max_body_bytes: int = 65536
    max_connections: int = 1000
    keep_alive_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 20.0


@attrs.frozen
class MetricsConfig:
    username: str = ""
    password: str = ""
    token: str = ""
    public: bool = False


@attrs.frozen
class ShutdownConfig:
    grace_seconds: float = 10.0


@attrs.frozen
class LogConfig:
    level: str = "info"
    format: str = "kv"


@attrs.frozen
class TrialConfig:
    enabled: bool = True
    days: int = 3
    #: The trial's limits (0: unlimited), like a plan's. A `[[plans]]` entry with `trial = true`
    #: replaces this section's days and limits.
    devices: int = 0
    traffic_gb: int = 0
    #: The channel a user must have joined to take the trial: "@username" or a numeric id "-100…"; "" = none.
    required_channel: str = ""
    #: The join link for a private channel (an invite link); a public one gets https://t.me/<username>.
    channel_invite_link: str = ""
    #: How long a "is a member" answer is trusted before getChatMember is asked again.
    membership_cache_seconds: int = 3600


@attrs.frozen
class SupportConfig:
    #: The chat users' support messages are copied to (an admin's id or a group's -100…); 0 = no relay.
    relay_chat: int = 0
    #: How many messages one user may send to support per hour.
    messages_per_hour: int = 5


@attrs.frozen
class ReferralLevel:
    """A cashback level: from `paying` referred users who have paid at least once, `percent` of their payments."""

    paying: int
    percent: int


@attrs.frozen
class ReferralConfig:
    percent: int = 10
    #: Cashback by level, ascending thresholds (`levels = [{ paying = 0, percent = 10 }, ...]`); empty: `percent`.
    levels: tuple[ReferralLevel, ...] = ()
    #: The least referral earnings a user may ask to withdraw (in the balance currency).
    withdraw_min: Decimal = Decimal("10")

    @property
    def effective_levels(self) -> tuple[ReferralLevel, ...]:
        """The levels in force: the configured ones, else one level of `percent` from the first referral."""
        return self.levels or (ReferralLevel(0, self.percent),)


@attrs.frozen
class Plan:
    code: str
    title: Mapping[str, str]
    days: int
    price: Decimal
    currency: str
    stars: int
    #: Prices in other currencies (`prices = { RUB = "299" }`), e.g. for card payments in the shop's currency.
    prices: Mapping[str, Decimal] = attrs.field(factory=dict)
    #: Names of the nodes this plan's users may use (premium locations); empty: every node.
    nodes: tuple[str, ...] = ()
    #: Devices (subscription-URL device ids) a subscriber may use; 0: unlimited.
    devices: int = 0
    #: Traffic per period in GB (GiB, 2**30 bytes); 0: unlimited.
    traffic_gb: int = 0
    #: When the traffic quota starts again: "never", "monthly" (each month from the period's start) or
    #: "per_period" (every `days` days, each paid period).
    traffic_reset: str = "per_period"
    #: A longer text shown beside the tier (language → text).
    description: Mapping[str, str] = attrs.field(factory=dict)
    #: False: not offered (existing subscribers keep it and its limits).
    visible: bool = True
    #: The free trial's plan (never sold).
    trial: bool = False

    @property
    def traffic_limit_bytes(self) -> int:
        """The quota per period in bytes (0: unlimited)."""
        return self.traffic_gb * GIB

    def label(self, language: str) -> str:
        return self.title.get(language) or self.title.get("en") or next(iter(self.title.values()), self.code)

    def price_in(self, currency: str) -> Decimal | None:
        """The plan's price in `currency`, or None when it is not sold in that currency."""
        if currency.upper() == self.currency.upper():
            return self.price
        return self.prices.get(currency.upper())

    def describe(self, language: str) -> str:
        return self.description.get(language) or self.description.get("en") or ""


#: One GB of a plan's traffic (binary: clients show 2**30 bytes as "1 GB").
GIB = 2**30

#: The code of the trial plan built from `[trial]` when no `[[plans]]` entry has `trial = true`.
TRIAL_PLAN_CODE = "trial"


@attrs.frozen
class TrafficPack:
    """Extra traffic for the current period (`[[traffic_packs]]`), bought with any payment method."""

    code: str
    title: Mapping[str, str]
    gb: int
    price: Decimal
    currency: str
    stars: int = 0
    prices: Mapping[str, Decimal] = attrs.field(factory=dict)

    def price_in(self, currency: str) -> Decimal | None:
        if currency.upper() == self.currency.upper():
            return self.price
        return self.prices.get(currency.upper())

    def label(self, language: str) -> str:
        return self.title.get(language) or self.title.get("en") or f"{self.gb} GB"


@attrs.frozen
class PaymentsConfig:
    purchase_ttl_minutes: int = 30
    min_price: Decimal = Decimal("0.10")
    topup_presets: tuple[Decimal, ...] = (Decimal("5"), Decimal("10"), Decimal("25"))
    topup_min: Decimal = Decimal("1")
    topup_max: Decimal = Decimal("500")
    currency: str = "USD"
    promo_max_wrong_attempts: int = 5
    promo_wrong_window_minutes: int = 10
    promo_alert_wrong_attempts: int = 50
    #: A Telegram chat (a group's or channel's id, or a person's) told of every successful payment; 0: nobody.
    notify_chat_id: int = 0


@attrs.frozen
class CryptoPayConfig:
    enabled: bool = False
    token: str = ""
    api_base_url: str = "https://pay.crypt.bot/api"
    poll_interval: float = 30.0
    accepted_assets: tuple[str, ...] = ()


@attrs.frozen
class YooKassaConfig:
    enabled: bool = False
    shop_id: str = ""
    secret_key: str = ""
    api_base_url: str = "https://api.yookassa.ru/v3"
    #: Notifications are accepted only from these networks (YooKassa's published ranges).
    notify_networks: tuple[str, ...] = (
        "185.71.76.0/27", "185.71.77.0/27", "77.75.153.0/25", "77.75.156.11/32", "77.75.156.35/32",
        "77.75.154.128/25", "2a02:5180::/32",
    )  # fmt: skip
    currency: str = "RUB"
    #: Offered as buttons: "bank_card", "sbp"; empty: one button, the method chosen on YooKassa's page.
    methods: tuple[str, ...] = ("bank_card", "sbp")
    #: Where YooKassa's page sends the payer back (https://t.me/<bot>); empty: the page's own.
    return_url: str = ""
    poll_interval: float = 30.0


@attrs.frozen
class StarsConfig:
    enabled: bool = True


@attrs.frozen
class TelegramPaymentsConfig:
    """Card payments through Telegram Payments: `sendInvoice` with the provider token BotFather gave."""

    enabled: bool = False
    provider_token: str = ""
    #: ISO 4217 code the invoices are in; "" = `[payments].currency`.
    currency: str = ""
    need_email: bool = False
    send_email_to_provider: bool = False
    #: Send `provider_data` with a fiscal receipt item (YooKassa's `{"receipt": {"items": [...]}}`).
    receipt: bool = False
    vat_code: int = 1


@attrs.frozen
class XrayConfig:
    enabled: bool = False
    template_path: str = "/etc/vpnd/xray-template.json"
    config_path: str = "/usr/local/etc/xray/config.json"
    inbound_tag: str = "vless-reality"
    flow: str = "xtls-rprx-vision"
    api_address: str = "127.0.0.1:10085"
    api_prefix: str = "xray."
    reconcile_interval: float = 60.0
    #: How often each node's traffic counters are read (usage, quotas, "online now").
    traffic_interval: float = 30.0
    restart_command: str = ""
    host: str = "vpn.example.com"
    port: int = 443
    public_key: str = ""
    short_id: str = ""
    sni: str = "www.microsoft.com"
    fingerprint: str = "chrome"
    link_name: str = "vpnd"
    #: This server's location as users see it (language → label); empty: `link_name`.
    location: Mapping[str, str] = attrs.field(factory=dict)
    #: A key rotation (`vpnd admin rotate-keys`) replaces this many keys per batch by default ...
    rotate_batch_size: int = 100
    #: ... one batch every this many seconds (the pace Xray's API and the outbox take).
    rotate_interval_seconds: float = 5.0

    def as_node(self) -> NodeConfig:
        """The local Xray as a node: the one whose config file vpnd writes."""
        return NodeConfig(
            name=LOCAL_NODE,
            location=self.location or {lang: self.link_name for lang in SUPPORTED_LANGUAGES},
            host=self.host,
            port=self.port,
            public_key=self.public_key,
            short_id=self.short_id,
            sni=self.sni,
            fingerprint=self.fingerprint,
            flow=self.flow,
            inbound_tag=self.inbound_tag,
            api_address="" if self.restart_command else self.api_address,
            api_prefix=self.api_prefix,
            template_path=self.template_path,
            config_path=self.config_path,
            restart_command=self.restart_command,
            managed=self.enabled,
        )


#: The name of the node `[xray]` describes (the Xray on vpnd's own host).
LOCAL_NODE = "local"


@attrs.frozen
class NodeTls:
    """How vpnd reaches a remote node's Xray API: mutual TLS (see README "Several servers")."""

    #: PEM of the CA that signed the node's server certificate (vpnd trusts nothing else).
    ca_file: str
    #: vpnd's client certificate and key (PEM), which the node's TLS proxy requires.
    cert_file: str
    key_file: str
    #: The name in the node's certificate, when it differs from the host of `api_address`.
    server_name: str = ""


@attrs.frozen
class NodeConfig:
    """One Xray server users connect to (`[[nodes]]`, or the local one from `[xray]`)."""

    name: str
    #: Language → what users see ("🇩🇪 Frankfurt"): the link's name and the location in "My subscription".
    location: Mapping[str, str]
    host: str
    port: int = 443
    public_key: str = ""
    short_id: str = ""
    sni: str = "www.microsoft.com"
    fingerprint: str = "chrome"
    flow: str = "xtls-rprx-vision"
    inbound_tag: str = "vless-reality"
    #: Where vpnd reaches the node's Xray API; "" when it has none (a local Xray with `restart_command`).
    api_address: str = ""
    api_prefix: str = "xray."
    tls: NodeTls | None = None
    #: Only the local node: the template, the file vpnd writes, and the restart for an API-less Xray.
    template_path: str = ""
    config_path: str = ""
    restart_command: str = ""
    #: False: links are built for it, but vpnd does not drive its Xray (`[xray].enabled = false`).
    managed: bool = True

    def label(self, language: str) -> str:
        """The location in `language` (else English, else any)."""
        return self.location.get(language) or self.location.get("en") or next(iter(self.location.values()), self.name)

    @property
    def connection(self) -> tuple[str, str, NodeTls | None]:
        """What a writer's API channel is built from: a change needs a new channel."""
        return (self.api_address, self.api_prefix, self.tls)


@attrs.frozen
class WorkersConfig:
    reminders_interval: float = 300.0
    trial_interval: float = 300.0
    #: Traffic periods that ended are rolled (and blocks lifted) at least this often, and at each period's end.
    quota_interval: float = 60.0
    expiry_interval: float = 60.0
    renewal_interval: float = 600.0
    renewal_window_hours: float = 24.0
    health_interval: float = 60.0
    housekeeping_interval: float = 3600.0
    retention_days: int = 30
    batch_size: int = 500
    audit_retention_days: int = 365


@attrs.frozen
class BroadcastConfig:
    paid: bool = False
    progress_interval: float = 3.0
    #: Broadcast pace with `paid = true` (Telegram: up to 1000/s with allow_paid_broadcast, for Stars).
    paid_rate_per_second: float = 30.0
    #: Recipients whose send was in flight at an unclean stop (kill -9): true sends them again (nobody
    #: skipped, a few may get it twice), false skips them (nobody gets it twice, a few may get nothing).
    resend_in_doubt: bool = True
    #: The operator's time zone (IANA name): a scheduled broadcast's "start at" is read in it.
    timezone: str = "UTC"


@attrs.frozen
class BackupConfig:
    #: Where `vpnd backup` and the scheduled job write `vpnd-<UTC time>.dump` (pg_dump custom format).
    directory: str = "/var/lib/vpnd/backups"
    #: Backups kept; older ones are deleted after each successful backup (never after a failed one).
    keep: int = 14
    #: The daemon makes a backup when the newest is this old (0: no schedule; `vpnd backup` from cron).
    interval_hours: float = 0.0
    #: The "backup" health check fails (admins alerted) when the newest backup is older than this;
    #: 0: twice `interval_hours` when a schedule is set, else no check.
    max_age_hours: float = 0.0
    #: The PostgreSQL client programs (a path, or a name looked up in PATH).
    pg_dump: str = "pg_dump"
    pg_restore: str = "pg_restore"
    #: A dump or restore taking longer than this is stopped (and counts as failed).
    timeout_minutes: float = 60.0

    @property
    def max_age_seconds(self) -> float:
        """The health check's limit (0: no check)."""
        hours = self.max_age_hours or 2 * self.interval_hours
        return hours * 3600


@attrs.frozen
class DevicesConfig:
    #: What a subscription fetch without an `x-hwid` header gets: "allow" (the links, no device
    #: recorded) or "deny" (a profile saying an app that sends a device id is needed).
    missing_hwid: str = "allow"


@attrs.frozen
class ConnectConfig:
    #: The client apps catalog (`vpnd/connect_apps.toml` format); "" → the built-in one. A relative
    #: path is relative to the configuration file's folder.
    apps_file: str = ""
    #: The catalog read from it (by `load_config`, so a mistake is a configuration error).
    catalog: Catalog = attrs.field(factory=load_catalog, eq=False, repr=False)


@attrs.frozen
class TermsConfig:
    """Terms of service and privacy policy users accept before anything else (see README "Terms")."""

    enabled: bool = False
    #: What an acceptance is recorded against; a new version asks everyone again, once.
    version: str = ""
    #: Each document is a text (language → text; a missing language gets the default language's) or a URL.
    terms_text: Mapping[str, str] = attrs.field(factory=dict)
    terms_url: str = ""
    privacy_text: Mapping[str, str] = attrs.field(factory=dict)
    privacy_url: str = ""

    def text(self, document: str, lang: str, default_lang: str) -> str:
        """`document`'s ("terms" or "privacy") text in `lang`, else the default language's, else any."""
        texts = self.terms_text if document == "terms" else self.privacy_text
        return texts.get(lang) or texts.get(default_lang) or texts.get("en") or next(iter(texts.values()), "")


@attrs.frozen
class Config:
    path: str
    telegram: TelegramConfig = TelegramConfig()
    database: DatabaseConfig = DatabaseConfig()
    http: HttpConfig = HttpConfig()
    metrics: MetricsConfig = MetricsConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    log: LogConfig = LogConfig()
    trial: TrialConfig = TrialConfig()
    support: SupportConfig = SupportConfig()
    referral: ReferralConfig = ReferralConfig()
    payments: PaymentsConfig = PaymentsConfig()
    cryptopay: CryptoPayConfig = CryptoPayConfig()
    yookassa: YooKassaConfig = YooKassaConfig()
    stars: StarsConfig = StarsConfig()
    telegram_payments: TelegramPaymentsConfig = TelegramPaymentsConfig()
    xray: XrayConfig = XrayConfig()
    workers: WorkersConfig = WorkersConfig()
    broadcast: BroadcastConfig = BroadcastConfig()
    devices: DevicesConfig = DevicesConfig()
    connect: ConnectConfig = ConnectConfig()
    backup: BackupConfig = BackupConfig()
    terms: TermsConfig = TermsConfig()
    plans: tuple[Plan, ...] = ()
    #: `[[nodes]]`: the remote Xray servers (the local one is `[xray]`).
    nodes: tuple[NodeConfig, ...] = ()
    #: `[[traffic_packs]]`: extra traffic for sale.
    traffic_packs: tuple[TrafficPack, ...] = ()

    def plan(self, code: str) -> Plan | None:
        """The plan `code` (the trial plan included), or None when no such plan is configured."""
        found = next((p for p in self.plans if p.code == code), None)
        if found is None and code == self.trial_plan.code:
            return self.trial_plan
        return found

    @property
    def sale_plans(self) -> tuple[Plan, ...]:
        """The plans offered to buyers, in config order (visible, not the trial)."""
        return tuple(p for p in self.plans if p.visible and not p.trial)

    @property
    def trial_plan(self) -> Plan:
        """The free trial as a plan: the `[[plans]]` entry with `trial = true`, else one built from `[trial]`."""
        configured = next((p for p in self.plans if p.trial), None)
        if configured is not None:
            return configured
        return Plan(
            code=TRIAL_PLAN_CODE,
            title={"en": "Trial", "ru": "Пробный период"},
            days=self.trial.days,
            price=Decimal(0),
            currency=self.payments.currency,
            stars=0,
            devices=self.trial.devices,
            traffic_gb=self.trial.traffic_gb,
            traffic_reset="never",
            visible=False,
            trial=True,
        )

    def traffic_pack(self, code: str) -> TrafficPack | None:
        return next((p for p in self.traffic_packs if p.code == code), None)

    @property
    def vpn_nodes(self) -> tuple[NodeConfig, ...]:
        """Every server users connect to, in the order links list them: the local one (when vpnd
        drives it, or when it is the only one) and then `[[nodes]]`."""
        local = self.xray.as_node()
        return (local, *self.nodes) if local.managed or not self.nodes else self.nodes

    @property
    def managed_nodes(self) -> tuple[NodeConfig, ...]:
        """The nodes whose Xray vpnd drives (one writer each)."""
        return tuple(node for node in self.vpn_nodes if node.managed)

    def nodes_for_plan(self, plan_code: str | None) -> tuple[NodeConfig, ...]:
        """The servers a subscription of `plan_code` may use (a trial, or a plan no longer sold: all)."""
        plan = self.plan(plan_code) if plan_code else None
        if plan is None or not plan.nodes:
            return self.vpn_nodes
        return tuple(node for node in self.vpn_nodes if node.name in plan.nodes)

    def plans_not_on(self, node_name: str) -> tuple[str, ...]:
        """Codes of the plans restricted to other nodes (their users are not put on `node_name`)."""
        return tuple(plan.code for plan in self.plans if plan.nodes and node_name not in plan.nodes)

    @property
    def card_currency(self) -> str:
        """The currency of card invoices (`[telegram_payments].currency`, else the shop's)."""
        return (self.telegram_payments.currency or self.payments.currency).upper()


# --- field readers ----------------------------------------------------------------------------
# Each reader takes the raw TOML value and returns the typed value or raises ValueError with the
# "expected ..., got ..." text; the loader adds the file and key path.


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _expected(what: str, value: object) -> ValueError:
    return ValueError(f"expected {what}, got {_show(value)}")


def read_str(value: object) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


def read_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def read_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _expected("an integer", value)
    return value


def read_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _expected("a number", value)
    if not math.isfinite(value):
        raise _expected("a finite number", value)
    return float(value)


def read_decimal(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _expected('a decimal string such as "4.99"', value)
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise _expected('a decimal string such as "4.99"', value) from None
    if not result.is_finite():
        raise _expected("a finite decimal", value)
    return result


def read_host_port(value: object) -> HostPort:
    text = read_str(value) if isinstance(value, str) else None
    if text is None:
        raise _expected('"host:port"', value)
    match = re.fullmatch(r"\[(?P<v6>[0-9a-fA-F:.]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]]+):(?P<port2>\d+)", text)
    if not match:
        raise _expected('"host:port"', value)
    host = match.group("v6") or match.group("host")
    port = int(match.group("port") or match.group("port2"))
    if not 0 <= port <= 65535:
        raise _expected("a port between 0 and 65535", value)
    return HostPort(host, port)


def read_url(value: object) -> str:
    text = read_str(value)
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", text):
        raise _expected("an http:// or https:// URL", value)
    return text.rstrip("/")


def read_network(value: object) -> str:
    """A CIDR network such as "185.71.76.0/27" (a bare address is a /32 or /128)."""
    import ipaddress

    text = read_str(value)
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise _expected('a network such as "185.71.76.0/27"', value) from None


def read_list(item: Callable[[object], T]) -> Callable[[object], tuple[T, ...]]:
    def read(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise _expected("a list", value)
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except ValueError as exc:
                raise ValueError(f"item {index}: {exc}") from None
        return tuple(out)

    return read


def read_timezone(value: object) -> str:
    """An IANA time zone name that this machine's tz database knows ("Europe/Berlin", "UTC")."""
    import zoneinfo

    name = read_str(value)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _expected('an IANA time zone name like "Europe/Berlin"', value) from None
    return name


def one_of(*choices: str) -> Callable[[object], str]:
    def read(value: object) -> str:
        text = read_str(value)
        if text not in choices:
            raise _expected("one of " + ", ".join(f'"{c}"' for c in choices), value)
        return text

    return read


def positive(reader: Callable[[object], T]) -> Callable[[object], T]:
    def read(value: object) -> T:
        result = reader(value)
        if result <= 0:  # type: ignore[operator]
            raise _expected("a positive value", value)
        return result

    return read


def non_negative(reader: Callable[[object], T]) -> Callable[[object], T]:
    def read(value: object) -> T:
        result = reader(value)
        if result < 0:  # type: ignore[operator]
            raise _expected("zero or a positive value", value)
        return result

    return read


def _number(value: float) -> str:
    """A bound as people write it: 1000000, 0.5 (never 1e+06)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def in_range(reader: Callable[[object], T], low: float, high: float) -> Callable[[object], T]:
    def read(value: object) -> T:
        result = reader(value)
        if not low <= result <= high:  # type: ignore[operator]
            raise _expected(f"a value from {_number(low)} to {_number(high)}", value)
        return result

    return read


def _read_referral_level(value: object) -> ReferralLevel:
    if not isinstance(value, dict) or set(value) != {"paying", "percent"}:
        raise _expected("a table { paying = N, percent = P }", value)
    paying = non_negative(read_int)(value["paying"])
    percent = in_range(read_int, 0, 100)(value["percent"])
    return ReferralLevel(paying, percent)


def _read_referral_levels(value: object) -> tuple[ReferralLevel, ...]:
    levels = read_list(_read_referral_level)(value)
    for index in range(1, len(levels)):
        if levels[index].paying <= levels[index - 1].paying:
            raise ValueError(
                f"item {index}: expected thresholds in ascending order, got paying = {levels[index].paying} "
                f"after paying = {levels[index - 1].paying}"
            )
    return levels


def read_telegram_currency(value: object) -> str:
    from vpnd.money import TELEGRAM_CURRENCIES

    text = read_str(value)
    if text and text.upper() not in TELEGRAM_CURRENCIES:
        raise _expected('an ISO 4217 code Telegram Payments take, such as "USD" or "RUB"', value)
    return text.upper()


def read_chat_id(value: object) -> int:
    """A Telegram chat id: a person's (positive) or a group's or channel's (negative, e.g. -100…), or 0 (none)."""
    chat_id = read_int(value)
    if abs(chat_id) >= 2**52:  # Telegram's ids fit 52 bits
        raise _expected("a Telegram chat id (an integer such as -1001234567890)", value)
    return chat_id


def read_channel(value: object) -> str:
    """A channel for `getChatMember`: "@username" (5–32 letters, digits, _) or a numeric id "-100…"; "" = none."""
    text = read_str(value).strip()
    if text and not (re.fullmatch(r"@[A-Za-z][A-Za-z0-9_]{4,31}", text) or re.fullmatch(r"-100\d{5,16}", text)):
        raise _expected('a channel "@username" or a numeric id such as "-1001234567890"', value)
    return text


def read_invite_link(value: object) -> str:
    text = read_str(value).strip()
    if text and not re.fullmatch(r"https://t\.me/\S+", text):
        raise _expected('an invite link such as "https://t.me/+AbCdEf123"', value)
    return text


def read_admin_roles(value: object) -> Mapping[int, str]:
    """`{ "123" = "admin", "456" = "support" }`: Telegram user ids (as TOML keys, so strings) → role."""
    if not isinstance(value, dict):
        raise _expected('a table of user ids and roles such as { "123" = "admin", "456" = "support" }', value)
    roles: dict[int, str] = {}
    for key, role in value.items():
        if not re.fullmatch(r"[1-9][0-9]{0,18}", key):
            raise ValueError(f'{key!r}: expected a Telegram user id such as "123456789"')
        if role not in ("admin", "support"):
            raise ValueError(f'{key!r}: expected "admin" or "support" (owners are admin_ids), got {_show(role)}')
        roles[int(key)] = role
    return roles


def read_language(value: object) -> str:
    return one_of(*SUPPORTED_LANGUAGES)(value)


def _read_terms_version(value: object) -> str:
    """It travels in the "I accept" button's callback data, so it is short and plain."""
    text = read_str(value)
    if text and not re.fullmatch(r"[A-Za-z0-9._-]{1,32}", text):
        raise _expected('1 to 32 letters, digits, ".", "_" or "-", such as "2026-12-01"', value)
    return text


def _read_terms_text(value: object) -> Mapping[str, str]:
    return {lang: text.strip() for lang, text in _read_title(value).items() if text.strip()}


def _read_https_url(value: object) -> str:
    text = read_str(value)
    if text and not re.fullmatch(r"https://[^\s/?#]+(/\S*)?", text):
        raise _expected("an https:// URL (or empty)", value)
    return text


# Section -> key -> reader. Keys not listed are refused (catches typos such as `grace_second`).
SECTION_READERS: dict[str, dict[str, Callable[[object], Any]]] = {
    "telegram": {
        "token": read_str,
        "api_base_url": read_url,
        "admin_ids": read_list(read_int),
        "admin_roles": read_admin_roles,
        "poll_timeout": in_range(read_int, 0, 50),
        "max_concurrent_updates": in_range(read_int, 1, 1000),
        "handler_timeout_seconds": positive(read_number),
        "rate_per_second": in_range(read_number, 0.1, 1000),
        "per_chat_per_second": in_range(read_number, 0.01, 100),
        "poll_dead_after_seconds": positive(read_number),
        "support_contact": read_str,
        "default_language": read_language,
        "max_pending_per_chat": in_range(read_int, 1, 1000),
        "flood_notice_interval_seconds": positive(read_number),
        "pending_alert_seconds": positive(read_number),
    },
    "database": {
        "dsn": read_str,
        "pool_min": in_range(read_int, 1, 100),
        "pool_max": in_range(read_int, 1, 100),
        "statement_timeout_ms": non_negative(read_int),
        "connect_timeout_seconds": positive(read_number),
        "migrate_on_start": read_bool,
        "migration_lock_timeout_seconds": positive(read_number),
    },
    "http": {
        "listen": read_host_port,
        "public_base_url": read_url,
        "max_body_bytes": in_range(read_int, 1024, 16 * 1024 * 1024),
        "max_connections": in_range(read_int, 16, 1_000_000),
        "keep_alive_timeout_seconds": in_range(read_number, 0.1, 3600),
        "read_timeout_seconds": in_range(read_number, 0.1, 3600),
        "body_timeout_seconds": in_range(read_number, 0.1, 3600),
    },
    "metrics": {"username": read_str, "password": read_str, "token": read_str, "public": read_bool},
    "shutdown": {"grace_seconds": in_range(read_number, 0, 3600)},
    "log": {
        "level": one_of("debug", "info", "warning", "error"),
        "format": one_of("kv", "json"),
    },
    "trial": {
        "enabled": read_bool,
        "days": in_range(read_int, 1, 365),
        "devices": in_range(read_int, 0, 1000),
        "traffic_gb": in_range(read_int, 0, 1_000_000),
        "required_channel": lambda v: read_channel(v),
        "channel_invite_link": lambda v: read_invite_link(v),
        "membership_cache_seconds": in_range(read_int, 0, 7 * 24 * 3600),
    },
    "support": {
        "relay_chat": read_chat_id,
        "messages_per_hour": in_range(read_int, 1, 1000),
    },
    "referral": {
        "percent": in_range(read_int, 0, 100),
        "levels": lambda v: _read_referral_levels(v),
        "withdraw_min": positive(read_decimal),
    },
    "payments": {
        "purchase_ttl_minutes": in_range(read_int, 1, 7 * 24 * 60),
        "min_price": non_negative(read_decimal),
        "topup_presets": read_list(positive(read_decimal)),
        "topup_min": positive(read_decimal),
        "topup_max": positive(read_decimal),
        "currency": read_str,
        "promo_max_wrong_attempts": in_range(read_int, 1, 1000),
        "promo_wrong_window_minutes": in_range(read_int, 1, 7 * 24 * 60),
        "promo_alert_wrong_attempts": in_range(read_int, 1, 1_000_000),
        "notify_chat_id": read_chat_id,
    },
    "cryptopay": {
        "enabled": read_bool,
        "token": read_str,
        "api_base_url": read_url,
        "poll_interval": positive(read_number),
        "accepted_assets": read_list(read_str),
    },
    "yookassa": {
        "enabled": read_bool,
        "shop_id": read_str,
        "secret_key": read_str,
        "api_base_url": read_url,
        "notify_networks": read_list(read_network),
        "currency": read_str,
        "methods": read_list(one_of("bank_card", "sbp")),
        "return_url": read_str,
        "poll_interval": positive(read_number),
    },
    "stars": {"enabled": read_bool},
    "telegram_payments": {
        "enabled": read_bool,
        "provider_token": read_str,
        "currency": read_telegram_currency,
        "need_email": read_bool,
        "send_email_to_provider": read_bool,
        "receipt": read_bool,
        "vat_code": in_range(read_int, 1, 12),
    },
    "xray": {
        "enabled": read_bool,
        "template_path": read_str,
        "config_path": read_str,
        "inbound_tag": read_str,
        "flow": read_str,
        "api_address": lambda v: str(read_host_port(v)),
        "api_prefix": one_of("xray.", "v2ray.core."),
        "reconcile_interval": positive(read_number),
        "traffic_interval": in_range(read_number, 1, 3600),
        "restart_command": read_str,
        "host": read_str,
        "port": in_range(read_int, 1, 65535),
        "public_key": read_str,
        "short_id": read_str,
        "sni": read_str,
        "fingerprint": read_str,
        "link_name": read_str,
        "location": lambda v: _read_location(v),
        "rotate_batch_size": in_range(read_int, 1, 10_000),
        "rotate_interval_seconds": in_range(read_number, 0.1, 3600),
    },
    "workers": {
        "reminders_interval": positive(read_number),
        "trial_interval": positive(read_number),
        "quota_interval": positive(read_number),
        "expiry_interval": positive(read_number),
        "renewal_interval": positive(read_number),
        "renewal_window_hours": positive(read_number),
        "health_interval": positive(read_number),
        "housekeeping_interval": positive(read_number),
        "retention_days": in_range(read_int, 1, 3650),
        "batch_size": in_range(read_int, 1, 10000),
        "audit_retention_days": in_range(read_int, 1, 36500),
    },
    "broadcast": {
        "paid": read_bool,
        "progress_interval": positive(read_number),
        "paid_rate_per_second": in_range(read_number, 1, 1000),
        "resend_in_doubt": read_bool,
        "timezone": read_timezone,
    },
    "devices": {"missing_hwid": one_of("allow", "deny")},
    "connect": {"apps_file": read_str},
    "backup": {
        "directory": read_str,
        "keep": in_range(read_int, 1, 10_000),
        "interval_hours": in_range(read_number, 0, 24 * 365),
        "max_age_hours": in_range(read_number, 0, 24 * 365),
        "pg_dump": read_str,
        "pg_restore": read_str,
        "timeout_minutes": in_range(read_number, 1, 24 * 60),
    },
    "terms": {
        "enabled": read_bool,
        "version": _read_terms_version,
        "terms_text": _read_terms_text,
        "terms_url": _read_https_url,
        "privacy_text": _read_terms_text,
        "privacy_url": _read_https_url,
    },
}

SECTION_CLASSES: dict[str, type] = {
    "telegram": TelegramConfig,
    "database": DatabaseConfig,
    "http": HttpConfig,
    "metrics": MetricsConfig,
    "shutdown": ShutdownConfig,
    "log": LogConfig,
    "trial": TrialConfig,
    "support": SupportConfig,
    "referral": ReferralConfig,
    "payments": PaymentsConfig,
    "cryptopay": CryptoPayConfig,
    "yookassa": YooKassaConfig,
    "stars": StarsConfig,
    "telegram_payments": TelegramPaymentsConfig,
    "xray": XrayConfig,
    "workers": WorkersConfig,
    "broadcast": BroadcastConfig,
    "devices": DevicesConfig,
    "connect": ConnectConfig,
    "backup": BackupConfig,
    "terms": TermsConfig,
}

PLAN_KEYS = {
    "code", "title", "days", "price", "currency", "stars", "prices", "nodes",
    "devices", "traffic_gb", "traffic_reset", "description", "visible", "trial",
}  # fmt: skip
#: Keys a plan may leave out (a trial plan also `price` and `currency`: it is never sold).
PLAN_OPTIONAL = {
    "title", "stars", "prices", "nodes", "devices", "traffic_gb", "traffic_reset", "description", "visible", "trial",
}  # fmt: skip
PACK_KEYS = {"code", "title", "gb", "price", "currency", "stars", "prices"}
TRAFFIC_RESETS = ("never", "monthly", "per_period")
#: A Stars price must fit the database's integer column (and Telegram's own limits are far lower).
MAX_STARS = 1_000_000


# --- loading ----------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and return the configuration at `path`; raise `ConfigError` on any problem."""
    environ = os.environ if environ is None else environ
    name = str(path)
    try:
        raw_bytes = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(name, None, "file not found") from None
    except OSError as exc:
        raise ConfigError(name, None, f"cannot read the file: {exc.strerror}") from None
    try:
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(name, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, None, f"invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(name, None, "invalid TOML: nested too deeply") from None
    return config_from_dict(raw, name, environ)


def config_from_dict(raw: Mapping[str, Any], name: str, environ: Mapping[str, str]) -> Config:
    sections: dict[str, Any] = {}
    for section, value in raw.items():
        if section in ("plans", "nodes", "traffic_packs"):
            continue
        if section not in SECTION_READERS:
            known = ", ".join(sorted([*SECTION_READERS, "plans", "nodes", "traffic_packs"]))
            raise ConfigError(name, f"[{section}]", f"unknown section (known: {known})")
        if not isinstance(value, dict):
            raise ConfigError(name, f"[{section}]", f"expected a table, got {_show(value)}")
        sections[section] = _read_section(name, section, value)

    for (section, key), (env_name, credential) in SECRET_SOURCES.items():
        secret = _secret_from_outside(env_name, credential, environ)
        if secret is not None:
            sections.setdefault(section, {})[key] = secret

    if sections.get("connect", {}).get("apps_file"):
        sections["connect"]["catalog"] = _read_catalog(name, sections["connect"]["apps_file"])
    values = {s: SECTION_CLASSES[s](**kwargs) for s, kwargs in sections.items()}
    plans = _read_plans(name, raw.get("plans", []))
    nodes = _read_nodes(name, raw.get("nodes", []))
    packs = _read_traffic_packs(name, raw.get("traffic_packs", []))
    config = Config(path=name, plans=plans, nodes=nodes, traffic_packs=packs, **values)
    check_whole(name, config)
    return config


def _read_catalog(name: str, apps_file: str) -> Catalog:
    path = Path(apps_file)
    if not path.is_absolute():
        path = Path(name).parent / path
    try:
        return load_catalog(path)
    except OSError as exc:
        raise ConfigError(name, "[connect].apps_file", f"cannot read {path}: {exc.strerror or exc}") from None
    except CatalogError as exc:
        raise ConfigError(name, "[connect].apps_file", f"{path}: {exc.key}: {exc.detail}") from None


def _read_section(name: str, section: str, table: Mapping[str, Any]) -> dict[str, Any]:
    readers = SECTION_READERS[section]
    out: dict[str, Any] = {}
    for key, value in table.items():
        reader = readers.get(key)
        if reader is None:
            raise ConfigError(name, f"[{section}].{key}", f"unknown key (known: {', '.join(readers)})")
        try:
            out[key] = reader(value)
        except ValueError as exc:
            raise ConfigError(name, f"[{section}].{key}", str(exc)) from None
    return out


def _secret_from_outside(env_name: str, credential: str, environ: Mapping[str, str]) -> str | None:
    """The environment wins over systemd credentials, which win over the file."""
    if environ.get(env_name):
        return environ[env_name]
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = Path(directory) / credential
        if candidate.is_file():
            return candidate.read_text("utf-8").strip()
    return None


def _read_array(
    name: str, raw: object, array: str, read: Callable[[str, str, object], T], key: str, ident: Callable[[T], str]
) -> tuple[T, ...]:
    """An array of tables (`[[plans]]`, `[[nodes]]`), each read by `read`, their `key` unique."""
    if not isinstance(raw, list):
        raise ConfigError(name, f"[[{array}]]", f"expected an array of tables, got {_show(raw)}")
    items = [read(name, f"[[{array}]][{index}]", table) for index, table in enumerate(raw)]
    seen = [ident(item) for item in items]
    for index, value in enumerate(seen):
        if seen.index(value) != index:
            raise ConfigError(name, f"[[{array}]][{index}].{key}", f'duplicate {array[:-1]} {key} "{value}"')
    return tuple(items)


def _read_plans(name: str, raw: object) -> tuple[Plan, ...]:
    return _read_array(name, raw, "plans", _read_plan, "code", lambda plan: plan.code)


def _read_traffic_packs(name: str, raw: object) -> tuple[TrafficPack, ...]:
    return _read_array(name, raw, "traffic_packs", _read_traffic_pack, "code", lambda pack: pack.code)


def _read_traffic_pack(name: str, where: str, table: object) -> TrafficPack:
    field = _table_reader(name, where, table, PACK_KEYS, required=PACK_KEYS - {"title", "stars", "prices"})
    code = _read_code(name, where, field)
    gb = field("gb", in_range(read_int, 1, 1_000_000))
    pack = TrafficPack(
        code=code,
        title=field("title", _read_title, f"+{gb} GB"),
        gb=gb,
        price=field("price", positive(read_decimal)),
        currency=field("currency", read_str),
        stars=field("stars", in_range(read_int, 0, MAX_STARS), 0),
        prices=field("prices", _read_prices, {}),
    )
    _check_prices(name, where, pack)
    return pack


def _table_reader(name: str, where: str, table: object, keys: set[str], *, required: set[str]) -> Callable[..., Any]:
    """For one table of an array (`[[plans]]`, `[[traffic_packs]]`): refuse unknown and missing keys, and
    return `field(key, reader, default=None)`, which reads a key and names it in its error."""
    if not isinstance(table, dict):
        raise ConfigError(name, where, f"expected a table, got {_show(table)}")
    unknown = set(table) - keys
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(name, f"{where}.{key}", f"unknown key (known: {', '.join(sorted(keys))})")
    missing = required - set(table)
    if missing:
        raise ConfigError(name, f"{where}.{sorted(missing)[0]}", "missing required key")

    def field(key: str, reader: Callable[[object], T], default: object = None) -> T:
        try:
            return reader(table.get(key, default))
        except ValueError as exc:
            raise ConfigError(name, f"{where}.{key}", str(exc)) from None

    return field


def _read_code(name: str, where: str, field: Callable[..., Any]) -> str:
    code: str = field("code", read_str)
    if not re.fullmatch(r"[a-z0-9_]{1,32}", code):
        raise ConfigError(name, f"{where}.code", f"expected 1-32 of a-z, 0-9, _, got {_show(code)}")
    return code


def _check_prices(name: str, where: str, item: Plan | TrafficPack) -> None:
    """Every price of a plan or a pack must be a whole number of its currency's minor units."""
    from vpnd import pricing

    for key, currency in [("price", item.currency), *((f"prices.{c}", c) for c in item.prices)]:
        try:
            pricing.to_minor(item.price_in(currency) or Decimal(0), currency)
        except pricing.InvalidAmount as exc:
            raise ConfigError(
                name, f"{where}.{key}", f"expected a price in whole {currency} minor units: {exc}"
            ) from None


def _read_plan(name: str, where: str, table: object) -> Plan:
    is_trial = isinstance(table, dict) and table.get("trial") is True
    required = PLAN_KEYS - PLAN_OPTIONAL - ({"price", "currency"} if is_trial else set())
    field = _table_reader(name, where, table, PLAN_KEYS, required=required)
    code = _read_code(name, where, field)
    plan = Plan(
        code=code,
        title=field("title", _read_title, code),
        days=field("days", in_range(read_int, 1, 3650)),
        price=field("price", positive(read_decimal), "1" if is_trial else None),
        currency=field("currency", read_str, "USD" if is_trial else None),
        stars=field("stars", in_range(read_int, 0, MAX_STARS), 0),
        prices=field("prices", _read_prices, {}),
        nodes=field("nodes", read_list(read_str), []),
        devices=field("devices", in_range(read_int, 0, 1000), 0),
        traffic_gb=field("traffic_gb", in_range(read_int, 0, 1_000_000), 0),
        traffic_reset=field("traffic_reset", one_of(*TRAFFIC_RESETS), "per_period"),
        description=field("description", _read_title, {}),
        visible=field("visible", read_bool, not is_trial),
        trial=field("trial", read_bool, False),
    )
    if plan.trial and plan.visible:
        raise ConfigError(name, f"{where}.visible", "a trial plan is never sold: leave visible out or set it to false")
    if not plan.trial:
        _check_prices(name, where, plan)
    return plan


#: `[[nodes]]` keys → readers (link and API settings default like `[xray]`'s).
NODE_READERS: dict[str, Callable[[object], Any]] = {
    "name": read_str,
    **{
        key: SECTION_READERS["xray"][key]
        for key in ("location", "host", "port", "public_key", "short_id", "sni", "fingerprint", "flow")
    },
    **{key: SECTION_READERS["xray"][key] for key in ("inbound_tag", "api_address", "api_prefix")},
    "api_tls_ca": read_str,
    "api_tls_cert": read_str,
    "api_tls_key": read_str,
    "api_tls_server_name": read_str,
}
NODE_REQUIRED = ("name", "location", "host", "api_address", "public_key")
_TLS_KEYS = ("api_tls_ca", "api_tls_cert", "api_tls_key")


def _read_nodes(name: str, raw: object) -> tuple[NodeConfig, ...]:
    return _read_array(name, raw, "nodes", _read_node, "name", lambda node: node.name)


def _read_node(name: str, where: str, table: object) -> NodeConfig:
    if not isinstance(table, dict):
        raise ConfigError(name, where, f"expected a table, got {_show(table)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        reader = NODE_READERS.get(key)
        if reader is None:
            raise ConfigError(name, f"{where}.{key}", f"unknown key (known: {', '.join(NODE_READERS)})")
        try:
            values[key] = reader(value)
        except ValueError as exc:
            raise ConfigError(name, f"{where}.{key}", str(exc)) from None
    for key in NODE_REQUIRED:
        if key not in values:
            raise ConfigError(name, f"{where}.{key}", "missing required key")
    if not re.fullmatch(r"[a-z0-9_-]{1,32}", values["name"]) or values["name"] == LOCAL_NODE:
        raise ConfigError(
            name,
            f"{where}.name",
            f'expected 1-32 of a-z, 0-9, _, - (and not "{LOCAL_NODE}"), got {_show(values["name"])}',
        )
    tls_given = [key for key in _TLS_KEYS if values.get(key)]
    tls = None
    if tls_given:
        missing = [key for key in _TLS_KEYS if not values.get(key)]
        if missing:
            raise ConfigError(
                name, f"{where}.{missing[0]}", f"required with {tls_given[0]} (mutual TLS needs all three)"
            )
        for key in _TLS_KEYS:
            if not Path(values[key]).is_file():
                raise ConfigError(name, f"{where}.{key}", f"file not found: {values[key]}")
        tls = NodeTls(
            values.pop("api_tls_ca"),
            values.pop("api_tls_cert"),
            values.pop("api_tls_key"),
            values.pop("api_tls_server_name", ""),
        )
    elif not _is_loopback(values["api_address"]):
        raise ConfigError(
            name,
            f"{where}.api_tls_ca",
            f"required: the Xray API at {values['api_address']} would be reached in the clear; set api_tls_ca, "
            'api_tls_cert and api_tls_key (mutual TLS, README "Several servers"), or use a loopback address '
            "such as a WireGuard-forwarded port on 127.0.0.1",
        )
    values.pop("api_tls_server_name", None)
    node = NodeConfig(**values, tls=tls)
    _check_link_settings(name, node, where)
    return node


def _is_loopback(address: str) -> bool:
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_prices(value: object) -> Mapping[str, Decimal]:
    if not isinstance(value, dict):
        raise _expected('a table of currencies such as { RUB = "299", USD = "4.99" }', value)
    prices = {}
    for currency, amount in value.items():
        if not re.fullmatch(r"[A-Za-z]{3}", currency):
            raise ValueError(f"expected an ISO 4217 currency code, got {_show(currency)}")
        try:
            prices[currency.upper()] = positive(read_decimal)(amount)
        except ValueError as exc:
            raise ValueError(f"{currency}: {exc}") from None
    return prices


def _read_title(value: object) -> Mapping[str, str]:
    if isinstance(value, str):
        return {lang: value for lang in SUPPORTED_LANGUAGES}
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        for lang in value:
            read_language(lang)
        return dict(value)
    raise _expected('a string or a table of languages such as { en = "1 month", ru = "1 месяц" }', value)


def _read_location(value: object) -> Mapping[str, str]:
    """Like a plan's title; empty labels are left out (`location = ""`: none)."""
    return {lang: label for lang, label in _read_title(value).items() if label}


def check_whole(name: str, config: Config) -> None:
    """Checks that involve more than one key."""
    if config.database.pool_min > config.database.pool_max:
        raise ConfigError(
            name,
            "[database].pool_min",
            f"expected at most pool_max ({config.database.pool_max}), got {config.database.pool_min}",
        )
    if config.payments.topup_min > config.payments.topup_max:
        raise ConfigError(name, "[payments].topup_min", "expected at most [payments].topup_max")
    _check_amounts(name, config.payments)
    both = sorted(set(config.telegram.admin_ids) & set(config.telegram.admin_roles))
    if both:
        raise ConfigError(name, "[telegram].admin_roles", f"{both[0]} is an owner already (in admin_ids): keep one")
    _check_terms(name, config.terms)
    if config.trial.required_channel.startswith("-") and not config.trial.channel_invite_link:
        # A private channel has no public address: users need the invite link to join it.
        raise ConfigError(name, "[trial].channel_invite_link", "required when required_channel is a numeric id")
    if config.xray.enabled:
        _check_link_settings(name, config.xray, "[xray]")
    known_nodes = {node.name for node in config.vpn_nodes}
    for index, plan in enumerate(config.plans):
        for node_name in plan.nodes:
            if node_name not in known_nodes:
                raise ConfigError(
                    name,
                    f"[[plans]][{index}].nodes",
                    f'unknown node "{node_name}" (known: {", ".join(sorted(known_nodes))})',
                )
    trials = [index for index, plan in enumerate(config.plans) if plan.trial]
    if len(trials) > 1:
        raise ConfigError(name, f"[[plans]][{trials[1]}].trial", "only one plan can be the trial")
    if not config.sale_plans and config.plans:
        raise ConfigError(name, "[[plans]]", "expected at least one plan for sale (visible = true and not the trial)")
    plan_codes = {plan.code for plan in config.plans}
    for index, pack in enumerate(config.traffic_packs):
        if pack.code in plan_codes:
            raise ConfigError(name, f"[[traffic_packs]][{index}].code", f'"{pack.code}" is also a plan\'s code')
    if config.cryptopay.enabled and not config.cryptopay.token:
        raise ConfigError(
            name, "[cryptopay].token", "required when [cryptopay].enabled = true (or VPND_CRYPTOPAY_TOKEN)"
        )
    if config.yookassa.enabled and not (config.yookassa.shop_id and config.yookassa.secret_key):
        raise ConfigError(
            name, "[yookassa].secret_key", "shop_id and secret_key are required when [yookassa].enabled = true"
        )
    if config.telegram_payments.enabled and not config.telegram_payments.provider_token:
        raise ConfigError(
            name,
            "[telegram_payments].provider_token",
            "required when [telegram_payments].enabled = true (or VPND_TELEGRAM_PAYMENTS_TOKEN)",
        )
    if config.telegram_payments.enabled and not config.telegram_payments.currency:
        try:  # the card currency defaults to the shop's, which must then be one Telegram takes
            read_telegram_currency(config.payments.currency)
        except ValueError as exc:
            raise ConfigError(name, "[telegram_payments].currency", f"{exc} ([payments].currency)") from None


#: Room the terms screen leaves for the operator's texts in one Telegram message (4096 characters).
TERMS_TEXT_BUDGET = 3500


def _check_terms(name: str, terms: TermsConfig) -> None:
    """Enabled terms need a version and, for each document, a text or a URL (not both); the terms of
    service are required, the privacy policy optional; the texts must fit one message."""
    if not terms.enabled:
        return
    if not terms.version:
        raise ConfigError(name, "[terms].version", "required when [terms].enabled = true")
    for document, required in (("terms", True), ("privacy", False)):
        has_text = bool(terms.terms_text if document == "terms" else terms.privacy_text)
        has_url = bool(terms.terms_url if document == "terms" else terms.privacy_url)
        if has_text and has_url:
            raise ConfigError(
                name, f"[terms].{document}_url", f"set either {document}_text or {document}_url, not both"
            )
        if required and not (has_text or has_url):
            raise ConfigError(name, "[terms].terms_text", "terms_text or terms_url is required when enabled = true")
    for lang in SUPPORTED_LANGUAGES:
        size = len(terms.text("terms", lang, lang)) + len(terms.text("privacy", lang, lang))
        if size > TERMS_TEXT_BUDGET:
            raise ConfigError(
                name,
                "[terms].terms_text",
                f"terms_text and privacy_text together must fit one message: at most {TERMS_TEXT_BUDGET} "
                f"characters per language, got {size} ({lang}); use terms_url / privacy_url for long documents",
            )


def _check_amounts(name: str, payments: PaymentsConfig) -> None:
    """Every configured amount must be a whole number of the currency's minor units (no 0.001 USD)."""
    from vpnd import pricing

    amounts = [
        ("min_price", payments.min_price),
        ("topup_min", payments.topup_min),
        ("topup_max", payments.topup_max),
        *(("topup_presets", amount) for amount in payments.topup_presets),
    ]
    for key, amount in amounts:
        try:
            pricing.to_minor(amount, payments.currency)
        except pricing.InvalidAmount as exc:
            raise ConfigError(
                name, f"[payments].{key}", f"expected whole {payments.currency} minor units: {exc}"
            ) from None


def _check_link_settings(name: str, xray: XrayConfig | NodeConfig, where: str) -> None:
    """With Xray enabled, every value that goes into users' links must be valid at load time."""
    from vpnd.xray import links

    checks: list[tuple[str, Callable[[Any], object], object]] = [
        ("public_key", links.validate_reality_public_key, xray.public_key),
        ("short_id", links.validate_short_id, xray.short_id),
        ("host", links.validate_host, xray.host),
        ("sni", links.validate_hostname, xray.sni),
        ("fingerprint", links.validate_fingerprint, xray.fingerprint),
        ("flow", links.validate_flow, xray.flow),
    ]
    for key, validate, value in checks:
        try:
            validate(value)
        except ValueError as exc:
            raise ConfigError(name, f"{where}.{key}", str(exc)) from None


def require_runtime_secrets(config: Config) -> None:
    """What `vpnd run` needs beyond what `check-config` accepts."""
    if not config.database.dsn:
        raise ConfigError(config.path, "[database].dsn", "required (or set VPND_DATABASE_DSN)")
    if not config.telegram.token:
        raise ConfigError(config.path, "[telegram].token", "required (or set VPND_TELEGRAM_TOKEN)")


# --- printing ---------------------------------------------------------------------------------

SECRET_KEYS = {
    ("telegram", "token"),
    ("database", "dsn"),
    ("cryptopay", "token"),
    ("yookassa", "secret_key"),
    ("metrics", "password"),
    ("metrics", "token"),
    ("telegram_payments", "provider_token"),
}


def mask_secret(value: str) -> str:
    from vpnd.masking import mask_secret

    return mask_secret(value)


def mask_dsn(dsn: str) -> str:
    """Hide the password in a DSN (URL or key=value form, parsed: see `vpnd.masking`)."""
    from vpnd.masking import mask_dsn

    return mask_dsn(dsn)


def render_effective(config: Config) -> str:
    """The effective configuration as TOML, secrets masked (for `vpnd check-config`)."""
    lines = [f"# effective configuration of {config.path} (secrets masked)"]
    for section in SECTION_CLASSES:
        value = getattr(config, section)
        lines.append(f"\n[{section}]")
        for field in attrs.fields(type(value)):
            if not field.repr:  # read from another file (the connect apps catalog), not a key
                continue
            item = getattr(value, field.name)
            if (section, field.name) == ("database", "dsn"):
                item = mask_dsn(item)
            elif (section, field.name) == ("telegram", "token"):
                from vpnd.masking import mask_telegram_token

                item = mask_telegram_token(item)
            elif (section, field.name) in SECRET_KEYS:
                item = mask_secret(item)
            lines.append(f"{field.name} = {_toml(item)}")
    for plan in config.plans:
        lines.append("\n[[plans]]")
        lines.append(f"code = {_toml(plan.code)}")
        lines.append("title = { " + ", ".join(f"{k} = {_toml(v)}" for k, v in plan.title.items()) + " }")
        lines.append(f"days = {plan.days}")
        lines.append(f"price = {_toml(plan.price)}")
        lines.append(f"currency = {_toml(plan.currency)}")
        lines.append(f"stars = {plan.stars}")
        if plan.prices:
            lines.append("prices = { " + ", ".join(f"{k} = {_toml(v)}" for k, v in plan.prices.items()) + " }")
        if plan.nodes:
            lines.append(f"nodes = {_toml(plan.nodes)}")
        lines.append(f"devices = {plan.devices}")
        lines.append(f"traffic_gb = {plan.traffic_gb}")
        lines.append(f"traffic_reset = {_toml(plan.traffic_reset)}")
        if plan.description:
            lines.append(f"description = {_toml(plan.description)}")
        lines.append(f"visible = {_toml(plan.visible)}")
        if plan.trial:
            lines.append("trial = true")
    for pack in config.traffic_packs:
        lines.append("\n[[traffic_packs]]")
        lines.append(f"code = {_toml(pack.code)}")
        lines.append(f"title = {_toml(pack.title)}")
        lines.append(f"gb = {pack.gb}")
        lines.append(f"price = {_toml(pack.price)}")
        lines.append(f"currency = {_toml(pack.currency)}")
        lines.append(f"stars = {pack.stars}")
        if pack.prices:
            lines.append(f"prices = {_toml(pack.prices)}")
    for node in config.nodes:
        lines.append("\n[[nodes]]")
        for field in attrs.fields(NodeConfig):
            item = getattr(node, field.name)
            if field.name == "tls" and item is not None:
                for key in ("ca_file", "cert_file", "key_file", "server_name"):
                    lines.append(f"api_tls_{key.removesuffix('_file')} = {_toml(getattr(item, key))}")
            elif field.name in NODE_READERS:
                lines.append(f"{field.name} = {_toml(item)}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | HostPort | Decimal):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return repr(value)
