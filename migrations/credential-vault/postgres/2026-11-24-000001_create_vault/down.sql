DROP TABLE audit_log;
DROP TABLE tokens;
DROP TABLE sealed_keys;
DROP TABLE credential_versions;
DROP TABLE credentials;
