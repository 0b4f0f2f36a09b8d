//! The UNet batcher: one thread with one model session, fed by any number of graphs (render
//! is one producer, a daemon's sessions are many). It batches frames across producers.
//!
//! A run takes up to `max_batch` frames, or whatever has come once the oldest frame has waited
//! `max_wait`, or at once when a producer's last frame is waiting (nothing more will come from
//! it); oldest first, at most a producer's own `limit` frames per run. Frames of cancelled
//! producers are dropped. Replies go back on each producer's own channel, which has room for
//! all of its jobs, so the batcher never blocks on a producer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use hdrhistogram::Histogram;
use lipsync_stages::crop::CropParams;
use lipsync_stages::face::{input_len, output_len, quantize_output, FacePrep};
use lipsync_stages::features::FRAME_AUDIO_LEN;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::unet::{
    self, BackendInfo, Batch, BatchSetting, Provider, RemoteSettings, RunFailure, UnetBackend, UnetError, UnetModel,
};

use crate::job::FrameJob;
use crate::metrics::histogram;
use crate::runtime::{panic_message, record, send_unless_cancelled, thread_cpu_seconds, Outlet, StageError};

/// A UNet run that failed: every frame of the batch gets it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the UNet failed on frame {index}: {source}")]
pub struct UnetFailure {
    /// The frame.
    pub index: usize,
    /// The run's error (ONNX Runtime's, the server's, or a panic), shared by the batch's frames.
    pub source: Arc<UnetError>,
}

/// What the batcher sends back: the job with its output filled, or why it failed.
pub type UnetReply = Result<FrameJob, UnetFailure>;

/// A frame waiting for the UNet.
struct Request {
    job: FrameJob,
    reply: Sender<UnetReply>,
    producer: u64,
    limit: usize,
    cancel: Arc<AtomicBool>,
    arrived: Instant,
}

/// Settings of a [`UnetService`].
#[derive(Debug, Clone)]
pub struct UnetServiceConfig {
    /// Most frames per UNet run (`auto`: resolved for the provider when the service starts).
    pub max_batch: BatchSetting,
    /// Longest the oldest waiting frame waits for a batch to fill.
    pub max_wait: Duration,
    /// ONNX Runtime intra-op threads.
    pub intra_threads: usize,
    /// Whether ORT threads spin.
    pub spinning: bool,
    /// Execution provider.
    pub provider: Provider,
    /// The server of [`Provider::Remote`].
    pub remote: Option<RemoteSettings>,
}

/// Counters of a [`UnetService`].
pub struct UnetStats {
    /// Runs per batch size (index = size).
    pub sizes: Vec<AtomicU64>,
    /// Run time per batch (ns).
    pub service: Mutex<Histogram<u64>>,
    /// How long the oldest frame of each run waited for it (ns).
    pub wait: Mutex<Histogram<u64>>,
    /// CPU time of the batcher thread (µs), updated after each run.
    pub cpu_us: AtomicU64,
    /// Runs that failed.
    pub errors: AtomicU64,
}

impl UnetStats {
    /// UNet runs so far.
    pub fn batches(&self) -> u64 {
        self.sizes.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Frames run so far.
    pub fn frames(&self) -> u64 {
        self.sizes.iter().enumerate().map(|(k, n)| k as u64 * n.load(Ordering::Relaxed)).sum()
    }
}

/// One UNet session shared by every graph that uses the model.
pub struct UnetService {
    tx: Option<Sender<Request>>,
    handle: Option<JoinHandle<()>>,
    crop: CropParams,
    max_batch: Batch,
    info: BackendInfo,
    stats: Arc<UnetStats>,
}

impl std::fmt::Debug for UnetService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnetService").field("max_batch", &self.max_batch).field("backend", &self.info).finish()
    }
}

