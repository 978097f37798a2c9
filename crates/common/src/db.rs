//! One connection type over PostgreSQL and SQLite, pooled, used off the async workers.
//!
//! `DATABASE_URL`'s scheme picks the backend (`postgres://` or `sqlite://`); we choose the
//! variant ourselves because `MultiConnection::establish` tries variants in order and
//! SQLite accepts any string as a file name. Diesel is synchronous: every query runs in
//! `spawn_blocking` on a pooled connection, never on an async worker thread.

use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::r2d2::{self, ManageConnection};
use diesel::{Connection, PgConnection, RunQueryDsl, SqliteConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness};
use tracing::Instrument;

use crate::secret::Secret;

/// A connection to either backend. Backend-specific SQL is an explicit `match` on it.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

impl fmt::Debug for DbConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Postgresql(_) => f.write_str("DbConnection::Postgresql"),
            Self::Sqlite(_) => f.write_str("DbConnection::Sqlite"),
        }
    }
}

/// Which database server a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// A validated `DATABASE_URL`. It may hold a password, so it never prints whole.
#[derive(Clone)]
pub struct DatabaseUrl {
    backend: Backend,
    url: Secret<String>,
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("backend", &self.backend)
            .field("url", &self.redacted())
            .finish()
    }
}

impl DatabaseUrl {
    pub fn parse(url: Secret<String>) -> Result<Self, String> {
        let text = url.expose();
        let backend = if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Backend::Postgres
        } else if let Some(path) = text.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("sqlite:// needs a file path, like sqlite://./data/vault.db".into());
            }
            Backend::Sqlite
        } else {
            return Err("expected a postgres:// or sqlite:// URL".into());
        };
        Ok(Self { backend, url })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn expose(&self) -> &str {
        self.url.expose()
    }

    /// The URL with any password replaced, fit for a log line.
    pub fn redacted(&self) -> String {
        let text = self.url.expose();
        let Some((scheme, rest)) = text.split_once("://") else {
            return "[unparsable]".into();
        };
        match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => text.to_owned(),
        }
    }

    fn sqlite_path(&self) -> &str {
        self.url.expose().trim_start_matches("sqlite://")
    }
}

/// What can go wrong on the way to a query's result.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No connection could be had in time: the database is down or the pool exhausted.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("migrations failed: {0}")]
    Migration(String),
    #[error("the database task was cancelled or panicked")]
    TaskFailed,
}

/// Opens connections of the backend the URL names; SQLite gets its pragmas here,
/// because they hold per connection.
struct Manager {
    url: DatabaseUrl,
}

impl ManageConnection for Manager {
    type Connection = DbConnection;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<DbConnection, r2d2::Error> {
        match self.url.backend {
            Backend::Postgres => PgConnection::establish(self.url.expose())
                .map(DbConnection::Postgresql)
                .map_err(r2d2::Error::ConnectionError),
            Backend::Sqlite => {
                let path = self.url.sqlite_path();
                create_private_file(path).map_err(|e| {
                    r2d2::Error::ConnectionError(diesel::ConnectionError::BadConnection(format!(
                        "cannot create the SQLite file: {e}"
                    )))
                })?;
                let mut conn =
                    SqliteConnection::establish(path).map_err(r2d2::Error::ConnectionError)?;
                conn.batch_execute(
                    "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; \
                     PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
                )
                .map_err(r2d2::Error::QueryError)?;
                Ok(DbConnection::Sqlite(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), r2d2::Error> {
        diesel::sql_query("SELECT 1")
            .execute(conn)
            .map(|_| ())
            .map_err(r2d2::Error::QueryError)
    }

    /// A connection given back while its holder panics, or with a transaction left
    /// open or broken, is not handed out again.
    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        std::thread::panicking() || diesel::r2d2::R2D2Connection::is_broken(conn)
    }
}

/// A database file holds ciphertexts and tokens' metadata: create it owner-only (0600).
fn create_private_file(path: &str) -> std::io::Result<()> {
    if path == ":memory:" || path.starts_with("file:") || Path::new(path).exists() {
        return Ok(());
    }
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// A `LIKE` pattern matching values that start with `prefix` taken literally; use it
/// with `.escape('\\')`.
pub fn like_prefix(prefix: &str) -> String {
    let escaped = prefix
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("{escaped}%")
}

/// Embedded migrations, one set per backend.
pub struct Migrations {
    pub postgres: EmbeddedMigrations,
    pub sqlite: EmbeddedMigrations,
}

impl fmt::Debug for Migrations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Migrations")
    }
}

/// Lends a `'static` set to diesel, which takes its migration source by value.
struct Borrowed(&'static EmbeddedMigrations);

impl<DB: diesel::backend::Backend> MigrationSource<DB> for Borrowed {
    fn migrations(
        &self,
    ) -> diesel::migration::Result<Vec<Box<dyn diesel::migration::Migration<DB>>>> {
        MigrationSource::<DB>::migrations(self.0)
    }
}

impl Migrations {
    /// The migration names of one backend, in order: the backends must agree on them.
    pub fn names(&self, backend: Backend) -> Vec<String> {
        fn names_of<DB: diesel::backend::Backend>(set: &EmbeddedMigrations) -> Vec<String> {
            MigrationSource::<DB>::migrations(set)
                .map(|all| all.iter().map(|m| m.name().to_string()).collect())
                .unwrap_or_default()
        }
        match backend {
            Backend::Postgres => names_of::<diesel::pg::Pg>(&self.postgres),
            Backend::Sqlite => names_of::<diesel::sqlite::Sqlite>(&self.sqlite),
        }
    }
}

/// A pooled connection kept by its holder; back to the pool when dropped.
pub struct HeldConnection(r2d2::PooledConnection<Manager>);

impl fmt::Debug for HeldConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeldConnection")
    }
}

impl std::ops::Deref for HeldConnection {
    type Target = DbConnection;

