//! A live session of `lipsync serve`: socket source -> the graph -> socket sink.
//!
//! The daemon's connection pushes audio as it arrives ([`Session::push_audio`], any rate,
//! resampled in the graph) and ends it ([`Session::end_audio`]); frames go to the session's
//! [`FrameSink`] (the client's socket) as soon as their audio is final. The UNet batcher is the
//! avatar's shared [`UnetService`]; the session's job pool (`queue`) is its credit: a client
//! that does not read its frames stalls its own sink, then its stages, then `push_audio`, and
//! never the batcher or another session.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use lipsync_stages::face::Blend;
use lipsync_stages::features::AudioEncoder;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::template::{JpegTemplate, SharedTemplate};
use lipsync_stages::unet::Batch;

use crate::graph::encode::Encoding;
use crate::graph::frames::Template;
use crate::graph::sink::FrameSink;
use crate::graph::unet::UnetService;
use crate::graph::{build, GraphConfig, GraphError, Layout};
use crate::job::{AudioIn, FrameStats};
use crate::live::{Live, LiveConfig};
use crate::metrics::{Clock, Percentiles};
use crate::runtime::{
    lock, send_unless_cancelled, Out, PinPolicy, Pipeline, PipelineError, SharedStageStats, StageError,
};

/// Audio tensors queued ahead of the frames stage: few, so that the frames in flight (the
/// latency a backlog adds) are the `queue` jobs plus these.
const TENSORS_AHEAD: usize = 2;

/// Capacity of the channels between a session's image stages.
const CAPACITY: usize = 2;

/// Seconds of audio a live session takes ahead of its frames before `push_audio` blocks:
/// the connection keeps reading (an interrupt is seen at once) while a client sends a file
/// faster than real time.
const LIVE_AHEAD_SECONDS: usize = 30;

/// Most messages a live session's queue holds (a client sending tiny messages or a
/// stream of ends of utterance cannot grow it beyond this).
const LIVE_AHEAD_ITEMS: usize = 4096;

/// Longest wait of a live session's source between checks of its cancel flag.
const FEED_POLL: Duration = Duration::from_millis(20);

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A setting cannot work, or the session's threads could not start.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// The session has stopped (failed, cancelled or finished); no more audio is taken.
    #[error("the session has stopped")]
    Stopped,
    /// The audio stream was already ended.
    #[error("audio was already ended for this session")]
    Ended,
    /// An interrupt or an end of utterance for a session that is not live.
    #[error("the session is not live (open it with \"realtime\": true)")]
    NotLive,
    /// The supervisor thread could not start.
    #[error("could not start the session's thread: {0}")]
    Thread(std::io::Error),
}

/// What one session has done so far (read by `stats` while it runs).
pub struct SessionCounters {
    /// Session id.
    pub id: u64,
    /// Avatar name.
    pub avatar: String,
    /// Frames, latency, in flight.
    pub stats: Arc<FrameStats>,
}

/// A session's settings.
pub struct SessionConfig {
    /// Session id (unique in the daemon; the UNet batcher's producer id).
    pub id: u64,
    /// Avatar name (for stats).
    pub name: String,
    /// The avatar.
    pub avatar: Arc<Avatar>,
    /// Its template (shared read-only).
    pub template: Arc<SharedTemplate>,
    /// Bytes of decoded template frames this session's reader keeps.
    pub template_cache: usize,
    /// The template's frames for JPEG output (shared read-only), used when their quality is the
    /// session's.
    pub jpeg_template: Option<Arc<JpegTemplate>>,
    /// The audio encoder shared by sessions using the model.
    pub encoder: Arc<Mutex<AudioEncoder>>,
    /// The UNet service of the avatar's model.
    pub unet: Arc<UnetService>,
    /// Sample rate of the audio pushed (resampled to 16 kHz).
    pub sample_rate: u32,
    /// JPEG quality.
    pub jpeg_quality: u8,
    /// Most frames of this session per UNet run.
    pub batch: Batch,
    /// Frame jobs in flight (frames to sink): bounds memory and the queue a slow client builds.
    pub queue: usize,
    /// Start offset into the ping-pong template sequence.
    pub start_frame: usize,
    /// Thread pinning of the session's stages.
    pub pin: PinPolicy,
    /// Threads per stage.
    pub layout: Layout,
    /// Daemon-wide per-stage statistics.
    pub shared: Arc<SharedStageStats>,
    /// Real-time mode: idle frames, interrupts and pacing on the audio clock.
    pub live: Option<LiveConfig>,
}

