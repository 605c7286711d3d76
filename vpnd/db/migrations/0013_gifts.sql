-- 0013: gifts. A plan bought as a gift (purchase kind 'gift') becomes, when paid, a gift with an
-- unguessable code the buyer hands on; whoever redeems it first gets the plan's days. An admin may
-- refund an unredeemed gift to the buyer's balance. Written to be safe to run twice.
ALTER TABLE purchases DROP CONSTRAINT IF EXISTS purchases_kind_check,
    ADD CONSTRAINT purchases_kind_check CHECK (kind IN ('plan', 'topup', 'pack', 'gift'));

CREATE TABLE IF NOT EXISTS gifts (
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
CREATE INDEX IF NOT EXISTS gifts_buyer_idx ON gifts (buyer_id, id);
