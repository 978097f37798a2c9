//! Request paths as the gateway reads them, and routes as it matches them: the checks
//! every path passes first (length, encoding, dot segments) and the one spelling routes,
//! policies and upstreams see. Shared so that the registry accepts only routes written
//! in that spelling.
//!
//! Pure, allocating only to normalise an escaped path.

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
    // One pass: the escapes and backslashes byte by byte, and each segment (up to its
    // parameters) as its `/` or the end closes it. A dot segment is told only after the
    // rest, which it does not outrank.
    let bytes = path.as_bytes();
    let mut segment = 0;
    let mut parameters = None;
    let mut dot_segment = false;
    let mut i = 0;
    loop {
        if i == bytes.len() || bytes[i] == b'/' {
            dot_segment |= is_dot_segment(&path[segment..parameters.unwrap_or(i)]);
            if i == bytes.len() {
                break;
            }
            segment = i + 1;
            parameters = None;
            i += 1;
            continue;
        }
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
            b';' if parameters.is_none() => parameters = Some(i),
            _ => {}
        }
        i += 1;
    }
    if dot_segment {
        return Err(BadTarget::Malformed(
            "'.' and '..' segments are not allowed in paths",
        ));
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
