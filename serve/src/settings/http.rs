//! The HTTP listener's settings (`--http` and the `--http-*` flags): its address and token, the
//! hosts it answers to and the origins whose pages may use it, and the bounds on its
//! connections. docs/security.md says what each one guards against.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use clap::Args;
use serde::Deserialize;

use super::{Limit, SettingsError};

/// Most HTTP connections at once: the default applies when the descriptor limit leaves room
/// for it (else what it leaves: see `crate::daemon::fds`); the maximum is checked before the
/// descriptor limit is known.
pub const MAX_CONNECTIONS: Limit<usize> = Limit::new("HTTP max connections", 1, 65_536, 256);
/// Seconds a request's head may take to arrive whole.
pub const HEADER_TIMEOUT_S: Limit<f64> = Limit::new("HTTP header timeout (s)", 0.1, 300.0, 10.0);
/// Seconds a connection may move no bytes before it is closed.
pub const IDLE_TIMEOUT_S: Limit<f64> = Limit::new("HTTP idle timeout (s)", 0.1, 3600.0, 5.0);
/// Messages per second a WebSocket may send, on average over two seconds.
pub const WS_MESSAGE_RATE: Limit<f64> = Limit::new("WebSocket message rate (1/s)", 1.0, 100_000.0, 200.0);
/// MiB per second a WebSocket may send, on average over two seconds.
pub const WS_MIB_RATE: Limit<f64> = Limit::new("WebSocket byte rate (MiB/s)", 0.1, 4096.0, 16.0);
/// Unix-socket connections that WebSocket relays can never take (the relays are capped at the
/// daemon's connection limit less these).
pub const UNIX_HEADROOM: usize = 16;
/// The subprotocol the WebSocket answers with (`Sec-WebSocket-Protocol`).
pub const WS_PROTOCOL: &str = "lipsync.v2";
/// The prefix of the subprotocol value that carries the token (`lipsync.token.TOKEN`).
pub const WS_TOKEN_PREFIX: &str = "lipsync.token.";

/// Fewest characters of an HTTP token (it may be guessed online, a few thousand a second).
pub const MIN_TOKEN: usize = 16;
/// Most characters of an HTTP token.
pub const MAX_TOKEN: usize = 512;

/// A secret that never shows in `Debug` output or summaries.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// Whether `b` may stand in an HTTP token (RFC 9110 `tchar`): so that a token goes unchanged in
/// a header, a cookie-free query and a WebSocket subprotocol.
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The HTTP listener's flags and config-file keys.
#[derive(Debug, Clone, Default, Args, Deserialize)]
pub struct HttpOptions {
    #[arg(
        long = "http",
        value_name = "ADDR",
        help = "Also serve HTTP on this address, e.g. 127.0.0.1:9100: the browser page (`/`), its WebSocket (`/ws`) and `/metrics` (Prometheus text). A non-loopback address needs --http-token; a wildcard one (0.0.0.0) needs --http-host too"
    )]
    #[serde(rename = "http")]
    pub addr: Option<String>,
    #[arg(
        long,
        value_name = "TOKEN",
        help = "The token every HTTP request must carry (16..=512 letters, digits or !#$%&'*+-.^_`|~): `Authorization: Bearer TOKEN`; a browser loads `/?token=TOKEN` once and gets a cookie; a WebSocket client may offer the subprotocol `lipsync.token.TOKEN`. Required to bind a non-loopback address. The command line is visible to other users (ps): prefer `http_token` in a --config file only you can read"
    )]
    pub http_token: Option<Secret>,
    #[arg(
        long,
        value_name = "NAME",
        help = "A host name (NAME or NAME:PORT) the HTTP listener answers to besides its own address (repeatable); requests naming any other `Host` get 421 (DNS rebinding). Its http and https origins may use the WebSocket"
    )]
    pub http_host: Option<Vec<String>>,
    #[arg(
        long,
        value_name = "ORIGIN",
        help = "An origin (http://HOST[:PORT] or https://...) whose pages may open the WebSocket (repeatable); pages of any origin other than the listener's own get 403"
    )]
    pub http_allow_origin: Option<Vec<String>>,
    #[arg(
        long,
        value_name = "N",
        help = MAX_CONNECTIONS.help_with(
            "Most HTTP connections open at once, and no more than the descriptor limit leaves after the Unix socket's connections; one more is answered 503 and closed",
            &format!("{}, or what that leaves", MAX_CONNECTIONS.default),
        )
    )]
    pub http_max_connections: Option<usize>,
    #[arg(
        long,
        value_name = "N",
        help = "Most WebSocket relays open at once (1..=4 x max sessions: each takes one of the Unix socket's connections, and 16 always stay for Unix-socket clients) [default: 2 x max sessions + 8]; one more is answered 503"
    )]
    pub http_max_websockets: Option<usize>,
    #[arg(
        long,
        value_name = "S",
        help = HEADER_TIMEOUT_S.help("Seconds a request's head may take to arrive whole, counted from the connection's open or the end of its previous response")
    )]
    pub http_header_timeout: Option<f64>,
    #[arg(
        long,
        value_name = "S",
        help = IDLE_TIMEOUT_S.help("Seconds an HTTP connection may move no bytes (an idle keep-alive connection, one that sends nothing) before it is closed")
    )]
    pub http_idle_timeout: Option<f64>,
    #[arg(
        long,
        value_name = "N",
        help = WS_MESSAGE_RATE.help("WebSocket messages per second one browser connection may send, two seconds' worth at once; past it that connection alone is closed (code 1008)")
    )]
    pub http_ws_message_rate: Option<f64>,
    #[arg(long, value_name = "MIB", help = WS_MIB_RATE.help("WebSocket MiB per second one browser connection may send, likewise"))]
    pub http_ws_mib_rate: Option<f64>,
}

