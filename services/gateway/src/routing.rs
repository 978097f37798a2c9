//! From a request's target to a route: the checks every path passes first (length,
//! encoding, dot segments), and the prefix arithmetic the route table and policies share.
//!
//! This is the part of the gateway that reads untrusted input before anything else, so
//! it is pure, allocation-free and covered by a property test.

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
/// (also percent-encoded), encoded slashes and backslashes (`%2f`, `%5c`), encoded NUL,
/// raw backslashes, and broken percent-encoding. An upstream that decoded those itself
/// could be led outside the prefix the gateway routed on.
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
        if is_dot_segment(segment) {
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
/// and `/shop/cart` but not `/shopping`. `/` covers everything.
pub fn is_under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
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
    fn prefixes_respect_segment_boundaries() {
        assert!(is_under("/shop", "/shop"));
        assert!(is_under("/shop/cart", "/shop"));
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
