//! The staged runtime: each stage on its own named (optionally pinned) OS thread, stages
//! connected only by bounded crossbeam channels, the first error (or panic) cancels everything,
//! every thread is joined, per-stage metrics are collected.
//!
//! A stage is a type implementing [`Stage`]: it only says what to do with one item (and at the
//! end of its input). [`Pipeline::stage`] runs it: receiving (queue-wait time), timing (service
//! time, not counting time blocked on a full output or an empty pool), sending with
//! backpressure, cancellation and panic capture are done here, once, for every stage. The
//! runtime knows nothing about lip-sync.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use hdrhistogram::Histogram;

use crate::metrics::{histogram, Clock, Percentiles, StageMetrics};

mod chain;
mod error;
mod pin;
mod pool;

pub use chain::Chain;
pub use error::{BoxError, ErrorKind, Message, PipelineError, StageError};
pub use lipsync_stages::panic_message;
pub use pin::{PinParseError, PinPolicy, PinSetting};
pub use pool::Pool;

/// How often blocked sends/receives look at the cancel flag.
const POLL: Duration = Duration::from_millis(20);

/// Longest nap of a pacing wait ([`Out::pace_until`]).
const PACE_NAP: Duration = Duration::from_millis(2);

/// Where a stage runs, for pinning: inference stages are left to ONNX Runtime's own pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// An ordinary worker stage (pinned by `auto` to the cores inference does not use).
    Worker,
    /// A stage that runs a model with its own intra-op threads (never pinned by `auto`).
    Inference,
}

/// A histogram several threads record into.
pub type SharedHistogram = Arc<Mutex<Histogram<u64>>>;

/// Histograms shared by many pipelines (a daemon's sessions): service and queue-wait time per
/// stage name, frame latency and time to the first frame. Every pipeline built with
/// [`Pipeline::with_shared`] also records into these.
pub struct SharedStageStats {
    stages: Mutex<Vec<(String, SharedHistogram)>>,
    waits: Mutex<Vec<(String, SharedHistogram)>>,
    /// Per frame: from the arrival of the audio that made it final to the frame written.
    pub frame_latency: SharedHistogram,
    /// Per graph: from its start to its first frame written.
    pub first_frame: SharedHistogram,
}

impl Default for SharedStageStats {
    fn default() -> Self {
        Self {
            stages: Mutex::default(),
            waits: Mutex::default(),
            frame_latency: Arc::new(Mutex::new(histogram())),
            first_frame: Arc::new(Mutex::new(histogram())),
        }
    }
}

/// The histogram `name` of `list`, created on first use (kept in first-use order).
fn named(list: &Mutex<Vec<(String, SharedHistogram)>>, name: &str) -> SharedHistogram {
    let mut list = lock(list);
    if let Some((_, h)) = list.iter().find(|(n, _)| n == name) {
        return h.clone();
    }
    let h = Arc::new(Mutex::new(histogram()));
    list.push((name.to_string(), h.clone()));
    h
}

impl SharedStageStats {
    /// Statistics with these stages listed from the start (in this order), before any
    /// pipeline has run.
    pub fn with_stages(names: &[&str]) -> Self {
        let s = Self::default();
        for n in names {
            s.histogram(n);
        }
        s
    }

    /// The service-time histogram of stage `name` (created on first use, kept in first-use
    /// order).
    pub fn histogram(&self, name: &str) -> SharedHistogram {
        named(&self.stages, name)
    }

    /// The queue-wait histogram of stage `name` (created on first use).
    pub fn wait_histogram(&self, name: &str) -> SharedHistogram {
        named(&self.waits, name)
    }

    /// Every stage's (name, service, queue wait) histograms, in first-use order.
    pub fn all(&self) -> Vec<(String, SharedHistogram, SharedHistogram)> {
        let names: Vec<(String, SharedHistogram)> = lock(&self.stages).clone();
        names.into_iter().map(|(n, h)| (n.clone(), h, self.wait_histogram(&n))).collect()
    }

    /// Records one service time of stage `name`.
    pub fn record(&self, name: &str, d: Duration) {
        record(&self.histogram(name), d);
    }

    /// Percentiles (ms) of every stage's service time, in first-use order.
    pub fn summary(&self) -> Vec<(String, Percentiles)> {
        lock(&self.stages).iter().map(|(n, h)| (n.clone(), Percentiles::of(&lock(h)))).collect()
    }
}

