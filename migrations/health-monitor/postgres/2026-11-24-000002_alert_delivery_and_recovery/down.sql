DROP TABLE recovery_attempts;
ALTER TABLE alerts DROP COLUMN escalated_at;
ALTER TABLE alerts DROP COLUMN caused_by;
ALTER TABLE alerts DROP COLUMN notified;
