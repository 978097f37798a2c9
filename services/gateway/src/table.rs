//! The route table: which path prefixes lead to which service, and each service's pool of
//! instances with their live state (circuit, requests in flight).
//!
//! A table is immutable once built; a change builds a new one and swaps it in (`ArcSwap`),
//! so requests under way keep the snapshot they started with and no connection is
//! touched. The live state of an instance carries over from table to table by instance id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use common::api::{HealthState, Instance, services};
use http::uri::Authority;

use crate::breaker::{Breaker, BreakerConfig};
use crate::budget::RetryBudget;
use crate::metrics::{GatewayMetrics, ServiceMetrics};
use crate::routing;

/// The control plane's fixed prefixes (DESIGN.md, "HTTP API"), kept as they are upstream.
pub const CONTROL_PLANE_ROUTES: &[(&str, &str)] = &[
    ("/api/credentials", services::CREDENTIAL_VAULT),
    ("/api/tokens", services::CREDENTIAL_VAULT),
    ("/api/auth", services::CREDENTIAL_VAULT),
    ("/api/audit", services::CREDENTIAL_VAULT),
    ("/api/services", services::SERVICE_REGISTRY),
    ("/api/discover", services::SERVICE_REGISTRY),
    ("/api/instances", services::SERVICE_REGISTRY),
    ("/api/health", services::HEALTH_MONITOR),
];

/// Control-plane paths that need no token.
pub const PUBLIC_PATHS: &[&str] = &["/api/auth/jwks"];

/// Whether `service` is one of ours, which speak HTTP/1.1 only (actix-web does not detect
/// h2c), so that `UPSTREAM_PROTOCOL` never applies to them.
pub fn is_control_plane(service: &str) -> bool {
    matches!(
        service,
        services::CREDENTIAL_VAULT | services::SERVICE_REGISTRY | services::HEALTH_MONITOR
    )
}

/// How pools are built.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub breaker: BreakerConfig,
    /// Retries per request a service's budget allows.
    pub retry_ratio: f64,
    /// Requests (so connections) open to one instance at once; more wait their turn.
    pub max_connections: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            breaker: BreakerConfig::default(),
            retry_ratio: 0.2,
            max_connections: 1024,
        }
    }
}

/// What an instance's state looks like across table rebuilds.
#[derive(Debug)]
pub struct Live {
    pub in_flight: AtomicU32,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// One permit per connection the instance may be sent at once.
    pub slots: Arc<tokio::sync::Semaphore>,
    breaker: Mutex<Breaker>,
    /// Its idle HTTP/1.1 connections.
    pub http1: crate::proxy::IdleConnections,
    /// The connection its h2c routes share.
    pub h2c: crate::proxy::SharedConnection,
}

impl Live {
    fn new(settings: &PoolSettings) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            slots: Arc::new(tokio::sync::Semaphore::new(settings.max_connections)),
            breaker: Mutex::new(Breaker::new(settings.breaker.clone(), Instant::now())),
            http1: crate::proxy::IdleConnections::default(),
            h2c: crate::proxy::SharedConnection::default(),
        }
    }

    pub fn breaker(&self) -> MutexGuard<'_, Breaker> {
        match self.breaker.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// One instance as this table routes to it.
#[derive(Debug)]
pub struct Endpoint {
    pub instance_id: Arc<str>,
    pub address: String,
    pub port: u16,
    pub authority: Authority,
    pub weight: u32,
    pub health: HealthState,
    pub draining: bool,
    pub live: Arc<Live>,
}

/// A service's instances.
#[derive(Debug)]
pub struct Pool {
    pub service: Arc<str>,
    pub endpoints: Vec<Endpoint>,
    /// Endpoint indices in smooth weighted round-robin order (nginx's algorithm), so that
    /// weights interleave rather than come in runs.
    pub wheel: Vec<usize>,
    pub cursor: AtomicUsize,
    pub budget: Arc<RetryBudget>,
    pub metrics: ServiceMetrics,
}

/// Where a prefix leads.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: Arc<str>,
    pub service: Arc<str>,
    /// `/{service}/…` routes strip their prefix; declared and control-plane routes do not.
    pub strip: bool,
    /// Control-plane routes always require a token (but for [`PUBLIC_PATHS`]).
    pub control_plane: bool,
}

/// A fixed upstream for a control-plane service the registry does not (yet) list.
#[derive(Debug, Clone)]
pub struct StaticUpstream {
    pub service: &'static str,
    pub authority: Authority,
}

