//! One check of one instance, over HTTP, HTTPS or TCP, with the reason of every failure:
//! `dns`, `connect`, `timeout`, `tls`, `status` or `body` (what blackbox_exporter users
//! ask for).
//!
//! HTTPS checks use rustls (on ring) and verify the instance's certificate against the
//! system's trust store (`SSL_CERT_FILE` or `SSL_CERT_DIR` name another), unless the
//! instance's registration says `tls_skip_verify`, as Consul's checks allow.
//!
//! An HTTP check keeps its connection open for the instance's next check ([`Kept`]), as
//! Envoy's health checker and Prometheus' scrapes do: at 10,000 instances most of a
//! checker's CPU otherwise goes to the kernel's TCP handshakes and teardowns. A kept
//! connection the instance has closed meanwhile is noticed, and the check opens a new
//! one; a TCP check always connects, since connecting is what it checks.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;
use tokio::time::timeout_at;

/// The largest health-endpoint body read and judged; a longer one is judged by its status.
const MAX_BODY: usize = 64 * 1024;
/// Each connection's read buffer: a larger answer is read in several pieces.
const READ_BUFFER: usize = 2048;
/// How long a connection serves an instance's checks: a new one then proves again that
/// the instance accepts connections, resolves its name anew, and sees its certificate.
const KEEP_FOR: Duration = Duration::from_secs(300);

/// Why a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The address did not resolve.
    Dns,
    /// Nothing accepted the connection, or it broke before an answer.
    Connect,
    /// No answer within the check's timeout.
    Timeout,
    /// The TLS handshake failed: an untrusted or mismatched certificate, no common
    /// protocol, or no TLS at all.
    Tls,
    /// An answer outside 2xx.
    Status,
    /// A body that says the instance is down, or that could not be read.
    Body,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dns => "dns",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::Status => "status",
            Self::Body => "body",
        }
    }
}

/// Why a passing check is still a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warning {
    /// The body said `{"status": "degraded"}`.
    Degraded,
    /// Slower than the slow threshold.
    Slow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Warn(Warning),
    Fail(Reason),
}

/// A check's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub verdict: Verdict,
    pub latency: Duration,
    /// What happened, for people (no secrets: addresses and status codes only).
    pub detail: String,
}

/// How to check an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `GET path`: 2xx passes; over TLS when `tls` is set.
    Http { path: String, tls: Option<Tls> },
    /// A TCP connection that is accepted passes.
    Tcp,
}

/// How an HTTPS check treats the instance's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// Whether the certificate must be trusted by the system's store and name the
    /// server; without, any certificate (a self-signed one, say) is accepted, though
    /// the handshake's signatures still count.
    pub verify: bool,
    /// The name sent and checked, when not the address (an instance registered by its
    /// IP with a certificate for its DNS name).
    pub server_name: Option<String>,
}

/// An open HTTP/1.1 connection to one instance, kept for its next check; dropping it
/// closes the connection.
#[derive(Debug)]
pub struct Kept {
    address: String,
    port: u16,
    tls: Option<Tls>,
    opened: Instant,
    sender: SendRequest<Empty<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Checks `address:port` within `timeout`; slower than `slow` is a warning. `kept` is
/// the connection the last check left open; the one to keep for the next is returned.
pub async fn check(
    address: &str,
    port: u16,
    method: &Method,
    timeout: Duration,
    slow: Duration,
    kept: Option<Kept>,
) -> (Probe, Option<Kept>) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut keep = None;
    let result = attempt(address, port, method, deadline, kept, &mut keep).await;
    let latency = started.elapsed();
    (judge(result, latency, slow), keep)
}

fn judge(result: Result<Verdict, Failure>, latency: Duration, slow: Duration) -> Probe {
    match result {
        Ok(verdict) => {
            let verdict = match verdict {
                Verdict::Pass if latency > slow => Verdict::Warn(Warning::Slow),
                other => other,
            };
            let detail = match verdict {
                Verdict::Pass => "passed".to_owned(),
                Verdict::Warn(Warning::Slow) => {
                    format!("answered in {latency:?}, slower than {slow:?}")
                }
                Verdict::Warn(Warning::Degraded) => "reports itself degraded".to_owned(),
                Verdict::Fail(_) => "failed".to_owned(),
            };
            Probe {
                verdict,
                latency,
                detail,
            }
        }
        Err((reason, detail)) => Probe {
            verdict: Verdict::Fail(reason),
            latency,
            detail,
        },
    }
}

