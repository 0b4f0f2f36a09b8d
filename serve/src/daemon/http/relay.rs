//! One WebSocket relayed to the daemon's socket: each binary WebSocket message is one protocol
//! message to the daemon, each protocol message from the daemon one binary WebSocket message.
//! Either side closing closes the other. What the browser sends is bounded in messages and
//! bytes per second (token buckets holding two seconds' worth): past either, that connection
//! alone is closed with code 1008 (policy violation). A browser that leaves a frame unwritten
//! for the daemon's client timeout is dropped.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::OwnedSemaphorePermit;

use super::accept::ConnectionSlot;
use crate::protocol::MAX_MESSAGE;

/// The close code of a connection that broke the rate bound (RFC 6455: policy violation).
const POLICY_VIOLATION: u16 = 1008;
/// The close code of a connection whose message is not one protocol message (protocol error).
const PROTOCOL_ERROR: u16 = 1002;

/// Why the relay closed a browser's connection.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Violation {
    /// It sent more than its rate: what.
    Rate(String),
    /// A binary message that is not exactly one protocol message (the daemon would read it as
    /// several, or as part of the next: the rate bound counts messages).
    Framing,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Rate(what) => write!(f, "sent {what} (code {POLICY_VIOLATION})"),
            Violation::Framing => write!(f, "sent a message that is not one protocol message (code {PROTOCOL_ERROR})"),
        }
    }
}

/// Whether `b` is exactly one protocol message: its length field counts the rest.
fn one_message(b: &[u8]) -> bool {
    b.len() >= 5 && u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize == b.len() - 4 && b.len() - 4 <= MAX_MESSAGE
}
/// Seconds' worth of each rate that may come at once.
const BURST_S: f64 = 2.0;

/// A WebSocket's bounds on what it sends.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rates {
    /// Messages per second.
    pub(super) messages: f64,
    /// Bytes per second.
    pub(super) bytes: f64,
}

/// A token bucket: `rate` a second, [`BURST_S`] seconds' worth at most. A take is allowed when
/// the bucket holds it; one larger than the bucket only when the bucket is full, leaving a
/// debt: a take before the debt is paid back is refused (and the relay closes).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Self {
        Self { rate, tokens: rate * BURST_S, at: now }
    }

    fn take(&mut self, n: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.rate * BURST_S);
        self.at = now;
        if self.tokens < n.min(self.rate * BURST_S) {
            return false;
        }
        self.tokens -= n;
        true
    }
}

/// Relays until either side closes, the browser breaks a bound (returned), or it stops reading.
pub(super) async fn relay(
    ws: WebSocket,
    socket: PathBuf,
    rates: Rates,
    send_timeout: Duration,
    _slots: (ConnectionSlot, OwnedSemaphorePermit),
) -> Option<Violation> {
    let unix = match tokio::net::UnixStream::connect(&socket).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!("WebSocket relay: cannot reach {}: {e}", socket.display());
            return None;
        }
    };
    let (mut from_daemon, mut to_daemon) = unix.into_split();
    let (mut to_browser, mut from_browser) = ws.split();
    let violation = tokio::select! {
        v = browser_to_daemon(&mut from_browser, &mut to_daemon, &rates) => v,
        () = daemon_to_browser(&mut from_daemon, &mut to_browser, send_timeout) => None,
    };
    let _ = to_daemon.shutdown().await;
    let close = match &violation {
        Some(Violation::Rate(what)) => {
            Message::Close(Some(CloseFrame { code: POLICY_VIOLATION, reason: format!("rate limit: {what}").into() }))
        }
        Some(Violation::Framing) => Message::Close(Some(CloseFrame {
            code: PROTOCOL_ERROR,
            reason: "one protocol message per WebSocket message".into(),
        })),
        None => Message::Close(None),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), to_browser.send(close)).await;
    violation
}

/// The browser's messages to the daemon, each a whole protocol message, within the rates;
/// returns the bound the browser broke, if it did.
async fn browser_to_daemon(
    from_browser: &mut SplitStream<WebSocket>,
    to_daemon: &mut OwnedWriteHalf,
    rates: &Rates,
) -> Option<Violation> {
    let now = Instant::now();
    let (mut messages, mut bytes) = (Bucket::new(rates.messages, now), Bucket::new(rates.bytes, now));
    while let Some(Ok(msg)) = from_browser.next().await {
        let len = match &msg {
            Message::Binary(b) => b.len(),
            Message::Text(t) => t.len(),
            Message::Ping(p) | Message::Pong(p) => p.len(),
            Message::Close(_) => break,
        };
        let now = Instant::now();
        if !messages.take(1.0, now) {
            return Some(Violation::Rate(format!("more than {} messages/s", rates.messages)));
        }
        if !bytes.take(len as f64, now) {
            return Some(Violation::Rate(format!("more than {:.1} MiB/s", rates.bytes / f64::from(1u32 << 20))));
        }
        if let Message::Binary(b) = msg {
            if !one_message(&b) {
                return Some(Violation::Framing);
            }
            if to_daemon.write_all(&b).await.is_err() {
                break;
            }
        }
    }
    None
}

/// The daemon's messages to the browser, one per WebSocket message, until either side closes
/// or the browser reads nothing for `send_timeout`.
async fn daemon_to_browser(
    from_daemon: &mut OwnedReadHalf,
    to_browser: &mut SplitSink<WebSocket, Message>,
    send_timeout: Duration,
) {
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
        match tokio::time::timeout(send_timeout, to_browser.send(Message::Binary(msg.into()))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::warn!("WebSocket relay: the browser read nothing for {send_timeout:?}: closing it");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_message_is_exactly_one_protocol_message() {
        assert!(one_message(&[0, 0, 0, 1, 0x30]));
        assert!(one_message(&[0, 0, 0, 3, 0x12, 1, 2]));
        assert!(!one_message(&[0, 0, 0, 1, 0x30, 0, 0, 0, 1, 0x30]), "two Stats requests in one");
        assert!(!one_message(&[0, 0, 0, 9, 0x12, 1]), "half of one");
        assert!(!one_message(&[0, 0, 0, 0]), "empty");
        assert!(!one_message(&[]));
    }

    #[test]
    fn the_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, t0);
        assert_eq!((0..20).filter(|_| b.take(1.0, t0)).count(), 20, "two seconds' worth at once");
        assert!(!b.take(1.0, t0), "then empty");
        assert!(b.take(1.0, t0 + Duration::from_millis(150)), "refilled at the rate");
        assert!(!b.take(1.0, t0 + Duration::from_millis(160)));
        let mut bytes = Bucket::new(100.0, t0);
        assert!(bytes.take(1000.0, t0), "one message larger than the bucket passes");
        assert!(!bytes.take(1.0, t0 + Duration::from_secs(7)), "and leaves a debt of 800: 8 s");
        assert!(bytes.take(1.0, t0 + Duration::from_secs(9)));
    }
}
