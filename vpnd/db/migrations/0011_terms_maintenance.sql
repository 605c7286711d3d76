-- 0011: terms of service / privacy policy acceptance (idempotent, like every migration since 0007).
-- Maintenance mode needs no table: it is the `daemon_state` row 'maintenance'.
CREATE TABLE IF NOT EXISTS terms_acceptances (
    user_id      bigint NOT NULL REFERENCES users (id),
    version      text NOT NULL,
    accepted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, version)
);
CREATE TABLE IF NOT EXISTS terms_pending_starts (
    user_id        bigint PRIMARY KEY REFERENCES users (id),
    argument       text NOT NULL CHECK (length(argument) <= 64),
    first_contact  boolean NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