    fn deref(&self) -> &DbConnection {
        &self.0
    }
}

impl std::ops::DerefMut for HeldConnection {
    fn deref_mut(&mut self) -> &mut DbConnection {
        &mut self.0
    }
}

/// A pool of connections to one database.
#[derive(Clone)]
pub struct Db {
    pool: r2d2::Pool<Manager>,
    backend: Backend,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend)
            .field("state", &self.pool.state())
            .finish()
    }
}

/// How long a request waits for a pooled connection before answering 503.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a readiness probe waits: shorter than any probe's own timeout.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

impl Db {
    /// Builds the pool without waiting for the database: a service starts, and says on
    /// `/ready` whether its database is there.
    pub fn new(url: &DatabaseUrl, max_connections: u32) -> Self {
        let max_size = match url.backend {
            // SQLite has one writer; a few readers share WAL well.
            Backend::Sqlite => max_connections.clamp(1, 4),
            Backend::Postgres => max_connections.max(1),
        };
        let pool = r2d2::Pool::builder()
            .max_size(max_size)
            .min_idle(Some(1))
            .connection_timeout(CHECKOUT_TIMEOUT)
            // A server restart leaves broken connections in the pool; a checkout test
            // replaces them instead of failing the request that drew one.
            .test_on_check_out(true)
            .build_unchecked(Manager { url: url.clone() });
        Self {
            pool,
            backend: url.backend,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs `f` on a pooled connection on the blocking pool, in the caller's span.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        self.run_with_timeout(CHECKOUT_TIMEOUT, f).await
    }

    /// Runs `f` as [`Db::run`] does, in one transaction: its writes all happen, or none
    /// does (an error from `f` rolls them back).
    pub async fn transaction<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        self.run(move |conn| conn.transaction(f)).await
    }

    async fn run_with_timeout<T, F>(&self, timeout: Duration, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, DbError> + Send + 'static,
    {
        let db = self.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&mut *db.checkout(timeout)?)))
            .in_current_span()
            .await
            .map_err(|_| DbError::TaskFailed)?
    }

    /// A connection to keep, blocking this thread until one is free: for a thread of
    /// its own that writes all the time (the audit writer), never for an async worker.
    /// Every checkout costs a `SELECT 1` (the pool tests it); a held one costs nothing.
    pub fn hold(&self) -> Result<HeldConnection, DbError> {
        self.checkout(CHECKOUT_TIMEOUT)
    }

    fn checkout(&self, timeout: Duration) -> Result<HeldConnection, DbError> {
        self.pool
            .get_timeout(timeout)
            .map(HeldConnection)
            .map_err(|e| DbError::Unavailable(e.to_string()))
    }

    /// `SELECT 1` within [`PING_TIMEOUT`]: the readiness check.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.run_with_timeout(PING_TIMEOUT, |conn| {
            diesel::sql_query("SELECT 1").execute(conn)?;
            Ok(())
        })
        .await
    }

    /// Applies the pending migrations of this backend; returns the versions applied.
    pub async fn migrate(&self, migrations: &'static Migrations) -> Result<Vec<String>, DbError> {
        self.run(move |conn| {
            let applied = match conn {
                DbConnection::Postgresql(pg) => {
                    pg.run_pending_migrations(Borrowed(&migrations.postgres))
                }
                DbConnection::Sqlite(sqlite) => {
                    sqlite.run_pending_migrations(Borrowed(&migrations.sqlite))
                }
            };
            applied
                .map(|versions| versions.iter().map(ToString::to_string).collect())
                .map_err(|e| DbError::Migration(e.to_string()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Result<DatabaseUrl, String> {
        DatabaseUrl::parse(Secret::new(text.to_owned()))
    }

    #[test]
    fn the_scheme_picks_the_backend() {
        assert_eq!(
            url("postgres://u@h/db").unwrap().backend(),
            Backend::Postgres
        );
        assert_eq!(
            url("postgresql://u@h/db").unwrap().backend(),
            Backend::Postgres
        );
        assert_eq!(url("sqlite://./x.db").unwrap().backend(), Backend::Sqlite);
        assert!(url("sqlite://").is_err());
        assert!(url("mysql://u@h/db").is_err());
        assert!(url("./x.db").is_err());
    }

    #[test]
    fn passwords_never_print() {
        let parsed = url("postgres://app:pa55word@db:5432/vault").unwrap();
        assert_eq!(parsed.redacted(), "postgres://app:***@db:5432/vault");
        assert!(!format!("{parsed:?}").contains("pa55word"));
    }

    #[test]
    fn sqlite_files_are_created_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/vault.db");
        create_private_file(path.to_str().unwrap()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