/// Locks a mutex, recovering the data of a poisoned one (a panicking stage holds no invariant
/// that a histogram could break).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a duration (ns, at least 1) into a shared histogram.
pub fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    lock(h).saturating_record((d.as_nanos() as u64).max(1));
}

/// What a stage body sees: the cancel flag, its metrics and the clock.
pub struct StageCtx {
    name: String,
    cancel: Arc<AtomicBool>,
    shared: Option<SharedHistogram>,
    shared_wait: Option<SharedHistogram>,
    registry: Option<Arc<SharedStageStats>>,
    /// This stage's service and queue-wait histograms.
    pub metrics: StageMetrics,
    /// The shared clock.
    pub clock: Clock,
}

impl StageCtx {
    /// Joins the pipeline's shared statistics: service time under the stage's name and queue
    /// wait likewise, or, for a fused thread whose first part is `fused_first`, its queue wait
    /// under that part's name (its parts record their own service times).
    fn attach(&mut self, fused_first: Option<&str>) {
        let Some(stats) = &self.registry else { return };
        self.shared = fused_first.is_none().then(|| stats.histogram(&self.name));
        self.shared_wait = Some(stats.wait_histogram(fused_first.unwrap_or(&self.name)));
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the pipeline is being cancelled.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Records one item's service time (here and in the shared statistics, if any).
    pub fn record_service(&mut self, d: Duration) {
        self.metrics.record_service(d);
        if let Some(h) = &self.shared {
            record(h, d);
        }
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
                    let waited = self.clock.now().duration_since(start);
                    self.metrics.record_wait(waited);
                    if let Some(h) = &self.shared_wait {
                        record(h, waited);
                    }
                    return Ok(Some(item));
                }
                Err(RecvTimeoutError::Timeout) => continue,
                // Upstream gone because of a cancel is not the end of the stream.
                Err(RecvTimeoutError::Disconnected) if self.cancelled() => return Err(StageError::Cancelled),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }

    /// Sends an item downstream, blocking while the channel is full (backpressure). A gone
    /// receiver or a cancel stops the stage quietly.
    pub fn send<T: Send>(&self, tx: &Sender<T>, item: T) -> Result<(), StageError> {
        tx.put(item, &self.cancel)
    }
}

/// Where a stage's output goes: a channel, or anything that forwards items (a shared
/// service's queue).
pub trait Outlet<T>: Send {
    /// Hands `item` on, blocking while the receiver is full; `Err(Cancelled)` once `cancel` is
    /// set or the receiver is gone.
    fn put(&self, item: T, cancel: &AtomicBool) -> Result<(), StageError>;
}

impl<T: Send> Outlet<T> for Sender<T> {
    fn put(&self, item: T, cancel: &AtomicBool) -> Result<(), StageError> {
        if send_unless_cancelled(self, item, cancel) {
            Ok(())
        } else {
            Err(StageError::Cancelled)
        }
    }
}

/// The outlet of a last stage: it emits nothing.
pub struct Discard;

impl<T> Outlet<T> for Discard {
    fn put(&self, _item: T, _cancel: &AtomicBool) -> Result<(), StageError> {
        Ok(())
    }
}

/// A stage's view of its output while it works on one item: sending and taking pooled buffers
/// block (backpressure), and that blocked time is not counted as service time.
pub struct Out<'a, T> {
    ctx: &'a mut StageCtx,
    outlet: &'a dyn Outlet<T>,
    blocked: Duration,
}

impl<T> Out<'_, T> {
    /// Sends an item downstream.
    pub fn send(&mut self, item: T) -> Result<(), StageError> {
        let t = self.ctx.clock.now();
        let r = self.outlet.put(item, &self.ctx.cancel);
        self.blocked += self.ctx.clock.now().duration_since(t);
        r
    }

    /// Takes a buffer from a pool, waiting while all are in use.
    pub fn take<P>(&mut self, pool: &Pool<P>) -> Result<P, StageError> {
        let t = self.ctx.clock.now();
        let r = pool.take(self.ctx);
        self.blocked += self.ctx.clock.now().duration_since(t);
        r
    }

    /// Waits until `deadline` (real-time pacing), or until `stop()` says the item is no longer
    /// wanted; like a blocked send, the wait is not service time.
    pub fn pace_until(&mut self, deadline: quanta::Instant, stop: impl Fn() -> bool) -> Result<(), StageError> {
        let t = self.ctx.clock.now();
        loop {
            if self.ctx.cancelled() {
                return Err(StageError::Cancelled);
            }
            let now = self.ctx.clock.now();
            if now >= deadline || stop() {
                break;
            }
            // Short naps: an interrupt or a cancel is seen within a millisecond or two.
            std::thread::sleep(deadline.duration_since(now).min(PACE_NAP));
        }
        self.blocked += self.ctx.clock.now().duration_since(t);
        Ok(())
    }

    /// The statistics shared with other pipelines (a daemon's), if any.
    pub fn shared(&self) -> Option<&Arc<SharedStageStats>> {
        self.ctx.registry.as_ref()
    }

    /// The clock (for timestamps carried by items).
    pub fn clock(&self) -> &Clock {
        &self.ctx.clock
    }

    /// Whether the pipeline is being cancelled.
    pub fn cancelled(&self) -> bool {
        self.ctx.cancelled()
    }
}

