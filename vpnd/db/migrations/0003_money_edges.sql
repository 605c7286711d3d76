-- Money edge cases: superseded purchases, repriced late payments, refunds that reverse what a purchase gave.

-- The price before any promo discount (NULL for purchases made before this column existed and discounted).
ALTER TABLE purchases ADD COLUMN list_amount_minor bigint CHECK (list_amount_minor IS NULL OR list_amount_minor >= 0);
-- The newer purchase of the same user that expired this one (its invoice is deleted at the provider).
ALTER TABLE purchases ADD COLUMN superseded_by bigint REFERENCES purchases (id);
UPDATE purchases SET list_amount_minor = amount_minor WHERE discount_percent = 0;
CREATE INDEX purchases_superseded_by_idx ON purchases (superseded_by) WHERE superseded_by IS NOT NULL;

-- What a payment gave: days of access and/or balance; `repriced` when its promo discount was refused
-- (a superseded invoice paid anyway, or the code's uses were gone) and it was valued at the list price.
ALTER TABLE payments ADD COLUMN granted_days integer;
ALTER TABLE payments ADD COLUMN credited_minor bigint NOT NULL DEFAULT 0;
ALTER TABLE payments ADD COLUMN repriced boolean NOT NULL DEFAULT false;
-- Payments made before: a granted plan gave its days, a top-up its amount (a refund reverses these).
UPDATE payments p SET granted_days = pu.days
FROM purchases pu WHERE pu.id = p.purchase_id AND pu.kind = 'plan' AND p.outcome <> 'amount_mismatch';
UPDATE payments p SET credited_minor = pu.amount_minor
FROM purchases pu WHERE pu.id = p.purchase_id AND pu.kind = 'topup' AND p.outcome <> 'amount_mismatch';

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
