-- 0015: rich broadcasts (idempotent). Media by Telegram file_id with the text as its caption, several
-- URL / "go to plan" buttons, per-language variants of the text, segments with an argument (a language,
-- a plan code), and scheduled sends: a 'scheduled' broadcast has no recipients until the broadcasts
-- nursery starts it at `start_at` (one UPDATE ... WHERE status = 'scheduled', so it starts once).
ALTER TABLE broadcasts ADD COLUMN IF NOT EXISTS media_kind text
    CHECK (media_kind IN ('photo', 'video', 'document', 'animation'));
ALTER TABLE broadcasts ADD COLUMN IF NOT EXISTS media_file_id text;
ALTER TABLE broadcasts ADD COLUMN IF NOT EXISTS buttons jsonb NOT NULL DEFAULT '[]';
ALTER TABLE broadcasts ADD COLUMN IF NOT EXISTS variants jsonb NOT NULL DEFAULT '{}';
ALTER TABLE broadcasts ADD COLUMN IF NOT EXISTS segment_arg text;
ALTER TABLE broadcasts ADD COLUMN IF NOT EXISTS start_at timestamptz;
ALTER TABLE broadcasts DROP CONSTRAINT IF EXISTS broadcasts_status_check;
ALTER TABLE broadcasts ADD CONSTRAINT broadcasts_status_check
    CHECK (status IN ('scheduled', 'running', 'paused', 'cancelled', 'done'));
CREATE INDEX IF NOT EXISTS broadcasts_scheduled_idx ON broadcasts (start_at) WHERE status = 'scheduled';
