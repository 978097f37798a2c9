//! Alerts: which conditions hold (the rules, pure), the alerts they keep firing with a
//! stable fingerprint, escalation from warning to critical, resolution, and inhibition by
//! a dependency that is down. Delivery is [`crate::notify`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use common::api::{HealthState, Instance};
use serde::Serialize;

use crate::config::Rules;
use crate::store::AlertRow;
use crate::tracker::Tracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    InstanceOffline,
    NoHealthyInstance,
    DegradedRatio,
    Flapping,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InstanceOffline => "instance_offline",
            Self::NoHealthyInstance => "no_healthy_instance",
            Self::DegradedRatio => "degraded_ratio",
            Self::Flapping => "flapping",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Self::InstanceOffline,
            Self::NoHealthyInstance,
            Self::DegradedRatio,
            Self::Flapping,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub rule: Rule,
    pub service: String,
    pub instance_id: Option<String>,
    pub since: DateTime<Utc>,
    pub summary: String,
    /// The dependency whose outage explains this one.
    pub caused_by: Option<String>,
}

impl Condition {
    pub fn fingerprint(&self) -> String {
        fingerprint(self.rule, &self.service, self.instance_id.as_deref())
    }

    /// What decides which monitor keeps this condition's alert.
    pub fn owner_key(&self) -> String {
        owner_key(&self.service, self.instance_id.as_deref())
    }
}

/// Instance alerts belong with the instance's monitor; service alerts with the service's.
pub fn owner_key(service: &str, instance: Option<&str>) -> String {
    match instance {
        Some(instance) => instance.to_owned(),
        None => format!("service:{service}"),
    }
}

