//! Logging through `tracing`: one `init` per process, and the request id every request carries.

use http::HeaderValue;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::LogFormat;

/// The header that carries a request's id, in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Installs the global subscriber: `RUST_LOG` filters (default `info`), `format` shapes.
/// A second call (tests) leaves the first subscriber in place.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// For tests: quiet unless `TEST_LOG` is set, then pretty lines through the test writer.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .compact()
            .try_init();
    }
}

/// A client's request id if it is well-formed (1 to 128 characters of `A-Z a-z 0-9 . _ : -`),
/// else a fresh UUID: ids end up in log lines, so nothing else is taken as given.
pub fn request_id(from_client: Option<&[u8]>) -> String {
    match from_client {
        Some(id) if is_well_formed_request_id(id) => String::from_utf8_lossy(id).into_owned(),
        _ => new_request_id(&mut [0; uuid::fmt::Hyphenated::LENGTH]).to_owned(),
    }
}

/// [`request_id`] as a header value: a client's well-formed one is kept as it came (no
/// copy), a fresh one is written once.
pub fn request_id_value(from_client: Option<&HeaderValue>) -> HeaderValue {
    match from_client {
        Some(id) if is_well_formed_request_id(id.as_bytes()) => id.clone(),
        _ => {
            let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
            HeaderValue::from_str(new_request_id(&mut text))
                .unwrap_or_else(|_| HeaderValue::from_static("-"))
        }
    }
}

/// A v4 UUID from a fast thread-local generator, written into `text`: request ids must be
/// unique, not unguessable, and the OS generator would cost a system call per request.
fn new_request_id(text: &mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &str {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
        .into_uuid()
        .hyphenated()
        .encode_lower(text)
}

fn is_well_formed_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_ids_are_kept_and_others_replaced() {
        assert_eq!(request_id(Some(b"abc-123_x.y:z")), "abc-123_x.y:z");
        for bad in [&b""[..], b"has space", b"new\nline", b"\xff", &[b'a'; 129]] {
            let id = request_id(Some(bad));
            assert_ne!(id.as_bytes(), bad);
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        }
        assert!(uuid::Uuid::parse_str(&request_id(None)).is_ok());
    }

    #[test]
    fn well_formed_id_values_are_kept_and_others_replaced() {
        let kept = HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(request_id_value(Some(&kept)), kept);
        for bad in [&b""[..], b"has space", b"\xff", &[b'a'; 129]] {
            let bad = HeaderValue::from_bytes(bad).unwrap();
            let id = request_id_value(Some(&bad));
            assert_ne!(id, bad);
            assert!(uuid::Uuid::try_parse_ascii(id.as_bytes()).is_ok(), "{id:?}");
        }
        let fresh = [request_id_value(None), request_id_value(None)];
        assert!(uuid::Uuid::try_parse_ascii(fresh[0].as_bytes()).is_ok());
        assert_ne!(fresh[0], fresh[1]);
    }
}
