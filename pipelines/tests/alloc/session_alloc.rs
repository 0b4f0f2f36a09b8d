//! A streaming session's hot path allocates nothing per frame in steady state: a counting
//! global allocator tallies allocations per thread. Streaming more audio adds no allocation to
//! the frames, prep, composite, encode and sink stages, and adds to the audio stage only what
//! ONNX Runtime's API allocates inside the audio encoder's runs. Sessions that decode their
//! template and sessions that splice into its JPEG frames are both checked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::alloc_counter;
use crate::common::{fixture, one_at_a_time};
use lipsync_pipelines::graph::sink::{FrameSink, SinkError};
use lipsync_pipelines::graph::unet::{UnetService, UnetServiceConfig};
use lipsync_pipelines::graph::Layout;
use lipsync_pipelines::job::FrameJob;
use lipsync_pipelines::live::LiveConfig;
use lipsync_pipelines::resources::{open_template, TemplatePlan};
use lipsync_pipelines::runtime::{PinPolicy, SharedStageStats};
use lipsync_pipelines::session::{Session, SessionConfig};
use lipsync_stages::audio::load_16k;
use lipsync_stages::features::{AudioEncoder, WINDOW_LEN};
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::template::JpegTemplate;
use lipsync_stages::unet::{Batch, BatchSetting, Provider};

/// A sink that keeps only a byte count (no allocation).
struct Count(Arc<AtomicU64>);