impl UnetService {
    /// Opens the model on its backend (signature checked for the model's crop) and starts the
    /// batching thread (`ls-unet`).
    pub fn start(rt: &OrtRuntime, model: &UnetModel, cfg: &UnetServiceConfig) -> Result<Self, UnetError> {
        let opts = SessionOptions { intra_threads: cfg.intra_threads.max(1), spinning: cfg.spinning };
        let limit = cfg.max_batch.limit(cfg.provider);
        let mut backend = unet::open(rt, model, limit, &opts, cfg.provider, cfg.remote.as_ref())?;
        let info = backend.info().clone();
        let crop = model.crop;
        let resolved = match cfg.max_batch {
            BatchSetting::Fixed(b) => b,
            BatchSetting::Auto => unet::auto_batch(backend.as_mut())?,
        };
        // Measuring (auto on a GPU) ran the model already; otherwise its slow first run happens
        // now rather than on the first frame.
        if !(cfg.max_batch == BatchSetting::Auto && info.provider != Provider::Cpu) {
            unet::warm_up(backend.as_mut())?;
        }
        let max_batch = resolved.get();
        let max_wait = cfg.max_wait;
        let stats = Arc::new(UnetStats {
            sizes: (0..=max_batch).map(|_| AtomicU64::new(0)).collect(),
            service: Mutex::new(histogram()),
            wait: Mutex::new(histogram()),
            cpu_us: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        let (tx, rx) = bounded::<Request>(max_batch * 8);
        let st = stats.clone();
        let handle = std::thread::Builder::new()
            .name("ls-unet".into())
            .spawn(move || batch_loop(backend.as_mut(), &crop, &rx, max_batch, max_wait, &st))
            .map_err(|e| UnetError::Run { batch: 0, source: RunFailure::Thread(e) })?;
        Ok(Self { tx: Some(tx), handle: Some(handle), crop, max_batch: resolved, info, stats })
    }

    /// The crop geometry the model was checked against.
    pub fn crop(&self) -> &CropParams {
        &self.crop
    }

    /// Most frames per run.
    pub fn max_batch(&self) -> Batch {
        self.max_batch
    }

    /// The provider in use.
    pub fn provider(&self) -> Provider {
        self.info.provider
    }

    /// The backend: engine, provider, model and its precision.
    pub fn backend(&self) -> &BackendInfo {
        &self.info
    }

    /// Batch counters.
    pub fn stats(&self) -> &Arc<UnetStats> {
        &self.stats
    }

    /// An outlet for one producer: its jobs go to the batcher (at most `limit` of them per
    /// run), and the replies to `reply`, which must have room for all of the producer's jobs.
    pub fn port(&self, producer: u64, limit: Batch, reply: Sender<UnetReply>, cancel: Arc<AtomicBool>) -> UnetPort {
        UnetPort {
            tx: self.tx.clone().expect("the service is running until dropped"),
            reply,
            producer,
            limit: limit.get(),
            cancel,
        }
    }
}

impl Drop for UnetService {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One producer's way into a [`UnetService`]: an [`Outlet`] for prepared jobs.
pub struct UnetPort {
    tx: Sender<Request>,
    reply: Sender<UnetReply>,
    producer: u64,
    limit: usize,
    cancel: Arc<AtomicBool>,
}

impl Outlet<FrameJob> for UnetPort {
    fn put(&self, job: FrameJob, cancel: &AtomicBool) -> Result<(), StageError> {
        let index = job.index;
        let req = Request {
            job,
            reply: self.reply.clone(),
            producer: self.producer,
            limit: self.limit,
            cancel: self.cancel.clone(),
            arrived: Instant::now(),
        };
        if send_unless_cancelled(&self.tx, req, cancel) {
            Ok(())
        } else if cancel.load(Ordering::Relaxed) {
            Err(StageError::Cancelled)
        } else {
            Err(StageError::at(index, "the UNet service has stopped"))
        }
    }
}

/// What the batcher's choices read of a waiting frame.
trait Waiting {
    /// The graph it comes from.
    fn producer(&self) -> u64;
    /// At most this many of its producer's frames per run.
    fn limit(&self) -> usize;
    /// Whether it goes back without a run (idle, or made stale by an interrupt).
    fn skips(&self) -> bool;
    /// Whether it is its producer's last (nothing more will come from it).
    fn last(&self) -> bool;
}

impl Waiting for Request {
    fn producer(&self) -> u64 {
        self.producer
    }
    fn limit(&self) -> usize {
        self.limit
    }
    fn skips(&self) -> bool {
        self.job.skips_unet()
    }
    fn last(&self) -> bool {
        self.job.last
    }
}

/// Takes out of `pending`, in order, the frames that need no UNet run and can go back at once:
/// those with none of their producer's frames before them (which have been run, or are still
/// waiting, in which case they wait too), so that a producer's replies stay in order.
fn take_skipped<W: Waiting>(pending: &mut VecDeque<W>, mut back: impl FnMut(W)) {
    let mut k = 0;
    while k < pending.len() {
        let r = &pending[k];
        if r.skips() && !pending.iter().take(k).any(|q| q.producer() == r.producer()) {
            back(pending.remove(k).expect("index in range"));
        } else {
            k += 1;
        }
    }
}

/// Whether the batcher should wait for more frames before a run: the batch is not full, more
/// may come, and no waiting frame must go now (a producer's last, or one that skips the UNet).
fn should_wait<W: Waiting>(pending: &VecDeque<W>, max_batch: usize, open: bool) -> bool {
    open && pending.len() < max_batch && !pending.iter().any(|r| r.last() || r.skips())
}

/// Moves the next run's frames from `pending` into `batch`: oldest first, at most `max_batch`,
/// at most each producer's `limit`; a frame that skips the UNet holds its producer's later
/// frames back (they go after it). `counts` is scratch (frames per producer).
fn select<W: Waiting>(pending: &mut VecDeque<W>, batch: &mut Vec<W>, counts: &mut Vec<(u64, usize)>, max_batch: usize) {
    counts.clear();
    let mut k = 0;
    while k < pending.len() && batch.len() < max_batch {
        let r = &pending[k];
        let n = match counts.iter_mut().find(|(s, _)| *s == r.producer()) {
            Some((_, n)) => n,
            None => {
                counts.push((r.producer(), 0));
                &mut counts.last_mut().expect("just pushed").1
            }
        };
        if r.skips() {
            *n = usize::MAX;
            k += 1;
        } else if *n < r.limit() {
            *n += 1;
            batch.push(pending.remove(k).expect("index in range"));
        } else {
            k += 1;
        }
    }
}

/// Runs `batch` on the backend, filling each job's prediction; a panic inside the backend fails
/// this batch's frames, not the service.
fn run_batch(
    unet: &mut dyn UnetBackend,
    crop: &CropParams,
    prep: &FacePrep,
    batch: &mut [Request],
) -> Result<(), UnetError> {
    let n = batch.len();
    let (slot, out_len) = (input_len(crop), output_len(crop));
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let inputs = unet.inputs(n)?;
        for (j, r) in batch.iter().enumerate() {
            prep.tensor(&r.job.c328, crop, &mut inputs.images[j * slot..(j + 1) * slot]);
            inputs.audio[j * FRAME_AUDIO_LEN..(j + 1) * FRAME_AUDIO_LEN].copy_from_slice(&r.job.audio);
        }
        let out = unet.run(n)?;
        for (j, r) in batch.iter_mut().enumerate() {
            quantize_output(&out[j * out_len..(j + 1) * out_len], &mut r.job.pred);
        }
        Ok(())
    }))
    .unwrap_or_else(|panic| Err(UnetError::Run { batch: n, source: RunFailure::Panicked(panic_message(&*panic)) }))
}

