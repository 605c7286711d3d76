-- 0004: wrong promo code attempts (per-user limit, spike alert); admin_audit indexes (nonce lookup,
-- refused strangers, retention pruning).

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

-- A confirmed action looks up its nonce; a refused stranger's recent rows are counted (at most a
-- few rows per window each); rows older than [workers].audit_retention_days are pruned.
CREATE INDEX admin_audit_nonce_idx ON admin_audit ((details ->> 'nonce')) WHERE details ? 'nonce';
CREATE INDEX admin_audit_denied_idx ON admin_audit (admin_id, created_at) WHERE result = 'denied';
CREATE INDEX admin_audit_created_at_idx ON admin_audit (created_at);
