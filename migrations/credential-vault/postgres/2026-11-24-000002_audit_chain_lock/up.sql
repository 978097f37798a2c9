-- Every statement that appends to the audit log takes the chain lock first, so that a
-- writer's single-statement append never slips between another writer's head read and
-- its commit. Writers that change data take the same lock explicitly, before they read
-- the head. The lock is per transaction: an autocommit INSERT holds it until it commits.
CREATE FUNCTION audit_chain_lock() RETURNS trigger AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7395412);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_chain_lock BEFORE INSERT ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_lock();