#[derive(Debug, Default)]
pub struct Table {
    pools: FastMap<Arc<str>, Arc<Pool>>,
    routes: FastMap<Box<str>, Route>,
    longest: usize,
    /// Every service that has had instances since the gateway started. A route another
    /// service declares under one of their names is never routed, also while that service
    /// has none (all deregistered for a deploy, say): it would catch the service's clients,
    /// and their credentials, meanwhile.
    known: HashSet<Arc<str>, foldhash::fast::RandomState>,
}

/// The table's maps, read a few times per request: foldhash (hashbrown's own default,
/// seeded per process) rather than SipHash, which took about 550 instructions of a
/// proxied request's 38,800 (callgrind). Their keys come from the registry and the
/// configuration, not from clients, who only look up.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The longest weighted-round-robin cycle kept; larger weight sums are scaled down.
const MAX_WHEEL: u64 = 4096;

impl Table {
    /// A table for `instances`, keeping the live state of those `previous` had.
    pub fn build(
        instances: &BTreeMap<String, Instance>,
        statics: &[StaticUpstream],
        previous: &Table,
        settings: &PoolSettings,
        metrics: &GatewayMetrics,
    ) -> Self {
        let mut by_service: BTreeMap<&str, Vec<Endpoint>> = BTreeMap::new();
        let mut declared: BTreeMap<String, &str> = BTreeMap::new();
        for instance in instances.values() {
            let service = instance.service.as_str();
            // The gateway routing to itself would loop.
            if service == services::GATEWAY {
                continue;
            }
            let Some(authority) = authority(&instance.address, instance.port) else {
                tracing::warn!(instance = %instance.instance_id, "skipping an instance whose address is not a host");
                continue;
            };
            let live = previous
                .live(service, &instance.instance_id)
                .unwrap_or_else(|| Arc::new(Live::new(settings)));
            by_service.entry(service).or_default().push(Endpoint {
                instance_id: instance.instance_id.as_str().into(),
                address: instance.address.clone(),
                port: instance.port,
                authority,
                weight: instance.weight.max(1),
                health: instance.health,
                draining: instance.draining,
                live,
            });
            for route in &instance.routes {
                let route = routing::normalize(route.trim_end_matches('/'));
                let route = route.as_ref();
                // A parameter would let a route sit beside a prefix it is really under.
                if route.is_empty() || route.contains(';') {
                    continue;
                }
                match declared.get(route) {
                    Some(owner) if *owner != service => {
                        tracing::warn!(
                            route,
                            owner,
                            other = service,
                            "two services declare one route; the first by name keeps it"
                        );
                    }
                    _ => {
                        declared.insert(route.to_owned(), service);
                    }
                }
            }
        }
        for fixed in statics {
            by_service.entry(fixed.service).or_insert_with(|| {
                let id = "configured";
                vec![Endpoint {
                    instance_id: id.into(),
                    address: fixed.authority.host().to_owned(),
                    port: fixed.authority.port_u16().unwrap_or(80),
                    authority: fixed.authority.clone(),
                    weight: 1,
                    health: HealthState::Healthy,
                    draining: false,
                    live: previous
                        .live(fixed.service, id)
                        .unwrap_or_else(|| Arc::new(Live::new(settings))),
                }]
            });
        }

        let mut table = Table {
            known: previous.known.clone(),
            ..Table::default()
        };
        for (service, endpoints) in by_service {
            let service: Arc<str> = service.into();
            table.known.insert(service.clone());
            let budget = previous.pools.get(&service).map_or_else(
                || Arc::new(RetryBudget::new(settings.retry_ratio)),
                |p| p.budget.clone(),
            );
            let wheel = wheel(&endpoints.iter().map(|e| e.weight).collect::<Vec<_>>());
            table.pools.insert(
                service.clone(),
                Arc::new(Pool {
                    service: service.clone(),
                    endpoints,
                    wheel,
                    cursor: AtomicUsize::new(0),
                    budget,
                    metrics: metrics.for_service(&service),
                }),
            );
            table.add_route(format!("/{service}"), &service, true);
        }
        for (prefix, service) in declared {
            if let Some(owner) = table.owner_of(&prefix, service) {
                tracing::warn!(
                    route = prefix,
                    service,
                    owner,
                    "a service declares a route in another's paths; it is not routed"
                );
                continue;
            }
            let service: Arc<str> = service.into();
            table.add_route(prefix, &service, false);
        }
        for (prefix, service) in CONTROL_PLANE_ROUTES {
            table.add_route((*prefix).to_owned(), &Arc::from(*service), false);
        }
        table
    }