impl FrameSink for Count {
    fn frame(&mut self, job: &FrameJob) -> Result<(), SinkError> {
        self.0.fetch_add(job.encoded.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

struct Fixture {
    avatar: Arc<Avatar>,
    template: Arc<lipsync_stages::template::SharedTemplate>,
    jpeg: Arc<JpegTemplate>,
    encoder: Arc<Mutex<AudioEncoder>>,
    unet: Arc<UnetService>,
    shared: Arc<SharedStageStats>,
    /// What one encoder run allocates inside ONNX Runtime's API.
    per_run: u64,
}

/// A 16 kHz session of the fixture avatar, batch 2, four jobs in flight; with `jpeg`, reading
/// the template's JPEG frames.
fn config(fx: &Fixture, id: u64, layout: Layout, jpeg: bool, live: Option<LiveConfig>) -> SessionConfig {
    SessionConfig {
        id,
        name: format!("alloc{id}"),
        avatar: fx.avatar.clone(),
        template: fx.template.clone(),
        template_cache: lipsync_stages::template::DEFAULT_CACHE,
        jpeg_template: jpeg.then(|| fx.jpeg.clone()),
        encoder: fx.encoder.clone(),
        unet: fx.unet.clone(),
        sample_rate: 16_000,
        jpeg_quality: 90,
        batch: Batch::new(2).unwrap(),
        queue: 4,
        start_frame: 0,
        pin: PinPolicy::None,
        layout,
        shared: fx.shared.clone(),
        live,
    }
}

/// Streams `seconds` of speech (the 2 s fixture repeated) in 20 ms chunks; returns allocations
/// per session thread and the number of windows (L = frames - 2). A 20 ms chunk adds 1.6 mel
/// rows and a window needs 3.2 more, so each encoder run takes exactly one window, except
/// the tail windows, which run together at the end.
fn allocations(fx: &Fixture, id: u64, seconds: usize, layout: Layout, jpeg: bool) -> (HashMap<String, u64>, u64) {
    let first_slot = alloc_counter::slots();
    let speech = load_16k(&fixture("golden/speech_2s.wav")).unwrap();
    let samples: Vec<f32> = speech.iter().copied().cycle().take(seconds * 16_000).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let cfg = config(fx, id, layout, jpeg, None);
    let bytes = Arc::new(AtomicU64::new(0));
    let mut s =
        Session::start(cfg, Box::new(Count(bytes.clone())), Box::new(move |r| tx.send(r.map(|o| o.frames)).unwrap()))
            .unwrap();
    for chunk in samples.chunks(320) {
        s.push_audio(chunk).unwrap();
    }
    s.end_audio().unwrap();
    let frames = rx.recv_timeout(Duration::from_secs(120)).unwrap().unwrap();
    s.wait();
    assert!(frames as usize > seconds * 24 && bytes.load(Ordering::Relaxed) > 0);
    (alloc_counter::by_name_since(first_slot), frames - 2)
}

/// Idles a live session for `seconds` (idle frames paced at 25 frames/s); returns
/// allocations per session thread and the frames sent.
fn idle_allocations(fx: &Fixture, id: u64, seconds: f64, jpeg: bool) -> (HashMap<String, u64>, u64) {
    let first_slot = alloc_counter::slots();
    let (tx, rx) = std::sync::mpsc::channel();
    let live = LiveConfig { fps: 25.0, delay: Duration::from_millis(100) };
    let cfg = config(fx, id, Layout::Staged, jpeg, Some(live));
    let mut s = Session::start(cfg, Box::new(Count(Arc::new(AtomicU64::new(0)))), {
        Box::new(move |r| tx.send(r.map(|o| o.frames)).unwrap())
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    s.end_audio().unwrap();
    let frames = rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    s.wait();
    (alloc_counter::by_name_since(first_slot), frames)
}

#[test]
fn session_hot_path_allocates_nothing_per_frame() {
    let _one = one_at_a_time();
    let fx = fixture_models();
    let staged = &["ls-frames", "ls-prep", "ls-composite", "ls-encode", "ls-sink"][..];
    for (k, (layout, stages, jpeg)) in [
        (Layout::Staged, staged, false),
        (Layout::Compact, &["ls-frames+prep", "ls-composite+encode+sink"][..], false),
        (Layout::Staged, staged, true),
    ]
    .into_iter()
    .enumerate()
    {
        let id = 10 * k as u64;
        let (short, short_windows) = allocations(&fx, id + 1, 2, layout, jpeg);
        let (long, long_windows) = allocations(&fx, id + 2, 6, layout, jpeg);
        check(&short, &long, stages, short_windows, long_windows, fx.per_run);
    }
}

/// A live session's idle frames (ticks, template frames, pacing) allocate nothing per
/// frame either: 2 s more of idle adds no allocation to any of its threads.
#[test]
fn realtime_idle_frames_allocate_nothing_per_frame() {
    let _one = one_at_a_time();
    let fx = fixture_models();
    for (id, jpeg) in [(101, false), (103, true)] {
        let (short, a) = idle_allocations(&fx, id, 1.0, jpeg);
        let (long, b) = idle_allocations(&fx, id + 1, 3.0, jpeg);
        let extra = b.saturating_sub(a);
        assert!(extra >= 40, "2 s more idle made {extra} more frames");
        for stage in ["ls-source", "ls-audio", "ls-frames", "ls-prep", "ls-composite", "ls-encode", "ls-sink"] {
            let (x, y) = (short.get(stage).copied().unwrap_or(0), long.get(stage).copied().unwrap_or(0));
            assert!(
                y.saturating_sub(x) * 6 < extra,
                "stage {stage} (JPEG frames: {jpeg}): {x} allocations for {a} frames, {y} for {b}"
            );
        }
    }
}

fn fixture_models() -> Fixture {
    let rt = OrtRuntime::load(None).expect("ONNX Runtime (run scripts/setup.sh)");
    let avatar = Avatar::open(&fixture("golden/avatar")).unwrap();
    let opened = open_template(&avatar, TemplatePlan { budget: 1 << 30, jpeg: Some((90, usize::MAX)) }).unwrap();
    let (template, jpeg) = (opened.template, opened.jpeg);
    let io = avatar.config.models.io.clone();
    let mut encoder = AudioEncoder::open(&rt, &avatar.encoder, &io, 64, &SessionOptions::default()).unwrap();
    // What one encoder run of one window allocates inside ONNX Runtime's API (warm).
    let window = vec![0.1f32; WINDOW_LEN];
    let mut o = Vec::with_capacity(4096);
    encoder.encode(&window, &mut o).unwrap();
    o.clear();
    let before = alloc_counter::this_thread();
    encoder.encode(&window, &mut o).unwrap();
    let per_run = alloc_counter::this_thread() - before;
    assert!(per_run > 0, "the counter counts ONNX Runtime's allocations");
    let cfg = UnetServiceConfig {
        max_batch: BatchSetting::Fixed(Batch::new(2).unwrap()),
        max_wait: Duration::from_millis(1),
        intra_threads: 1,
        spinning: false,
        provider: Provider::Cpu,
        remote: None,
    };
    let unet = UnetService::start(&rt, &avatar.unet_model(Default::default(), Provider::Cpu).unwrap(), &cfg).unwrap();
    Fixture {
        avatar: Arc::new(avatar),
        template,
        jpeg: jpeg.expect("within the limit"),
        encoder: Arc::new(Mutex::new(encoder)),
        unet: Arc::new(unet),
        shared: Arc::new(SharedStageStats::default()),
        per_run,
    }
}

fn check(
    short: &HashMap<String, u64>,
    long: &HashMap<String, u64>,
    stages: &[&str],
    short_windows: u64,
    long_windows: u64,
    per_run: u64,
) {
    let extra_frames = 100u64; // 4 s more audio: 100 more frames
    for &stage in stages {
        let a = *short.get(stage).unwrap_or_else(|| panic!("stage {stage} ran: {short:?}"));
        let b = long[stage];
        // Channel wake-ups may register a waiter now and then (timing-dependent); a per-frame
        // allocation would add at least 100.
        assert!(b.saturating_sub(a) * 6 < extra_frames, "stage {stage}: {a} allocations for 2 s, {b} for 6 s");
    }
    let a = short["ls-audio"];
    let b = long["ls-audio"];
    let extra_runs = long_windows - short_windows;
    // 200 more chunks: an allocation per chunk of our own would add 200.
    assert!(
        b.saturating_sub(a) <= extra_runs * per_run + extra_runs / 4,
        "audio stage: {a} allocations for 2 s, {b} for 6 s; {extra_runs} more encoder runs, ORT allocates {per_run} per run"
    );
}
