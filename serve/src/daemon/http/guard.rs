//! What every HTTP request must pass, in this order:
//!
//! 1. **Host** (against DNS rebinding): the `Host` header must name the listener (its address;
//!    on loopback also `localhost`, `127.0.0.1` and `[::1]`, with the port) or a name given
//!    with `--http-host`. Otherwise 421, computed from the settings, never from the request.
//! 2. **Origin** (against cross-site WebSocket hijacking: browsers apply no same-origin rule to
//!    WebSockets): a request that carries `Origin` must come from the listener's own origins or
//!    one given with `--http-allow-origin`; `null` never passes. Otherwise 403 and a log line
//!    naming the origin. Requests without `Origin` (not from a browser page) pass to 3.
//! 3. **Token** (with `--http-token`): `Authorization: Bearer TOKEN`; or the session cookie a
//!    browser got by loading `/?token=TOKEN` once (answered 303 to the bare URL with an
//!    `HttpOnly; SameSite=Strict` cookie holding a random session id, never the token); or,
//!    for WebSocket clients, the subprotocol `lipsync.token.TOKEN` (answered `lipsync.v2`).
//!    Otherwise 401. The token is in no log line and no response.
//!
//! Every response carries a Content-Security-Policy without `'unsafe-inline'`,
//! `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY` and `Referrer-Policy:
//! no-referrer`.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lipsync_pipelines::runtime::lock;

use super::{HttpState, Refused};
use crate::settings::http::{normalize_host, normalize_origin, WS_TOKEN_PREFIX};
use crate::settings::HttpSettings;

/// The page's policy: its own script and style only, its own origin to connect to.
pub(super) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
     img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// Browser sessions kept (each `/?token=` load makes one; the oldest goes first).
const MAX_SESSIONS: usize = 256;
/// Refusals logged per window (a flood of refused requests does not flood the log).
const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Why a request is refused: the reason counted, the status and the text answered.
#[derive(Debug)]
pub(super) struct Refusal(Refused, StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.1, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], self.2).into_response()
    }
}

/// What a request that passes may do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// Go on to its route.
    Pass,
    /// Get a session cookie and a redirect to the bare URL (a page load with a valid `?token=`).
    Login,
}

/// The checks, from the settings.
pub(super) struct Policy {
    hosts: Vec<String>,
    origins: Vec<String>,
    token: Option<String>,
    /// The session cookie's name (per port: cookies are shared by every port of a host).
    cookie: String,
    sessions: Mutex<VecDeque<String>>,
    log: LogLimit,
}

/// Compares in time that depends on the lengths only (a token is not guessed byte by byte).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// A header's values as text, split at commas (`Sec-WebSocket-Protocol`) or semicolons.
fn values<'a>(headers: &'a HeaderMap, name: header::HeaderName, sep: char) -> impl Iterator<Item = &'a str> + 'a {
    headers.get_all(name).into_iter().filter_map(|v| v.to_str().ok()).flat_map(move |v| v.split(sep)).map(str::trim)
}

/// At most 120 characters of a client's header value, quoted and escaped for a log line.
fn shown(v: &str) -> String {
    format!("{:?}", v.chars().take(120).collect::<String>())
}

impl Policy {
    pub(super) fn new(http: &HttpSettings) -> Self {
        Self {
            hosts: http.hosts.clone(),
            origins: http.origins.clone(),
            token: http.token.as_ref().map(|t| t.0.clone()),
            cookie: format!("lipsync_session_{}", http.addr.port()),
            sessions: Mutex::new(VecDeque::new()),
            log: LogLimit::default(),
        }
    }