    /// Whose paths a route `service` declares lies in, when they are not its own: another
    /// service's (`/{name}` and below, for any service this gateway has seen) or the
    /// control plane's. A service registers with its own token alone, so without this one
    /// could take over another's traffic, or, under a control-plane prefix, receive
    /// clients' tokens on a path that needs none.
    fn owner_of(&self, prefix: &str, service: &str) -> Option<String> {
        if let Some((_, owner)) = CONTROL_PLANE_ROUTES
            .iter()
            .find(|(control, _)| routing::is_under(prefix, control))
            && *owner != service
        {
            return Some((*owner).to_owned());
        }
        let first = prefix.trim_start_matches('/').split('/').next()?;
        (first != service && self.known.contains(first)).then(|| first.to_owned())
    }

    fn add_route(&mut self, prefix: String, service: &Arc<str>, strip: bool) {
        self.longest = self.longest.max(prefix.len());
        let prefix: Arc<str> = prefix.into();
        self.routes.insert(
            prefix.as_ref().into(),
            Route {
                prefix,
                service: service.clone(),
                strip,
                control_plane: is_control_plane(service),
            },
        );
    }

    /// The route of the longest prefix `path` is under.
    pub fn resolve(&self, path: &str) -> Option<&Route> {
        routing::prefixes(path, self.longest).find_map(|prefix| self.routes.get(prefix))
    }

    pub fn pool(&self, service: &str) -> Option<&Arc<Pool>> {
        self.pools.get(service)
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        let mut pools: Vec<_> = self.pools.values().collect();
        pools.sort_by(|a, b| a.service.cmp(&b.service));
        pools.into_iter()
    }

    pub fn routes(&self) -> Vec<&Route> {
        let mut routes: Vec<_> = self.routes.values().collect();
        routes.sort_by(|a, b| a.prefix.cmp(&b.prefix));
        routes
    }

    fn live(&self, service: &str, instance_id: &str) -> Option<Arc<Live>> {
        self.pools
            .get(service)?
            .endpoints
            .iter()
            .find(|e| &*e.instance_id == instance_id)
            .map(|e| e.live.clone())
    }

    /// Every (service, instance id) in the table, for retiring metrics of those that left.
    pub fn instance_keys(&self) -> Vec<(Arc<str>, Arc<str>)> {
        self.pools
            .values()
            .flat_map(|pool| {
                pool.endpoints
                    .iter()
                    .map(|e| (pool.service.clone(), e.instance_id.clone()))
            })
            .collect()
    }
}

/// `host:port` as a URI authority (IPv6 addresses in brackets), or `None` for an address
/// that is not a host.
pub fn authority(address: &str, port: u16) -> Option<Authority> {
    let text = if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    };
    let authority: Authority = text.parse().ok()?;
    // No user info or other surprises: exactly the host and port given.
    let exact = authority.as_str() == text
        && !address.contains('@')
        && authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            == address.trim_start_matches('[').trim_end_matches(']');
    exact.then_some(authority)
}

