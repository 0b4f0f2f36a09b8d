//! The daemon's HTTP listener (`--http ADDR`): `GET /metrics` in the Prometheus text format,
//! and a browser page (`GET /`, its script `/page.js` and style `/page.css`) that talks to the
//! daemon over a WebSocket (`GET /ws`).
//!
//! The WebSocket carries the daemon's own protocol (docs/protocol.md), one protocol message per
//! binary WebSocket message both ways: the listener relays each browser connection to the
//! daemon's Unix socket, so a browser is one more client, with the same handshake, limits and
//! errors as any other.
//!
//! Every request passes [`guard`] first: its `Host` must be one the listener answers to (DNS
//! rebinding), its `Origin`, when it has one, the listener's own or one allowed
//! (`--http-allow-origin`: cross-site WebSocket hijacking), and with `--http-token` it must be
//! authenticated. Connections are capped and timed ([`accept`]), and so are WebSocket relays,
//! in number and in the rate of what they send ([`relay`]). docs/security.md has the whole
//! picture.

mod accept;
mod guard;
mod relay;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use tokio::sync::Semaphore;

use crate::daemon::error::ServeError;
pub(crate) use crate::daemon::http_stats::{Counters, Refused};
use crate::daemon::shared::Shared;
use crate::protocol::MAX_MESSAGE;
use crate::settings::http::WS_PROTOCOL;
use crate::settings::HttpSettings;

/// The browser page: HTML, its script and its style, each served as a file of its own so that
/// the Content-Security-Policy needs no `'unsafe-inline'`.
const PAGE: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");
const PAGE_CSS: &str = include_str!("page.css");

/// Counts one open thing (a connection, a relay) while it lives.
pub(crate) struct Open(Arc<Shared>, fn(&Counters) -> &AtomicUsize);

impl Open {
    pub(crate) fn new(shared: Arc<Shared>, which: fn(&Counters) -> &AtomicUsize) -> Self {
        which(&shared.http).fetch_add(1, Ordering::Relaxed);
        Self(shared, which)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        (self.1)(&self.0.http).fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the handlers share.
struct HttpState {
    policy: guard::Policy,
    shared: Arc<Shared>,
    socket: PathBuf,
    websockets: Arc<Semaphore>,
    max_websockets: usize,
    rates: relay::Rates,
    /// Longest a frame may wait to be written to a browser that does not read.
    send_timeout: Duration,
}

/// A running HTTP listener; stopped when dropped.
pub(crate) struct HttpServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// Binds the address (errors are reported here) and serves on its own thread (`ls-http`), at
/// most `max_connections` connections at once.
pub(crate) fn start(
    http: &HttpSettings,
    max_connections: usize,
    shared: Arc<Shared>,
    socket: PathBuf,
) -> Result<HttpServer, ServeError> {
    let addr = http.addr;
    let fail = |source: std::io::Error| ServeError::Http { addr, source };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(fail)?;
    let listener = rt.block_on(async { bind(addr) }).map_err(fail)?;
    let send_timeout = shared.registry.settings.client_timeout;
    let state = Arc::new(HttpState {
        policy: guard::Policy::new(http),
        shared,
        socket,
        websockets: Arc::new(Semaphore::new(http.max_websockets)),
        max_websockets: http.max_websockets,
        rates: relay::Rates { messages: http.ws_message_rate, bytes: http.ws_byte_rate },
        send_timeout,
    });
    let app = router(state.clone());
    let limits =
        accept::Limits { max_connections, header_timeout: http.header_timeout, idle_timeout: http.idle_timeout };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("ls-http".into())
        .spawn(move || rt.block_on(accept::serve(listener, app, limits, state.shared.clone(), stopped)))
        .map_err(fail)?;
    tracing::info!(
        %addr,
        max_connections,
        max_websockets = http.max_websockets,
        "HTTP listener: / (browser page), /ws, /avatars, /metrics"
    );
    Ok(HttpServer { stop: Some(stop), handle: Some(handle) })
}

/// Binds with a deep accept queue (the kernel's `somaxconn` caps it), so that a burst of
/// connections waits there, holding no descriptor of ours, rather than being dropped.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The routes, behind the guard (every request, known route or not).
fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/page.js", get(|| async { asset("text/javascript; charset=utf-8", PAGE_JS) }))
        .route("/page.css", get(|| async { asset("text/css; charset=utf-8", PAGE_CSS) }))
        .route("/metrics", get(metrics))
        .route("/avatars", get(avatars))
        .route("/ws", get(ws))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::guard))
        .with_state(state)
}

impl Drop for HttpServer {
    /// Stops accepting and closes every connection (the daemon has closed their sessions by
    /// now); waits a moment for the thread to end.
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

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    match crate::daemon::metrics::render(&st.shared) {
        Ok(body) => ([(header::CONTENT_TYPE, crate::daemon::metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the metrics: {e}\n")).into_response(),
    }
}

/// The avatar names, for the page's list.
async fn avatars(State(st): State<Arc<HttpState>>) -> Response {
    let names: Vec<String> = st.shared.registry.list().into_iter().map(|a| a.name).collect();
    let body = serde_json::json!({ "avatars": names }).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Upgrades to a WebSocket relayed to the daemon's socket, if a relay slot is free (503 if
/// not). The subprotocol answered is always `lipsync.v2` (never a token the client offered).
async fn ws(
    State(st): State<Arc<HttpState>>,
    Extension(connection): Extension<accept::ConnectionSlot>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Ok(slot) = st.websockets.clone().try_acquire_owned() else {
        st.shared.http.refuse(Refused::WebSocketsBusy);
        let m = format!("busy: the daemon's maximum of {} WebSocket connections are open\n", st.max_websockets);
        return (StatusCode::SERVICE_UNAVAILABLE, m).into_response();
    };
    let (shared, socket, rates, send_timeout) = (st.shared.clone(), st.socket.clone(), st.rates, st.send_timeout);
    upgrade.protocols([WS_PROTOCOL]).max_message_size(MAX_MESSAGE + 4).max_frame_size(MAX_MESSAGE + 4).on_upgrade(
        move |ws| async move {
            let _open = Open::new(shared.clone(), |c| &c.websockets);
            if let Some(v) = relay::relay(ws, socket, rates, send_timeout, (connection, slot)).await {
                tracing::warn!("WebSocket relay: closed a connection that {v}");
                shared.http.refuse(if v == relay::Violation::Framing { Refused::Framing } else { Refused::Rate });
            }
        },
    )
}