/// A stable id for (rule, service, instance): FNV-1a, 64 bits, hex.
pub fn fingerprint(rule: Rule, service: &str, instance: Option<&str>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [rule.as_str(), service, instance.unwrap_or("")] {
        for byte in part.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// The conditions that hold for the fleet as the monitor sees it.
pub fn evaluate(
    fleet: &[(&Instance, &Tracker)],
    rules: &Rules,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    let mut conditions = Vec::new();
    let mut services: BTreeMap<&str, Vec<(&Instance, &Tracker)>> = BTreeMap::new();
    for (instance, tracker) in fleet {
        services
            .entry(instance.service.as_str())
            .or_default()
            .push((instance, tracker));
        if tracker.state == HealthState::Offline {
            conditions.push(Condition {
                rule: Rule::InstanceOffline,
                service: instance.service.to_string(),
                instance_id: Some(instance.instance_id.clone()),
                since: tracker.since,
                summary: format!(
                    "instance {} of {} is offline: {}",
                    instance.instance_id,
                    instance.service,
                    tracker.last_error.as_ref().map_or(
                        "no answer".to_owned(),
                        |(reason, detail)| format!("{}: {detail}", reason.as_str())
                    )
                ),
                caused_by: None,
            });
        }
        let since =
            common::config::before(now, rules.flap_window).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let recent = tracker.transitions_since(since);
        if recent > rules.flap_transitions {
            conditions.push(Condition {
                rule: Rule::Flapping,
                service: instance.service.to_string(),
                instance_id: Some(instance.instance_id.clone()),
                since: tracker.transitions.front().copied().unwrap_or(now),
                summary: format!(
                    "instance {} of {} changed state {recent} times within {:?}",
                    instance.instance_id, instance.service, rules.flap_window
                ),
                caused_by: None,
            });
        }
    }
    let mut down: BTreeSet<String> = BTreeSet::new();
    for (service, members) in &services {
        let total = members.len();
        let healthy = members
            .iter()
            .filter(|(_, t)| t.state == HealthState::Healthy)
            .count();
        let since = members
            .iter()
            .filter(|(_, t)| t.state != HealthState::Healthy)
            .map(|(_, t)| t.since)
            .max()
            .unwrap_or(now);
        if healthy == 0 {
            down.insert((*service).to_owned());
            conditions.push(Condition {
                rule: Rule::NoHealthyInstance,
                service: (*service).to_owned(),
                instance_id: None,
                since,
                summary: format!("{service} has no healthy instance (0 of {total})"),
                caused_by: None,
            });
        } else if (total - healthy) as f64 > rules.degraded_ratio * total as f64 {
            conditions.push(Condition {
                rule: Rule::DegradedRatio,
                service: (*service).to_owned(),
                instance_id: None,
                since,
                summary: format!(
                    "{} of {total} instances of {service} are not healthy",
                    total - healthy
                ),
                caused_by: None,
            });
        }
    }
    // Inhibition: a service whose dependency has no healthy instance is blamed on it.
    for condition in &mut conditions {
        let Some(members) = services.get(condition.service.as_str()) else {
            continue;
        };
        condition.caused_by = members
            .iter()
            .flat_map(|(i, _)| i.dependencies.iter())
            .map(|d| d.as_str())
            .find(|d| *d != condition.service && down.contains(*d))
            .map(str::to_owned);
    }
    conditions
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

/// An alert, firing or resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub fingerprint: String,
    pub rule: Rule,
    pub service: String,
    pub instance_id: Option<String>,
    pub severity: Severity,
    pub firing: bool,
    pub started_at: DateTime<Utc>,
    pub escalated_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub summary: String,
    pub caused_by: Option<String>,
    /// What each webhook has been told: `warning`, `critical` or `resolved`.
    pub notified: BTreeMap<String, String>,
}

impl Alert {
    /// The notice a webhook should have received by now.
    pub fn due(&self) -> &'static str {
        match (self.firing, self.severity) {
            (false, _) => "resolved",
            (true, Severity::Warning) => "warning",
            (true, Severity::Critical) => "critical",
        }
    }

    pub fn owner_key(&self) -> String {
        owner_key(&self.service, self.instance_id.as_deref())
    }

    /// Whether the alert has fired long enough to be sent: like Alertmanager's group wait,
    /// it gives a dependency's alert time to claim this one before anyone is paged.
    pub fn settled(&self, now: DateTime<Utc>, wait: Duration) -> bool {
        !self.firing
            || !self.notified.is_empty()
            || now - self.started_at
                >= chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX)
    }

    /// Whether `webhook` still has to be told something. An alert blamed on a dependency
    /// is not paged on its own; only a notice already begun is brought to its end.
    pub fn needs(&self, webhook: &str) -> bool {
        let told = self.notified.get(webhook).map(String::as_str);
        if told == Some(self.due()) {
            return false;
        }
        self.caused_by.is_none() || (told.is_some() && !self.firing)
    }

    pub fn to_row(&self) -> AlertRow {
        AlertRow {
            fingerprint: self.fingerprint.clone(),
            rule: self.rule.as_str().to_owned(),
            service: self.service.clone(),
            instance_id: self.instance_id.clone(),
            severity: match self.severity {
                Severity::Warning => "warning",
                Severity::Critical => "critical",
            }
            .to_owned(),
            state: if self.firing { "firing" } else { "resolved" }.to_owned(),
            started_at: self.started_at.naive_utc(),
            resolved_at: self.resolved_at.map(|t| t.naive_utc()),
            last_notified_at: None,
            details: serde_json::json!({ "summary": self.summary }).to_string(),
            notified: serde_json::to_string(&self.notified).unwrap_or_else(|_| "{}".into()),
            caused_by: self.caused_by.clone(),
            escalated_at: self.escalated_at.map(|t| t.naive_utc()),
        }
    }

    pub fn from_row(row: AlertRow) -> Option<Self> {
        let utc = |t: NaiveDateTime| DateTime::<Utc>::from_naive_utc_and_offset(t, Utc);
        let details: serde_json::Value = serde_json::from_str(&row.details).unwrap_or_default();
        Some(Self {
            rule: Rule::parse(&row.rule)?,
            severity: if row.severity == "critical" {
                Severity::Critical
            } else {
                Severity::Warning
            },
            firing: row.state == "firing",
            started_at: utc(row.started_at),
            escalated_at: row.escalated_at.map(utc),
            resolved_at: row.resolved_at.map(utc),
            summary: details["summary"].as_str().unwrap_or_default().to_owned(),
            notified: serde_json::from_str(&row.notified).unwrap_or_default(),
            fingerprint: row.fingerprint,
            service: row.service,
            instance_id: row.instance_id,
            caused_by: row.caused_by,
        })
    }
}

