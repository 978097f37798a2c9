//! The vault's rows: credentials and their versions, tokens, sealed keys.
//!
//! Functions here are synchronous and take a connection: callers run them on the
//! blocking pool (`Db::run`) or inside the audit writer's transaction. Nothing here
//! decrypts; ciphertexts come and go as bytes.

use chrono::NaiveDateTime;
use common::db::{DbConnection, DbError};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use crate::crypto::CryptoError;
use crate::schema::{credential_versions, credentials, sealed_keys, tokens};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Db(DbError),
    #[error(transparent)]
    Crypto(CryptoError),
    #[error("a stored row is unreadable: {0}")]
    Corrupt(String),
}

// Diesel's transactions need it; a query error stays a database error, explicitly.
impl From<DieselError> for StoreError {
    fn from(error: DieselError) -> Self {
        match error {
            DieselError::NotFound => Self::NotFound,
            other => Self::Db(DbError::Query(other)),
        }
    }
}

impl From<DbError> for StoreError {
    fn from(error: DbError) -> Self {
        Self::Db(error)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable, Identifiable)]
#[diesel(table_name = credentials)]
pub struct CredentialRow {
    pub id: String,
    pub service: String,
    pub name: String,
    pub description: Option<String>,
    /// A JSON array of service names.
    pub shared_with: String,
    pub current_version: i64,
    pub grace_period_s: i64,
    pub deleted_at: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

impl CredentialRow {
    pub fn shared_with(&self) -> Result<Vec<String>, StoreError> {
        serde_json::from_str(&self.shared_with)
            .map_err(|_| StoreError::Corrupt(format!("credential {}: shared_with", self.id)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = credential_versions)]
pub struct VersionRow {
    pub credential_id: String,
    pub version: i64,
    pub ciphertext: Option<Vec<u8>>,
    pub wrapped_key: Option<Vec<u8>>,
    pub master_key_id: String,
    pub created_at: NaiveDateTime,
    pub destroyed_at: Option<NaiveDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = tokens)]
pub struct TokenRow {
    pub id: String,
    pub subject: String,
    /// A JSON array of scopes.
    pub scopes: String,
    pub issued_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
    pub revoked_at: Option<NaiveDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = sealed_keys)]
pub struct SealedKeyRow {
    pub name: String,
    pub purpose: String,
    pub sealed: Vec<u8>,
    pub master_key_id: String,
    pub created_at: NaiveDateTime,
    pub retired_at: Option<NaiveDateTime>,
}

fn is_unique_violation(error: &DieselError) -> bool {
    matches!(
        error,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)
    )
}

pub fn insert_credential(
    conn: &mut DbConnection,
    credential: &CredentialRow,
    first: &VersionRow,
) -> Result<(), StoreError> {
    let taken = credentials::table
        .filter(credentials::service.eq(&credential.service))
        .filter(credentials::name.eq(&credential.name))
        .count()
        .get_result::<i64>(conn)?;
    if taken > 0 {
        return Err(StoreError::Conflict(format!(
            "{} already has a credential named {:?}",
            credential.service, credential.name
        )));
    }
    diesel::insert_into(credentials::table)
        .values(credential)
        .execute(conn)
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict("the credential already exists".into())
            } else {
                e.into()
            }
        })?;
    diesel::insert_into(credential_versions::table)
        .values(first)
        .execute(conn)?;
    Ok(())
}

/// A credential, deleted or not.
pub fn credential(conn: &mut DbConnection, id: &str) -> Result<CredentialRow, StoreError> {
    Ok(credentials::table
        .find(id)
        .select(CredentialRow::as_select())
        .first(conn)?)
}

pub fn version(conn: &mut DbConnection, id: &str, version: i64) -> Result<VersionRow, StoreError> {
    Ok(credential_versions::table
        .find((id, version))
        .select(VersionRow::as_select())
        .first(conn)?)
}

pub fn versions(conn: &mut DbConnection, id: &str) -> Result<Vec<VersionRow>, StoreError> {
    Ok(credential_versions::table
        .filter(credential_versions::credential_id.eq(id))
        .order(credential_versions::version.asc())
        .select(VersionRow::as_select())
        .load(conn)?)
}

/// Adds the next version if the current one is still `expected` (check-and-set).
pub fn add_version(
    conn: &mut DbConnection,
    id: &str,
    expected: Option<i64>,
    next: &VersionRow,
    now: NaiveDateTime,
) -> Result<(), StoreError> {
    let current = credential(conn, id)?;
    if current.deleted_at.is_some() {
        return Err(StoreError::NotFound);
    }
    if let Some(expected) = expected.filter(|e| *e != current.current_version) {
        return Err(StoreError::Conflict(format!(
            "check-and-set failed: the current version is {}, not {expected}",
            current.current_version
        )));
    }
    if next.version != current.current_version + 1 {
        return Err(StoreError::Conflict("another rotation came first".into()));
    }
    diesel::insert_into(credential_versions::table)
        .values(next)
        .execute(conn)?;
    let updated = diesel::update(credentials::table.find(id))
        .filter(credentials::current_version.eq(current.current_version))
        .set((
            credentials::current_version.eq(next.version),
            credentials::updated_at.eq(now),
        ))
        .execute(conn)?;
    if updated != 1 {
        return Err(StoreError::Conflict("another rotation came first".into()));
    }
    Ok(())
}