type Failure = (Reason, String);

fn timed_out() -> Failure {
    (
        Reason::Timeout,
        "no answer within the check timeout".to_owned(),
    )
}

async fn attempt(
    address: &str,
    port: u16,
    method: &Method,
    deadline: tokio::time::Instant,
    kept: Option<Kept>,
    keep: &mut Option<Kept>,
) -> Result<Verdict, Failure> {
    let Method::Http { path, tls } = method else {
        return connect(address, port, deadline)
            .await
            .map(|_| Verdict::Pass);
    };
    let request = || {
        http::Request::get(path.as_str())
            .header(http::header::HOST, host_header(address, port))
            .header(http::header::USER_AGENT, "concierge-health-monitor")
            .body(Empty::<Bytes>::new())
            .map_err(|e| {
                (
                    Reason::Connect,
                    format!("invalid health endpoint {path:?}: {e}"),
                )
            })
    };
    // The kept connection, if it is to the same place the same way, young enough, and
    // still open. One the instance closed just as we sent, or one a middlebox dropped
    // without a word (no answer in half the time), is no verdict on the instance: a new
    // connection decides, in the time left.
    let usable = |k: &Kept| {
        k.address == address && k.port == port && k.tls == *tls && k.opened.elapsed() < KEEP_FOR
    };
    let reused = match kept.filter(usable) {
        Some(mut kept) => {
            let now = tokio::time::Instant::now();
            let patience = now + deadline.saturating_duration_since(now) / 2;
            match timeout_at(patience, kept.sender.ready()).await {
                Ok(Ok(())) => {
                    match timeout_at(patience, kept.sender.send_request(request()?)).await {
                        Ok(Ok(response)) => Some((kept, response)),
                        _ => None,
                    }
                }
                _ => None,
            }
        }
        None => None,
    };
    let (connection, response) = match reused {
        Some(answer) => answer,
        None => {
            let mut connection = handshake(address, port, tls.as_ref(), deadline).await?;
            let answer = timeout_at(deadline, connection.sender.send_request(request()?)).await;
            match answer {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) => {
                    return Err((Reason::Connect, format!("the connection broke: {e}")));
                }
                Ok(Ok(response)) => (connection, response),
            }
        }
    };
    let status = response.status();
    let body = match timeout_at(deadline, read_head_of(response.into_body())).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(e)) => return Err((Reason::Body, format!("the body could not be read: {e}"))),
        Ok(Ok(body)) => body,
    };
    // Read to the end: the connection may serve the next check (unless the instance
    // said `Connection: close`, which its next check will find).
    if body.is_some() {
        *keep = Some(connection);
    }
    if !status.is_success() {
        return Err((Reason::Status, format!("answered {}", status.as_u16())));
    }
    let Some(body) = body else {
        // A long page (an HTML `/`, a detailed actuator report) is judged by its status
        // alone, as Consul judges every HTTP check.
        return Ok(Verdict::Pass);
    };
    judge_body(&body).map_err(|said| (Reason::Body, format!("the body says {said:?}")))
}

/// `address:port` as a `Host` header writes it: an IPv6 address in brackets.
fn host_header(address: &str, port: u16) -> String {
    if address.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// The whole body if it is at most `MAX_BODY` bytes, else `None` (read no further).
async fn read_head_of(mut body: hyper::body::Incoming) -> Result<Option<Vec<u8>>, hyper::Error> {
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if read.len() + data.len() > MAX_BODY {
                return Ok(None);
            }
            read.extend_from_slice(&data);
        }
    }
    Ok(Some(read))
}

/// Resolves and connects, within the deadline.
async fn connect(
    address: &str,
    port: u16,
    deadline: tokio::time::Instant,
) -> Result<tokio::net::TcpStream, Failure> {
    let mut addresses = timeout_at(deadline, tokio::net::lookup_host((address, port)))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| (Reason::Dns, format!("{address} does not resolve: {e}")))?;
    // Never a cloud's metadata service, whatever name leads there (`common::address`):
    // the first address that is not one, as the gateway connects.
    let mut refusal = None;
    let target = addresses
        .find(|target| match common::address::refused(target.ip()) {
            Some(why) => {
                refusal.get_or_insert((
                    Reason::Connect,
                    format!("{address} resolves to {}, {why}: not checked", target.ip()),
                ));
                false
            }
            None => true,
        })
        .ok_or_else(|| {
            refusal.unwrap_or_else(|| (Reason::Dns, format!("{address} resolves to nothing")))
        })?;
    timeout_at(deadline, tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| (Reason::Connect, format!("cannot connect to {target}: {e}")))
}

