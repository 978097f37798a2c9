//! From a request's target to a route: the checks every path passes first (length,
//! encoding, dot segments), and the prefix arithmetic the route table and policies share.
//!
//! This is the part of the gateway that reads untrusted input before anything else, so
//! it is pure, allocates only to normalise an escaped path, and is covered by a property
//! test.

use std::borrow::Cow;

/// The longest request target (path and query) accepted; nginx's default header buffer
/// is 8 KiB too.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Why a request target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTarget {
    /// 414.
    TooLong,
    /// 400, with the reason.
    Malformed(&'static str),
}

/// Checks a path (and its query) before it is matched against any route.
///
/// Refused: anything not starting with `/` (`*`, authority form), `.` and `..` segments
/// (also percent-encoded, and with path parameters: `..;x`, which Tomcat and Spring read as
/// `..`), encoded slashes and backslashes (`%2f`, `%5c`), encoded NUL, raw backslashes, and
/// broken percent-encoding. An upstream that decoded those itself could be led outside the
/// prefix the gateway routed on.
pub fn check(path: &str, query: Option<&str>) -> Result<(), BadTarget> {
    if path.len() + query.map_or(0, |q| q.len() + 1) > MAX_TARGET_BYTES {
        return Err(BadTarget::TooLong);
    }
    if !path.starts_with('/') {
        return Err(BadTarget::Malformed("the path must start with /"));
    }
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(BadTarget::Malformed("backslashes are not allowed in paths")),
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| Some(hex_value(hex[0])? * 16 + hex_value(hex[1])?))
                    .ok_or(BadTarget::Malformed("broken percent-encoding"))?;
                if matches!(decoded, b'/' | b'\\' | 0) {
                    return Err(BadTarget::Malformed(
                        "encoded slashes, backslashes and NUL are not allowed in paths",
                    ));
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    for segment in path.split('/') {
        let before_parameters = segment.split(';').next().unwrap_or(segment);
        if is_dot_segment(before_parameters) {
            return Err(BadTarget::Malformed(
                "'.' and '..' segments are not allowed in paths",
            ));
        }
    }
    if let Some(query) = query
        && query.bytes().any(|b| b == b'#')
    {
        return Err(BadTarget::Malformed("a fragment is not part of a request"));
    }
    Ok(())
}

/// `path` in the one spelling routes and policies are matched on, and that goes upstream:
/// percent-encoded unreserved characters decoded (`%61dmin` is `admin`), the hex digits of
/// every other escape in upper case (RFC 3986 §6.2.2). Without it `/shop/%61dmin` would
/// slip past a policy on `/shop/admin` to an upstream that decodes it. `path` has passed
/// [`check`]; a broken escape is left as it is.
pub fn normalize(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut normal = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| Some((hex, hex_value(hex[0])? * 16 + hex_value(hex[1])?)));
        match escape {
            Some((_, decoded)) if is_unreserved(decoded) => normal.push(char::from(decoded)),
            Some((hex, _)) => {
                normal.push('%');
                normal.push(char::from(hex[0].to_ascii_uppercase()));
                normal.push(char::from(hex[1].to_ascii_uppercase()));
            }
            None => {
                // Not an escape: copy it, and all up to the next `%`, whole.
                let from = i + usize::from(bytes[i] == b'%');
                let end = path[from..].find('%').map_or(path.len(), |at| from + at);
                normal.push_str(&path[i..end]);
                i = end;
                continue;
            }
        }
        i += 3;
    }
    Cow::Owned(normal)
}

/// `path` without its path parameters (`/a;v=1/b;x` → `/a/b`), which servers such as
/// Tomcat drop before routing: what policies are matched on, so that `/shop/admin;x/users`
/// falls under a policy on `/shop/admin/users`.
pub fn without_parameters(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut bare = String::with_capacity(path.len());
    for (index, segment) in path.split('/').enumerate() {
        if index > 0 {
            bare.push('/');
        }
        bare.push_str(segment.split(';').next().unwrap_or(segment));
    }
    Cow::Owned(bare)
}

/// RFC 3986 §2.3: what never needs escaping, so its escaped spelling means the same.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `.`, `..`, and their percent-encoded spellings (`%2e`, `.%2E`, …).
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3
            && rest[0] == b'%'
            && rest[1] == b'2'
            && matches!(rest[2], b'e' | b'E')
        {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    (1..=2).contains(&dots)
}

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
