//! From a request's target to a route: the checks every path passes first (length,
//! encoding, dot segments), and the prefix arithmetic the route table and policies share.
//!
//! This is the part of the gateway that reads untrusted input before anything else, so
//! it is pure and covered by a property test; the path checks themselves are
//! `common::path`'s, shared with the registry's route validation.

pub use common::path::{BadTarget, MAX_TARGET_BYTES, check, normalize, without_parameters};

/// Whether `path` is `prefix` or below it, on a segment boundary: `/shop` covers `/shop`
/// and `/shop/cart` but not `/shopping`. `/` covers everything. A path parameter ends a
/// segment too (`/shop;x/cart`), since servers such as Tomcat drop it before routing.
pub fn is_under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && (path.len() == prefix.len() || matches!(path.as_bytes()[prefix.len()], b'/' | b';')))
}

/// `path` with `prefix` taken off (`/payments/charge` → `/charge`, `/payments` → `/`).
/// `path` must be under `prefix`.
pub fn strip<'a>(path: &'a str, prefix: &str) -> &'a str {
    match path.get(prefix.len()..) {
        Some(rest) if !rest.is_empty() => rest,
        _ => "/",
    }
}

/// The prefixes of `path` on segment boundaries, longest first, none longer than `longest`:
/// `/a/b/c` → `/a/b/c`, `/a/b`, `/a`.
pub fn prefixes(path: &str, longest: usize) -> impl Iterator<Item = &str> {
    let whole = (path.len() <= longest).then_some(path);
    let cuts = path
        .char_indices()
        .rev()
        .filter(move |&(i, c)| c == '/' && i > 0 && i <= longest)
        .map(move |(i, _)| &path[..i]);
    whole.into_iter().chain(cuts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn good_paths_pass() {
        for path in [
            "/",
            "/payments",
            "/payments/charge/",
            "/a%20b",
            "/x/.well-known/y",
            "/...",
            "/a..b",
            "/a;../b",
            "/a/b;x=..",
        ] {
            assert_eq!(check(path, Some("q=1&r=%2F")), Ok(()), "{path}");
        }
    }

    #[test]
    fn bad_paths_are_refused() {
        for path in [
            "",
            "*",
            "payments",
            "/a/../b",
            "/a/./b",
            "/..",
            "/a/%2e%2e/b",
            "/a/.%2E",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
            "/a%00",
            "/a%zz",
            "/a%2",
            "/a/..;x/b",
            "/a/.;/b",
            "/a/%2e%2E;jsessionid=1",
            "/a/..",
            "/a/%2e",
            "/a/..;",
            "/../a%zz",
        ] {
            assert!(
                matches!(check(path, None), Err(BadTarget::Malformed(_))),
                "{path:?}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_TARGET_BYTES));
        assert_eq!(check(&long, None), Err(BadTarget::TooLong));
    }

    #[test]
    fn escapes_of_unreserved_characters_are_decoded_and_the_rest_upper_cased() {
        assert_eq!(normalize("/shop/%61dmin/users"), "/shop/admin/users");
        assert_eq!(normalize("/%7Eme%2d%5F%2E%30"), "/~me-_.0");
        assert_eq!(normalize("/a%20b%3fc%c3%a9"), "/a%20b%3Fc%C3%A9");
        assert_eq!(normalize("/é%41é"), "/éAé");
        assert!(matches!(normalize("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn path_parameters_come_off_every_segment() {
        assert_eq!(
            without_parameters("/shop/admin;x/users"),
            "/shop/admin/users"
        );
        assert_eq!(without_parameters("/a;v=1/b;x;y/c;"), "/a/b/c");
        assert!(matches!(
            without_parameters("/plain/path"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn prefixes_respect_segment_boundaries() {
        assert!(is_under("/shop", "/shop"));
        assert!(is_under("/shop/cart", "/shop"));
        assert!(is_under("/shop/admin;x/users", "/shop/admin"));
        assert!(!is_under("/shopping", "/shop"));
        assert!(is_under("/anything", "/"));
        assert_eq!(strip("/payments/charge?x", "/payments"), "/charge?x");
        assert_eq!(strip("/payments", "/payments"), "/");
        let all: Vec<&str> = prefixes("/a/b/c/", 100).collect();
        assert_eq!(all, ["/a/b/c/", "/a/b/c", "/a/b", "/a"]);
        let short: Vec<&str> = prefixes("/a/b/c", 4).collect();
        assert_eq!(short, ["/a/b", "/a"]);
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::table::Table;

    /// Paths built from the characters that matter to routing, plus anything at all.
    fn path() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::collection::vec(
                prop_oneof![
                    Just("/".to_owned()),
                    Just(".".to_owned()),
                    Just("..".to_owned()),
                    Just("%".to_owned()),
                    Just("%2e".to_owned()),
                    Just("%2F".to_owned()),
                    Just("%5c".to_owned()),
                    Just("%00".to_owned()),
                    Just("%61".to_owned()),
                    Just(";".to_owned()),
                    Just("..;".to_owned()),
                    Just("shop".to_owned()),
                    Just("api".to_owned()),
                    Just("credentials".to_owned()),
                    "[a-z0-9]{1,3}",
                    any::<char>().prop_map(String::from),
                ],
                0..24,
            )
            .prop_map(|parts| parts.concat()),
            any::<String>(),
        ]
    }

    fn table() -> Table {
        let now = chrono::Utc::now();
        let instances: BTreeMap<String, common::api::Instance> = [
            ("shop", vec!["/store", "/api/x"]),
            ("cart", vec!["/store/cart"]),
        ]
        .into_iter()
        .map(|(service, routes)| {
            let instance = common::api::Instance {
                instance_id: format!("{service}-1"),
                service: common::api::ServiceName::parse(service).unwrap(),
                version: "1".into(),
                address: "127.0.0.1".into(),
                port: 9000,
                health_endpoint: "/health".into(),
                health: common::api::HealthState::Healthy,
                load: None,
                weight: 1,
                tags: vec![],
                metadata: serde_json::Map::new(),
                routes: routes.into_iter().map(str::to_owned).collect(),
                dependencies: vec![],
                registered_at: now,
                last_heartbeat_at: now,
                health_since: now,
                draining: false,
                flapping: false,
            };
            (instance.instance_id.clone(), instance)
        })
        .collect();
        Table::build(
            &instances,
            &[],
            &Table::default(),
            &crate::table::PoolSettings::default(),
            &crate::metrics::GatewayMetrics::new(&prometheus::Registry::new()).unwrap(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the path: no panic; an accepted path has no dot segment and no encoded
        /// slash in any spelling; its route covers it; what goes upstream is a path.
        #[test]
        fn any_target_is_refused_or_routed_soundly(path in path(), query in proptest::option::of(any::<String>())) {
            let table = table();
            match check(&path, query.as_deref()) {
                Err(_) => {}
                Ok(()) => {
                    prop_assert!(path.starts_with('/'));
                    let lower = path.to_ascii_lowercase();
                    prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains('\\'));
                    for segment in lower.split('/') {
                        let decoded = segment.replace("%2e", ".");
                        prop_assert!(decoded != "." && decoded != "..", "{path}");
                    }
                    let normal = normalize(&path);
                    prop_assert_eq!(check(&normal, query.as_deref()), Ok(()));
                    prop_assert_eq!(&normalize(&normal), &normal);
                    if let Some(route) = table.resolve(&path) {
                        prop_assert!(is_under(&path, &route.prefix));
                        let upstream = if route.strip { strip(&path, &route.prefix) } else { &path };
                        prop_assert!(upstream.starts_with('/'));
                    }
                }
            }
        }
    }
}
