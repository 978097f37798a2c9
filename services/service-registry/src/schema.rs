//! The registry's table, as diesel sees it.
//!
//! Portable types only, so that one schema serves PostgreSQL and SQLite: TEXT ids,
//! TIMESTAMP holding UTC, TEXT holding JSON, DOUBLE for the reported load.

diesel::table! {
    instances (instance_id) {
        instance_id -> Text,
        service -> Text,
        version -> Text,
        address -> Text,
        port -> Integer,
        health_endpoint -> Text,
        health -> Text,
        load -> Nullable<Double>,
        weight -> Integer,
        tags -> Text,
        metadata -> Text,
        routes -> Text,
        dependencies -> Text,
        registered_at -> Timestamp,
        last_heartbeat_at -> Timestamp,
        health_since -> Timestamp,
        draining -> Bool,
    }
}

diesel::table! {
    health_history (id) {
        id -> BigInt,
        instance_id -> Text,
        service -> Text,
        at -> Timestamp,
        from_state -> Nullable<Text>,
        to_state -> Text,
        reason -> Text,
    }
}
