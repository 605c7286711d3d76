-- 0007: hosted checkouts (YooKassa first). A purchase paid on a provider's page has one checkout
-- payment: the provider's id (unique per provider: a notification or a watcher round finds the
-- purchase by it), the page to send the payer to, and the provider's status as last seen (the
-- watcher polls the pending ones). Written to be safe to run twice. 'card' is 0006's (Telegram Payments,
-- branch h/fiat): the lists here keep it.
ALTER TABLE purchases DROP CONSTRAINT purchases_method_check,
    ADD CONSTRAINT purchases_method_check CHECK (method IN ('cryptopay', 'stars', 'balance', 'card', 'yookassa'));
ALTER TABLE payments DROP CONSTRAINT payments_provider_check,
    ADD CONSTRAINT payments_provider_check CHECK (provider IN ('cryptopay', 'stars', 'balance', 'card', 'yookassa'));
CREATE TABLE IF NOT EXISTS checkout_payments (
    purchase_id       bigint PRIMARY KEY REFERENCES purchases (id),
    provider          text NOT NULL,
    payment_id        text NOT NULL,
    confirmation_url  text,
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'canceled')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, payment_id)
);
CREATE INDEX IF NOT EXISTS checkout_payments_pending_idx ON checkout_payments (purchase_id) WHERE status = 'pending';