impl HttpOptions {
    /// These options over `base` (each one given here wins).
    pub fn over(self, base: HttpOptions) -> HttpOptions {
        HttpOptions {
            addr: self.addr.or(base.addr),
            http_token: self.http_token.or(base.http_token),
            http_host: self.http_host.or(base.http_host),
            http_allow_origin: self.http_allow_origin.or(base.http_allow_origin),
            http_max_connections: self.http_max_connections.or(base.http_max_connections),
            http_max_websockets: self.http_max_websockets.or(base.http_max_websockets),
            http_header_timeout: self.http_header_timeout.or(base.http_header_timeout),
            http_idle_timeout: self.http_idle_timeout.or(base.http_idle_timeout),
            http_ws_message_rate: self.http_ws_message_rate.or(base.http_ws_message_rate),
            http_ws_mib_rate: self.http_ws_mib_rate.or(base.http_ws_mib_rate),
        }
    }
}

/// The HTTP listener, validated.
#[derive(Debug, Clone, Serialize)]
pub struct HttpSettings {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The token requests must carry (never shown in summaries or logs).
    #[serde(skip)]
    pub token: Option<Secret>,
    /// `Host` values answered (normalized: lower case, no `:80`).
    pub hosts: Vec<String>,
    /// `Origin` values whose pages may use it (normalized: lower case, no default port).
    pub origins: Vec<String>,
    /// Most HTTP connections at once, if given (else derived from the descriptor limit).
    pub max_connections: Option<usize>,
    /// Most WebSocket relays at once.
    pub max_websockets: usize,
    /// Longest a request's head may take, from the connection's open or the previous response.
    #[serde(rename = "header_timeout_s", serialize_with = "super::secs")]
    pub header_timeout: Duration,
    /// Longest a connection may move no bytes (idle keep-alive, nothing sent).
    #[serde(rename = "idle_timeout_s", serialize_with = "super::secs")]
    pub idle_timeout: Duration,
    /// WebSocket messages per second from one connection (two seconds' worth may come at once).
    pub ws_message_rate: f64,
    /// WebSocket bytes per second from one connection (likewise).
    pub ws_byte_rate: f64,
}

/// `authority` without the port when it is the scheme's `default` (`:80`, `:443`).
fn strip_port<'a>(authority: &'a str, default: &str) -> &'a str {
    authority.strip_suffix(default).unwrap_or(authority)
}

/// A `Host` header value (or a request target's authority) as compared: its host in lower
/// case and its port unless that is 80; `None` if it is not `HOST[:PORT]` (a user part, two
/// ports, a stray character).
pub fn normalize_host(host: &str) -> Option<String> {
    if host.contains('@') {
        return None;
    }
    let a: axum::http::uri::Authority = host.parse().ok()?;
    let name = a.host().to_ascii_lowercase();
    let rest = &a.as_str()[a.host().len()..];
    let port_ok = rest.is_empty() || rest.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()).is_some_and(|p| p > 0);
    if !valid_authority(&name) || !port_ok {
        return None;
    }
    Some(match a.port_u16() {
        None | Some(80) => name,
        Some(p) => format!("{name}:{p}"),
    })
}

