-- Which notice each webhook has received (a JSON map: webhook URL -> warning|critical|resolved),
-- the dependency an alert is blamed on, and the recovery attempts made.

ALTER TABLE alerts ADD COLUMN notified TEXT NOT NULL DEFAULT '{}';
ALTER TABLE alerts ADD COLUMN caused_by TEXT;
ALTER TABLE alerts ADD COLUMN escalated_at TIMESTAMP;

CREATE TABLE recovery_attempts (
    id TEXT PRIMARY KEY NOT NULL,
    service TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    action TEXT NOT NULL,
    at TIMESTAMP NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE INDEX recovery_attempts_instance ON recovery_attempts (instance_id, at);
