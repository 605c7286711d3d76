-- 0012: support tickets (idempotent, like every migration since 0007). A user's message to support and
-- an admin's answer are rows of `support_messages`; a user's message is copied to the relay chat through
-- the outbox (`relay_outbox_id`), and the id Telegram gave that copy (`relay_message_id`) is recorded when
-- it was sent, so an admin's reply to it finds the ticket and its user after a restart too.
CREATE TABLE IF NOT EXISTS support_messages (
    id                bigserial PRIMARY KEY,
    user_id           bigint NOT NULL REFERENCES users (id),
    direction         text NOT NULL CHECK (direction IN ('user', 'admin')),
    body              text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- An admin's answer: who wrote it and the user's message it answers.
    author_id         bigint,
    answers_id        bigint REFERENCES support_messages (id),
    -- A user's message: its copy in the relay chat.
    relay_chat_id     bigint,
    relay_outbox_id   bigint,
    relay_message_id  bigint
);
CREATE INDEX IF NOT EXISTS support_messages_user_idx ON support_messages (user_id, created_at) WHERE direction = 'user';
CREATE UNIQUE INDEX IF NOT EXISTS support_messages_relayed_idx ON support_messages (relay_chat_id, relay_message_id)
    WHERE relay_message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS support_messages_unsent_idx ON support_messages (relay_outbox_id)
    WHERE relay_message_id IS NULL AND relay_outbox_id IS NOT NULL;
