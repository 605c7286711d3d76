-- vpnd — the whole current database schema, for people to read and for fresh installs.
--
-- PostgreSQL is the single source of truth: Xray's user list, messages to users and broadcast
-- progress are all derived from these tables after commit. A fresh database gets this file in one
-- transaction; an existing one gets the numbered files in vpnd/db/migrations/ (see vpnd/db/migrations.py).
-- Money is integer minor units (cents) of one currency ([payments].currency), never float.

CREATE TABLE schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- Telegram users. `id` is the Telegram user id (= the private chat id).
CREATE TABLE users (
    id                  bigint PRIMARY KEY,
    username            text,
    first_name          text NOT NULL DEFAULT '',
    language            text NOT NULL DEFAULT 'en',
    language_chosen     boolean NOT NULL DEFAULT false,
    referral_code       text NOT NULL UNIQUE,
    referred_by         bigint REFERENCES users (id),
    balance_minor       bigint NOT NULL DEFAULT 0 CHECK (balance_minor >= 0),
    pending_promo_code  text,
    reachable           boolean NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- Banned by an admin (`vpnd admin ban`): the bot ignores them and Xray does not know them.
    banned_at           timestamptz,
    ban_reason          text,
    CHECK (referred_by IS NULL OR referred_by <> id)
);
CREATE INDEX users_username_idx ON users (lower(username));
CREATE INDEX users_created_at_idx ON users (created_at);
CREATE INDEX users_banned_idx ON users (id) WHERE banned_at IS NOT NULL;

-- One subscription per user: the user's VPN identity (UUID, subscription token) and its validity.
-- Renewal extends `expires_at` and keeps the UUID; reissue replaces UUID and token.
CREATE TABLE subscriptions (
    user_id      bigint PRIMARY KEY REFERENCES users (id),
    kind         text NOT NULL CHECK (kind IN ('trial', 'paid')),
    status       text NOT NULL CHECK (status IN ('active', 'expired', 'revoked')),
    uuid         uuid NOT NULL UNIQUE,
    sub_token    text NOT NULL UNIQUE,
    plan_code    text,
    starts_at    timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    auto_renew   boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- Over its traffic quota: taken off Xray until a pack, a reset or an admin's grant (vpnd/db/quota.py).
    traffic_blocked  boolean NOT NULL DEFAULT false,
    -- Device slots granted by an admin beyond the plan's `devices`.
    extra_devices    integer NOT NULL DEFAULT 0 CHECK (extra_devices >= 0)
);
CREATE INDEX subscriptions_active_expiry_idx ON subscriptions (expires_at, user_id) WHERE status = 'active';
-- The Xray writer streams the desired set ordered by its client email ("u<user_id>", byte order).
CREATE INDEX subscriptions_traffic_blocked_idx ON subscriptions (user_id) WHERE traffic_blocked;
CREATE INDEX subscriptions_xray_email_idx ON subscriptions ((('u' || user_id::text) COLLATE "C"))
    WHERE status = 'active';

-- A trial is granted once per user, ever: the primary key is the guarantee.
CREATE TABLE trials (
    user_id     bigint PRIMARY KEY REFERENCES users (id),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    ends_at     timestamptz NOT NULL
);
CREATE INDEX trials_ends_at_idx ON trials (ends_at, user_id);