/// Applies the conditions that hold now to the alerts: new ones fire (deduplicated by
/// fingerprint), old ones escalate or resolve. Only alerts `owned` by this monitor
/// resolve here (the conditions are this monitor's already). Returns the alerts that changed.
pub fn reconcile(
    alerts: &mut BTreeMap<String, Alert>,
    conditions: Vec<Condition>,
    escalate_after: Duration,
    now: DateTime<Utc>,
    owned: &dyn Fn(&Alert) -> bool,
) -> Vec<Alert> {
    let mut changed = Vec::new();
    let mut holding = BTreeSet::new();
    let escalate_after =
        chrono::Duration::from_std(escalate_after).unwrap_or(chrono::Duration::MAX);
    for condition in conditions {
        let fingerprint = condition.fingerprint();
        holding.insert(fingerprint.clone());
        match alerts.get_mut(&fingerprint) {
            Some(alert) if alert.firing => {
                let mut touched = false;
                if alert.severity == Severity::Warning && now - alert.started_at >= escalate_after {
                    alert.severity = Severity::Critical;
                    alert.escalated_at = Some(now);
                    touched = true;
                }
                if alert.caused_by != condition.caused_by {
                    alert.caused_by = condition.caused_by;
                    touched = true;
                }
                if touched {
                    changed.push(alert.clone());
                }
            }
            _ => {
                let alert = Alert {
                    fingerprint: fingerprint.clone(),
                    rule: condition.rule,
                    service: condition.service,
                    instance_id: condition.instance_id,
                    severity: Severity::Warning,
                    firing: true,
                    started_at: condition.since.min(now),
                    escalated_at: None,
                    resolved_at: None,
                    summary: condition.summary,
                    caused_by: condition.caused_by,
                    notified: BTreeMap::new(),
                };
                changed.push(alert.clone());
                alerts.insert(fingerprint, alert);
            }
        }
    }
    for alert in alerts.values_mut() {
        if alert.firing && !holding.contains(&alert.fingerprint) && owned(alert) {
            alert.firing = false;
            alert.resolved_at = Some(now);
            changed.push(alert.clone());
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Probe, Reason, Verdict};
    use crate::tracker::Thresholds;

    fn instance(service: &str, id: &str, deps: &[&str]) -> Instance {
        let now = Utc::now();
        Instance {
            instance_id: id.into(),
            service: common::api::ServiceName::parse(service).unwrap(),
            version: "1".into(),
            address: "127.0.0.1".into(),
            port: 1,
            health_endpoint: "/health".into(),
            health: HealthState::Healthy,
            load: None,
            weight: 1,
            tags: vec![],
            metadata: serde_json::Map::new(),
            routes: vec![],
            dependencies: deps
                .iter()
                .map(|d| common::api::ServiceName::parse(d).unwrap())
                .collect(),
            registered_at: now,
            last_heartbeat_at: now,
            health_since: now,
            draining: false,
            flapping: false,
        }
    }

    fn offline(now: DateTime<Utc>) -> Tracker {
        let mut tracker = Tracker::new(HealthState::Healthy, now);
        let fail = Probe {
            verdict: Verdict::Fail(Reason::Connect),
            latency: Duration::from_millis(1),
            detail: "refused".into(),
        };
        let t = Thresholds {
            failures_to_offline: 1,
            passes_to_healthy: 1,
        };
        tracker.observe(&fail, now, t);
        tracker
    }

    #[test]
    fn alerts_fire_once_escalate_and_resolve() {
        let now = Utc::now();
        let db = instance("db", "db-1", &[]);
        let down = offline(now);
        let fleet = [(&db, &down)];
        let rules = Rules::default();
        let mut alerts = BTreeMap::new();
        let fired = reconcile(
            &mut alerts,
            evaluate(&fleet, &rules, now),
            rules.escalate_after,
            now,
            &|_| true,
        );
        let rules_fired: BTreeSet<Rule> = fired.iter().map(|a| a.rule).collect();
        assert_eq!(
            rules_fired,
            [Rule::InstanceOffline, Rule::NoHealthyInstance].into()
        );
        assert!(
            fired
                .iter()
                .all(|a| a.severity == Severity::Warning && a.needs("hook"))
        );
        let wait = Duration::from_secs(10);
        assert!(
            fired.iter().all(|a| !a.settled(now, wait)),
            "held for the group wait"
        );
        let after_wait = now + chrono::Duration::seconds(10);
        assert!(fired.iter().all(|a| a.settled(after_wait, wait)));
        // The same conditions again: nothing new (deduplicated).
        assert!(
            reconcile(
                &mut alerts,
                evaluate(&fleet, &rules, now),
                rules.escalate_after,
                now,
                &|_| true,
            )
            .is_empty()
        );
        let later = now + chrono::Duration::minutes(6);
        let escalated = reconcile(
            &mut alerts,
            evaluate(&fleet, &rules, later),
            rules.escalate_after,
            later,
            &|_| true,
        );
        assert_eq!(escalated.len(), 2);
        assert!(escalated.iter().all(|a| a.severity == Severity::Critical));
        let healthy = Tracker::new(HealthState::Healthy, later);
        let resolved = reconcile(
            &mut alerts,
            evaluate(&[(&db, &healthy)], &rules, later),
            rules.escalate_after,
            later,
            &|_| true,
        );
        assert_eq!(resolved.len(), 2);
        assert!(resolved.iter().all(|a| !a.firing && a.due() == "resolved"));
        let fp = fingerprint(Rule::InstanceOffline, "db", Some("db-1"));
        assert!(alerts.contains_key(&fp), "stable fingerprint");

        // Another monitor's alerts are not resolved here, whatever this one sees.
        let mut theirs = BTreeMap::new();
        reconcile(
            &mut theirs,
            evaluate(&fleet, &rules, now),
            rules.escalate_after,
            now,
            &|_| true,
        );
        let untouched = reconcile(&mut theirs, vec![], rules.escalate_after, later, &|_| false);
        assert!(untouched.is_empty());
    }

    #[test]
    fn a_dependency_down_inhibits_its_dependents() {
        let now = Utc::now();
        let (db, api) = (
            instance("db", "db-1", &[]),
            instance("api", "api-1", &["db"]),
        );
        let (db_down, api_down) = (offline(now), offline(now));
        let conditions = evaluate(
            &[(&db, &db_down), (&api, &api_down)],
            &Rules::default(),
            now,
        );
        for condition in &conditions {
            let expected = (condition.service == "api").then(|| "db".to_owned());
            assert_eq!(condition.caused_by, expected, "{condition:?}");
        }
        let mut alerts = BTreeMap::new();
        let fired = reconcile(
            &mut alerts,
            conditions,
            Duration::from_secs(300),
            now,
            &|_| true,
        );
        for alert in fired {
            assert_eq!(alert.needs("hook"), alert.service == "db", "{alert:?}");
        }
    }

    #[test]
    fn a_mostly_degraded_service_alerts() {
        let now = Utc::now();
        let members: Vec<Instance> = (0..4)
            .map(|i| instance("web", &format!("w-{i}"), &[]))
            .collect();
        let healthy = Tracker::new(HealthState::Healthy, now);
        let degraded = Tracker::new(HealthState::Degraded, now);
        let fleet: Vec<_> = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m, if i == 0 { &healthy } else { &degraded }))
            .collect();
        let conditions = evaluate(&fleet, &Rules::default(), now);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].rule, Rule::DegradedRatio);
    }
}
