-- 0005: changes wake their owner by themselves. Every statement that changes who may connect, queues
-- messages or creates/steers a broadcast notifies its owner's channel (vpnd/db/notify.py). PostgreSQL
-- delivers a notification only when the transaction commits (never for a rollback) and folds identical
-- ones of one transaction into one, so a bulk change wakes its owner once, and a change made by any
-- process (`vpnd admin revoke`, psql) wakes the daemon's listener (vpnd/nurseries/listener.py).
CREATE FUNCTION vpnd_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

-- The Xray writer's desired set reads subscriptions only (vpnd/db/xray_state.py): user, status, UUID, expiry.
CREATE TRIGGER subscriptions_notify_xray
    AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF user_id, status, uuid, expires_at ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_xray');
CREATE TRIGGER outbox_notify_sender
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_outbox');
-- A broadcast created, paused, resumed or cancelled (progress columns change without waking anyone).
CREATE TRIGGER broadcasts_notify
    AFTER INSERT OR UPDATE OF status ON broadcasts
    FOR EACH STATEMENT EXECUTE FUNCTION vpnd_notify('vpnd_broadcasts');
