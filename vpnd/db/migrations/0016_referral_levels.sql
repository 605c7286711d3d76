-- 0016: referral earnings as their own bucket of the balance, and withdrawal requests (idempotent).
-- Referral earnings (vpnd/db/referrals.py): the part of a user's balance that came from referral rewards
-- and may be withdrawn. A top-up never becomes withdrawable. `vpnd.db.ledger.record` keeps
-- 0 <= withdrawable_minor <= users.balance_minor: a debit spends the rest of the balance first and
-- earnings last; a reversed reward and a withdrawal take from earnings first.
CREATE TABLE IF NOT EXISTS referral_earnings (
    user_id             bigint PRIMARY KEY REFERENCES users (id),
    withdrawable_minor  bigint NOT NULL DEFAULT 0 CHECK (withdrawable_minor >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Withdrawal requests of referral earnings. The amount leaves the balance when requested (ledger reason
-- `withdrawal`, so it cannot be spent while pending); an approval records the payout, a rejection gives
-- it back (`withdrawal_released`). One pending request per user.
CREATE TABLE IF NOT EXISTS withdrawals (
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
CREATE UNIQUE INDEX IF NOT EXISTS withdrawals_one_pending_idx ON withdrawals (user_id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS withdrawals_status_idx ON withdrawals (status, id);

-- Rewards earned before this version are withdrawable as far as the balance still holds them (earnings
-- are spent last); a rerun changes nothing.
INSERT INTO referral_earnings (user_id, withdrawable_minor)
SELECT u.id, LEAST(u.balance_minor, e.earned)
FROM (SELECT user_id, sum(delta_minor) AS earned FROM balance_ledger
      WHERE reason IN ('referral_reward', 'referral_reversal') GROUP BY user_id) AS e
JOIN users u ON u.id = e.user_id
WHERE LEAST(u.balance_minor, e.earned) > 0
ON CONFLICT (user_id) DO NOTHING;
