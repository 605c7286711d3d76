-- 0008: auto-renewal by a saved card (YooKassa). A user who consented has one saved payment method
-- (the provider's id, and a title such as "MasterCard *4477" to show them); a renewal period may be
-- decided as a card charge in flight ('card_pending', with its purchase) or a failed one ('card_failed',
-- after which the balance renewal may still take the period). Written to be safe to run twice.
CREATE TABLE IF NOT EXISTS saved_payment_methods (
    user_id     bigint PRIMARY KEY REFERENCES users (id),
    provider    text NOT NULL,
    method_id   text NOT NULL,
    title       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE auto_renewals ADD COLUMN IF NOT EXISTS purchase_id bigint REFERENCES purchases (id);
ALTER TABLE auto_renewals DROP CONSTRAINT IF EXISTS auto_renewals_outcome_check,
    ADD CONSTRAINT auto_renewals_outcome_check
    CHECK (outcome IN ('charged', 'insufficient_balance', 'card_pending', 'card_failed'));