    /// The checks of the module's documentation, in order.
    pub(super) fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<Access, Refusal> {
        let path = uri.path();
        // Exactly one Host; an absolute-form target's authority must pass as well.
        let mut given = headers.get_all(header::HOST).iter();
        let (Some(host), None) = (given.next(), given.next()) else {
            return Err(Refusal(
                Refused::Host,
                StatusCode::BAD_REQUEST,
                "bad request: exactly one Host header is required\n".into(),
            ));
        };
        let host = host.to_str().unwrap_or("<not text>");
        for name in std::iter::once(host).chain(uri.authority().map(|a| a.as_str())) {
            if !normalize_host(name).is_some_and(|h| self.hosts.contains(&h)) {
                self.log.warn(|| {
                    format!(
                        "HTTP: refused a request to {} for host {}: not one this listener answers to",
                        shown(path),
                        shown(name)
                    )
                });
                return Err(Refusal(
                    Refused::Host,
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected request: this listener does not answer to that host (see --http-host)\n".into(),
                ));
            }
        }
        let mut origins = headers.get_all(header::ORIGIN).iter();
        if let Some(origin) = origins.next() {
            let text = origin.to_str().unwrap_or("<not text>");
            let allowed = normalize_origin(text).is_some_and(|o| self.origins.contains(&o));
            if !allowed || origins.next().is_some() {
                self.log.warn(|| {
                    format!(
                        "HTTP: refused a request to {} from origin {}: not the listener's own nor one given with --http-allow-origin",
                        shown(path),
                        shown(text)
                    )
                });
                return Err(Refusal(
                    Refused::Origin,
                    StatusCode::FORBIDDEN,
                    format!(
                        "forbidden: pages of origin {} may not use this listener (see --http-allow-origin)\n",
                        shown(text)
                    ),
                ));
            }
        }
        let Some(token) = &self.token else { return Ok(Access::Pass) };
        if path == "/" {
            let q = Query::<HashMap<String, String>>::try_from_uri(uri);
            if let Some(given) = q.ok().and_then(|Query(q)| q.get("token").cloned()) {
                return if same(given.as_bytes(), token.as_bytes()) { Ok(Access::Login) } else { Err(unauthorized()) };
            }
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()));
        let subprotocol = values(headers, header::SEC_WEBSOCKET_PROTOCOL, ',')
            .filter_map(|p| p.strip_prefix(WS_TOKEN_PREFIX))
            .any(|t| same(t.as_bytes(), token.as_bytes()));
        let cookie = values(headers, header::COOKIE, ';')
            .filter_map(|c| c.split_once('='))
            .any(|(name, id)| name == self.cookie && self.known_session(id));
        if bearer || subprotocol || cookie {
            Ok(Access::Pass)
        } else {
            tracing::debug!("HTTP: refused a request to {}: no valid token", shown(path));
            Err(unauthorized())
        }
    }

    fn known_session(&self, id: &str) -> bool {
        lock(&self.sessions).iter().fold(false, |found, s| found | same(s.as_bytes(), id.as_bytes()))
    }

    /// A new browser session: 303 to the bare URL, with its cookie.
    pub(super) fn login(&self) -> Response {
        let mut bytes = [0u8; 32];
        if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_err() {
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot make a session id\n").into_response();
        }
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        {
            let mut sessions = lock(&self.sessions);
            if sessions.len() >= MAX_SESSIONS {
                sessions.pop_front();
            }
            sessions.push_back(id.clone());
        }
        let cookie = format!("{}={id}; HttpOnly; SameSite=Strict; Path=/", self.cookie);
        let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

fn unauthorized() -> Refusal {
    Refusal(
        Refused::Token,
        StatusCode::UNAUTHORIZED,
        "unauthorized: send the daemon's --http-token as `Authorization: Bearer TOKEN`; a browser loads \
         /?token=TOKEN once (it then holds a cookie); a WebSocket client may offer the subprotocol \
         lipsync.token.TOKEN beside lipsync.v2\n"
            .into(),
    )
}

/// Every request's guard (before routing: unknown paths too).
pub(super) async fn guard(State(st): State<Arc<HttpState>>, request: Request, next: Next) -> Response {
    let verdict = st.policy.check(request.uri(), request.headers());
    let mut response = match verdict {
        Ok(Access::Pass) => next.run(request).await,
        Ok(Access::Login) => st.policy.login(),
        Err(refusal) => {
            st.shared.http.refuse(refusal.0);
            refusal.into_response()
        }
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// At most [`LOG_BURST`] warnings a [`LOG_WINDOW`]; the rest are counted and the count logged.
#[derive(Default)]
struct LogLimit(Mutex<Option<(Instant, u32, u64)>>);

impl LogLimit {
    fn warn(&self, line: impl FnOnce() -> String) {
        let mut w = lock(&self.0);
        let now = Instant::now();
        let (start, logged, dropped) = w.get_or_insert((now, 0, 0));
        if now.duration_since(*start) > LOG_WINDOW {
            if *dropped > 0 {
                tracing::warn!("HTTP: {dropped} more refused requests were not logged");
            }
            (*start, *logged, *dropped) = (now, 0, 0);
        }
        if *logged < LOG_BURST {
            *logged += 1;
            tracing::warn!("{}", line());
        } else {
            *dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(token: Option<&str>, allow: &[&str]) -> Policy {
        let http = crate::settings::http::HttpOptions {
            addr: Some("127.0.0.1:9100".into()),
            http_token: token.map(Into::into),
            http_allow_origin: Some(allow.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        let o = crate::ServeOptions { http, ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let s = crate::ServeOptions { socket: Some("s".into()), avatars: Some(dir.path().into()), ..o };
        Policy::new(&s.validate().unwrap().http.unwrap())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn status(r: Result<Access, Refusal>) -> u16 {
        r.map_or_else(|e| e.1.as_u16(), |a| if a == Access::Login { 303 } else { 200 })
    }

    #[test]
    fn hosts_then_origins_then_the_token() {
        let p = policy(None, &["http://127.0.0.2:8999"]);
        let check = |h: &[(&'static str, &str)]| status(p.check(&Uri::from_static("/ws"), &headers(h)));
        assert_eq!(check(&[("host", "127.0.0.1:9100")]), 200);
        assert_eq!(check(&[("host", "LOCALHOST:9100")]), 200);
        assert_eq!(check(&[("host", "[::1]:9100")]), 200);
        assert_eq!(check(&[]), 400);
        assert_eq!(check(&[("host", "127.0.0.1:9100"), ("host", "evil.example")]), 400, "two Hosts");
        assert_eq!(check(&[("host", "127.0.0.1:9100:80")]), 421);
        let absolute: Uri = "http://evil.example/ws".parse().unwrap();
        assert_eq!(status(p.check(&absolute, &headers(&[("host", "127.0.0.1:9100")]))), 421, "absolute-form target");
        let own: Uri = "http://localhost:9100/ws".parse().unwrap();
        assert_eq!(status(p.check(&own, &headers(&[("host", "127.0.0.1:9100")]))), 200);
        let two = [("host", "localhost:9100"), ("origin", "http://localhost:9100"), ("origin", "http://evil.example")];
        assert_eq!(check(&two), 403, "two Origins");
        assert_eq!(check(&[("host", "evil.example")]), 421);
        assert_eq!(check(&[("host", "evil.example:9100")]), 421);
        assert_eq!(check(&[("host", "127.0.0.1:9101")]), 421);
        assert_eq!(check(&[("host", "localhost:9100"), ("origin", "http://localhost:9100")]), 200);
        assert_eq!(check(&[("host", "localhost:9100"), ("origin", "http://127.0.0.2:8999")]), 200);
        assert_eq!(check(&[("host", "localhost:9100"), ("origin", "http://127.0.0.3:8999")]), 403);
        assert_eq!(check(&[("host", "localhost:9100"), ("origin", "null")]), 403);
        assert_eq!(check(&[("host", "localhost:9100"), ("origin", "https://localhost:9100")]), 403);
    }

    #[test]
    fn the_token_by_bearer_cookie_or_subprotocol_and_on_the_page_once() {
        let p = policy(Some("tok-1-0123456789"), &[]);
        let host = ("host", "127.0.0.1:9100");
        let check = |uri: &str, h: &[(&'static str, &str)]| {
            let mut all = vec![host];
            all.extend_from_slice(h);
            status(p.check(&uri.parse().unwrap(), &headers(&all)))
        };
        assert_eq!(check("/", &[]), 401);
        assert_eq!(check("/metrics", &[("authorization", "Bearer tok-1-0123456789")]), 200);
        assert_eq!(check("/metrics", &[("authorization", "Bearer tok-2-0123456789")]), 401);
        assert_eq!(check("/?token=tok-1-0123456789", &[]), 303);
        assert_eq!(check("/?token=nope", &[]), 401);
        assert_eq!(check("/ws?token=tok-1-0123456789", &[]), 401, "a query token only on the page");
        assert_eq!(check("/ws", &[("sec-websocket-protocol", "lipsync.v2, lipsync.token.tok-1-0123456789")]), 200);
        assert_eq!(check("/ws", &[("sec-websocket-protocol", "lipsync.v2, lipsync.token.tok")]), 401);
        let r = p.login();
        assert_eq!(r.status(), 303);
        assert_eq!(r.headers()[header::LOCATION], "/");
        let set = r.headers()[header::SET_COOKIE].to_str().unwrap().to_string();
        assert!(set.ends_with("; HttpOnly; SameSite=Strict; Path=/") && !set.contains("tok-1-0123456789"), "{set}");
        let pair = set.split(';').next().unwrap();
        assert!(pair.starts_with("lipsync_session_9100="));
        assert_eq!(check("/ws", &[("cookie", &format!("a=b; {pair}"))]), 200);
        assert_eq!(check("/ws", &[("cookie", "lipsync_session_9100=00")]), 401);
        for _ in 0..MAX_SESSIONS {
            p.login();
        }
        assert_eq!(check("/ws", &[("cookie", pair)]), 401, "the oldest session went");
    }
}