/// The batcher's thread: waits for frames, picks each run ([`select`]), runs it and replies on
/// each frame's producer's channel, until every port is gone and nothing waits.
fn batch_loop(
    unet: &mut dyn UnetBackend,
    crop: &CropParams,
    rx: &Receiver<Request>,
    max_batch: usize,
    max_wait: Duration,
    stats: &UnetStats,
) {
    let prep = FacePrep::new();
    let mut pending: VecDeque<Request> = VecDeque::with_capacity(max_batch * 8);
    let mut batch: Vec<Request> = Vec::with_capacity(max_batch);
    let mut counts: Vec<(u64, usize)> = Vec::with_capacity(max_batch);
    let mut open = true;
    // Room for every job of the producer: never blocks. A gone producer drops it.
    let back = |r: Request| drop(r.reply.try_send(Ok(r.job)));
    loop {
        // Drop the frames of producers that were cancelled.
        pending.retain(|r| !r.cancel.load(Ordering::Relaxed));
        take_skipped(&mut pending, back);
        if pending.is_empty() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(r) => pending.push_back(r),
                Err(_) => return,
            }
        }
        let deadline = pending.front().map(|r| r.arrived + max_wait).unwrap_or_else(Instant::now);
        while should_wait(&pending, max_batch, open) {
            match rx.recv_deadline(deadline) {
                Ok(r) => pending.push_back(r),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => break,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => open = false,
            }
        }
        while let Ok(r) = rx.try_recv() {
            pending.push_back(r);
        }
        select(&mut pending, &mut batch, &mut counts, max_batch);
        let n = batch.len();
        if n == 0 {
            continue;
        }
        let t = Instant::now();
        record(&stats.wait, t.duration_since(batch[0].arrived));
        let result = run_batch(unet, crop, &prep, &mut batch).map_err(Arc::new);
        record(&stats.service, t.elapsed());
        stats.sizes[n].fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        stats.cpu_us.store((thread_cpu_seconds() * 1e6) as u64, Ordering::Relaxed);
        for r in batch.drain(..) {
            let reply = match &result {
                Ok(()) => Ok(r.job),
                Err(e) => Err(UnetFailure { index: r.job.index, source: e.clone() }),
            };
            // Room for every job of the producer: never blocks. A gone producer drops it.
            let _ = r.reply.try_send(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiting frame: (producer, limit, skips, last), and its number to follow it by.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct W(u64, usize, bool, bool, u32);

    impl Waiting for W {
        fn producer(&self) -> u64 {
            self.0
        }
        fn limit(&self) -> usize {
            self.1
        }
        fn skips(&self) -> bool {
            self.2
        }
        fn last(&self) -> bool {
            self.3
        }
    }

    fn frame(producer: u64, limit: usize, id: u32) -> W {
        W(producer, limit, false, false, id)
    }

    fn pick(pending: &mut VecDeque<W>, max_batch: usize) -> Vec<u32> {
        let (mut batch, mut counts) = (Vec::new(), Vec::new());
        select(pending, &mut batch, &mut counts, max_batch);
        batch.iter().map(|w| w.4).collect()
    }

    #[test]
    fn a_run_takes_the_oldest_frames_up_to_the_batch() {
        let mut pending: VecDeque<W> = (0..5).map(|i| frame(i % 2, 8, i as u32)).collect();
        assert_eq!(pick(&mut pending, 3), [0, 1, 2]);
        assert_eq!(pending.iter().map(|w| w.4).collect::<Vec<_>>(), [3, 4], "the rest wait, in order");
    }

    #[test]
    fn a_producer_gets_at_most_its_limit_per_run_and_others_fill_the_rest() {
        let mut pending: VecDeque<W> =
            [frame(1, 2, 0), frame(1, 2, 1), frame(1, 2, 2), frame(2, 8, 3), frame(1, 2, 4), frame(2, 8, 5)].into();
        assert_eq!(pick(&mut pending, 8), [0, 1, 3, 5]);
        assert_eq!(pick(&mut pending, 8), [2, 4], "its next frames go in the next run");
    }

    #[test]
    fn a_frame_that_skips_the_unet_holds_back_its_producers_later_frames() {
        let mut pending: VecDeque<W> = [frame(1, 8, 0), W(1, 8, true, false, 1), frame(1, 8, 2), frame(2, 8, 3)].into();
        assert_eq!(pick(&mut pending, 8), [0, 3]);
        let mut back = Vec::new();
        take_skipped(&mut pending, |w| back.push(w.4));
        assert_eq!(back, [1], "the skipped frame goes back once the frames before it have run");
        assert_eq!(pick(&mut pending, 8), [2]);
    }

    #[test]
    fn a_skipped_frame_waits_for_its_producers_earlier_frames_only() {
        let mut pending: VecDeque<W> = [frame(1, 8, 0), W(1, 8, true, false, 1), W(2, 8, true, false, 2)].into();
        let mut back = Vec::new();
        take_skipped(&mut pending, |w| back.push(w.4));
        assert_eq!(back, [2], "producer 2's frame goes at once; producer 1's waits behind frame 0");
        assert_eq!(pending.iter().map(|w| w.4).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn the_batcher_waits_only_while_a_fuller_batch_can_come() {
        let some: VecDeque<W> = [frame(1, 8, 0)].into();
        assert!(should_wait(&some, 4, true));
        assert!(!should_wait(&some, 4, false), "every port is gone: nothing more comes");
        assert!(!should_wait(&some, 1, true), "the batch is full");
        let last: VecDeque<W> = [frame(1, 8, 0), W(2, 8, false, true, 1)].into();
        assert!(!should_wait(&last, 4, true), "a producer's last frame goes now");
        let idle: VecDeque<W> = [W(1, 8, true, false, 0)].into();
        assert!(!should_wait(&idle, 4, true), "an idle frame goes now");
    }
}
