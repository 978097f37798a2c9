-- An operator may drain an instance: it keeps running but takes no new traffic.
ALTER TABLE instances ADD COLUMN draining BOOLEAN NOT NULL DEFAULT FALSE;

-- Every state change of every instance, with its reason, kept for HISTORY_RETENTION.
CREATE TABLE health_history (
    id BIGSERIAL PRIMARY KEY,
    instance_id TEXT NOT NULL,
    service TEXT NOT NULL,
    at TIMESTAMP NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);

CREATE INDEX health_history_instance ON health_history (instance_id, at);
CREATE INDEX health_history_at ON health_history (at);
