//! The HTTP side (`--http`): the browser page end to end in Chromium; pages of other origins
//! kept off the WebSocket (in Chromium too); `Host` checked against DNS rebinding; the token by
//! cookie, subprotocol and bearer, and in no log line; WebSocket relays capped and rate-bound;
//! a flood of half-open connections under a 1,024-descriptor limit that leaves the Unix socket
//! answering and is closed by its timeouts.

use std::net::{SocketAddr, TcpStream};

use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

use super::*;

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

impl Daemon {
    /// A daemon with `--http 127.0.0.1:PORT` and `extra`, under a descriptor limit if given;
    /// with its HTTP address.
    fn start_http(extra: &[&str], nofile: Option<u64>) -> (Self, String) {
        let addr = format!("127.0.0.1:{}", free_port("127.0.0.1"));
        let dir = tempfile::tempdir().unwrap();
        let avatars = write_avatars(dir.path());
        let socket = dir.path().join("serve.sock");
        let mut args: Vec<String> = ["-v", "serve", "--socket", s(&socket), "--avatars", s(&avatars), "--http", &addr]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        (Self::spawn_limited(dir, socket, &args, nofile), addr)
    }

    fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).unwrap().count()
    }
}

/// An HTTP reply: status, head (lower-cased names) and body.
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One request on its own connection: the request line and header lines (each ending in
/// CRLF), `Connection: close` added.
fn request(addr: &str, lines: &str) -> Reply {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(c, "{lines}Connection: close\r\n\r\n").unwrap();
    let mut t = Vec::new();
    let _ = c.read_to_end(&mut t);
    let t = String::from_utf8_lossy(&t).to_string();
    let (head, body) = t.split_once("\r\n\r\n").unwrap_or((&t, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply { status, head: head.to_string(), body: body.to_string() }
}

/// `GET path` naming the listener as its host, with `extra` header lines.
fn get(addr: &str, path: &str, extra: &[&str]) -> Reply {
    let mut lines = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for h in extra {
        lines.push_str(h);
        lines.push_str("\r\n");
    }
    request(addr, &lines)
}

type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// Opens `ws://addr/ws` with these request headers.
fn websocket(
    addr: &str,
    headers: &[(&'static str, &str)],
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    tungstenite::connect(req)
}

fn ws_status(r: Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error>) -> u16 {
    match r {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("WebSocket handshake: {e}"),
    }
}

fn protocol_message(kind: u8, payload: &[u8]) -> Message {
    let mut m = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    m.push(kind);
    m.extend_from_slice(payload);
    Message::binary(m)
}

/// Hello over the WebSocket; Welcome expected.
fn ws_hello(ws: &mut Ws) {
    ws.send(protocol_message(HELLO, br#"{"protocol": 2, "client": "tests/it/serve/http.rs"}"#)).unwrap();
    match ws.read().unwrap() {
        Message::Binary(b) => assert_eq!(b[4], WELCOME, "{b:?}"),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// The browser page, end to end in headless Chromium: loaded once with `?token=` (answered 303
/// with a session cookie), an avatar picked, the speech file played into the page, its frames
/// decoded and its sound played, nothing refused by its Content-Security-Policy; the token
/// guards the page, its WebSocket and the metrics, and shows in no log line.
#[test]
fn the_browser_page_plays_speech_in_headless_chromium() {
    let speech = fixture("golden/speech_2s.wav");
    let (d, addr) = Daemon::start_http(&["--http-token", "page-token-5e1-abcd"], None);
    assert_eq!(get(&addr, "/", &[]).status, 401, "the page needs the token");
    assert_eq!(get(&addr, "/ws", &[]).status, 401, "so does its WebSocket");
    let login = get(&addr, "/?token=page-token-5e1-abcd", &[]);
    assert_eq!((login.status, login.header("location")), (303, Some("/")), "{}", login.head);
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/browser/page_check.py"))
        .args([&format!("http://{addr}/?token=page-token-5e1-abcd"), "golden", s(&speech), "49", "/usr/bin/chromium"])
        .output()
        .expect(".venv/bin/python (run scripts/setup.sh)");
    assert!(o.status.success(), "{}\n{}", text(&o), d.log());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["error"].is_null() && v["page_errors"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["csp_errors"].as_array().unwrap().is_empty(), "the page breaks its own policy: {v}");
    assert_eq!(v["url"], format!("http://{addr}/"), "the token left the address bar: {v}");
    assert_eq!(v["speech"], 49, "every frame of the utterance decoded: {v}");
    assert!(v["idle"].as_u64().unwrap() > 0, "idle frames came before the speech: {v}");
    assert!(v["audioStarted"] == true && v["audioPlayedMs"].as_f64().unwrap() > 1500.0, "the 2 s sound played: {v}");
    let first = v["firstFrameMs"].as_f64().unwrap();
    let speech_first = v["speechFirstFrameMs"].as_f64().unwrap();
    assert!(first > 0.0 && speech_first > 450.0, "{v}");
    eprintln!("browser: first frame {first:.0} ms after Open, first speech frame {speech_first:.0} ms after its audio");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("page-token-5e1-abcd"), "the token is in the log:\n{log}");
}

/// Cross-site WebSocket hijacking, tried in a real browser: a page served from another origin
/// (127.0.0.3) cannot open `/ws` of a daemon on loopback without a token (the default); a page
/// of an origin given with `--http-allow-origin` (127.0.0.2) can, and gets Welcome.
#[test]
fn pages_of_other_origins_cannot_open_the_websocket_in_chromium() {
    let allowed = format!("127.0.0.2:{}", free_port("127.0.0.2"));
    let refused = format!("127.0.0.3:{}", free_port("127.0.0.3"));
    let (d, addr) = Daemon::start_http(&["--http-allow-origin", &format!("http://{allowed}")], None);
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/browser/origin_check.py"))
        .args([&format!("ws://{addr}/ws"), &allowed, &refused, "/usr/bin/chromium"])
        .output()
        .expect(".venv/bin/python (run scripts/setup.sh)");
    assert!(o.status.success(), "{}\n{}", text(&o), d.log());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["refused"]["opened"], false, "a page of another origin opened the WebSocket: {v}");
    assert_eq!((&v["allowed"]["opened"], &v["allowed"]["welcome"]), (&true.into(), &true.into()), "{v}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let line = format!("refused a request to \"/ws\" from origin \"http://{refused}\"");
    assert!(log.contains(&line), "no log line naming the origin ({line}):\n{log}");
}

/// DNS rebinding: a request naming another host is refused, whatever the route; the listener's
/// own names pass. Foreign and `null` origins are refused; every reply carries the page's
/// security headers.
#[test]
fn foreign_hosts_and_origins_are_refused_and_replies_are_hardened() {
    let (d, addr) = Daemon::start_http(&[], None);
    let port = addr.rsplit(':').next().unwrap();
    for path in ["/", "/ws", "/metrics", "/avatars", "/page.js", "/nowhere"] {
        let r = request(&addr, &format!("GET {path} HTTP/1.1\r\nHost: evil.example\r\n"));
        assert_eq!(r.status, 421, "{path}: {}", r.head);
        let r = request(&addr, &format!("GET {path} HTTP/1.1\r\nHost: evil.example:{port}\r\n"));
        assert_eq!(r.status, 421, "{path}");
    }
    assert_eq!(request(&addr, "GET / HTTP/1.0\r\n").status, 400, "no Host at all");
    let two = format!("GET /avatars HTTP/1.1\r\nHost: {addr}\r\nHost: evil.example\r\n");
    assert_eq!(request(&addr, &two).status, 400, "two Hosts");
    let absolute = format!("GET http://evil.example/avatars HTTP/1.1\r\nHost: {addr}\r\n");
    assert_eq!(request(&addr, &absolute).status, 421, "an absolute-form target naming another host");
    let bad = request(&addr, "GET / HTTP/1.1\r\nHost: evil.example\r\n");
    assert!(!bad.body.contains("127.0.0.1") && !bad.body.contains("localhost"), "the 421 lists no names: {}", bad.body);
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        assert_eq!(request(&addr, &format!("GET /avatars HTTP/1.1\r\nHost: {host}\r\n")).status, 200, "{host}");
    }
    let page = get(&addr, "/", &[]);
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert!(!page.body.contains("<script>") && !page.body.contains("<style>"), "inline code in the page");
    let js = get(&addr, "/page.js", &[]);
    assert_eq!((js.status, js.header("content-type")), (200, Some("text/javascript; charset=utf-8")));
    assert_eq!(get(&addr, "/page.css", &[]).status, 200);
    let own = format!("Origin: http://localhost:{port}");
    assert_eq!(get(&addr, "/avatars", &[&own]).status, 200, "the listener's own origin");
    for origin in ["null", "http://evil.example", &format!("https://127.0.0.1:{port}")] {
        let r = get(&addr, "/ws", &[&format!("Origin: {origin}")]);
        assert_eq!(r.status, 403, "{origin}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }
    // A WebSocket from a foreign origin, as a hijacking page would open it, never upgrades.
    assert_eq!(ws_status(websocket(&addr, &[("origin", "http://evil.example")])), 403);
    let (mut ws, _) = websocket(&addr, &[]).unwrap();
    ws_hello(&mut ws);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("for host \"evil.example\""), "{log}");
}

/// With a token: a page load with `?token=` once gets a session cookie (never the token); the
/// WebSocket authenticates by that cookie, by the subprotocol (answered `lipsync.v2`, never
/// echoed) or by a bearer header; a query token off the page, a wrong token and a forged
/// cookie get 401; the token is in no log line, even at trace level.
#[test]
fn the_token_goes_by_cookie_subprotocol_or_bearer_and_never_into_the_log() {
    let token = "tok-7Hq2-secret-x";
    let (d, addr) = Daemon::start_http(&["--http-token", token, "-v"], None);
    let login = get(&addr, &format!("/?token={token}"), &[]);
    assert_eq!((login.status, login.header("location")), (303, Some("/")));
    let cookie = login.header("set-cookie").unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && !cookie.contains(token), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    assert_eq!(get(&addr, &format!("/?token={token}x"), &[]).status, 401);
    assert_eq!(get(&addr, "/avatars", &[&format!("Cookie: {pair}")]).status, 200);
    let name = pair.split('=').next().unwrap();
    assert_eq!(get(&addr, "/avatars", &[&format!("Cookie: {name}=00ff")]).status, 401, "a forged session id");
    let m = get(&addr, "/metrics", &[&format!("Authorization: Bearer {token}")]);
    assert!(m.status == 200 && m.body.contains("lipsync_sessions_active"), "{}", m.head);
    assert_eq!(get(&addr, &format!("/metrics?token={token}"), &[]).status, 401, "query tokens only on the page");

    let (mut ws, _) = websocket(&addr, &[("cookie", &pair)]).unwrap();
    ws_hello(&mut ws);
    let offer = format!("lipsync.v2, lipsync.token.{token}");
    let (mut ws, resp) = websocket(&addr, &[("sec-websocket-protocol", &offer)]).unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "lipsync.v2", "the token is never echoed");
    ws_hello(&mut ws);
    let (mut ws, _) = websocket(&addr, &[("authorization", &format!("Bearer {token}"))]).unwrap();
    ws_hello(&mut ws);
    assert_eq!(ws_status(websocket(&addr, &[])), 401);
    assert_eq!(ws_status(websocket(&addr, &[("sec-websocket-protocol", "lipsync.v2, lipsync.token.wrong")])), 401);
    let req = format!("ws://{addr}/ws?token={token}").into_client_request().unwrap();
    assert!(matches!(tungstenite::connect(req), Err(tungstenite::Error::Http(r)) if r.status() == 401));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("refused a request to \"/metrics\": no valid token"), "logged at trace level: {log}");
    assert!(!log.contains(token), "the token is in the log:\n{log}");
}

/// WebSocket relays are capped below the Unix socket's connection limit: with the cap reached,
/// one more is answered 503 and a Unix-socket client still gets Welcome; a cap that would eat
/// the socket's headroom is refused at start. A WebSocket that sends past the message rate is
/// closed with 1008, alone, and one that batches two protocol messages into one WebSocket
/// message with 1002: the others keep working and their slots are free again.
#[test]
fn websocket_relays_are_capped_and_rate_bound_and_the_socket_keeps_its_slots() {
    let (d, addr) = Daemon::start_http(
        &["--max-sessions", "1", "--http-max-websockets", "4", "--http-ws-message-rate", "20"],
        None,
    );
    let mut open: Vec<Ws> = (0..4)
        .map(|_| {
            let (mut ws, _) = websocket(&addr, &[]).unwrap();
            ws_hello(&mut ws);
            ws
        })
        .collect();
    match websocket(&addr, &[]) {
        Err(tungstenite::Error::Http(r)) => {
            let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).to_string();
            assert_eq!(r.status(), 503, "{body}");
            assert!(body.contains("maximum of 4 WebSocket connections"), "{body}");
        }
        other => panic!("a fifth WebSocket: {other:?}"),
    }
    let t = Instant::now();
    let _unix = d.connect();
    assert!(t.elapsed() < Duration::from_secs(1), "Hello took {:?}", t.elapsed());

    // One relay floods: 200 Stats requests at once against 20/s (40 at once).
    let mut flood = open.remove(0);
    for _ in 0..200 {
        if flood.send(protocol_message(STATS_REQUEST, b"{}")).is_err() {
            break;
        }
    }
    let code = loop {
        match flood.read() {
            Ok(Message::Close(frame)) => break frame.map(|f| f.code),
            Ok(_) => continue,
            Err(e) => panic!("the flooding WebSocket ended without a close frame: {e}"),
        }
    };
    assert_eq!(code, Some(CloseCode::Policy), "closed with 1008");
    // Another sends two protocol messages in one WebSocket message (the rate bound counts
    // WebSocket messages): closed with 1002.
    let mut batch = open.remove(0);
    let two = [[0u8, 0, 0, 1, STATS_REQUEST], [0, 0, 0, 1, STATS_REQUEST]].concat();
    batch.send(Message::binary(two)).unwrap();
    let code = loop {
        match batch.read() {
            Ok(Message::Close(frame)) => break frame.map(|f| f.code),
            Ok(_) => continue,
            Err(e) => panic!("the batching WebSocket ended without a close frame: {e}"),
        }
    };
    assert_eq!(code, Some(CloseCode::Protocol), "closed with 1002");
    // The others are untouched.
    for ws in &mut open {
        ws.send(protocol_message(STATS_REQUEST, b"{}")).unwrap();
        match ws.read().unwrap() {
            Message::Binary(b) => assert_eq!(b[4], STATS),
            other => panic!("{other:?}"),
        }
    }
    // The offender's slot is free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        match websocket(&addr, &[]) {
            Ok((ws, _)) => break ws,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the slot stayed taken: {e}"),
        }
    };
    ws_hello(&mut again);
    // The listener's figures: 4 relays open, the refusals counted by reason.
    let m = get(&addr, "/metrics", &[]).body;
    let value = |name: &str| m.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok());
    assert_eq!(value("lipsync_http_websockets "), Some(3.0), "{m}");
    assert_eq!(value("lipsync_http_refused_total{reason=\"framing\"} "), Some(1.0), "{m}");
    assert_eq!(value("lipsync_http_refused_total{reason=\"rate\"} "), Some(1.0), "{m}");
    assert_eq!(value("lipsync_http_refused_total{reason=\"websockets_busy\"} "), Some(1.0), "{m}");
    assert!(value("lipsync_http_connections ").unwrap() >= 4.0, "the relays and this request: {m}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("more than 20 messages/s (code 1008)"), "{log}");

    let o = run(&["serve", "--socket", "/tmp/x.sock", "--avatars", "/tmp", "--max-sessions", "1"]
        .into_iter()
        .chain(["--http", "127.0.0.1:1", "--http-max-websockets", "5"])
        .collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(text(&o).contains("HTTP max WebSockets 5 is out of range: expected 1..=4"), "{}", text(&o));
}

/// Raises this process's soft descriptor limit to its hard one (the flood needs 2,000).
fn raise_own_limit() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    assert!(l.rlim_cur >= 4096, "the test needs a hard descriptor limit of at least 4096, not {}", l.rlim_cur);
}

/// How a connection ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Still open at the deadline.
    Open,
    /// Closed after reading what was sent (FIN).
    Closed,
    /// Reset: closed with what was sent unread (a connection refused over the cap).
    Reset,
}

/// Reads until the peer closes or `within` passes: how it ended, and what was read.
fn ended_within(c: &mut TcpStream, within: Duration) -> (End, Vec<u8>) {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (End::Open, got);
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut b) {
            Ok(0) => return (End::Closed, got),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return (End::Open, got)
            }
            Err(_) => return (End::Reset, got),
        }
    }
}