-- Key reissues, for the per-user rate limit.
CREATE TABLE key_reissues (
    user_id  bigint NOT NULL REFERENCES users (id),
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX key_reissues_user_at_idx ON key_reissues (user_id, at);

-- Key rotations (`vpnd admin rotate-keys`, the admin bot's "Rotate all keys"): every subscription's UUID
-- and subscription token replaced, a batch at a time, by the daemon (vpnd/workers/key_rotation.py). A
-- batch rotates its users, queues their messages and moves the cursor (`after_user_id`) in ONE
-- transaction: a restart or a kill -9 resumes after the last committed batch. At most one is open.
CREATE TABLE key_rotations (
    id             bigserial PRIMARY KEY,
    status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'paused', 'done', 'cancelled')),
    batch_size     integer NOT NULL CHECK (batch_size BETWEEN 1 AND 10000),
    notify         boolean NOT NULL,
    after_user_id  bigint,
    total          integer NOT NULL,
    rotated        integer NOT NULL DEFAULT 0,
    skipped        integer NOT NULL DEFAULT 0,
    notified       integer NOT NULL DEFAULT 0,
    created_by     bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE UNIQUE INDEX key_rotations_open_idx ON key_rotations ((status IN ('running', 'paused')))
    WHERE status IN ('running', 'paused');

-- Who invited whom; recorded once, for a new user only.
CREATE TABLE referrals (
    referred_id  bigint PRIMARY KEY REFERENCES users (id),
    referrer_id  bigint NOT NULL REFERENCES users (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (referred_id <> referrer_id)
);
CREATE INDEX referrals_referrer_idx ON referrals (referrer_id);

-- Support tickets: a user's message, its copy in the relay chat (the id Telegram gave it, recorded when
-- sent), and the admins' answers (vpnd/db/support.py).
CREATE TABLE support_messages (
    id                bigserial PRIMARY KEY,
    user_id           bigint NOT NULL REFERENCES users (id),
    direction         text NOT NULL CHECK (direction IN ('user', 'admin')),
    body              text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- An admin's answer: who wrote it and the user's message it answers.
    author_id         bigint,
    answers_id        bigint REFERENCES support_messages (id),
    -- A user's message: its copy in the relay chat.
    relay_chat_id     bigint,
    relay_outbox_id   bigint,
    relay_message_id  bigint
);
CREATE INDEX support_messages_user_idx ON support_messages (user_id, created_at) WHERE direction = 'user';
CREATE UNIQUE INDEX support_messages_relayed_idx ON support_messages (relay_chat_id, relay_message_id)
    WHERE relay_message_id IS NOT NULL;
CREATE INDEX support_messages_unsent_idx ON support_messages (relay_outbox_id)
    WHERE relay_message_id IS NULL AND relay_outbox_id IS NOT NULL;

-- Conversation states (e.g. "waiting for a promo code"): durable, with an expiry.
CREATE TABLE conversation_states (
    user_id     bigint PRIMARY KEY REFERENCES users (id),
    state       text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    expires_at  timestamptz NOT NULL
);
CREATE INDEX conversation_states_expires_idx ON conversation_states (expires_at);

-- Every update taken from getUpdates is recorded here before the offset moves past it; a row is
-- handled once (handled_at set in the handler's own transaction) and survives a crash.
CREATE TABLE telegram_inbox (
    update_id    bigint PRIMARY KEY,
    chat_id      bigint,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    handled_at   timestamptz,
    outcome      text
);
CREATE INDEX telegram_inbox_pending_idx ON telegram_inbox (update_id) WHERE handled_at IS NULL;

-- Small durable key/value facts of the daemon (e.g. the getUpdates offset).
CREATE TABLE daemon_state (
    key    text PRIMARY KEY,
    value  jsonb NOT NULL
);

-- Terms of service / privacy policy accepted, one row per user and version (history kept: a new
-- `[terms].version` asks again and adds a row). Maintenance mode is the daemon_state row 'maintenance'.
CREATE TABLE terms_acceptances (
    user_id      bigint NOT NULL REFERENCES users (id),
    version      text NOT NULL,
    accepted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, version)
);

-- A /start argument (ref_…, gift_…) that came before the terms were accepted: processed right after.
CREATE TABLE terms_pending_starts (
    user_id        bigint PRIMARY KEY REFERENCES users (id),
    argument       text NOT NULL CHECK (length(argument) <= 64),
    first_contact  boolean NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Messages to users, written in the transaction that causes them and delivered after commit.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    chat_id      bigint NOT NULL,
    dedupe_key   text UNIQUE,
    method       text NOT NULL DEFAULT 'sendMessage',
    payload      jsonb NOT NULL,
    not_before   timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer NOT NULL DEFAULT 0,
    status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'dropped', 'failed')),
    sent_at      timestamptz,
    last_error   text
);
CREATE INDEX outbox_due_idx ON outbox (not_before, id) WHERE status = 'pending';
-- Rows waiting for a retry hold back their chat's newer rows (per-chat order).
CREATE INDEX outbox_retry_idx ON outbox (chat_id, id) WHERE status = 'pending' AND attempts > 0;