/// A DNS name or an IPv4 address: dot-separated labels of letters, digits and `-`.
fn valid_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Whether `s` is `NAME`, `NAME:PORT`, `[IPV6]` or `[IPV6]:PORT`.
fn valid_authority(s: &str) -> bool {
    let (host_ok, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let Some((v6, tail)) = rest.split_once(']') else { return false };
            let port = match tail {
                "" => None,
                t => match t.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return false,
                },
            };
            (v6.parse::<std::net::Ipv6Addr>().is_ok(), port)
        }
        None => match s.split_once(':') {
            Some((h, p)) => (valid_name(h), Some(p)),
            None => (valid_name(s), None),
        },
    };
    host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// An origin (`http://NAME[:PORT]` or `https://...`) as compared: lower case, no trailing `/`,
/// no default port; `None` for anything else (`null`, a path, another scheme).
pub fn normalize_origin(origin: &str) -> Option<String> {
    let o = origin.trim().to_ascii_lowercase();
    let o = o.strip_suffix('/').unwrap_or(&o);
    let (scheme, authority, default) = if let Some(a) = o.strip_prefix("http://") {
        ("http://", a, ":80")
    } else if let Some(a) = o.strip_prefix("https://") {
        ("https://", a, ":443")
    } else {
        return None;
    };
    valid_authority(authority).then(|| format!("{scheme}{}", strip_port(authority, default)))
}

/// `ip:port` as a `Host` header writes it.
fn authority(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// The `Host` values the listener at `addr` answers and the origins whose pages may use it:
/// its own address (and loopback names), the names `--http-host` gives (with their https
/// origins: they may sit behind a TLS proxy), and the origins `--http-allow-origin` adds.
fn names(addr: SocketAddr, o: &HttpOptions) -> Result<(Vec<String>, Vec<String>), SettingsError> {
    let port = addr.port();
    let mut hosts = Vec::new();
    if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        hosts.extend(["localhost", "127.0.0.1", "[::1]"].map(|h| format!("{h}:{port}")));
    }
    if !addr.ip().is_unspecified() {
        hosts.push(authority(addr.ip(), port));
    }
    let names = o.http_host.clone().unwrap_or_default();
    if addr.ip().is_unspecified() && names.is_empty() {
        return Err(SettingsError::Http(format!(
            "--http {addr} listens on every address: name the hosts it is reached by with --http-host NAME \
             (requests naming any other host are refused, against DNS rebinding)"
        )));
    }
    let mut origins = Vec::new();
    for name in &names {
        let n = name.to_ascii_lowercase();
        if !valid_authority(&n) {
            return Err(SettingsError::Invalid {
                name: "HTTP host",
                value: name.clone(),
                expected: "a host name or address, with or without :PORT (e.g. avatars.example.com)",
            });
        }
        let forms = if n.starts_with('[') && n.ends_with(']') || !n.starts_with('[') && !n.contains(':') {
            vec![n.clone(), format!("{n}:{port}")]
        } else {
            vec![n.clone()]
        };
        for f in forms {
            // A name given here may sit behind a TLS proxy: its https origin is allowed too.
            origins.extend(normalize_origin(&format!("https://{f}")));
            hosts.push(f);
        }
    }
    for h in &hosts.clone() {
        origins.extend(normalize_origin(&format!("http://{h}")));
    }
    for given in o.http_allow_origin.clone().unwrap_or_default() {
        let normalized = normalize_origin(&given).ok_or_else(|| SettingsError::Invalid {
            name: "HTTP allowed origin",
            value: given.clone(),
            expected: "http://HOST[:PORT] or https://HOST[:PORT] (no path; `null` is never allowed)",
        })?;
        origins.push(normalized);
    }
    hosts = hosts.iter().filter_map(|h| normalize_host(h)).collect();
    hosts.sort();
    hosts.dedup();
    origins.sort();
    origins.dedup();
    Ok((hosts, origins))
}

