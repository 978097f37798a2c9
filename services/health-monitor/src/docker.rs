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

/// The label a container carries to be restarted for an instance of a service: a
/// registration names the container, and without the label any service could have any
/// container restarted (the vault's, say).
pub const SERVICE_LABEL: &str = "concierge.service";

/// Whether `container` carries `concierge.service=<service>`.
pub async fn labelled_for(socket: &Path, container: &str, service: &str) -> Result<bool, String> {
    check_name(container)?;
    let (status, body) = call(
        socket,
        http::Method::GET,
        &format!("/{API_VERSION}/containers/{container}/json"),
        Duration::from_secs(30),
    )
    .await?;
    if !status.is_success() {
        return Err(engine_error(status, &body));
    }
    let inspected: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| format!("the engine's description of {container} is not JSON: {e}"))?;
    Ok(inspected["Config"]["Labels"][SERVICE_LABEL].as_str() == Some(service))
}

/// `POST /containers/{name}/restart`, giving the container `grace` to stop.
pub async fn restart(socket: &Path, container: &str, grace: Duration) -> Result<(), String> {
    check_name(container)?;
    let (status, body) = call(
        socket,
        http::Method::POST,
        &format!(
            "/{API_VERSION}/containers/{container}/restart?t={}",
            grace.as_secs()
        ),
        grace + Duration::from_secs(30),
    )
    .await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(engine_error(status, &body))
    }
}

fn check_name(container: &str) -> Result<(), String> {
    if container.is_empty()
        || !container
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!("{container:?} is not a container name or id"));
    }
    Ok(())
}

fn engine_error(status: http::StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    format!("the engine answered {status}: {message}")
}

/// One call to the engine's API on its unix socket, within `limit`.
async fn call(
    socket: &Path,
    method: http::Method,
    path: &str,
    limit: Duration,
) -> Result<(http::StatusCode, Bytes), String> {
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
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("the engine did not answer: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        driver.abort();
        Ok((status, body))
    };
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| "the engine did not answer in time".to_owned())?
}
