//! A minimal HTTP/1.1 client over std, enough for the xtask to drive its own services.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Sends one request to a loopback port and returns the status and body.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP answer from {addr}");
    };
    let status = head
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let chunked = head.lines().any(|line| {
        line.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// A chunked body's content (Prometheus' API answers large results chunked).
fn dechunk(mut body: &str) -> Result<String> {
    let mut content = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("a cut-off chunk size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16)
            .context("a malformed chunk size")?;
        if size == 0 {
            return Ok(content);
        }
        content.push_str(rest.get(..size).context("a cut-off chunk")?);
        body = rest.get(size + 2..).context("a chunk without its CRLF")?;
    }
}

/// `GET path`'s status, or `None` if nothing answered.
pub fn status(port: u16, path: &str) -> Option<u16> {
    request(port, "GET", path, &[], None)
        .ok()
        .map(|(status, _)| status)
}
