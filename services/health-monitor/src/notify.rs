//! Delivering alert notices to webhooks: a generic JSON object or Alertmanager's format,
//! retried with backoff per webhook until it is taken. What each webhook has been told is
//! stored with the alert, so that a restart neither repeats nor drops a notice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::HttpClient;
use serde_json::{Value, json};

use crate::alerts::Alert;
use crate::config::{Webhook, WebhookFormat};

/// The body a webhook receives for `alert`.
pub fn body(alert: &Alert, format: WebhookFormat) -> Value {
    match format {
        WebhookFormat::Generic => json!({
            "fingerprint": alert.fingerprint,
            "rule": alert.rule,
            "service": alert.service,
            "instance_id": alert.instance_id,
            "status": if alert.firing { "firing" } else { "resolved" },
            "severity": alert.severity,
            "summary": alert.summary,
            "caused_by": alert.caused_by,
            "started_at": alert.started_at,
            "escalated_at": alert.escalated_at,
            "resolved_at": alert.resolved_at,
        }),
        WebhookFormat::Alertmanager => {
            let mut labels = json!({
                "alertname": alert.rule.as_str(),
                "service": alert.service,
                "severity": alert.severity,
                "fingerprint": alert.fingerprint,
            });
            if let Some(instance) = &alert.instance_id {
                labels["instance"] = json!(instance);
            }
            let mut entry = json!({
                "labels": labels,
                "annotations": { "summary": alert.summary },
                "startsAt": alert.started_at,
            });
            if let Some(resolved) = alert.resolved_at {
                entry["endsAt"] = json!(resolved);
            }
            json!([entry])
        }
    }
}

/// Per-webhook backoff after failures.
#[derive(Debug, Default)]
pub struct Backoff {
    until: HashMap<String, (Instant, u32)>,
}

impl Backoff {
    pub fn ready(&self, url: &str, now: Instant) -> bool {
        self.until.get(url).is_none_or(|(until, _)| now >= *until)
    }

    pub fn failed(&mut self, url: &str, now: Instant) {
        let failures = self.until.get(url).map_or(0, |(_, f)| *f) + 1;
        let delay = Duration::from_millis(250)
            .saturating_mul(1 << failures.min(8))
            .min(Duration::from_secs(60));
        self.until.insert(url.to_owned(), (now + delay, failures));
    }

    pub fn succeeded(&mut self, url: &str) {
        self.until.remove(url);
    }
}

/// Posts one notice; `Ok` when the webhook answered 2xx.
pub async fn send(client: &HttpClient, webhook: &Webhook, alert: &Alert) -> Result<(), String> {
    let request = http::Request::post(&webhook.url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body(alert, webhook.format).to_string()))
        .map_err(|e| e.to_string())?;
    let response = client.send(request).await.map_err(|e| e.to_string())?;
    if response.status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", response.status))
    }
}
