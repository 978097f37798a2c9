-- The audit log is append-only: the database refuses to change or remove a record.
-- Someone who owns the database can drop these triggers; the keyed hash chain is the
-- second line (a rewritten record does not verify without the vault's audit key).
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