CREATE TABLE promo_codes (
    code          text PRIMARY KEY,
    percent       integer CHECK (percent BETWEEN 1 AND 100),
    max_uses      integer CHECK (max_uses IS NULL OR max_uses > 0),
    used_count    integer NOT NULL DEFAULT 0,
    expires_at    timestamptz,
    active        boolean NOT NULL DEFAULT true,
    created_by    bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- percent: `percent` off the next plan; amount: `amount_minor` (in `currency`) off the next plan,
    -- never below [payments] min_price; days: `grant_days` added at once; balance: `amount_minor`
    -- credited at once. Conditions: `plan_code` (discounts only), `user_id` (a personal code),
    -- `first_purchase` (only users who never paid).
    kind          text NOT NULL DEFAULT 'percent',
    amount_minor  bigint,
    currency      text,
    grant_days    integer,
    plan_code     text,
    user_id       bigint,
    first_purchase boolean NOT NULL DEFAULT false,
    CHECK (max_uses IS NULL OR used_count <= max_uses),
    CONSTRAINT promo_codes_kind_value CHECK (
        (kind = 'percent' AND percent IS NOT NULL AND amount_minor IS NULL AND grant_days IS NULL)
        OR (kind IN ('amount', 'balance') AND percent IS NULL AND amount_minor > 0 AND currency IS NOT NULL
            AND grant_days IS NULL)
        OR (kind = 'days' AND percent IS NULL AND amount_minor IS NULL AND grant_days > 0)
    ),
    CONSTRAINT promo_codes_plan_for_discounts CHECK (plan_code IS NULL OR kind IN ('percent', 'amount'))
);

CREATE TABLE promo_redemptions (
    code         text NOT NULL REFERENCES promo_codes (code),
    user_id      bigint NOT NULL REFERENCES users (id),
    purchase_id  bigint,  -- NULL: a days or balance code (redeemed without a purchase)
    redeemed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (code, user_id)
);

-- Wrong promo codes typed by users (not found, expired, used up, ...): a user gets at most
-- [payments].promo_max_wrong_attempts per promo_wrong_window_minutes, and a spike across all users
-- alerts the admins. Kept [workers].retention_days.
CREATE TABLE promo_attempts (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id),
    code        text NOT NULL,
    result      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX promo_attempts_user_idx ON promo_attempts (user_id, created_at);
CREATE INDEX promo_attempts_created_at_idx ON promo_attempts (created_at);

-- A purchase is the intent to pay: a plan (or a balance top-up) at a price, by a method.
CREATE TABLE purchases (
    id                bigserial PRIMARY KEY,
    user_id           bigint NOT NULL REFERENCES users (id),
    kind              text NOT NULL CHECK (kind IN ('plan', 'topup', 'pack', 'gift')),
    plan_code         text,
    days              integer,
    method            text NOT NULL CHECK (method IN ('cryptopay', 'stars', 'balance', 'card', 'yookassa')),
    amount_minor      bigint NOT NULL CHECK (amount_minor >= 0),
    currency          text NOT NULL,
    stars             integer,
    promo_code        text,
    discount_percent  integer NOT NULL DEFAULT 0,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'paid', 'expired', 'cancelled')),
    invoice_id        bigint UNIQUE,
    invoice_url       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    paid_at           timestamptz,
    paid_late         boolean NOT NULL DEFAULT false,
    -- The price before any promo discount (NULL only for discounted purchases older than this column).
    list_amount_minor bigint CHECK (list_amount_minor IS NULL OR list_amount_minor >= 0),
    -- The newer purchase of the same user that expired this one (its invoice is deleted at the provider).
    superseded_by     bigint REFERENCES purchases (id),
    -- A pro-rata upgrade: the plan it replaces, the credit for that plan's unused part (in this purchase's
    -- currency, Stars for a Stars purchase) and that plan's end when the credit was computed.
    upgrade_from      text,
    upgrade_credit_minor bigint NOT NULL DEFAULT 0 CHECK (upgrade_credit_minor >= 0),
    upgrade_basis_expires_at timestamptz,
    -- A traffic pack: the bytes it adds (fixed when bought; a reload may change the pack).
    pack_bytes        bigint CHECK (pack_bytes IS NULL OR pack_bytes > 0)
);
CREATE INDEX purchases_pending_idx ON purchases (id) WHERE status = 'pending';
CREATE INDEX purchases_user_idx ON purchases (user_id, created_at);
-- The payment watcher re-checks invoices of purchases expired early (a newer purchase replaced them).
CREATE INDEX purchases_expired_invoice_idx ON purchases (expires_at) WHERE status = 'expired' AND invoice_id IS NOT NULL;
CREATE INDEX purchases_superseded_by_idx ON purchases (superseded_by) WHERE superseded_by IS NOT NULL;

