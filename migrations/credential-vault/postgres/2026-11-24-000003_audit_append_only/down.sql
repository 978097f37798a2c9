DROP TRIGGER audit_no_truncate ON audit_log;
DROP TRIGGER audit_append_only ON audit_log;
DROP FUNCTION audit_append_only();
