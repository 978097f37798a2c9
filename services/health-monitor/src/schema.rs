//! The monitor's tables, as diesel sees them.
//!
//! Portable types only, so that one schema serves PostgreSQL and SQLite: TEXT ids,
//! TIMESTAMP holding UTC, TEXT holding JSON.

diesel::table! {
    alerts (fingerprint) {
        fingerprint -> Text,
        rule -> Text,
        service -> Text,
        instance_id -> Nullable<Text>,
        severity -> Text,
        state -> Text,
        started_at -> Timestamp,
        resolved_at -> Nullable<Timestamp>,
        last_notified_at -> Nullable<Timestamp>,
        details -> Text,
        notified -> Text,
        caused_by -> Nullable<Text>,
        escalated_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    recovery_attempts (id) {
        id -> Text,
        service -> Text,
        instance_id -> Text,
        attempt -> Integer,
        action -> Text,
        at -> Timestamp,
        outcome -> Text,
        detail -> Text,
    }
}
