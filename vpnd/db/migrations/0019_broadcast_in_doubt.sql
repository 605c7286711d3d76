-- 0019: a broadcast recipient's send attempt is recorded before the Bot API call (in the transaction that
-- re-checks the segment), so after an unclean stop (kill -9, a lost database connection) vpnd knows exactly
-- which recipients were in flight: pending rows with attempted_at set. Telegram has no idempotency key, so
-- whether those few got the message is unknown; `[broadcast] resend_in_doubt` decides (resend: nobody
-- skipped, those few may get it twice; skip: nobody gets it twice, those few may get nothing).
ALTER TABLE broadcast_recipients ADD COLUMN IF NOT EXISTS attempted_at timestamptz;
