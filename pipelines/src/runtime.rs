//! The staged runtime: each stage on its own named (optionally pinned) OS thread, stages
//! connected only by bounded crossbeam channels, first error (or panic) cancels everything,
//! every thread joined, per-stage metrics collected.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use crate::metrics::{Clock, StageMetrics};

/// How often blocked sends/receives look at the cancel flag.
const POLL: Duration = Duration::from_millis(20);

/// Why a stage stopped early.
#[derive(Debug)]
pub enum StageError {
    /// The stage failed; the pipeline reports this.
    Failed {
        /// The output frame being worked on, when known.
        frame: Option<usize>,
        /// What went wrong.
        message: String,
    },
    /// Another stage failed or a neighbour went away: stop quietly.
    Cancelled,
}

impl StageError {
    /// A failure at `frame` with `message`.
    pub fn at(frame: usize, message: impl std::fmt::Display) -> Self {
        StageError::Failed { frame: Some(frame), message: message.to_string() }
    }

    /// A failure not tied to one frame.
    pub fn msg(message: impl std::fmt::Display) -> Self {
        StageError::Failed { frame: None, message: message.to_string() }
    }
}

/// The error a pipeline run returns: the first stage failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("stage `{stage}` failed{}: {message}", frame.map(|f| format!(" at frame {f}")).unwrap_or_default())]
pub struct PipelineError {
    /// The stage's name.
    pub stage: String,
    /// The frame index, when known.
    pub frame: Option<usize>,
    /// What went wrong.
    pub message: String,
}

/// Where stage threads run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PinPolicy {
    /// Let the OS schedule every thread.
    #[default]
    None,
    /// Spread stages over the cores left after the inference thread and ONNX Runtime's
    /// intra-op threads (the first `reserved` cores); no pinning when fewer than
    /// `reserved + 2` cores exist (pinned stages would then fight ORT for the same cores).
    Auto {
        /// Cores left to the inference stage and its intra-op pool.
        reserved: usize,
    },
    /// Pin the stages, in the order they are spawned, to these core ids (cycling).
    List(Vec<usize>),
}

