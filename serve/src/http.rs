//! The daemon's HTTP listener (`--http ADDR`): `GET /metrics` in the Prometheus text format.
//! It binds loopback unless told otherwise; a wider address needs `--http-token`, and every
//! request must then carry it (`Authorization: Bearer TOKEN`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::listener::{ServeError, Shared};

/// A running HTTP listener; stopped and joined when dropped.
pub(crate) struct HttpServer {
    server: Arc<tiny_http::Server>,
    handle: Option<JoinHandle<()>>,
}

/// Binds `addr` and serves on its own thread (`ls-http`).
pub(crate) fn start(addr: SocketAddr, token: Option<String>, shared: Arc<Shared>) -> Result<HttpServer, ServeError> {
    let server = tiny_http::Server::http(addr).map_err(|e| ServeError::Http { addr, message: e.to_string() })?;
    let server = Arc::new(server);
    let s = server.clone();
    let handle = std::thread::Builder::new()
        .name("ls-http".into())
        .spawn(move || {
            for request in s.incoming_requests() {
                respond(request, token.as_deref(), &shared);
            }
        })
        .map_err(|e| ServeError::Http { addr, message: e.to_string() })?;
    tracing::info!(%addr, "HTTP listener: /metrics");
    Ok(HttpServer { server, handle: Some(handle) })
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn text(status: u16, body: String, content_type: &str) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()).expect("a valid header");
    tiny_http::Response::from_string(body).with_status_code(status).with_header(header)
}

/// Whether the request carries the token (when one is set).
fn authorized(request: &tiny_http::Request, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    request
        .headers()
        .iter()
        .any(|h| h.field.equiv("Authorization") && h.value.as_str().strip_prefix("Bearer ").is_some_and(|t| t == token))
}

fn respond(request: tiny_http::Request, token: Option<&str>, shared: &Arc<Shared>) {
    let plain = "text/plain; charset=utf-8";
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let response = if !authorized(&request, token) {
        text(401, "unauthorized: send the daemon's --http-token as `Authorization: Bearer TOKEN`\n".into(), plain)
    } else if *request.method() != tiny_http::Method::Get {
        text(405, format!("{} is not allowed: only GET\n", request.method()), plain)
    } else if path == "/metrics" {
        match crate::metrics::render(shared) {
            Ok(body) => text(200, body, crate::metrics::CONTENT_TYPE),
            Err(e) => text(500, format!("cannot encode the metrics: {e}\n"), plain),
        }
    } else {
        text(404, format!("no such path {path}: this listener serves /metrics\n"), plain)
    };
    if let Err(e) = request.respond(response) {
        tracing::debug!("HTTP response not sent: {e}");
    }
}