-- A plan bought as a gift: its code (unguessable, `secrets`), what it gives, and what a refund credits the
-- buyer (the purchase's price, in its currency). Redeemed once (a conditional UPDATE), or refunded once.
CREATE TABLE gifts (
    id           bigserial PRIMARY KEY,
    code         text NOT NULL UNIQUE,
    purchase_id  bigint NOT NULL UNIQUE REFERENCES purchases (id),
    buyer_id     bigint NOT NULL REFERENCES users (id),
    plan_code    text NOT NULL,
    days         integer NOT NULL CHECK (days > 0),
    value_minor  bigint NOT NULL CHECK (value_minor >= 0),
    currency     text NOT NULL,
    status       text NOT NULL DEFAULT 'unredeemed' CHECK (status IN ('unredeemed', 'redeemed', 'refunded')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    redeemed_by  bigint REFERENCES users (id),
    redeemed_at  timestamptz,
    refunded_at  timestamptz,
    CHECK ((status = 'redeemed') = (redeemed_by IS NOT NULL AND redeemed_at IS NOT NULL)),
    CHECK ((status = 'refunded') = (refunded_at IS NOT NULL))
);
CREATE INDEX gifts_buyer_idx ON gifts (buyer_id, id);

-- Money received. The unique provider id makes finalize idempotent across webhook and watcher.
CREATE TABLE payments (
    id                   bigserial PRIMARY KEY,
    purchase_id          bigint NOT NULL UNIQUE REFERENCES purchases (id),
    user_id              bigint NOT NULL REFERENCES users (id),
    provider             text NOT NULL CHECK (provider IN ('cryptopay', 'stars', 'balance', 'card', 'yookassa')),
    provider_payment_id  text NOT NULL,
    amount_minor         bigint NOT NULL,
    currency             text NOT NULL,
    outcome              text NOT NULL CHECK (outcome IN ('granted', 'amount_mismatch', 'refunded')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    -- What the payment gave (a refund reverses exactly this): days of access and/or balance.
    granted_days         integer,
    credited_minor       bigint NOT NULL DEFAULT 0,
    -- Its promo discount was refused (a superseded invoice paid anyway, or the code's uses were gone):
    -- valued at the list price instead, the rest credited to the balance; alerted.
    repriced             boolean NOT NULL DEFAULT false,
    -- Card payments (Telegram Payments): Telegram's charge id; provider_payment_id is the provider's.
    telegram_payment_charge_id text,
    UNIQUE (provider, provider_payment_id),
    -- A traffic pack's bytes added to the period (a refund takes back what is left of them).
    granted_bytes        bigint
);
CREATE INDEX payments_created_idx ON payments (created_at);

-- A purchase paid on a hosted checkout page (YooKassa): the provider's payment id (unique per provider),
-- the page, and the provider's status as last seen (the watcher polls the pending ones).
CREATE TABLE checkout_payments (
    purchase_id       bigint PRIMARY KEY REFERENCES purchases (id),
    provider          text NOT NULL,
    payment_id        text NOT NULL,
    confirmation_url  text,
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'canceled')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, payment_id)
);
CREATE INDEX checkout_payments_pending_idx ON checkout_payments (purchase_id) WHERE status = 'pending';

-- Every change of a balance; the balance equals the sum of its ledger.
CREATE TABLE balance_ledger (
    id           bigserial PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id),
    delta_minor  bigint NOT NULL,
    reason       text NOT NULL,
    reference    text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (reason, reference)
);
CREATE INDEX balance_ledger_user_idx ON balance_ledger (user_id);

-- What a user owes when a reversal (a refund taking back a referral reward) exceeded their balance:
-- the balance never goes negative; the rest is recorded here, once per (reason, reference).
CREATE TABLE balance_owed (
    id           bigserial PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id),
    amount_minor bigint NOT NULL CHECK (amount_minor > 0),
    reason       text NOT NULL,
    reference    text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (reason, reference)
);
CREATE INDEX balance_owed_user_idx ON balance_owed (user_id);