pub fn set_deleted(
    conn: &mut DbConnection,
    id: &str,
    deleted_at: Option<NaiveDateTime>,
) -> Result<CredentialRow, StoreError> {
    let current = credential(conn, id)?;
    match (deleted_at, current.deleted_at) {
        (Some(_), Some(_)) => return Err(StoreError::NotFound),
        (None, None) => return Err(StoreError::Conflict("the credential is not deleted".into())),
        _ => {}
    }
    diesel::update(credentials::table.find(id))
        .set(credentials::deleted_at.eq(deleted_at))
        .execute(conn)?;
    Ok(current)
}

/// Removes the ciphertexts of `numbers` for good; the version rows stay as a record.
pub fn destroy_versions(
    conn: &mut DbConnection,
    id: &str,
    numbers: &[i64],
    now: NaiveDateTime,
) -> Result<CredentialRow, StoreError> {
    let current = credential(conn, id)?;
    for &number in numbers {
        let existing = version(conn, id, number).map_err(|e| match e {
            StoreError::NotFound => StoreError::Invalid(format!("version {number} does not exist")),
            other => other,
        })?;
        if existing.destroyed_at.is_some() {
            continue;
        }
        diesel::update(credential_versions::table.find((id, number)))
            .set((
                credential_versions::ciphertext.eq(None::<Vec<u8>>),
                credential_versions::wrapped_key.eq(None::<Vec<u8>>),
                credential_versions::destroyed_at.eq(Some(now)),
            ))
            .execute(conn)?;
    }
    Ok(current)
}

/// Filters for listing credentials' metadata.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub service: Option<String>,
    /// Only these owners or credentials shared with `readable_by` (a service caller).
    pub readable_by: Option<String>,
    pub name_prefix: Option<String>,
    /// Ids after this one (the cursor).
    pub after_id: Option<String>,
    pub limit: i64,
}

/// One page of live credentials in id order, after `after`.
fn live_page(
    conn: &mut DbConnection,
    filter: &ListFilter,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<CredentialRow>, StoreError> {
    let mut query = credentials::table
        .filter(credentials::deleted_at.is_null())
        .order(credentials::id.asc())
        .select(CredentialRow::as_select())
        .limit(limit)
        .into_boxed();
    if let Some(service) = &filter.service {
        query = query.filter(credentials::service.eq(service.clone()));
    }
    if let Some(prefix) = &filter.name_prefix {
        query = query.filter(
            credentials::name
                .like(common::db::like_prefix(prefix))
                .escape('\\'),
        );
    }
    if let Some(after) = after {
        query = query.filter(credentials::id.gt(after.to_owned()));
    }
    Ok(query.load(conn)?)
}

/// Live credentials in id order, `limit + 1` at most so the caller can tell if more follow.
pub fn list_credentials(
    conn: &mut DbConnection,
    filter: &ListFilter,
) -> Result<Vec<CredentialRow>, StoreError> {
    let Some(reader) = &filter.readable_by else {
        return live_page(conn, filter, filter.after_id.as_deref(), filter.limit + 1);
    };
    // Access depends on the JSON list of sharers: filter in code, page by page.
    let mut readable = Vec::new();
    let mut after = filter.after_id.clone();
    loop {
        let page = live_page(conn, filter, after.as_deref(), 500)?;
        let Some(last) = page.last().map(|row| row.id.clone()) else {
            return Ok(readable);
        };
        for row in page {
            if &row.service == reader || row.shared_with()?.iter().any(|s| s == reader) {
                readable.push(row);
                if readable.len() as i64 > filter.limit {
                    return Ok(readable);
                }
            }
        }
        after = Some(last);
    }
}

pub fn insert_token(conn: &mut DbConnection, token: &TokenRow) -> Result<(), StoreError> {
    diesel::insert_into(tokens::table)
        .values(token)
        .execute(conn)?;
    Ok(())
}

pub fn token(conn: &mut DbConnection, id: &str) -> Result<TokenRow, StoreError> {
    Ok(tokens::table
        .find(id)
        .select(TokenRow::as_select())
        .first(conn)?)
}

/// Marks a token revoked; revoking twice is not an error (the caller asked for a state).
pub fn revoke_token(
    conn: &mut DbConnection,
    id: &str,
    now: NaiveDateTime,
) -> Result<TokenRow, StoreError> {
    let existing = token(conn, id)?;
    if existing.revoked_at.is_none() {
        diesel::update(tokens::table.find(id))
            .set(tokens::revoked_at.eq(Some(now)))
            .execute(conn)?;
    }
    Ok(existing)
}

/// The tokens of `subject` that are neither revoked nor expired, oldest first.
pub fn live_tokens_of(
    conn: &mut DbConnection,
    subject: &str,
    now: NaiveDateTime,
) -> Result<Vec<TokenRow>, StoreError> {
    Ok(tokens::table
        .filter(tokens::subject.eq(subject))
        .filter(tokens::revoked_at.is_null())
        .filter(tokens::expires_at.gt(now))
        .order(tokens::issued_at.asc())
        .select(TokenRow::as_select())
        .load(conn)?)
}

/// Ids of revoked tokens that have not expired yet (expired ones are refused anyway),
/// with a minute's margin over the clock skew that verifiers tolerate.
pub fn revoked_tokens(
    conn: &mut DbConnection,
    now: NaiveDateTime,
) -> Result<Vec<String>, StoreError> {
    Ok(tokens::table
        .filter(tokens::revoked_at.is_not_null())
        .filter(tokens::expires_at.gt(now - chrono::Duration::minutes(1)))
        .order(tokens::id.asc())
        .select(tokens::id)
        .load(conn)?)
}

pub fn insert_sealed_key(conn: &mut DbConnection, key: &SealedKeyRow) -> Result<(), StoreError> {
    diesel::insert_into(sealed_keys::table)
        .values(key)
        .execute(conn)
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("key {} exists", key.name))
            } else {
                e.into()
            }
        })?;
    Ok(())
}

