//! HTTPS checks against real TLS servers: a certificate the system's store trusts passes,
//! one it does not (or one for another name) fails with the reason `tls`, unless the
//! instance opts out of verification or names the server; so does an instance that
//! speaks no TLS at all.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Mode, Stack, Upstream};

/// A certificate for `name` and its key: signed by `issuer`, or by itself.
fn leaf(
    name: &str,
    issuer: Option<&CertifiedIssuer<'_, KeyPair>>,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert.der().clone(), key)
}

/// A loopback HTTPS server answering `{"status":"ok"}` with `cert`; returns its port.
async fn https_upstream(cert: CertificateDer<'static>, key: KeyPair) -> u16 {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        buffer.drain(..end + 4);
                        let answer =
                            "HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}";
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn https_checks_verify_certificates_against_the_trust_store() {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let dir = testkit::TempDir::new("monitor-tls").unwrap();
    let trust_store = dir.path().join("ca.pem");
    std::fs::write(&trust_store, ca.pem()).unwrap();

    // The monitor's trust store holds only the test CA.
    let stack = Stack::start(None, &[("SSL_CERT_FILE", trust_store.to_str().unwrap())]).await;
    let (cert, key) = leaf("127.0.0.1", Some(&ca));
    let trusted = https_upstream(cert, key).await;
    let (cert, key) = leaf("127.0.0.1", None);
    let self_signed = https_upstream(cert, key).await;
    // Registered by its IP, with a certificate for its DNS name.
    let (cert, key) = leaf("web.internal.test", Some(&ca));
    let named = https_upstream(cert, key).await;
    let plain = Upstream::start(Mode::Healthy).await;

    let https = json!({"metadata": {"check": "https"}});
    let skip = json!({"metadata": {"check": "https", "tls_skip_verify": true}});
    let server_name =
        json!({"metadata": {"check": "https", "tls_server_name": "web.internal.test"}});
    let cases = [
        ("trusted", trusted, https.clone(), "healthy", None),
        ("named", named, server_name, "healthy", None),
        ("misnamed", named, https.clone(), "offline", Some("tls")),
        (
            "untrusted",
            self_signed,
            https.clone(),
            "offline",
            Some("tls"),
        ),
        ("skipped", self_signed, skip, "healthy", None),
        ("plain", plain.port, https, "offline", Some("tls")),
    ];
    for (name, port, extra, _, _) in &cases {
        stack
            .register(
                name,
                &format!("{name}-1"),
                "127.0.0.1",
                *port,
                extra.clone(),
            )
            .await;
    }
    for (name, _, _, state, reason) in &cases {
        let (view, _) = stack.wait_state(name, &format!("{name}-1"), state).await;
        assert_eq!(
            view["last_error"]["reason"].as_str(),
            *reason,
            "{name}: {view:#}"
        );
    }
    let page = stack.monitor_get("/metrics").await;
    let page = String::from_utf8_lossy(&page.body).into_owned();
    assert!(
        page.contains(r#"concierge_monitor_checks_total{outcome="fail",reason="tls"}"#),
        "{page}"
    );
}
