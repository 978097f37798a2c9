//! The vault's tables, as diesel sees them.
//!
//! Portable types only, so that one schema serves PostgreSQL and SQLite: TEXT ids,
//! TIMESTAMP holding UTC, BINARY for ciphertexts, BIGINT counters, TEXT holding JSON.

diesel::table! {
    credentials (id) {
        id -> Text,
        service -> Text,
        name -> Text,
        description -> Nullable<Text>,
        shared_with -> Text,
        current_version -> BigInt,
        grace_period_s -> BigInt,
        deleted_at -> Nullable<Timestamp>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    credential_versions (credential_id, version) {
        credential_id -> Text,
        version -> BigInt,
        ciphertext -> Nullable<Binary>,
        wrapped_key -> Nullable<Binary>,
        master_key_id -> Text,
        created_at -> Timestamp,
        destroyed_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    sealed_keys (name) {
        name -> Text,
        purpose -> Text,
        sealed -> Binary,
        master_key_id -> Text,
        created_at -> Timestamp,
        retired_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    tokens (id) {
        id -> Text,
        subject -> Text,
        scopes -> Text,
        issued_at -> Timestamp,
        expires_at -> Timestamp,
        revoked_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    audit_log (seq) {
        seq -> BigInt,
        at -> Timestamp,
        actor -> Text,
        action -> Text,
        resource -> Text,
        outcome -> Text,
        request_id -> Text,
        client_addr -> Text,
        prev_hash -> Text,
        hash -> Text,
    }
}

diesel::joinable!(credential_versions -> credentials (credential_id));
diesel::allow_tables_to_appear_in_same_query!(credentials, credential_versions);
