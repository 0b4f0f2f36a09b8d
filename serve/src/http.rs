//! The daemon's HTTP listener (`--http ADDR`): `GET /metrics` in the Prometheus text format,
//! and a browser page (`GET /`) that talks to the daemon over a WebSocket (`GET /ws`).
//!
//! The WebSocket carries the daemon's own protocol (docs/protocol.md), one protocol message per
//! binary WebSocket message both ways: the listener relays each browser connection to the
//! daemon's Unix socket, so a browser is one more client, with the same handshake, limits and
//! errors as any other. The listener binds loopback unless told otherwise; a wider address needs
//! `--http-token`, and every request must then carry it (`Authorization: Bearer TOKEN`, or
//! `?token=TOKEN` where a browser cannot set headers: the page and its WebSocket).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::listener::{ServeError, Shared};
use crate::protocol::MAX_MESSAGE;

/// The browser page (HTML, CSS and JavaScript in one file, no dependencies).
const PAGE: &str = include_str!("page.html");

/// What the handlers share.
struct HttpState {
    token: Option<String>,
    shared: Arc<Shared>,
    socket: PathBuf,
}

/// A running HTTP listener; stopped when dropped.
pub(crate) struct HttpServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// Binds `addr` (errors are reported here) and serves on its own thread (`ls-http`).
pub(crate) fn start(
    addr: SocketAddr,
    token: Option<String>,
    shared: Arc<Shared>,
    socket: PathBuf,
) -> Result<HttpServer, ServeError> {
    let fail = |e: std::io::Error| ServeError::Http { addr, message: e.to_string() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(fail)?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).map_err(fail)?;
    let state = Arc::new(HttpState { token, shared, socket });
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/avatars", get(avatars))
        .route("/ws", get(ws))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("ls-http".into())
        .spawn(move || {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = rt.block_on(async move { serve.await }) {
                tracing::warn!("HTTP listener: {e}");
            }
        })
        .map_err(fail)?;
    tracing::info!(%addr, "HTTP listener: / (browser page), /ws, /avatars, /metrics");
    Ok(HttpServer { stop: Some(stop), handle: Some(handle) })
}

impl Drop for HttpServer {
    /// Stops accepting; waits a moment for open connections (the daemon has closed their
    /// sessions by now), then leaves the thread to end on its own.
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while !h.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

/// Compares in time that depends on the lengths only (a token is not guessed byte by byte).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Whether the request carries the token (when one is set), as a bearer header or `?token=`.
fn authorized(st: &HttpState, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
    let Some(token) = &st.token else { return true };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.as_bytes(), token.as_bytes()));
    bearer || query.get("token").is_some_and(|t| same(t.as_bytes(), token.as_bytes()))
}

fn unauthorized() -> Response {
    let m = "unauthorized: send the daemon's --http-token as `Authorization: Bearer TOKEN` or `?token=TOKEN`\n";
    (StatusCode::UNAUTHORIZED, m).into_response()
}

/// Every route's guard: the token (when one is set), before any other extractor runs.
async fn require_token(
    State(st): State<Arc<HttpState>>,
    Query(q): Query<HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    if !authorized(&st, request.headers(), &q) {
        return unauthorized();
    }
    next.run(request).await
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    match crate::metrics::render(&st.shared) {
        Ok(body) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the metrics: {e}\n")).into_response(),
    }
}

/// The avatar names, for the page's list.
async fn avatars(State(st): State<Arc<HttpState>>) -> Response {
    let names: Vec<String> = st.shared.registry.list().into_iter().map(|a| a.name).collect();
    let body = serde_json::json!({ "avatars": names }).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn ws(State(st): State<Arc<HttpState>>, upgrade: WebSocketUpgrade) -> Response {
    let socket = st.socket.clone();
    upgrade.max_message_size(MAX_MESSAGE + 4).on_upgrade(move |ws| relay(ws, socket))
}

/// Relays one browser connection to the daemon's socket: each binary WebSocket message is one
/// protocol message to the daemon, each protocol message from the daemon one binary WebSocket
/// message. Either side closing closes the other.
async fn relay(ws: WebSocket, socket: PathBuf) {
    let unix = match tokio::net::UnixStream::connect(&socket).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!("WebSocket relay: cannot reach {}: {e}", socket.display());
            return;
        }
    };
    let (mut from_daemon, mut to_daemon) = unix.into_split();
    let (mut to_browser, mut from_browser) = ws.split();
    let up = async move {
        while let Some(Ok(msg)) = from_browser.next().await {
            match msg {
                Message::Binary(b) if to_daemon.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = to_daemon.shutdown().await;
    };
    let down = async move {
        let mut head = [0u8; 5];
        loop {
            if from_daemon.read_exact(&mut head).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len == 0 || len > MAX_MESSAGE {
                break;
            }
            let mut msg = vec![0u8; 4 + len];
            msg[..5].copy_from_slice(&head);
            if from_daemon.read_exact(&mut msg[5..]).await.is_err() {
                break;
            }
            if to_browser.send(Message::Binary(msg.into())).await.is_err() {
                break;
            }
        }
        let _ = to_browser.close().await;
    };
    futures_util::future::join(up, down).await;
}
