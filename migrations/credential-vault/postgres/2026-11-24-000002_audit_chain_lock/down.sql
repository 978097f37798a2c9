DROP TRIGGER audit_chain_lock ON audit_log;
DROP FUNCTION audit_chain_lock();