impl PinPolicy {
    /// Parses `auto`, `none` or a comma-separated list of core ids; `auto` reserves
    /// `intra_threads` cores for inference.
    pub fn parse(s: &str, intra_threads: usize) -> Result<Self, String> {
        match s {
            "none" => Ok(PinPolicy::None),
            "auto" => Ok(PinPolicy::Auto { reserved: intra_threads.max(1) }),
            list => list
                .split(',')
                .map(|c| {
                    c.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("bad core id `{c}` in --pin (expected auto, none or a list like 0,1,2)"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(PinPolicy::List),
        }
    }

    /// The core for the `k`-th stage (`inference` marks the inference stage), if pinned.
    fn core_for(&self, k: usize, inference: bool, cores: &[core_affinity::CoreId]) -> Option<core_affinity::CoreId> {
        match self {
            PinPolicy::None => None,
            PinPolicy::List(ids) if !ids.is_empty() => {
                let id = ids[k % ids.len()];
                cores.iter().find(|c| c.id == id).copied()
            }
            PinPolicy::List(_) => None,
            PinPolicy::Auto { reserved } => {
                if inference || cores.len() < reserved + 2 {
                    return None;
                }
                let free = &cores[*reserved..];
                Some(free[k % free.len()])
            }
        }
    }
}

/// What a stage sees: the cancel flag, its metrics and the clock.
pub struct StageCtx {
    name: String,
    cancel: Arc<AtomicBool>,
    /// This stage's service and queue-wait histograms.
    pub metrics: StageMetrics,
    /// The shared clock.
    pub clock: Clock,
}

impl StageCtx {
    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the pipeline is being cancelled.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Receives the next item, recording the wait as queue-wait time. `Ok(None)` when the
    /// sender has finished (end of stream); `Err(Cancelled)` when the pipeline is cancelled.
    pub fn recv<T>(&mut self, rx: &Receiver<T>) -> Result<Option<T>, StageError> {
        let start = self.clock.now();
        loop {
            if self.cancelled() {
                return Err(StageError::Cancelled);
            }
            match rx.recv_timeout(POLL) {
                Ok(item) => {
                    self.metrics.record_wait(self.clock.now().duration_since(start));
                    return Ok(Some(item));
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }

    /// Receives without waiting: `Ok(None)` when nothing is queued, `Err(Cancelled)` when
    /// cancelled, and `Ok(Some(None))`-like end of stream reported as `Err(Cancelled)` is not
    /// used: callers check [`Receiver::is_empty`] and disconnection through [`StageCtx::recv`].
    pub fn try_recv<T>(&self, rx: &Receiver<T>) -> Result<Option<T>, StageError> {
        if self.cancelled() {
            return Err(StageError::Cancelled);
        }
        Ok(rx.try_recv().ok())
    }

    /// Sends an item downstream, blocking while the channel is full (backpressure). A gone
    /// receiver or a cancel stops the stage quietly.
    pub fn send<T>(&self, tx: &Sender<T>, item: T) -> Result<(), StageError> {
        if send_unless_cancelled(tx, item, &self.cancel) {
            Ok(())
        } else {
            Err(StageError::Cancelled)
        }
    }
}

/// Result of one finished stage.
pub struct StageReport {
    /// The stage's name.
    pub name: String,
    /// Its histograms.
    pub metrics: StageMetrics,
    /// CPU time the thread used, in seconds.
    pub cpu_seconds: f64,
    /// The core it was pinned to.
    pub core: Option<usize>,
}

type Outcome = (StageReport, Result<(), StageError>);

/// Builds and runs a set of stage threads.
pub struct Pipeline {
    cancel: Arc<AtomicBool>,
    first_error: Arc<Mutex<Option<PipelineError>>>,
    handles: Vec<(String, JoinHandle<Outcome>)>,
    pin: PinPolicy,
    cores: Vec<core_affinity::CoreId>,
    clock: Clock,
    spawned: usize,
}

impl Pipeline {
    /// An empty pipeline with a pinning policy.
    pub fn new(pin: PinPolicy, clock: Clock) -> Self {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        Self {
            cancel: Arc::new(AtomicBool::new(false)),
            first_error: Arc::new(Mutex::new(None)),
            handles: Vec::new(),
            pin,
            cores,
            clock,
            spawned: 0,
        }
    }

    /// The cancel flag (set it to stop every stage).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Spawns a stage thread named `name`. `inference` marks the stage that runs ONNX Runtime
    /// (never pinned by `auto`). The first failure or panic of any stage cancels the others.
    pub fn spawn<F>(&mut self, name: &str, inference: bool, body: F) -> Result<(), PipelineError>
    where
        F: FnOnce(&mut StageCtx) -> Result<(), StageError> + Send + 'static,
    {
        let core = self.pin.core_for(self.spawned, inference, &self.cores);
        self.spawned += 1;
        let mut ctx = StageCtx {
            name: name.to_string(),
            cancel: self.cancel.clone(),
            metrics: StageMetrics::new(),
            clock: self.clock.clone(),
        };
        let cancel = self.cancel.clone();
        let first_error = self.first_error.clone();
        let stage = name.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("ls-{name}"))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        tracing::warn!("could not pin stage {stage} to core {}", core.id);
                    }
                }
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut ctx)));
                let result = match result {
                    Ok(r) => r,
                    Err(panic) => Err(StageError::Failed {
                        frame: None,
                        message: format!("panicked: {}", panic_message(&*panic)),
                    }),
                };
                if let Err(StageError::Failed { frame, message }) = &result {
                    let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.is_none() {
                        *slot = Some(PipelineError { stage: stage.clone(), frame: *frame, message: message.clone() });
                    }
                    cancel.store(true, Ordering::SeqCst);
                }
                let report = StageReport {
                    name: stage,
                    metrics: ctx.metrics,
                    cpu_seconds: thread_cpu_seconds(),
                    core: core.map(|c| c.id),
                };
                (report, result)
            })
            .map_err(|e| PipelineError {
                stage: name.to_string(),
                frame: None,
                message: format!("could not start thread: {e}"),
            })?;
        self.handles.push((name.to_string(), handle));
        Ok(())
    }

    /// Waits for every stage; returns their reports, or the first failure (after all threads
    /// have been joined).
    pub fn join(self) -> Result<Vec<StageReport>, PipelineError> {
        let mut reports = Vec::new();
        let mut cancelled_without_error = None;
        for (name, handle) in self.handles {
            match handle.join() {
                Ok((report, result)) => {
                    if let Err(StageError::Cancelled) = result {
                        cancelled_without_error.get_or_insert(name);
                    }
                    reports.push(report);
                }
                Err(panic) => {
                    let mut slot = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(PipelineError { stage: name, frame: None, message: panic_message(&*panic) });
                }
            }
        }
        if let Some(e) = self.first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Err(PipelineError { stage: "pipeline".into(), frame: None, message: "cancelled".into() });
        }
        if let Some(stage) = cancelled_without_error {
            tracing::debug!("stage {stage} stopped because its neighbour finished");
        }
        Ok(reports)
    }
}

/// Sends `item`, blocking while the channel is full; `false` (item dropped) once `cancel` is
/// set or the receiver is gone.
pub(crate) fn send_unless_cancelled<T>(tx: &Sender<T>, mut item: T, cancel: &AtomicBool) -> bool {
    loop {
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        match tx.send_timeout(item, POLL) {
            Ok(()) => return true,
            Err(SendTimeoutError::Timeout(back)) => item = back,
            Err(SendTimeoutError::Disconnected(_)) => return false,
        }
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc == 0 {
        ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
    } else {
        0.0
    }
}

/// A fixed set of reusable buffers: take one (blocking while all are in use), give it back
/// when done. Memory in flight is bounded by the pool size.
pub struct Pool<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), rx: self.rx.clone() }
    }
}

impl<T> Pool<T> {
    /// A pool of `n` items made by `make`.
    pub fn new(n: usize, mut make: impl FnMut() -> T) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(n);
        for _ in 0..n {
            tx.send(make()).expect("pool has room for its items");
        }
        Self { tx, rx }
    }

    /// Takes an item, waiting (queue-wait) while all are in use.
    pub fn take(&self, ctx: &mut StageCtx) -> Result<T, StageError> {
        ctx.recv(&self.rx)?.ok_or(StageError::Cancelled)
    }

    /// Gives an item back.
    pub fn give(&self, item: T) {
        let _ = self.tx.try_send(item);
    }
}
