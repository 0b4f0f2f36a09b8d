//! File descriptors: the daemon raises its soft `RLIMIT_NOFILE` to the hard limit at start,
//! and sizes the HTTP listener's connection cap from what is left once the Unix socket's
//! connections and sessions are provided for, so that an HTTP flood can never leave the Unix
//! socket unable to accept.

use crate::settings::{HttpSettings, SettingsError};

/// Descriptors one Unix-socket connection may hold: its stream, the listener's copy (to shut it
/// down), its writer's and its session's frame sink's.
pub(crate) const PER_UNIX_CONNECTION: usize = 4;
/// Descriptors one session may open besides its connection's (the template's video or frames,
/// a decoder's).
pub(crate) const PER_SESSION: usize = 4;
/// Kept free for everything else: avatar and model files opened on load, logs, the accept of
/// a connection that is then refused.
pub(crate) const MARGIN: usize = 64;
/// Fewest HTTP connections worth serving.
const MIN_HTTP: usize = 8;

/// Raises the soft descriptor limit to the hard one; returns the soft limit now in force.
pub(crate) fn raise_limit() -> u64 {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1024;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit { rlim_cur: l.rlim_max, rlim_max: l.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l.rlim_cur = l.rlim_max;
            }
        }
    }
    l.rlim_cur
}

/// Descriptors this process has open now.
pub(crate) fn open_now() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// What the descriptor limit leaves for HTTP connections: the limit less those open now, the
/// Unix socket's connections and sessions at their maximum, each WebSocket relay's own Unix
/// connection end, and a margin.
pub(crate) fn http_budget(
    limit: u64,
    open: usize,
    unix_connections: usize,
    sessions: usize,
    websockets: usize,
) -> usize {
    let reserved = open + PER_UNIX_CONNECTION * unix_connections + PER_SESSION * sessions + websockets + MARGIN;
    usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(reserved)
}

/// The HTTP connection cap: `--http-max-connections` if the budget allows it, else the default
/// or the budget if that is smaller.
pub(crate) fn http_cap(
    http: &HttpSettings,
    limit: u64,
    open: usize,
    unix_connections: usize,
    sessions: usize,
) -> Result<usize, SettingsError> {
    let budget = http_budget(limit, open, unix_connections, sessions, http.max_websockets);
    let why = || {
        format!(
            "the descriptor limit {limit} less {open} open, {PER_UNIX_CONNECTION} for each of the Unix socket's \
             {unix_connections} connections, {PER_SESSION} for each of {sessions} sessions, one for each of \
             {} WebSocket relays and {MARGIN} spare; raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower \
             --max-sessions",
            http.max_websockets
        )
    };
    let too_small = |value| SettingsError::Budget {
        name: "HTTP max connections",
        value,
        allowed: format!("1..={budget}"),
        why: why(),
    };
    match http.max_connections {
        Some(n) if n > budget => Err(too_small(n)),
        Some(n) => Ok(n),
        None if budget < MIN_HTTP => Err(too_small(MIN_HTTP)),
        None => Ok(budget.min(crate::settings::http::MAX_CONNECTIONS.default)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_the_unix_socket_its_descriptors() {
        // soft = hard = 1024, the default 16 sessions: 80 Unix connections, 40 relays.
        let b = http_budget(1024, 40, 80, 16, 40);
        assert_eq!(b, 1024 - 40 - 320 - 64 - 40 - 64);
        assert_eq!(http_budget(100, 40, 80, 16, 40), 0, "never negative");
        let http = crate::settings::http::HttpOptions { addr: Some("127.0.0.1:1".into()), ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let o = crate::ServeOptions { http, ..Default::default() };
        let mut s = crate::ServeOptions { socket: Some("s".into()), avatars: Some(dir.path().into()), ..o }
            .validate()
            .unwrap()
            .http
            .unwrap();
        assert_eq!(http_cap(&s, 1024, 40, 80, 16).unwrap(), 256.min(b));
        assert_eq!(http_cap(&s, 524_288, 40, 80, 16).unwrap(), 256, "the default when there is room");
        s.max_connections = Some(1000);
        let e = http_cap(&s, 1024, 40, 80, 16).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "HTTP max connections 1000 is out of range: expected 1..={b} (the descriptor limit 1024"
            )),
            "{e}"
        );
        s.max_connections = None;
        let e = http_cap(&s, 400, 40, 80, 16).unwrap_err().to_string();
        assert!(e.contains("expected 1..=0"), "{e}");
    }
}
