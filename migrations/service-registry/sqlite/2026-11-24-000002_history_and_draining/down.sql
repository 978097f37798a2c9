DROP TABLE health_history;
ALTER TABLE instances DROP COLUMN draining;
