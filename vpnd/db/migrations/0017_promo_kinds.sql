-- 0017: promo code kinds and conditions (idempotent). Existing codes are percent discounts.
-- percent: a discount on the next plan (percent); amount: a fixed amount off the next plan
-- (amount_minor in currency, never below [payments] min_price); days: grant_days added at once;
-- balance: amount_minor credited to the balance at once (ledger). Conditions: plan_code (discounts
-- only), user_id (a personal code), first_purchase (only users who never paid).
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'percent';
ALTER TABLE promo_codes ALTER COLUMN percent DROP NOT NULL;
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS amount_minor bigint;
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS currency text;
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS grant_days integer;
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS plan_code text;
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS user_id bigint;
ALTER TABLE promo_codes ADD COLUMN IF NOT EXISTS first_purchase boolean NOT NULL DEFAULT false;
ALTER TABLE promo_codes DROP CONSTRAINT IF EXISTS promo_codes_kind_value;
ALTER TABLE promo_codes ADD CONSTRAINT promo_codes_kind_value CHECK (
    (kind = 'percent' AND percent IS NOT NULL AND amount_minor IS NULL AND grant_days IS NULL)
    OR (kind IN ('amount', 'balance') AND percent IS NULL AND amount_minor > 0 AND currency IS NOT NULL
        AND grant_days IS NULL)
    OR (kind = 'days' AND percent IS NULL AND amount_minor IS NULL AND grant_days > 0)
);
ALTER TABLE promo_codes DROP CONSTRAINT IF EXISTS promo_codes_plan_for_discounts;
ALTER TABLE promo_codes ADD CONSTRAINT promo_codes_plan_for_discounts
    CHECK (plan_code IS NULL OR kind IN ('percent', 'amount'));
-- A days or balance code is redeemed without a purchase.
ALTER TABLE promo_redemptions ALTER COLUMN purchase_id DROP NOT NULL;
