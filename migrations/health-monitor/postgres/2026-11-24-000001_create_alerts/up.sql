-- The monitor's alert state, kept so that a restart neither re-fires nor drops an alert.

CREATE TABLE alerts (
    fingerprint TEXT PRIMARY KEY NOT NULL,
    rule TEXT NOT NULL,
    service TEXT NOT NULL,
    instance_id TEXT,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at TIMESTAMP NOT NULL,
    resolved_at TIMESTAMP,
    last_notified_at TIMESTAMP,
    details TEXT NOT NULL DEFAULT '{}'
);
