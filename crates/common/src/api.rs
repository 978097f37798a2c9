//! The wire types the services share: names, health states, instances, credential
//! metadata, and the events on the Redis channels of DESIGN.md.
//!
//! These are the contract between processes: a field added here must stay readable by an
//! older reader (serde ignores unknown fields), and a field removed must have been optional.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A service's name: 1 to 63 characters of `a-z`, `0-9` and `-`, not starting or ending
/// with `-` (a DNS label, so that it can also be a host name and a path segment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid service name {0:?}: use 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
)]
pub struct InvalidServiceName(pub String);

impl ServiceName {
    pub fn parse(name: &str) -> Result<Self, InvalidServiceName> {
        let valid = (1..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            // Keep at most a prefix: a bad name may be arbitrarily long.
            Err(InvalidServiceName(name.chars().take(64).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ServiceName {
    type Err = InvalidServiceName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// The control plane's own services, as they name themselves in tokens and the registry.
pub mod services {
    pub const CREDENTIAL_VAULT: &str = "credential-vault";
    pub const SERVICE_REGISTRY: &str = "service-registry";
    pub const GATEWAY: &str = "gateway";
    pub const HEALTH_MONITOR: &str = "health-monitor";
}

/// An instance's health (DESIGN.md, "Health states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    Degraded,
    Offline,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Offline => "offline",
        }
    }
}

/// A registered instance of a service, as the registry reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub instance_id: String,
    pub service: ServiceName,
    pub version: String,
    pub address: String,
    pub port: u16,
    pub health_endpoint: String,
    pub health: HealthState,
    /// The instance's own report of its load, 0 to 1.
    #[serde(default)]
    pub load: Option<f64>,
    #[serde(default)]
    pub weight: u32,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Extra path prefixes the gateway routes to this service.
    #[serde(default)]
    pub routes: Vec<String>,
    /// The services this one calls (the dependency graph).
    #[serde(default)]
    pub dependencies: Vec<ServiceName>,
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    /// Since when `health` has held.
    pub health_since: DateTime<Utc>,
    /// Set by an operator before maintenance: the instance takes no new traffic.
    #[serde(default)]
    pub draining: bool,
    /// Changed state too often lately: held out of discovery until it settles.
    #[serde(default)]
    pub flapping: bool,
}

/// A credential's description, never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialMetadata {
    pub id: String,
    pub service: ServiceName,
    pub name: String,
    pub version: i64,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub shared_with: Vec<ServiceName>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The Redis channels of DESIGN.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Registry,
    Health,
    Vault,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Registry, Channel::Health, Channel::Vault];

    pub fn name(self) -> &'static str {
        match self {
            Self::Registry => "concierge:registry",
            Self::Health => "concierge:health",
            Self::Vault => "concierge:vault",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// What happened. Serialized with its `type` beside the envelope's `at` and `origin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    InstanceRegistered {
        instance: Instance,
    },
    InstanceUpdated {
        instance: Instance,
    },
    InstanceDeregistered {
        service: ServiceName,
        instance_id: String,
    },
    HealthChanged {
        service: ServiceName,
        instance_id: String,
        from: HealthState,
        to: HealthState,
        reason: String,
        /// The latency of the check that caused the change, when a check did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency_ms: Option<f64>,
    },
    CredentialRotated {
        id: String,
        service: ServiceName,
        name: String,
        version: i64,
    },
    CredentialDeleted {
        id: String,
        service: ServiceName,
        name: String,
    },
    TokenRevoked {
        id: String,
    },
    /// A signing key was added or retired: vaults reload their keys, and the others
    /// their JWKS, now rather than at their next resync. Published by the CLI that made
    /// the change, and again by each vault whose keys it changed.
    SigningKeysChanged {},
}

impl Event {
    /// The channel an event travels on.
    pub fn channel(&self) -> Channel {
        match self {
            Self::InstanceRegistered { .. }
            | Self::InstanceUpdated { .. }
            | Self::InstanceDeregistered { .. } => Channel::Registry,
            Self::HealthChanged { .. } => Channel::Health,
            Self::CredentialRotated { .. }
            | Self::CredentialDeleted { .. }
            | Self::TokenRevoked { .. }
            | Self::SigningKeysChanged {} => Channel::Vault,
        }
    }
}

/// An event as it travels: `{"type": …, "at": …, "origin": …, …fields}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(flatten)]
    pub event: Event,
    pub at: DateTime<Utc>,
    /// The service (and process) that published it.
    pub origin: String,
}

impl Envelope {
    pub fn new(event: Event, origin: impl Into<String>) -> Self {
        Self {
            event,
            at: Utc::now(),
            origin: origin.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_dns_labels() {
        for good in ["a", "payments", "order-api-2", &"x".repeat(63)] {
            assert!(ServiceName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Payments",
            "a_b",
            "a.b",
            "a/b",
            "ü",
            &"x".repeat(64),
        ] {
            assert!(ServiceName::parse(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<ServiceName>(r#""Bad Name""#).is_err());
    }

    #[test]
    fn envelopes_carry_type_at_and_origin_at_the_top() {
        let envelope = Envelope::new(
            Event::HealthChanged {
                service: ServiceName::parse("payments").unwrap(),
                instance_id: "i-1".into(),
                from: HealthState::Healthy,
                to: HealthState::Degraded,
                reason: "timeout".into(),
                latency_ms: Some(5000.0),
            },
            "health-monitor",
        );
        let json = serde_json::to_value(&envelope).unwrap();
        assert_eq!(json["type"], "health_changed");
        assert_eq!(json["origin"], "health-monitor");
        assert_eq!(json["from"], "healthy");
        assert!(json["at"].is_string());
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(back.event.channel(), Channel::Health);
        assert_eq!(
            Channel::from_name("concierge:health"),
            Some(Channel::Health)
        );
    }
}