/// A new HTTP/1.1 connection, its driver running.
async fn handshake(
    address: &str,
    port: u16,
    tls: Option<&Tls>,
    deadline: tokio::time::Instant,
) -> Result<Kept, Failure> {
    let stream = connect(address, port, deadline).await?;
    let _ = stream.set_nodelay(true);
    let driver = match tls {
        None => http_handshake(stream, deadline).await?,
        Some(tls) => {
            let name = tls.server_name.as_deref().unwrap_or(address);
            let name = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| (Reason::Tls, format!("{name} is no TLS server name: {e}")))?;
            let connector = tokio_rustls::TlsConnector::from(client_config(tls)?);
            let stream = timeout_at(deadline, connector.connect(name, stream))
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| (Reason::Tls, format!("TLS handshake failed: {e}")))?;
            http_handshake(stream, deadline).await?
        }
    };
    let (sender, driver) = driver;
    Ok(Kept {
        address: address.to_owned(),
        port,
        tls: tls.cloned(),
        opened: Instant::now(),
        sender,
        driver,
    })
}

/// HTTP/1.1 over `stream`: the request sender, and the task driving the connection.
async fn http_handshake<S>(
    stream: S,
    deadline: tokio::time::Instant,
) -> Result<(SendRequest<Empty<Bytes>>, JoinHandle<()>), Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = timeout_at(
        deadline,
        // Health answers are small, and 10,000 kept connections each holding hyper's
        // default 8 KiB read buffer would be most of the monitor's memory.
        hyper::client::conn::http1::Builder::new()
            .read_buf_exact_size(Some(READ_BUFFER))
            .handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| timed_out())?
    .map_err(|e| (Reason::Connect, format!("HTTP handshake failed: {e}")))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, driver))
}

/// The TLS client configuration for `tls`, built once: loading the trust store is slow.
fn client_config(tls: &Tls) -> Result<Arc<rustls::ClientConfig>, Failure> {
    static VERIFY: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    static SKIP: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    let provider = || Arc::new(rustls::crypto::ring::default_provider());
    let built = match tls.verify {
        true => VERIFY.get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no trusted certificates in the system's store".to_owned());
            }
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(with_http1(config)))
        }),
        false => SKIP.get_or_init(|| {
            let provider = provider();
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Ok(Arc::new(with_http1(config)))
        }),
    };
    built.clone().map_err(|e| (Reason::Tls, e))
}