-- Referral earnings (vpnd/db/referrals.py): the part of a user's balance that came from referral rewards
-- and may be withdrawn. A top-up never becomes withdrawable. `vpnd.db.ledger.record` keeps
-- 0 <= withdrawable_minor <= users.balance_minor: a debit spends the rest of the balance first and
-- earnings last; a reversed reward and a withdrawal take from earnings first.
CREATE TABLE referral_earnings (
    user_id             bigint PRIMARY KEY REFERENCES users (id),
    withdrawable_minor  bigint NOT NULL DEFAULT 0 CHECK (withdrawable_minor >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Withdrawal requests of referral earnings. The amount leaves the balance when requested (ledger reason
-- `withdrawal`, so it cannot be spent while pending); an approval records the payout, a rejection gives
-- it back (`withdrawal_released`). One pending request per user.
CREATE TABLE withdrawals (
    id            bigserial PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users (id),
    amount_minor  bigint NOT NULL CHECK (amount_minor > 0),
    currency      text NOT NULL,
    details       text NOT NULL CHECK (length(details) BETWEEN 1 AND 200),
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'rejected')),
    note          text,
    decided_by    bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    decided_at    timestamptz
);
CREATE UNIQUE INDEX withdrawals_one_pending_idx ON withdrawals (user_id) WHERE status = 'pending';
CREATE INDEX withdrawals_status_idx ON withdrawals (status, id);

