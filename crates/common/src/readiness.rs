//! `/ready`: are this service's dependencies reachable right now?
//!
//! A required dependency that is down makes `/ready` 503, and takes the instance out of
//! rotation (Kubernetes, the gateway). An optional one (Redis: events, shared rate limits)
//! is reported but keeps the instance ready, since the service works without it; else
//! one Redis outage would take every replica of every service out at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::db::Db;
use crate::problem::Problem;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// How long one dependency may take to answer before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The named dependency checks behind `/ready`.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<Check>,
}

#[derive(Clone)]
struct Check {
    name: &'static str,
    required: bool,
    run: CheckFn,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.checks.iter().map(|check| check.name).collect();
        f.debug_struct("Readiness").field("checks", &names).finish()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a required check; `check` resolves to an error message (for the log) when
    /// `name` is down.
    pub fn with_check<F, Fut>(self, name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.push(name, true, check)
    }

    /// Adds an optional check: reported in the body, never a reason for 503.
    pub fn with_optional_check<F, Fut>(self, name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.push(name, false, check)
    }

    fn push<F, Fut>(mut self, name: &'static str, required: bool, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push(Check {
            name,
            required,
            run: Arc::new(move || Box::pin(check()) as CheckFuture),
        });
        self
    }

    /// Adds the `database` check.
    pub fn with_db(self, db: Db) -> Self {
        self.with_check("database", move || {
            let db = db.clone();
            async move { db.ping().await.map_err(|e| e.to_string()) }
        })
    }

    /// Runs every check at once; `Ok` with the body for 200 (`status` is `degraded` when
    /// an optional dependency is down), or the 503 problem naming the required ones that
    /// are down. Causes go to the log, not to the client.
    pub async fn evaluate(&self) -> Result<serde_json::Value, Problem> {
        let results = futures_util::future::join_all(self.checks.iter().map(|check| async move {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, (check.run)()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            (check, outcome)
        }))
        .await;
        let mut statuses = serde_json::Map::new();
        let mut down = Vec::new();
        let mut degraded = false;
        for (check, outcome) in results {
            match outcome {
                Ok(()) => {
                    statuses.insert(check.name.to_owned(), json!("up"));
                }
                Err(error) => {
                    tracing::warn!(dependency = check.name, %error, "dependency is down");
                    statuses.insert(check.name.to_owned(), json!("down"));
                    if check.required {
                        down.push(check.name);
                    } else {
                        degraded = true;
                    }
                }
            }
        }
        if down.is_empty() {
            let status = if degraded { "degraded" } else { "ready" };
            Ok(json!({ "status": status, "checks": statuses }))
        } else {
            Err(Problem::new("not-ready", 503, "Service Unavailable")
                .with_detail(format!("down: {}", down.join(", ")))
                .with_extension("checks", serde_json::Value::Object(statuses)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_what_is_down() {
        let readiness = Readiness::new()
            .with_check("database", || async { Ok(()) })
            .with_check("redis", || async { Err("connection refused".to_owned()) });
        let problem = readiness.evaluate().await.unwrap_err();
        assert_eq!(problem.status, 503);
        assert_eq!(problem.detail.as_deref(), Some("down: redis"));
        assert_eq!(problem.extensions["checks"]["database"], "up");
        assert_eq!(problem.extensions["checks"]["redis"], "down");

        let all_up = Readiness::new().with_check("database", || async { Ok(()) });
        assert_eq!(all_up.evaluate().await.unwrap()["status"], "ready");

        let optional_down = Readiness::new()
            .with_check("database", || async { Ok(()) })
            .with_optional_check("redis", || async { Err("refused".to_owned()) });
        let body = optional_down.evaluate().await.unwrap();
        assert_eq!(body["status"], "degraded");
        assert_eq!(body["checks"]["redis"], "down");
    }
}