/// The HTTP settings of `o` (`None` without `--http`), for a daemon whose Unix socket takes
/// `unix_connections` connections.
pub(super) fn resolve(o: &HttpOptions, unix_connections: usize) -> Result<Option<HttpSettings>, SettingsError> {
    let Some(a) = &o.addr else {
        let given = [
            ("--http-token", o.http_token.is_some()),
            ("--http-host", o.http_host.is_some()),
            ("--http-allow-origin", o.http_allow_origin.is_some()),
            ("--http-max-connections", o.http_max_connections.is_some()),
            ("--http-max-websockets", o.http_max_websockets.is_some()),
            ("--http-header-timeout", o.http_header_timeout.is_some()),
            ("--http-idle-timeout", o.http_idle_timeout.is_some()),
            ("--http-ws-message-rate", o.http_ws_message_rate.is_some()),
            ("--http-ws-mib-rate", o.http_ws_mib_rate.is_some()),
        ];
        return match given.iter().find(|(_, g)| *g) {
            Some((flag, _)) => Err(SettingsError::Http(format!("{flag} without --http"))),
            None => Ok(None),
        };
    };
    let addr: SocketAddr = a.parse().map_err(|_| {
        SettingsError::Http(format!("--http {a} is not an address: expected IP:PORT, e.g. 127.0.0.1:9100"))
    })?;
    let token = o.http_token.clone().map(|t| t.0).filter(|t| !t.is_empty());
    if !addr.ip().is_loopback() && token.is_none() {
        return Err(SettingsError::Http(format!(
            "--http {addr} is not a loopback address: give --http-token too, which every request must carry"
        )));
    }
    if let Some(t) = &token {
        if !(MIN_TOKEN..=MAX_TOKEN).contains(&t.len()) || !t.bytes().all(tchar) {
            return Err(SettingsError::Http(format!(
                "--http-token must be {MIN_TOKEN} to {MAX_TOKEN} characters, each a letter, a digit or one of                  !#$%&'*+-.^_`|~ (it has {} characters; the token is not shown)",
                t.len()
            )));
        }
    }
    let (hosts, origins) = names(addr, o)?;
    // The default is applied at start, where the descriptor limit is known.
    let max_connections = o.http_max_connections.map(|n| MAX_CONNECTIONS.check(Some(n))).transpose()?;
    let ws_cap = unix_connections.saturating_sub(UNIX_HEADROOM).max(1);
    let max_websockets = o.http_max_websockets.unwrap_or((unix_connections / 2).min(ws_cap));
    if !(1..=ws_cap).contains(&max_websockets) {
        return Err(SettingsError::Budget {
            name: "HTTP max WebSockets",
            value: max_websockets,
            allowed: format!("1..={ws_cap}"),
            why: format!(
                "each relay takes one of the Unix socket's {unix_connections} connections (4 x max sessions + 16), \
                 and {UNIX_HEADROOM} stay for Unix-socket clients"
            ),
        });
    }
    let header = HEADER_TIMEOUT_S.check(o.http_header_timeout)?;
    let idle = IDLE_TIMEOUT_S.check(o.http_idle_timeout)?;
    let rate = WS_MESSAGE_RATE.check(o.http_ws_message_rate)?;
    let mib = WS_MIB_RATE.check(o.http_ws_mib_rate)?;
    Ok(Some(HttpSettings {
        addr,
        token: token.map(Secret),
        hosts,
        origins,
        max_connections,
        max_websockets,
        header_timeout: Duration::from_secs_f64(header),
        idle_timeout: Duration::from_secs_f64(idle),
        ws_message_rate: rate,
        ws_byte_rate: mib * (1u64 << 20) as f64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(addr: &str, f: impl FnOnce(&mut HttpOptions)) -> Result<HttpSettings, SettingsError> {
        let mut o = HttpOptions { addr: Some(addr.into()), ..Default::default() };
        f(&mut o);
        resolve(&o, 80).map(|h| h.expect("--http given"))
    }

    #[test]
    fn loopback_answers_its_own_names_and_nothing_else() {
        let h = http("127.0.0.1:9100", |_| {}).unwrap();
        assert_eq!(h.hosts, ["127.0.0.1:9100", "[::1]:9100", "localhost:9100"]);
        assert_eq!(h.origins, ["http://127.0.0.1:9100", "http://[::1]:9100", "http://localhost:9100"]);
        assert_eq!((h.max_websockets, h.max_connections), (40, None));
        let h = http("127.0.0.1:80", |_| {}).unwrap();
        assert_eq!(h.hosts, ["127.0.0.1", "[::1]", "localhost"], "the default port is dropped");
    }

    #[test]
    fn host_names_add_their_hosts_and_origins() {
        let e = http("0.0.0.0:9100", |o| o.http_token = Some("t0123456789abcdef".into())).unwrap_err().to_string();
        assert!(e.contains("--http-host"), "{e}");
        let h = http("0.0.0.0:9100", |o| {
            o.http_token = Some("t0123456789abcdef".into());
            o.http_host = Some(vec!["Avatars.Example.com".into(), "10.0.0.5:8443".into()]);
            o.http_allow_origin = Some(vec!["https://app.example.com:443/".into()]);
        })
        .unwrap();
        for want in ["avatars.example.com", "avatars.example.com:9100", "10.0.0.5:8443", "localhost:9100"] {
            assert!(h.hosts.contains(&want.to_string()), "{want}: {:?}", h.hosts);
        }
        for want in ["https://avatars.example.com", "http://avatars.example.com:9100", "https://app.example.com"] {
            assert!(h.origins.contains(&want.to_string()), "{want}: {:?}", h.origins);
        }
        assert!(!h.hosts.iter().any(|x| x.starts_with("0.0.0.0")));
    }

    #[test]
    fn bad_hosts_origins_and_bounds_are_refused_with_what_is_allowed() {
        for bad in ["null", "file:///x", "http://a.example/path", "ws://a.example", "http://", "http://a b"] {
            let e = http("127.0.0.1:1", |o| o.http_allow_origin = Some(vec![bad.into()])).unwrap_err();
            assert!(e.to_string().contains("http://HOST[:PORT]"), "{bad}: {e}");
        }
        for bad in ["*", "a/b", "", "x:99999", "[::1"] {
            assert!(http("127.0.0.1:1", |o| o.http_host = Some(vec![bad.into()])).is_err(), "{bad}");
        }
        let e = http("127.0.0.1:1", |o| o.http_max_websockets = Some(65)).unwrap_err().to_string();
        assert!(e.starts_with("HTTP max WebSockets 65 is out of range: expected 1..=64"), "{e}");
        let e = http("127.0.0.1:1", |o| o.http_max_connections = Some(0)).unwrap_err().to_string();
        assert!(e.contains("expected 1..=65536"), "{e}");
        let e = http("127.0.0.1:1", |o| o.http_idle_timeout = Some(0.0)).unwrap_err().to_string();
        assert_eq!(e, "HTTP idle timeout (s) 0 is out of range: expected 0.1..=3600");
        let o = HttpOptions { http_allow_origin: Some(vec!["http://a".into()]), ..Default::default() };
        assert_eq!(resolve(&o, 80).unwrap_err().to_string(), "--http-allow-origin without --http");
        for bad in ["has space 0123456789", "short-token", "comma,0123456789abc", "quote\"0123456789ab"] {
            let e = http("127.0.0.1:1", |o| o.http_token = Some(bad.into())).unwrap_err().to_string();
            assert!(e.contains("16 to 512 characters") && !e.contains(bad), "{e}");
        }
        assert!(http("127.0.0.1:1", |o| o.http_token = Some("A-Za_z0.9~!#$%&'*+^`|".into())).is_ok());
    }

    #[test]
    fn origins_and_hosts_normalize_as_browsers_write_them() {
        assert_eq!(normalize_origin("HTTP://LocalHost:80/").as_deref(), Some("http://localhost"));
        assert_eq!(normalize_origin("https://a.example:443").as_deref(), Some("https://a.example"));
        assert_eq!(normalize_origin("https://a.example:8443").as_deref(), Some("https://a.example:8443"));
        assert_eq!(normalize_origin("http://[::1]:9100").as_deref(), Some("http://[::1]:9100"));
        assert_eq!(normalize_origin("null"), None);
        assert_eq!(normalize_host("LOCALHOST:80").as_deref(), Some("localhost"));
        assert_eq!(normalize_host("localhost:8080").as_deref(), Some("localhost:8080"));
        assert_eq!(normalize_host("[::1]:9100").as_deref(), Some("[::1]:9100"));
        for bad in ["127.0.0.1:9100:80", "user@127.0.0.1:9100", "a b:1", "", "127.0.0.1:x", "evil.example/x"] {
            assert_eq!(normalize_host(bad), None, "{bad}");
        }
        let mut options = HttpOptions { addr: Some("127.0.0.1:9100".into()), ..Default::default() };
        options.http_token = Some("s3cret-0123456789".into());
        assert!(!format!("{options:?}").contains("s3cret"), "the token never shows in Debug");
        let h = resolve(&options, 80).unwrap().unwrap();
        assert!(!format!("{h:?}").contains("s3cret"), "nor here");
        assert!(!serde_json::to_string(&h).unwrap().contains("s3cret"), "nor in summaries");
    }
}
