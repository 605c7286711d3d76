-- 0018: key rotations (idempotent). `vpnd admin rotate-keys` / the admin bot's "Rotate all keys" after a
-- leak: every subscription's UUID and subscription token are replaced, a batch at a time, by the daemon
-- (vpnd/workers/key_rotation.py). A batch rotates its users, queues their messages and moves the cursor
-- in ONE transaction, so a restart or a kill -9 resumes after the last committed batch: nobody skipped,
-- nobody rotated twice. At most one rotation is open (running or paused) at a time.
CREATE TABLE IF NOT EXISTS key_rotations (
    id             bigserial PRIMARY KEY,
    status         text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'paused', 'done', 'cancelled')),
    batch_size     integer NOT NULL CHECK (batch_size BETWEEN 1 AND 10000),
    notify         boolean NOT NULL,
    after_user_id  bigint,
    total          integer NOT NULL,
    rotated        integer NOT NULL DEFAULT 0,
    skipped        integer NOT NULL DEFAULT 0,
    notified       integer NOT NULL DEFAULT 0,
    created_by     bigint NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS key_rotations_open_idx ON key_rotations ((status IN ('running', 'paused')))
    WHERE status IN ('running', 'paused');
