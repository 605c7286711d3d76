-- 0006: card payments through Telegram Payments (a provider token from BotFather). A purchase and its
-- payment may be `card`; the payment is keyed by the provider's charge id (provider_payment_id, unique per
-- provider as before) and keeps Telegram's charge id beside it.
ALTER TABLE purchases DROP CONSTRAINT purchases_method_check,
    ADD CONSTRAINT purchases_method_check CHECK (method IN ('cryptopay', 'stars', 'balance', 'card'));
ALTER TABLE payments DROP CONSTRAINT payments_provider_check,
    ADD CONSTRAINT payments_provider_check CHECK (provider IN ('cryptopay', 'stars', 'balance', 'card'));
ALTER TABLE payments ADD COLUMN telegram_payment_charge_id text;
