//! Auto-recovery triggers: when an instance has been offline for its service's configured
//! time, call the service's recovery webhook (an orchestrator's restart endpoint, say),
//! with a cool-down between attempts and a limit on attempts per outage. Never when the
//! outage is blamed on a dependency. Declared in the registration's metadata:
//! `"recovery": {"webhook": "http://…", "after": "60s", "cooldown": "5m", "max_attempts": 3}`,
//! or, with `DOCKER_HOST` set, `"recovery": {"container": "NAME", …}` to restart the
//! instance's container through the engine's API, within a global restart budget.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::api::Instance;
use common::config::HumanDuration;

/// One instance's recovery settings.
/// What a recovery attempt does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `POST` the instance's details to this URL.
    Webhook(String),
    /// Restart this container through the engine API.
    Restart(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub action: Action,
    pub after: Duration,
    pub cooldown: Duration,
    pub max_attempts: u32,
}

impl Policy {
    /// The instance's policy, if its metadata declares a usable one.
    pub fn of(instance: &Instance) -> Option<Self> {
        let recovery = instance.metadata.get("recovery")?;
        let text = |key: &str| recovery.get(key).and_then(|v| v.as_str());
        let action = match (text("webhook"), text("container")) {
            (Some(url), None) if url.starts_with("http://") => Action::Webhook(url.to_owned()),
            (None, Some(container)) if !container.is_empty() => {
                Action::Restart(container.to_owned())
            }
            _ => return None,
        };
        let duration = |key: &str, default: Duration| {
            recovery
                .get(key)
                .and_then(|v| v.as_str())
                .and_then(|v| HumanDuration::from_str(v).ok())
                .map_or(default, |d| d.0)
        };
        Some(Self {
            action,
            after: duration("after", Duration::from_secs(60)),
            cooldown: duration("cooldown", Duration::from_secs(300)),
            max_attempts: recovery
                .get("max_attempts")
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(3),
        })
    }
}

/// The attempts made during one outage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempts {
    /// The outage they belong to (when the instance went offline).
    pub outage: Option<DateTime<Utc>>,
    pub count: u32,
    pub last: Option<DateTime<Utc>>,
}

/// Whether to call the webhook now, for an instance offline since `offline_since`.
pub fn due(
    policy: &Policy,
    attempts: &Attempts,
    offline_since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    let to_chrono = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let (count, last) = if attempts.outage == Some(offline_since) {
        (attempts.count, attempts.last)
    } else {
        (0, None)
    };
    now - offline_since >= to_chrono(policy.after)
        && count < policy.max_attempts
        && last.is_none_or(|last| now - last >= to_chrono(policy.cooldown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_wait_respect_the_cooldown_and_stop_at_the_limit() {
        let policy = Policy {
            action: Action::Webhook("http://x".into()),
            after: Duration::from_secs(10),
            cooldown: Duration::from_secs(60),
            max_attempts: 2,
        };
        let t0 = Utc::now();
        let s = |n: i64| t0 + chrono::Duration::seconds(n);
        let mut attempts = Attempts::default();
        assert!(
            !due(&policy, &attempts, t0, s(5)),
            "not offline long enough"
        );
        assert!(due(&policy, &attempts, t0, s(10)));
        attempts = Attempts {
            outage: Some(t0),
            count: 1,
            last: Some(s(10)),
        };
        assert!(!due(&policy, &attempts, t0, s(30)), "cooling down");
        assert!(due(&policy, &attempts, t0, s(70)));
        attempts = Attempts {
            outage: Some(t0),
            count: 2,
            last: Some(s(70)),
        };
        assert!(!due(&policy, &attempts, t0, s(500)), "attempts spent");
        assert!(
            due(&policy, &attempts, s(1000), s(1010)),
            "a new outage starts afresh"
        );
    }
}
