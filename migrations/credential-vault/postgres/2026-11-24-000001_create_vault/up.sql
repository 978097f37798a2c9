-- The vault's tables. Portable types only (see the service's schema.rs):
-- TEXT ids, TIMESTAMP in UTC, BYTEA for ciphertexts, BIGINT counters, TEXT holding JSON.

CREATE TABLE credentials (
    id TEXT PRIMARY KEY NOT NULL,
    service TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT,
    shared_with TEXT NOT NULL DEFAULT '[]',
    current_version BIGINT NOT NULL,
    grace_period_s BIGINT NOT NULL,
    deleted_at TIMESTAMP,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    UNIQUE (service, name)
);

CREATE TABLE credential_versions (
    credential_id TEXT NOT NULL REFERENCES credentials (id),
    version BIGINT NOT NULL,
    -- NULL once destroyed: the ciphertext is gone for good, the metadata stays.
    ciphertext BYTEA,
    wrapped_key BYTEA,
    master_key_id TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    destroyed_at TIMESTAMP,
    PRIMARY KEY (credential_id, version)
);

-- The vault's own keys (token signing, audit HMAC), sealed under the master key.
CREATE TABLE sealed_keys (
    name TEXT PRIMARY KEY NOT NULL,
    purpose TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    master_key_id TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    retired_at TIMESTAMP
);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY NOT NULL,
    subject TEXT NOT NULL,
    scopes TEXT NOT NULL,
    issued_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    revoked_at TIMESTAMP
);

CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY NOT NULL,
    at TIMESTAMP NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    outcome TEXT NOT NULL,
    request_id TEXT NOT NULL,
    client_addr TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

CREATE INDEX audit_log_actor ON audit_log (actor, seq);
CREATE INDEX audit_log_resource ON audit_log (resource, seq);
