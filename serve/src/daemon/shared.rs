//! What the daemon's threads share: the avatar registry, every session's stage statistics and
//! counters, the open connections, and the HTTP listener's figures.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lipsync_pipelines::graph::StageId;
use lipsync_pipelines::runtime::SharedStageStats;
use lipsync_pipelines::session::SessionCounters;

use crate::daemon::registry::Registry;
use crate::daemon::writer::Writer;

/// Everything connection threads share.
pub(crate) struct Shared {
    pub(crate) registry: Registry,
    /// Every session's stage service times, by stage name.
    pub(crate) stages: Arc<SharedStageStats>,
    /// Frames sent by all sessions.
    pub(crate) frames_total: AtomicU64,
    pub(crate) sessions: Mutex<HashMap<u64, Arc<SessionCounters>>>,
    pub(crate) active: AtomicUsize,
    pub(crate) next_id: AtomicU64,
    pub(crate) sessions_total: AtomicU64,
    pub(crate) started: Instant,
    /// Open connections: the raw stream (to shut it down) and, once greeted, its writer (to
    /// send a last error).
    pub(crate) connections: Mutex<HashMap<u64, (UnixStream, Option<Writer>)>>,
    pub(crate) draining: AtomicBool,
    /// Sessions started whose last message (Done or Error) is not out yet.
    pub(crate) finishing: AtomicUsize,
    /// Sessions that failed.
    pub(crate) sessions_failed: AtomicU64,
    /// Idle frames sent by all sessions.
    pub(crate) idle_frames_total: AtomicU64,
    /// The HTTP listener's connections, relays and refusals.
    pub(crate) http: crate::daemon::http_stats::Counters,
}

impl Shared {
    /// A new daemon's state over `registry`.
    pub(crate) fn new(registry: Registry) -> Self {
        Self {
            registry,
            stages: Arc::new(SharedStageStats::with_stages(&StageId::thread_names())),
            frames_total: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            sessions_total: AtomicU64::new(0),
            started: Instant::now(),
            connections: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            finishing: AtomicUsize::new(0),
            sessions_failed: AtomicU64::new(0),
            idle_frames_total: AtomicU64::new(0),
            http: crate::daemon::http_stats::Counters::default(),
        }
    }

    /// Sessions being opened, running, or sending their last message.
    pub(crate) fn in_progress(&self) -> usize {
        self.active.load(Ordering::SeqCst).max(self.finishing.load(Ordering::SeqCst))
    }
}