pub fn sealed_keys(conn: &mut DbConnection) -> Result<Vec<SealedKeyRow>, StoreError> {
    Ok(sealed_keys::table
        .order(sealed_keys::created_at.asc())
        .select(SealedKeyRow::as_select())
        .load(conn)?)
}

/// Retires every signing key still in use but `keep`, as of `at`; returns their names.
pub fn retire_signing_keys_but(
    conn: &mut DbConnection,
    keep: &str,
    at: NaiveDateTime,
) -> Result<Vec<String>, StoreError> {
    let in_use = sealed_keys::table
        .filter(sealed_keys::purpose.eq(crate::vault::SIGNING_PURPOSE))
        .filter(sealed_keys::name.ne(keep))
        .filter(sealed_keys::retired_at.is_null());
    let names: Vec<String> = in_use.select(sealed_keys::name).load(conn)?;
    diesel::update(in_use)
        .set(sealed_keys::retired_at.eq(Some(at)))
        .execute(conn)?;
    Ok(names)
}

pub fn reseal_key(
    conn: &mut DbConnection,
    name: &str,
    sealed: &[u8],
    master_key_id: &str,
) -> Result<(), StoreError> {
    diesel::update(sealed_keys::table.find(name))
        .set((
            sealed_keys::sealed.eq(sealed),
            sealed_keys::master_key_id.eq(master_key_id),
        ))
        .execute(conn)?;
    Ok(())
}

/// How many credential versions each master key has sealed a data key for, as the
/// database holds them: every replica's and every restart's encryptions, destroyed
/// versions included (their rows stay).
pub fn versions_per_master_key(conn: &mut DbConnection) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(credential_versions::table
        .group_by(credential_versions::master_key_id)
        .select((
            credential_versions::master_key_id,
            diesel::dsl::count_star(),
        ))
        .load(conn)?)
}

/// Version rows still sealed under a key other than `master_key_id`, `limit` at a time.
pub fn versions_not_under(
    conn: &mut DbConnection,
    master_key_id: &str,
    limit: i64,
) -> Result<Vec<(VersionRow, String)>, StoreError> {
    Ok(credential_versions::table
        .inner_join(credentials::table)
        .filter(credential_versions::master_key_id.ne(master_key_id))
        .filter(credential_versions::wrapped_key.is_not_null())
        .order((
            credential_versions::credential_id.asc(),
            credential_versions::version.asc(),
        ))
        .limit(limit)
        .select((VersionRow::as_select(), credentials::service))
        .load(conn)?)
}

pub fn rewrap_version(
    conn: &mut DbConnection,
    id: &str,
    number: i64,
    wrapped_key: &[u8],
    master_key_id: &str,
) -> Result<(), StoreError> {
    diesel::update(credential_versions::table.find((id, number)))
        .set((
            credential_versions::wrapped_key.eq(Some(wrapped_key)),
            credential_versions::master_key_id.eq(master_key_id),
        ))
        .execute(conn)?;
    Ok(())
}

/// Whether `init` has run on this database.
pub fn is_initialized(conn: &mut DbConnection) -> Result<bool, StoreError> {
    let count: i64 = sealed_keys::table.count().get_result(conn)?;
    Ok(count > 0)
}
