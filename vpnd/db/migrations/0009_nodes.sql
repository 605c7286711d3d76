-- 0009: several Xray servers (nodes). Each node's raw traffic counters are kept per node (a node
-- restarting resets only its own), and the user's total in `traffic` is the sum of every node's deltas.
-- `xray_nodes` is what each node's writer last saw (for `vpnd admin nodes` and the admin bot).
-- Written to be safe to run twice.
CREATE TABLE IF NOT EXISTS traffic_seen (
    node           text NOT NULL,
    user_id        bigint NOT NULL REFERENCES users (id),
    uplink_seen    bigint NOT NULL DEFAULT 0,
    downlink_seen  bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node, user_id)
);
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'traffic' AND column_name = 'uplink_seen') THEN
        INSERT INTO traffic_seen (node, user_id, uplink_seen, downlink_seen, updated_at)
        SELECT 'local', user_id, uplink_seen, downlink_seen, updated_at FROM traffic
        ON CONFLICT DO NOTHING;
        ALTER TABLE traffic DROP COLUMN uplink_seen, DROP COLUMN downlink_seen;
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS xray_nodes (
    name           text PRIMARY KEY,
    reachable      boolean NOT NULL,
    detail         text NOT NULL DEFAULT '',
    users          integer NOT NULL DEFAULT 0,
    online         integer NOT NULL DEFAULT 0,
    traffic_day    date,
    traffic_today  bigint NOT NULL DEFAULT 0,
    synced_at      timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
