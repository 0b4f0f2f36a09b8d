//! Accepting HTTP connections within bounds: at most `max_connections` at once (one more is
//! answered 503 and closed at once, so a flood holds no descriptor past its cap), each served
//! by hyper's HTTP/1.1 connection with a timer, so that a request's head must arrive within the
//! header timeout (counted from the connection's open, or from the end of its previous
//! response), and closed when it moves no bytes for the idle timeout. `axum::serve` installs no
//! timer (hyper's header timeout then does nothing) and caps nothing, hence this loop.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::{Open, Refused};
use crate::daemon::shared::Shared;

/// Largest request head kept in memory, bytes (hyper's read buffer).
const MAX_HEAD: usize = 64 << 10;
/// Most headers in a request.
const MAX_HEADERS: usize = 64;
/// The answer to a connection over the cap.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n\
Content-Length: 51\r\n\r\nbusy: the daemon's HTTP connections are all taken\r\n";

/// The listener's bounds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_connections: usize,
    pub(super) header_timeout: Duration,
    pub(super) idle_timeout: Duration,
}

/// A connection's place under the cap (and in the connections gauge), held by the connection
/// and, after an upgrade, by its WebSocket relay: the place is free once both are done.
#[derive(Clone)]
pub(crate) struct ConnectionSlot(#[allow(dead_code)] Arc<(OwnedSemaphorePermit, Open)>);

/// Accepts until `stop` fires; dropping the runtime afterwards closes what is left.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut last_error = None::<Instant>;
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Descriptors run out only if something outside the budget took them: say so
                // now and then, and leave the kernel's queue alone for a moment.
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!("HTTP accept failed: {e}");
                    last_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.http.refuse(Refused::Busy);
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot(Arc::new((permit, Open::new(shared.clone(), |c| &c.connections))));
        tokio::spawn(connection(stream, app.clone(), slot, limits));
    }
}

/// Serves one connection until it closes, upgrades, or idles past the idle timeout.
async fn connection(stream: TcpStream, app: Router, slot: ConnectionSlot, limits: Limits) {
    let base = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Tracked { inner: stream, base, last: last.clone() });
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(slot.clone());
        let mut app = app.clone();
        async move { app.call(request).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    loop {
        let quiet = base.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        let Some(left) = limits.idle_timeout.checked_sub(quiet).filter(|d| !d.is_zero()) else {
            tracing::debug!("HTTP connection closed: no bytes for {:?}", limits.idle_timeout);
            return;
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("HTTP connection: {e}");
                }
                return;
            }
            () = tokio::time::sleep(left) => {}
        }
    }
}

/// A stream that notes when bytes last moved either way (ms since `base`).
struct Tracked {
    inner: TcpStream,
    base: Instant,
    last: Arc<AtomicU64>,
}

impl Tracked {
    fn moved(&self) {
        self.last.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