/// How a session ended.
#[derive(Debug, Clone)]
pub struct SessionOutcome {
    /// Frames written.
    pub frames: u64,
    /// Latency percentiles (ms).
    pub latency: Percentiles,
}

/// Where a session's audio goes: straight into the graph, or (real-time) into the queue its
/// source thread feeds the graph from, between clock ticks.
enum Input {
    Direct(Sender<AudioIn>),
    Feed(Arc<Feed>),
}

/// A live session's queue of audio, bounded in samples.
struct Feed {
    state: Mutex<FeedState>,
    changed: Condvar,
    max_samples: usize,
}

#[derive(Default)]
struct FeedState {
    items: VecDeque<AudioIn>,
    samples: usize,
}

impl Feed {
    fn new(max_samples: usize) -> Self {
        Self { state: Mutex::new(FeedState::default()), changed: Condvar::new(), max_samples }
    }

    /// Queues an item, waiting while the queue holds too much audio or too many items; `false`
    /// once `cancel` is set. An end of utterance right after another adds nothing.
    fn push(&self, item: AudioIn, cancel: &AtomicBool) -> bool {
        let n = match &item {
            AudioIn::Samples(s, _) => s.len(),
            _ => 0,
        };
        let mut st = lock(&self.state);
        if matches!(item, AudioIn::EndUtterance(_)) && matches!(st.items.back(), Some(AudioIn::EndUtterance(_))) {
            return true;
        }
        while (n > 0 && st.samples > 0 && st.samples + n > self.max_samples) || st.items.len() >= LIVE_AHEAD_ITEMS {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            st = self.changed.wait_timeout(st, FEED_POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
        st.samples += n;
        st.items.push_back(item);
        self.changed.notify_all();
        true
    }

    /// Drops the queued audio and queues `item` in its place.
    fn replace_all(&self, item: AudioIn) {
        let mut st = lock(&self.state);
        st.items.clear();
        st.samples = 0;
        st.items.push_back(item);
        self.changed.notify_all();
    }

    /// The next item, waiting until `until` at most (`None`: time is up, which comes first
    /// even with items queued, so that ticks are never late behind audio).
    fn pop_until(&self, until: quanta::Instant, clock: &Clock) -> Option<AudioIn> {
        let mut st = lock(&self.state);
        loop {
            if clock.now() >= until {
                return None;
            }
            if let Some(item) = st.items.pop_front() {
                if let AudioIn::Samples(s, _) = &item {
                    st.samples -= s.len();
                }
                self.changed.notify_all();
                return Some(item);
            }
            let wait = until.duration_since(clock.now()).min(FEED_POLL);
            st = self.changed.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// A live session's source: queued audio into the graph, and a tick per frame period so
/// that idle frames come when no utterance owns the clock. Ends after the end of the audio.
fn live_source(feed: &Feed, live: &Live, out: &mut Out<'_, AudioIn>) -> Result<(), StageError> {
    let mut slot = 0;
    loop {
        if out.cancelled() {
            return Err(StageError::Cancelled);
        }
        match feed.pop_until(live.slot_time(slot), live.clock()) {
            Some(item) => {
                let end = matches!(item, AudioIn::End(_));
                out.send(item)?;
                if end {
                    return Ok(());
                }
            }
            None => {
                let now = live.current_slot();
                out.send(AudioIn::Tick(now))?;
                slot = now + 1;
            }
        }
    }
}

/// Called once with the session's result, after every frame was written (or it failed).
pub type OnFinish = Box<dyn FnOnce(Result<SessionOutcome, PipelineError>) + Send>;

/// A running streaming session.
pub struct Session {
    input: Option<Input>,
    live: Option<Arc<Live>>,
    recycle: Receiver<Vec<f32>>,
    cancel: Arc<AtomicBool>,
    clock: Clock,
    info: Arc<SessionCounters>,
    supervisor: Option<JoinHandle<()>>,
}

impl Session {
    /// Builds the session's graph; `on_finish` runs on a supervisor thread when its stages
    /// have all stopped.
    pub fn start(cfg: SessionConfig, sink: Box<dyn FrameSink>, on_finish: OnFinish) -> Result<Self, SessionError> {
        let clock = Clock::new();
        let mut p = Pipeline::new(cfg.pin.clone(), clock.clone()).with_shared(cfg.shared.clone());
        let cancel = p.cancel_flag();
        let live = cfg.live.map(|l| Arc::new(Live::new(l, clock.clone())));
        let graph = GraphConfig {
            id: cfg.id,
            avatar: cfg.avatar,
            template: Template {
                template: cfg.template,
                cache: cfg.template_cache,
                jpeg: cfg.jpeg_template.filter(|s| s.quality() == cfg.jpeg_quality),
            },
            start_frame: cfg.start_frame,
            first_index: 0,
            live: live.clone(),
            encoder: cfg.encoder,
            unet: cfg.unet,
            input_rate: cfg.sample_rate,
            encoding: Encoding::Jpeg(cfg.jpeg_quality),
            blend: Blend::Hard,
            batch: cfg.batch,
            jobs: cfg.queue,
            capacity: CAPACITY,
            audio_ahead: TENSORS_AHEAD,
            max_frames: None,
            progress: None,
            layout: cfg.layout,
        };
        let g = match build(&mut p, graph, sink) {
            Ok(g) => g,
            Err(e) => {
                // Stop whatever stages had started.
                cancel.store(true, Ordering::SeqCst);
                let _ = p.join();
                return Err(e.into());
            }
        };
        let input = match &live {
            None => Input::Direct(g.input),
            Some(l) => {
                let feed = Arc::new(Feed::new(cfg.sample_rate as usize * LIVE_AHEAD_SECONDS));
                let (f, l) = (feed.clone(), l.clone());
                if let Err(e) = p.source("source", g.input, move |out| live_source(&f, &l, out)) {
                    cancel.store(true, Ordering::SeqCst);
                    let _ = p.join();
                    return Err(GraphError::from(e).into());
                }
                Input::Feed(feed)
            }
        };
        let info = Arc::new(SessionCounters { id: cfg.id, avatar: cfg.name, stats: g.stats.clone() });
        let stats = g.stats;
        let supervisor = std::thread::Builder::new()
            .name(format!("ls-session-{}", cfg.id))
            .spawn(move || {
                let result = p.join().map(|_| SessionOutcome { frames: stats.frames(), latency: stats.latency() });
                on_finish(result);
            })
            .map_err(SessionError::Thread)?;
        Ok(Self { input: Some(input), live, recycle: g.recycle, cancel, clock, info, supervisor: Some(supervisor) })
    }

    /// This session's counters (read by `Stats` while it runs).
    pub fn counters(&self) -> &Arc<SessionCounters> {
        &self.info
    }

    /// Whether the session is live (a clock, idle frames, interrupts: protocol 2's `"realtime":
    /// true`).
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// Live sessions: ends the current utterance (its last frames come, then idle frames).
    pub fn end_utterance(&self) -> Result<(), SessionError> {
        if self.live.is_none() {
            return Err(SessionError::NotLive);
        }
        self.send(AudioIn::EndUtterance(self.clock.now()))
    }

    /// Live sessions: drops the queued audio and the frames not yet sent, and returns to
    /// idle frames at once; returns the index the next frame takes.
    pub fn interrupt(&self) -> Result<usize, SessionError> {
        let live = self.live.as_ref().ok_or(SessionError::NotLive)?;
        let Some(Input::Feed(feed)) = &self.input else {
            return Err(SessionError::Ended);
        };
        if self.is_stopped() {
            return Err(SessionError::Stopped);
        }
        let (generation, resume) = live.interrupt();
        feed.replace_all(AudioIn::Interrupt { generation, resume });
        Ok(resume)
    }

    /// Pushes mono samples at the session's sample rate (copied into a recycled buffer).
    /// Blocks while the session's queue is full (backpressure); fails once the session has
    /// stopped.
    pub fn push_audio(&self, samples: &[f32]) -> Result<(), SessionError> {
        if self.input.is_none() {
            return Err(SessionError::Ended);
        }
        let mut buf = self.recycle.try_recv().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(samples);
        self.send(AudioIn::Samples(buf, self.clock.now()))
    }

    /// Ends the audio stream: the remaining frames (which wait for the end of the stream) are
    /// produced, then the session finishes.
    pub fn end_audio(&mut self) -> Result<(), SessionError> {
        let sent = self.send(AudioIn::End(self.clock.now()));
        if !matches!(sent, Err(SessionError::Ended)) {
            self.input = None;
        }
        sent
    }

    /// Whether the session has stopped early (failed or cancelled): it takes no more audio and
    /// will not finish its frames.
    pub fn is_stopped(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Whether every stage has stopped (the session finished, failed or was cancelled).
    pub fn is_finished(&self) -> bool {
        self.supervisor.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Whether [`Session::end_audio`] was called.
    pub fn audio_ended(&self) -> bool {
        self.input.is_none()
    }

    fn send(&self, item: AudioIn) -> Result<(), SessionError> {
        let sent = match self.input.as_ref().ok_or(SessionError::Ended)? {
            Input::Direct(tx) => send_unless_cancelled(tx, item, &self.cancel),
            Input::Feed(feed) => feed.push(item, &self.cancel),
        };
        if sent {
            Ok(())
        } else {
            Err(SessionError::Stopped)
        }
    }

    /// Stops the session now (frames in flight are dropped).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Waits until the session has finished (after [`Session::end_audio`] or
    /// [`Session::cancel`]).
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        self.input = None;
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Session {
    /// A dropped session that was not ended is cancelled; either way its threads are joined.
    fn drop(&mut self) {
        if self.input.is_some() {
            self.cancel();
        }
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_queue_is_bounded_in_samples_and_messages() {
        let clock = Clock::new();
        let feed = Feed::new(100);
        let (go, stop) = (AtomicBool::new(false), AtomicBool::new(true));
        // Ends of utterance in a row add one item.
        assert!(feed.push(AudioIn::EndUtterance(clock.now()), &go));
        assert!(feed.push(AudioIn::EndUtterance(clock.now()), &go));
        assert_eq!(lock(&feed.state).items.len(), 1);
        // Audio beyond the bound waits (here: gives up, as the session is cancelled).
        assert!(feed.push(AudioIn::Samples(vec![0.0; 80], clock.now()), &go));
        assert!(!feed.push(AudioIn::Samples(vec![0.0; 40], clock.now()), &stop));
        // So do messages beyond the bound, whatever their size.
        for _ in 0..LIVE_AHEAD_ITEMS - 2 {
            assert!(feed.push(AudioIn::Samples(Vec::new(), clock.now()), &go));
        }
        assert!(!feed.push(AudioIn::EndUtterance(clock.now()), &stop));
        // An interrupt replaces everything queued.
        feed.replace_all(AudioIn::Interrupt { generation: 1, resume: 0 });
        let st = lock(&feed.state);
        assert_eq!((st.items.len(), st.samples), (1, 0));
    }

    #[test]
    fn a_due_tick_comes_before_queued_audio() {
        let clock = Clock::new();
        let feed = Feed::new(100);
        assert!(feed.push(AudioIn::Samples(vec![0.0; 10], clock.now()), &AtomicBool::new(false)));
        assert!(feed.pop_until(clock.now(), &clock).is_none(), "the tick is due: it goes first");
        let later = clock.now() + Duration::from_secs(1);
        assert!(matches!(feed.pop_until(later, &clock), Some(AudioIn::Samples(..))));
    }
}