-- Auto-renewal attempts, one per subscription and period end (charged or notified).
CREATE TABLE auto_renewals (
    user_id     bigint NOT NULL REFERENCES users (id),
    period_end  timestamptz NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('charged', 'insufficient_balance', 'card_pending', 'card_failed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- A saved-card charge's purchase (vpnd/workers/renewal.py): a retry charges the same one.
    purchase_id bigint REFERENCES purchases (id),
    PRIMARY KEY (user_id, period_end)
);

-- A user's payment method saved at the provider with their consent, charged by auto-renewal.
CREATE TABLE saved_payment_methods (
    user_id     bigint PRIMARY KEY REFERENCES users (id),
    provider    text NOT NULL,
    method_id   text NOT NULL,
    title       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Monotonic traffic totals per user, from Xray's counters read without reset.
CREATE TABLE traffic (
    user_id          bigint PRIMARY KEY REFERENCES users (id),
    uplink_total     bigint NOT NULL DEFAULT 0,
    downlink_total   bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Each node's raw counters as last read (a node restarting resets only its own); `traffic` sums the deltas.
CREATE TABLE traffic_seen (
    node           text NOT NULL,
    user_id        bigint NOT NULL REFERENCES users (id),
    uplink_seen    bigint NOT NULL DEFAULT 0,
    downlink_seen  bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node, user_id)
);
-- Traffic per quota period: the bytes used in it (summed over nodes), the packs and grants added to it,
-- and the highest usage notice sent (80, 95, 100 %). One current period per user; `ends_at` is the next
-- reset (NULL: the quota never resets). Closed periods stay as history.
CREATE TABLE traffic_periods (
    user_id      bigint NOT NULL REFERENCES users (id),
    started_at   timestamptz NOT NULL,
    ends_at      timestamptz,
    used_bytes   bigint NOT NULL DEFAULT 0,
    extra_bytes  bigint NOT NULL DEFAULT 0 CHECK (extra_bytes >= 0),
    notified     smallint NOT NULL DEFAULT 0 CHECK (notified IN (0, 80, 95, 100)),
    current      boolean NOT NULL DEFAULT true,
    PRIMARY KEY (user_id, started_at),
    CHECK (ends_at IS NULL OR ends_at > started_at)
);
CREATE UNIQUE INDEX traffic_periods_current_idx ON traffic_periods (user_id) WHERE current;
CREATE INDEX traffic_periods_due_idx ON traffic_periods (ends_at, user_id) WHERE current AND ends_at IS NOT NULL;
-- Housekeeping deletes closed periods past `[workers].audit_retention_days`.
CREATE INDEX traffic_periods_closed_idx ON traffic_periods (started_at) WHERE NOT current;

-- Devices that fetched a subscription URL with a device id (`x-hwid`), for the plan's device limit.
CREATE TABLE devices (
    user_id     bigint NOT NULL REFERENCES users (id),
    hwid        text NOT NULL,
    os          text NOT NULL DEFAULT '',
    os_version  text NOT NULL DEFAULT '',
    model       text NOT NULL DEFAULT '',
    user_agent  text NOT NULL DEFAULT '',
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, hwid)
);

-- What each Xray node's writer last saw (`vpnd admin nodes`, the admin bot).
CREATE TABLE xray_nodes (
    name           text PRIMARY KEY,
    reachable      boolean NOT NULL,
    detail         text NOT NULL DEFAULT '',
    users          integer NOT NULL DEFAULT 0,
    online         integer NOT NULL DEFAULT 0,
    traffic_day    date,
    traffic_today  bigint NOT NULL DEFAULT 0,
    synced_at      timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Current state of each health check, for alerts on a change of state.
CREATE TABLE health_checks (
    name           text PRIMARY KEY,
    ok             boolean NOT NULL,
    detail         text NOT NULL DEFAULT '',
    since          timestamptz NOT NULL DEFAULT now(),
    last_alert_at  timestamptz
);

CREATE TABLE broadcasts (
    id                   bigserial PRIMARY KEY,
    created_by           bigint NOT NULL,
    text                 text NOT NULL,
    button_text          text,
    button_url           text,
    segment              text NOT NULL,
    segment_days         integer,
    status               text NOT NULL CHECK (status IN ('scheduled', 'running', 'paused', 'cancelled', 'done')),
    total                integer NOT NULL DEFAULT 0,
    progress_chat_id     bigint,
    progress_message_id  bigint,
    created_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    -- Rich broadcasts (0015): media by file_id (the text is its caption), buttons
    -- ([{"text", "url"} | {"text", "plan"}]), per-language texts, a segment's argument, a scheduled start.
    media_kind           text CHECK (media_kind IN ('photo', 'video', 'document', 'animation')),
    media_file_id        text,
    buttons              jsonb NOT NULL DEFAULT '[]',
    variants             jsonb NOT NULL DEFAULT '{}',
    segment_arg          text,
    start_at             timestamptz
);
CREATE INDEX broadcasts_scheduled_idx ON broadcasts (start_at) WHERE status = 'scheduled';

CREATE TABLE broadcast_recipients (
    broadcast_id  bigint NOT NULL REFERENCES broadcasts (id),
    user_id       bigint NOT NULL REFERENCES users (id),
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed', 'skipped')),
    message_id    bigint,
    error         text,
    sent_at       timestamptz,
    -- Set just before the Bot API call (0019): pending with attempted_at = in flight at an unclean stop.
    attempted_at  timestamptz,
    PRIMARY KEY (broadcast_id, user_id)
);
CREATE INDEX broadcast_recipients_pending_idx ON broadcast_recipients (broadcast_id, user_id)
    WHERE status = 'pending';

-- Every admin action (and refused attempt), bot or command line.
CREATE TABLE admin_audit (
    id          bigserial PRIMARY KEY,
    admin_id    bigint NOT NULL,
    action      text NOT NULL,
    target      text,
    result      text NOT NULL,
    details     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- A confirmed action looks up its nonce; a refused stranger's recent rows are counted (at most a
-- few rows per window each); rows older than [workers].audit_retention_days are pruned.
CREATE INDEX admin_audit_nonce_idx ON admin_audit ((details ->> 'nonce')) WHERE details ? 'nonce';
CREATE INDEX admin_audit_denied_idx ON admin_audit (admin_id, created_at) WHERE result = 'denied';
CREATE INDEX admin_audit_created_at_idx ON admin_audit (created_at);

-- Changes wake their owner by themselves: each statement below notifies its owner's channel
-- (vpnd/db/notify.py); PostgreSQL delivers at commit only and folds identical notifications of one
-- transaction into one, so a bulk change wakes its owner once, whichever process made it.
CREATE FUNCTION vpnd_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

-- The Xray writer's desired set reads subscriptions only (vpnd/db/xray_state.py): user, status, UUID,
-- expiry, plan (its nodes) and the traffic block.
CREATE TRIGGER subscriptions_notify_xray
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF user_id, status, uuid, expires_at, plan_code, traffic_blocked
    ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_xray');
-- A ban or unban changes who may connect, like the subscription columns above.
CREATE TRIGGER users_ban_notify_xray
    AFTER UPDATE OF banned_at ON users
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_xray');
CREATE TRIGGER outbox_notify_sender
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_outbox');
-- A broadcast created, paused, resumed or cancelled (progress columns change without waking anyone).
CREATE TRIGGER broadcasts_notify
    AFTER INSERT OR UPDATE OF status ON broadcasts
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_broadcasts');