/// Under `prlimit --nofile=1024:1024`, 2,000 half-open HTTP connections leave the Unix socket
/// answering Hello within 1 s and `lipsync stats` working; connections over the cap are
/// answered 503 at once; held ones, silent ones and idle keep-alive ones are closed by the idle
/// timeout, a trickling one by the header timeout; the daemon's descriptors return to their
/// baseline.
#[test]
fn an_http_flood_under_1024_descriptors_leaves_the_unix_socket_answering() {
    raise_own_limit();
    let args = ["--http-header-timeout", "3", "--http-idle-timeout", "1.5"];
    let (d, addr) = Daemon::start_http(&args, Some(1024));
    let sockaddr: SocketAddr = addr.parse().unwrap();
    assert_eq!(get(&addr, "/metrics", &[]).status, 200);
    std::thread::sleep(Duration::from_millis(300));
    let baseline = d.descriptors();

    // A trickle: a header line every 0.4 s, never the end of the head.
    let trickle = {
        let host = addr.clone();
        std::thread::spawn(move || {
            let mut c = TcpStream::connect(&host).unwrap();
            let t = Instant::now();
            write!(c, "GET / HTTP/1.1\r\nHost: {host}\r\n").unwrap();
            loop {
                if ended_within(&mut c, Duration::from_millis(400)).0 != End::Open
                    || write!(c, "X-Slow: 1\r\n").is_err()
                {
                    return t.elapsed();
                }
                assert!(t.elapsed() < Duration::from_secs(20), "the trickle was never closed");
            }
        })
    };
    // An idle keep-alive connection, after one whole request.
    let mut keep = TcpStream::connect(&addr).unwrap();
    let idle_since = Instant::now();
    write!(keep, "GET /avatars HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let (end, first) = ended_within(&mut keep, Duration::from_millis(500));
    assert!(
        end == End::Open && String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    let mut silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(&addr).unwrap()).collect();

    let mut flood = Vec::new();
    let (mut refused_connects, mut slow_connects) = (0, 0);
    let (started, mut peak) = (Instant::now(), 0);
    for i in 0..2000 {
        if i % 100 == 99 {
            peak = peak.max(d.descriptors());
        }
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&sockaddr, Duration::from_secs(2));
        if t.elapsed() > Duration::from_millis(200) {
            slow_connects += 1;
        }
        match r {
            Ok(mut c) => {
                let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n");
                flood.push(c);
            }
            Err(_) => refused_connects += 1,
        }
    }
    let flood_time = started.elapsed();
    // The Unix socket answers during the flood.
    let t = Instant::now();
    let mut c = UnixStream::connect(&d.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    hello(&mut c).expect("Welcome within 1 s");
    assert!(t.elapsed() < Duration::from_secs(1), "Hello took {:?}", t.elapsed());
    let o = run(&["stats", "--socket", d.sock()]);
    assert!(o.status.success(), "stats during the flood: {}", text(&o));

    let (end, _) = ended_within(&mut keep, Duration::from_secs(10));
    let keep_idle = idle_since.elapsed();
    assert!(
        end == End::Closed && keep_idle >= Duration::from_millis(1400),
        "idle keep-alive closed after {keep_idle:?}"
    );
    for c in &mut silent {
        assert_eq!(ended_within(c, Duration::from_secs(10)).0, End::Closed, "a silent connection");
    }
    let (mut held, mut busy, mut answered) = (0, 0, 0);
    for c in &mut flood {
        match ended_within(c, Duration::from_secs(10)) {
            (End::Closed, got) if got.is_empty() => held += 1,
            (End::Open, _) => panic!("a flood connection stayed open"),
            (_, got) => {
                busy += 1;
                answered += usize::from(got.starts_with(b"HTTP/1.1 503 Service Unavailable"));
            }
        }
    }
    let trickled = trickle.join().unwrap();
    assert!(
        trickled >= Duration::from_millis(2500) && trickled < Duration::from_secs(8),
        "the trickle closed after {trickled:?}"
    );
    drop((flood, silent, keep, c));
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.descriptors() > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = d.descriptors();
    eprintln!(
        "flood: {} connected in {flood_time:?} ({refused_connects} connects failed, {slow_connects} over 200 ms), {held} held to the idle timeout, \
         {busy} refused at once ({answered} read the 503); trickle closed after {trickled:?}; descriptors {baseline} -> {after}, at most {peak}",
        2000 - refused_connects
    );
    assert!(after <= baseline, "descriptors {baseline} before the flood, {after} after");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let cap: usize = log.split("max_connections=").nth(1).and_then(|t| t.split(' ').next()?.parse().ok()).unwrap();
    assert!(peak <= baseline + cap + 8, "the cap is {cap}, yet {peak} descriptors were open (baseline {baseline})");
    assert!(busy > 0 && held > 0, "the cap was never reached: {held} held, {busy} refused");
    assert!(answered > 0, "none of the {busy} refused got the 503");
    assert!(!log.contains("Too many open files"), "{log}");
}
