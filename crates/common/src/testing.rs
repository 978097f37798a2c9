//! Test support for the services' integration tests (feature `test-support`): a fresh
//! database per test on either backend, and the suite's Redis.
//!
//! `cargo xtask test` starts the servers and hands them over in `CONCIERGE_TEST_*`
//! variables; a test run without them fails and says so, rather than skip silently.

use diesel::{Connection, PgConnection, RunQueryDsl};

use crate::db::{Backend, DatabaseUrl};
use crate::secret::Secret;

fn required_env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with `cargo xtask test`, which starts PostgreSQL and Redis")
    })
}

/// The suite's Redis server.
pub fn redis_url() -> String {
    required_env(testkit::env::REDIS_URL)
}

/// A database of its own for one test; a SQLite file lives as long as this value.
#[derive(Debug)]
pub struct TestDb {
    pub url: DatabaseUrl,
    _dir: Option<testkit::TempDir>,
}

impl TestDb {
    pub fn new(backend: Backend) -> Self {
        match backend {
            Backend::Postgres => Self::postgres(),
            Backend::Sqlite => Self::sqlite(),
        }
    }

    /// A new, empty database on the suite's PostgreSQL server.
    pub fn postgres() -> Self {
        let admin = required_env(testkit::env::POSTGRES_URL);
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::establish(&admin)
            .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL server: {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        let (base, _) = admin
            .rsplit_once('/')
            .unwrap_or_else(|| panic!("{} has no database path", testkit::env::POSTGRES_URL));
        Self {
            url: parse(format!("{base}/{name}")),
            _dir: None,
        }
    }

    /// A new SQLite file in a temp dir.
    pub fn sqlite() -> Self {
        let dir = testkit::TempDir::new("concierge-sqlite")
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let path = dir.path().join("test.db");
        Self {
            url: parse(format!("sqlite://{}", path.display())),
            _dir: Some(dir),
        }
    }
}

fn parse(url: String) -> DatabaseUrl {
    DatabaseUrl::parse(Secret::new(url)).unwrap_or_else(|e| panic!("bad test database URL: {e}"))
}

/// Runs an async test body on both backends: `both_backends!(name, |backend| async { … })`
/// makes `name::postgres` and `name::sqlite`, so that a failure names its backend.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $test:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                ($test)($crate::db::Backend::Postgres).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                ($test)($crate::db::Backend::Sqlite).await
            }
        }
    };
}