/// One step of the dataflow: what to do with each input item and at the end of the input.
/// [`Pipeline::stage`] runs it on its own thread.
pub trait Stage: 'static {
    /// The items it receives.
    type In: Send + 'static;
    /// The items it sends on.
    type Out: Send + 'static;

    /// Works on one item, sending any number of items on.
    fn process(&mut self, item: Self::In, out: &mut Out<'_, Self::Out>) -> Result<(), StageError>;

    /// Called once when the input has ended (not on cancellation).
    fn finish(&mut self, _out: &mut Out<'_, Self::Out>) -> Result<(), StageError> {
        Ok(())
    }

    /// For several stages fused on one thread ([`Chain`]): the first part's name. Each part
    /// then records its own service time in the shared statistics, and the thread records its
    /// queue wait under that part's name, nothing under its own.
    fn fused_first(&self) -> Option<&'static str> {
        None
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

/// Builds and runs a set of stage threads.
pub struct Pipeline {
    cancel: Arc<AtomicBool>,
    first_error: Arc<Mutex<Option<PipelineError>>>,
    handles: Vec<(String, JoinHandle<StageReport>)>,
    pin: PinPolicy,
    cores: Vec<core_affinity::CoreId>,
    clock: Clock,
    shared: Option<Arc<SharedStageStats>>,
    prefix: String,
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
            shared: None,
            prefix: "ls-".into(),
            spawned: 0,
        }
    }

    /// Uses `flag` as the cancel flag (set it, from a signal handler say, to stop every stage);
    /// call before adding stages.
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = flag;
        self
    }

    /// Also records every stage's service time into `shared`, by stage name.
    pub fn with_shared(mut self, shared: Arc<SharedStageStats>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The cancel flag (set it to stop every stage).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The pipeline's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Runs `stage` on its own thread named `ls-NAME`: items from `input` go through
    /// [`Stage::process`], then [`Stage::finish`] once `input` has ended; outputs go to
    /// `output`.
    pub fn stage<S: Stage + Send>(
        &mut self,
        name: &str,
        placement: Placement,
        stage: S,
        input: Receiver<S::In>,
        output: impl Outlet<S::Out> + 'static,
    ) -> Result<(), PipelineError> {
        self.stage_built(name, placement, move || stage, input, output)
    }

    /// Like [`Pipeline::stage`] for a stage that must be made on the thread that runs it (one
    /// holding handles that are not `Send`): `make` runs first, on that thread.
    pub fn stage_built<S: Stage>(
        &mut self,
        name: &str,
        placement: Placement,
        make: impl FnOnce() -> S + Send + 'static,
        input: Receiver<S::In>,
        output: impl Outlet<S::Out> + 'static,
    ) -> Result<(), PipelineError> {
        self.spawn_keep(name, placement, output, move |ctx, output| {
            let mut stage = make();
            ctx.attach(stage.fused_first());
            while let Some(item) = ctx.recv(&input)? {
                run_step(ctx, output, |out| stage.process(item, out))?;
            }
            run_step(ctx, output, |out| stage.finish(out))
        })
    }

    /// Runs a source on its own thread: `body` sends items to `output` until it returns.
    pub fn source<T: Send + 'static>(
        &mut self,
        name: &str,
        output: impl Outlet<T> + 'static,
        body: impl FnOnce(&mut Out<'_, T>) -> Result<(), StageError> + Send + 'static,
    ) -> Result<(), PipelineError> {
        self.spawn_keep(name, Placement::Worker, output, move |ctx, output| {
            ctx.attach(None);
            run_step(ctx, output, body)
        })
    }

    /// Spawns a thread running `body` as stage `name`. The first failure or panic of any
    /// stage cancels the others. (Prefer [`Pipeline::stage`]; this is the primitive under it.)
    pub fn spawn<F>(&mut self, name: &str, placement: Placement, body: F) -> Result<(), PipelineError>
    where
        F: FnOnce(&mut StageCtx) -> Result<(), StageError> + Send + 'static,
    {
        self.spawn_keep(name, placement, (), move |ctx, _| {
            ctx.attach(None);
            body(ctx)
        })
    }

    /// [`Pipeline::spawn`] for a body that sends through `keep` (its output): the thread owns
    /// it, outside the body, and drops it only after a failure or panic has been recorded and
    /// the cancel flag set, so downstream stages see the cancel, never a normal end of their
    /// input (which would let them finish and commit a partial output).
    fn spawn_keep<K, F>(&mut self, name: &str, placement: Placement, keep: K, body: F) -> Result<(), PipelineError>
    where
        K: Send + 'static,
        F: FnOnce(&mut StageCtx, &K) -> Result<(), StageError> + Send + 'static,
    {
        let core = self.pin.core_for(self.spawned, placement, &self.cores);
        self.spawned += 1;
        let mut ctx = StageCtx {
            name: name.to_string(),
            cancel: self.cancel.clone(),
            // Attached by the thread once it knows whether its stage is fused.
            shared: None,
            shared_wait: None,
            registry: self.shared.clone(),
            metrics: StageMetrics::new(),
            clock: self.clock.clone(),
        };
        let cancel = self.cancel.clone();
        let first_error = self.first_error.clone();
        let stage = name.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("{}{name}", self.prefix))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        tracing::warn!("could not pin stage {stage} to core {}", core.id);
                    }
                }
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut ctx, &keep)));
                let failure = match result {
                    Ok(Ok(())) | Ok(Err(StageError::Cancelled)) => None,
                    Ok(Err(StageError::Failed { item, source })) => Some((item, ErrorKind::Failed(Arc::from(source)))),
                    Err(panic) => Some((None, ErrorKind::Panicked(panic_message(&*panic)))),
                };
                if let Some((item, kind)) = failure {
                    let mut slot = lock(&first_error);
                    // Failures after a cancel are its consequences, not the cause.
                    if slot.is_none() && !cancel.load(Ordering::SeqCst) {
                        *slot = Some(PipelineError { stage: stage.clone(), item, kind });
                    }
                    cancel.store(true, Ordering::SeqCst);
                }
                drop(keep);
                StageReport {
                    name: stage,
                    metrics: ctx.metrics,
                    cpu_seconds: thread_cpu_seconds(),
                    core: core.map(|c| c.id),
                }
            })
            .map_err(|e| PipelineError::setup(name, e))?;
        self.handles.push((name.to_string(), handle));
        Ok(())
    }

    /// Waits for every stage; returns their reports, or the first failure (after all threads
    /// have been joined).
    pub fn join(self) -> Result<Vec<StageReport>, PipelineError> {
        let mut reports = Vec::new();
        for (name, handle) in self.handles {
            match handle.join() {
                Ok(report) => reports.push(report),
                Err(panic) => {
                    lock(&self.first_error).get_or_insert(PipelineError {
                        stage: name,
                        item: None,
                        kind: ErrorKind::Panicked(panic_message(&*panic)),
                    });
                }
            }
        }
        if let Some(e) = lock(&self.first_error).take() {
            return Err(e);
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Err(PipelineError { stage: "pipeline".into(), item: None, kind: ErrorKind::Cancelled });
        }
        Ok(reports)
    }
}

/// One call of a stage body with its output: service time is the call's time less the time it
/// was blocked sending or taking pooled buffers.
fn run_step<T>(
    ctx: &mut StageCtx,
    outlet: &dyn Outlet<T>,
    body: impl FnOnce(&mut Out<'_, T>) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let t = ctx.clock.now();
    let mut out = Out { ctx, outlet, blocked: Duration::ZERO };
    let r = body(&mut out);
    let blocked = out.blocked;
    let took = ctx.clock.now().duration_since(t).saturating_sub(blocked);
    ctx.record_service(took);
    r
}

/// Sends `item`, blocking while the channel is full; `false` (item dropped) once `cancel` is
/// set or the receiver is gone.
pub fn send_unless_cancelled<T>(tx: &Sender<T>, mut item: T, cancel: &AtomicBool) -> bool {
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

#[cfg(test)]
mod tests;
