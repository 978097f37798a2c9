//! Restarting a container through the Docker Engine API on a unix socket (Docker's, or
//! Podman's `podman system service`): what Docker itself never does for an unhealthy
//! container (moby/moby#28400).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// The API version asked for; Docker 20.10+ and Podman 3+ serve it.
const API_VERSION: &str = "v1.41";

/// `POST /containers/{name}/restart`, giving the container `grace` to stop.
pub async fn restart(socket: &Path, container: &str, grace: Duration) -> Result<(), String> {
    if container.is_empty()
        || !container
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!("{container:?} is not a container name or id"));
    }
    let call = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot reach the engine at {}: {e}", socket.display()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("engine handshake failed: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = http::Request::post(format!(
            "/{API_VERSION}/containers/{container}/restart?t={}",
            grace.as_secs()
        ))
        .header(http::header::HOST, "docker")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("the engine did not answer: {e}"))?;
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        driver.abort();
        if status.is_success() {
            Ok(())
        } else {
            let body = body.unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_default();
            Err(format!("the engine answered {status}: {message}"))
        }
    };
    tokio::time::timeout(grace + Duration::from_secs(30), call)
        .await
        .map_err(|_| "the engine did not finish the restart in time".to_owned())?
}