fn with_http1(mut config: rustls::ClientConfig) -> rustls::ClientConfig {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// `tls_skip_verify`: any certificate is accepted, but the handshake's signatures are
/// still checked against it (the peer holds the key of the certificate it showed).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A health body's own verdict: `{"status": "degraded"}` warns, a status that means down
/// fails; anything else (or no JSON at all) passes on the 2xx alone.
fn judge_body(body: &[u8]) -> Result<Verdict, String> {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(Verdict::Pass);
    };
    match json.get("status").and_then(|s| s.as_str()) {
        Some(status) => match status.to_ascii_lowercase().as_str() {
            "degraded" | "warn" | "warning" => Ok(Verdict::Warn(Warning::Degraded)),
            "down" | "fail" | "failed" | "unhealthy" | "offline" | "error" => {
                Err(status.chars().take(32).collect())
            }
            _ => Ok(Verdict::Pass),
        },
        None => Ok(Verdict::Pass),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// How a test server ends a connection after its first answer.
    #[derive(Clone, Copy)]
    enum Close {
        Never,
        /// `Connection: close`, then close.
        Announced,
        /// Close without a word, as an idle timeout does.
        Silently,
    }

    /// A loopback HTTP/1.1 server answering `{"status":"ok"}`, counting its connections;
    /// aborting the returned task stops it and closes every connection.
    async fn server(close: Close) -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                connections.spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            buffer.drain(..end + 4);
                            let header = match close {
                                Close::Announced => "Connection: close\r\n",
                                _ => "",
                            };
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: 15\r\n{header}\r\n{{\"status\":\"ok\"}}"
                            );
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            if !matches!(close, Close::Never) {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, accepted, task)
    }

    fn plain() -> Method {
        Method::Http {
            path: "/health".into(),
            tls: None,
        }
    }

    async fn checks(port: u16, count: usize) -> Vec<Verdict> {
        let method = plain();
        let mut kept = None;
        let mut verdicts = Vec::new();
        for _ in 0..count {
            let (probe, next) = check(
                "127.0.0.1",
                port,
                &method,
                Duration::from_secs(5),
                Duration::from_secs(5),
                kept,
            )
            .await;
            verdicts.push(probe.verdict);
            kept = next;
            // Time for a closing instance's FIN to arrive, as between real checks.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        verdicts
    }

    #[tokio::test]
    async fn one_connection_serves_every_check_of_an_instance() {
        let (port, accepted, _server) = server(Close::Never).await;
        assert_eq!(checks(port, 3).await, [Verdict::Pass; 3]);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_instance_closed_is_replaced_without_a_failure() {
        for close in [Close::Announced, Close::Silently] {
            let (port, accepted, _server) = server(close).await;
            assert_eq!(checks(port, 3).await, [Verdict::Pass; 3]);
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
        }
    }

    #[tokio::test]
    async fn a_kept_connection_serves_only_checks_made_the_same_way() {
        let (port, accepted, _server) = server(Close::Never).await;
        let second = Duration::from_secs(1);
        let plain = plain();
        let (probe, kept) = check("127.0.0.1", port, &plain, second, second, None).await;
        assert_eq!(probe.verdict, Verdict::Pass);
        // The instance now says HTTPS: the plain connection must not pass for it.
        let https = Method::Http {
            path: "/health".into(),
            tls: Some(Tls {
                verify: false,
                server_name: None,
            }),
        };
        // (This server never answers a ClientHello: the handshake times out.)
        let (probe, _) = check("127.0.0.1", port, &https, second, second, kept).await;
        assert!(matches!(probe.verdict, Verdict::Fail(_)), "{probe:?}");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "a new connection, not the kept one"
        );
    }

    #[tokio::test]
    async fn a_kept_connection_does_not_hide_a_dead_instance() {
        let (port, _, server) = server(Close::Never).await;
        let method = plain();
        let second = Duration::from_secs(1);
        let (probe, kept) = check("127.0.0.1", port, &method, second, second, None).await;
        assert_eq!(probe.verdict, Verdict::Pass);
        assert!(kept.is_some());
        server.abort();
        let _ = server.await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (probe, kept) = check("127.0.0.1", port, &method, second, second, kept).await;
        assert_eq!(probe.verdict, Verdict::Fail(Reason::Connect), "{probe:?}");
        assert!(kept.is_none());
    }

    /// A server that answers one request with `status` and a body of `len` bytes.
    async fn long_page(status: u16, len: usize) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: {len}\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.write_all(&vec![b'<'; len]).await;
        });
        port
    }

    #[tokio::test]
    async fn a_long_page_is_judged_by_its_status() {
        let second = Duration::from_secs(2);
        let port = long_page(200, 100 * 1024).await;
        let (probe, _) = check("127.0.0.1", port, &plain(), second, second, None).await;
        assert_eq!(probe.verdict, Verdict::Pass, "{probe:?}");
        let port = long_page(500, 100 * 1024).await;
        let (probe, _) = check("127.0.0.1", port, &plain(), second, second, None).await;
        assert_eq!(probe.verdict, Verdict::Fail(Reason::Status), "{probe:?}");
    }

    #[tokio::test]
    async fn a_metadata_address_is_never_checked() {
        let second = Duration::from_secs(2);
        for method in [plain(), Method::Tcp] {
            for address in ["169.254.169.254", "fd00:ec2::254"] {
                let (probe, _) = check(address, 80, &method, second, second, None).await;
                assert_eq!(probe.verdict, Verdict::Fail(Reason::Connect), "{probe:?}");
                assert!(
                    probe.detail.contains("metadata"),
                    "{address}: {}",
                    probe.detail
                );
            }
        }
    }

    #[test]
    fn an_ipv6_host_goes_in_brackets() {
        assert_eq!(host_header("::1", 8080), "[::1]:8080");
        assert_eq!(host_header("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(host_header("db.internal", 5432), "db.internal:5432");
    }

    #[test]
    fn bodies_judge_themselves() {
        assert_eq!(judge_body(br#"{"status":"ok"}"#), Ok(Verdict::Pass));
        assert_eq!(judge_body(b"plain text"), Ok(Verdict::Pass));
        assert_eq!(
            judge_body(br#"{"status":"Degraded"}"#),
            Ok(Verdict::Warn(Warning::Degraded))
        );
        assert_eq!(judge_body(br#"{"status":"down"}"#), Err("down".to_owned()));
    }
}