/// The smooth weighted round-robin order of `weights` (one cycle).
fn wheel(weights: &[u32]) -> Vec<usize> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|w| u64::from(w / divisor)).collect();
    let total: u64 = reduced.iter().sum();
    if total > MAX_WHEEL {
        for weight in &mut reduced {
            *weight = (*weight * MAX_WHEEL / total).max(1);
        }
    }
    let total: i64 = reduced.iter().map(|w| i64::try_from(*w).unwrap_or(1)).sum();
    let mut current = vec![0i64; reduced.len()];
    let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, weight) in reduced.iter().enumerate() {
            current[i] += i64::try_from(*weight).unwrap_or(1);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best);
    }
    order
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    pub(crate) fn instance(service: &str, id: &str, routes: &[&str]) -> Instance {
        let now = chrono::Utc::now();
        Instance {
            instance_id: id.into(),
            service: common::api::ServiceName::parse(service).unwrap(),
            version: "1".into(),
            address: "127.0.0.1".into(),
            port: 9000,
            health_endpoint: "/health".into(),
            health: HealthState::Healthy,
            load: None,
            weight: 1,
            tags: vec![],
            metadata: serde_json::Map::new(),
            routes: routes.iter().map(|r| (*r).to_owned()).collect(),
            dependencies: vec![],
            registered_at: now,
            last_heartbeat_at: now,
            health_since: now,
            draining: false,
            flapping: false,
        }
    }

    pub(crate) fn test_metrics() -> GatewayMetrics {
        GatewayMetrics::new(&prometheus::Registry::new()).unwrap()
    }

    fn table(instances: Vec<Instance>, previous: &Table) -> Table {
        let map = instances
            .into_iter()
            .map(|i| (i.instance_id.clone(), i))
            .collect();
        Table::build(
            &map,
            &[],
            previous,
            &PoolSettings::default(),
            &test_metrics(),
        )
    }

    #[test]
    fn the_longest_prefix_wins_and_service_routes_strip() {
        let t = table(
            vec![
                instance("shop", "s-1", &["/store", "/api/catalog"]),
                instance("cart", "c-1", &["/store/cart"]),
                instance("gateway", "g-1", &[]),
            ],
            &Table::default(),
        );
        let service = |path: &str| t.resolve(path).map(|r| (&*r.service, r.strip));
        assert_eq!(service("/shop/items"), Some(("shop", true)));
        assert_eq!(service("/store/items"), Some(("shop", false)));
        assert_eq!(service("/store/cart/1"), Some(("cart", false)));
        assert_eq!(service("/store/cartoon"), Some(("shop", false)));
        assert_eq!(service("/api/catalog"), Some(("shop", false)));
        assert_eq!(
            service("/api/credentials/x"),
            Some(("credential-vault", false))
        );
        assert_eq!(service("/gateway/health"), None, "never routes to itself");
        assert_eq!(service("/nothing"), None);
        assert!(t.resolve("/api/services").unwrap().control_plane);
    }

    #[test]
    fn a_service_cannot_declare_routes_in_another_services_paths() {
        let t = table(
            vec![
                instance("payments", "p-1", &["/payments/v2", "/pay"]),
                instance(
                    "evil",
                    "e-1",
                    &[
                        "/payments",
                        "/payments/v2/refunds",
                        "/api/credentials/x",
                        "/api/tokens",
                        "/payments;v=1",
                        "/evil-zone",
                    ],
                ),
                instance("service-registry", "r-1", &["/api/services/v2"]),
            ],
            &Table::default(),
        );
        let service = |path: &str| t.resolve(path).map(|r| &*r.service);
        assert_eq!(service("/payments/charge"), Some("payments"));
        assert_eq!(service("/payments/v2/refunds/1"), Some("payments"));
        assert_eq!(service("/pay/x"), Some("payments"));
        assert_eq!(service("/api/credentials/x"), Some("credential-vault"));
        assert!(t.resolve("/api/credentials/x").unwrap().control_plane);
        assert_eq!(service("/api/tokens/x"), Some("credential-vault"));
        assert_eq!(service("/evil-zone/x"), Some("evil"));
        assert_eq!(
            service("/payments;v=1/x"),
            None,
            "no route holds a parameter"
        );
        // A control-plane service may declare routes under its own prefixes.
        let own = t.resolve("/api/services/v2/x").unwrap();
        assert_eq!(
            (&*own.prefix, &*own.service),
            ("/api/services/v2", "service-registry")
        );
    }

    #[test]
    fn a_service_gone_for_a_while_keeps_its_paths() {
        let evil = || instance("evil", "e-1", &["/payments/charge", "/evil-zone"]);
        let both = table(
            vec![instance("payments", "p-1", &[]), evil()],
            &Table::default(),
        );
        // Every payments instance deregistered, for a deploy: its paths stay its own.
        let without = table(vec![evil()], &both);
        let service = |t: &Table, path: &str| t.resolve(path).map(|r| r.service.to_string());
        assert_eq!(service(&without, "/payments/charge"), None);
        assert_eq!(service(&without, "/evil-zone/x").as_deref(), Some("evil"));
        let back = table(vec![instance("payments", "p-2", &[]), evil()], &without);
        assert_eq!(
            service(&back, "/payments/charge").as_deref(),
            Some("payments")
        );
        // A gateway that never saw payments cannot know the name is taken.
        let fresh = table(vec![evil()], &Table::default());
        assert_eq!(service(&fresh, "/payments/charge").as_deref(), Some("evil"));
    }

    #[test]
    fn live_state_survives_a_rebuild() {
        let first = table(vec![instance("shop", "s-1", &[])], &Table::default());
        let live = first.pool("shop").unwrap().endpoints[0].live.clone();
        live.requests.store(7, Ordering::Relaxed);
        let second = table(
            vec![instance("shop", "s-1", &[]), instance("shop", "s-2", &[])],
            &first,
        );
        let pool = second.pool("shop").unwrap();
        assert!(Arc::ptr_eq(&pool.endpoints[0].live, &live));
        assert_eq!(pool.endpoints[1].live.requests.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn weights_interleave() {
        assert_eq!(wheel(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(wheel(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(wheel(&[100, 100]), [0, 1]);
        assert!(wheel(&[1000, 1000, 1000, 1000, 1000, 7]).len() <= 4096 + 6);
    }

    #[test]
    fn authorities_are_exactly_host_and_port() {
        assert_eq!(authority("10.0.0.1", 80).unwrap().as_str(), "10.0.0.1:80");
        assert_eq!(authority("::1", 80).unwrap().as_str(), "[::1]:80");
        assert_eq!(authority("svc.local", 8080).unwrap().host(), "svc.local");
        assert!(authority("user@host", 80).is_none());
        assert!(authority("a/b", 80).is_none());
    }
}
