-- 0014: banned users (idempotent). A ban is a fact about the person, not their subscription: the
-- subscription keeps its expiry (an unban gives back what was paid for), while the Xray writer's
-- desired set, the subscription URL and the bot leave banned users out. Banning wakes the writer.
ALTER TABLE users ADD COLUMN IF NOT EXISTS banned_at timestamptz;
ALTER TABLE users ADD COLUMN IF NOT EXISTS ban_reason text;
CREATE INDEX IF NOT EXISTS users_banned_idx ON users (id) WHERE banned_at IS NOT NULL;
DROP TRIGGER IF EXISTS users_ban_notify_xray ON users;
CREATE TRIGGER users_ban_notify_xray
    AFTER UPDATE OF banned_at ON users
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_xray');
