-- The registry's catalog. Portable types only: TEXT ids, TIMESTAMP in UTC, TEXT holding JSON.

CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY NOT NULL,
    service TEXT NOT NULL,
    version TEXT NOT NULL,
    address TEXT NOT NULL,
    port INTEGER NOT NULL,
    health_endpoint TEXT NOT NULL,
    health TEXT NOT NULL,
    load DOUBLE PRECISION,
    weight INTEGER NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    routes TEXT NOT NULL DEFAULT '[]',
    dependencies TEXT NOT NULL DEFAULT '[]',
    registered_at TIMESTAMP NOT NULL,
    last_heartbeat_at TIMESTAMP NOT NULL,
    health_since TIMESTAMP NOT NULL
);

CREATE INDEX instances_service ON instances (service);
