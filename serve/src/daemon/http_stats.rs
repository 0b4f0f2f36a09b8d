//! The HTTP listener's figures for `/metrics`: connections and WebSocket relays open now, and
//! what was refused, by reason. They depend on nothing else, so that the daemon's shared state
//! holds them without importing the listener.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Why the listener refused a request or a connection (the `reason` label of
/// `lipsync_http_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `Host` missing or not one the listener answers to.
    Host,
    /// `Origin` not the listener's own nor allowed.
    Origin,
    /// No valid token.
    Token,
    /// Over the connection cap.
    Busy,
    /// Over the WebSocket relay cap.
    WebSocketsBusy,
    /// A WebSocket past its rate bound.
    Rate,
    /// A WebSocket message that was not one protocol message.
    Framing,
}

impl Refused {
    pub(crate) const ALL: [Refused; 7] = [
        Refused::Host,
        Refused::Origin,
        Refused::Token,
        Refused::Busy,
        Refused::WebSocketsBusy,
        Refused::Rate,
        Refused::Framing,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::Host => "host",
            Refused::Origin => "origin",
            Refused::Token => "token",
            Refused::Busy => "busy",
            Refused::WebSocketsBusy => "websockets_busy",
            Refused::Rate => "rate",
            Refused::Framing => "framing",
        }
    }
}

/// The listener's figures, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// HTTP connections open now (WebSockets included).
    pub(crate) connections: AtomicUsize,
    /// WebSocket relays open now.
    pub(crate) websockets: AtomicUsize,
    refused: [AtomicU64; Refused::ALL.len()],
}

impl Counters {
    pub(crate) fn refuse(&self, why: Refused) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, why: Refused) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }
}
