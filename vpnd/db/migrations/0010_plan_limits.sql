-- 0010: plans with limits (idempotent, like every migration since 0007). A subscription over its traffic quota is taken off Xray (`traffic_blocked`,
-- which wakes the writer like any change of who may connect); traffic is counted per period
-- (`traffic_periods`: the quota's use, packs bought for it, the notices sent); devices are recorded from
-- the subscription URL's device id (`devices`); a traffic pack is a kind of purchase.
ALTER TABLE subscriptions
    ADD COLUMN IF NOT EXISTS traffic_blocked boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS extra_devices integer NOT NULL DEFAULT 0 CHECK (extra_devices >= 0);
ALTER TABLE purchases DROP CONSTRAINT IF EXISTS purchases_kind_check,
    ADD CONSTRAINT purchases_kind_check CHECK (kind IN ('plan', 'topup', 'pack'));
ALTER TABLE payments ADD COLUMN IF NOT EXISTS granted_bytes bigint;
-- A pro-rata upgrade (the plan replaced, its credit, that plan's end when quoted) and a pack's bytes.
ALTER TABLE purchases
    ADD COLUMN IF NOT EXISTS upgrade_from text,
    ADD COLUMN IF NOT EXISTS upgrade_credit_minor bigint NOT NULL DEFAULT 0 CHECK (upgrade_credit_minor >= 0),
    ADD COLUMN IF NOT EXISTS upgrade_basis_expires_at timestamptz,
    ADD COLUMN IF NOT EXISTS pack_bytes bigint CHECK (pack_bytes IS NULL OR pack_bytes > 0);

CREATE TABLE IF NOT EXISTS traffic_periods (
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
CREATE UNIQUE INDEX IF NOT EXISTS traffic_periods_current_idx ON traffic_periods (user_id) WHERE current;
CREATE INDEX IF NOT EXISTS traffic_periods_due_idx ON traffic_periods (ends_at, user_id) WHERE current AND ends_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS traffic_periods_closed_idx ON traffic_periods (started_at) WHERE NOT current;
CREATE INDEX IF NOT EXISTS subscriptions_traffic_blocked_idx ON subscriptions (user_id) WHERE traffic_blocked;

CREATE TABLE IF NOT EXISTS devices (
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

DROP TRIGGER IF EXISTS subscriptions_notify_xray ON subscriptions;
CREATE TRIGGER subscriptions_notify_xray
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF user_id, status, uuid, expires_at, plan_code, traffic_blocked
    ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_xray');
