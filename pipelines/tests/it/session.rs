//! Streaming sessions against the offline render: for the same audio, every session gives the
//! render's frames bit for bit, however the audio is chunked and however many sessions share
//! the UNet service (which then batches frames across them).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::fixture;
use lipsync_pipelines::graph::sink::{FrameSink, SinkError};
use lipsync_pipelines::graph::unet::{UnetService, UnetServiceConfig};
use lipsync_pipelines::graph::Layout;
use lipsync_pipelines::job::FrameJob;
use lipsync_pipelines::render::{render, ImageFormat, Output, RenderConfig};
use lipsync_pipelines::resources::{open_template, TemplatePlan};
use lipsync_pipelines::runtime::PinPolicy;
use lipsync_pipelines::runtime::SharedStageStats;
use lipsync_pipelines::session::{Session, SessionConfig, SessionError};
use lipsync_stages::audio::{decode_file, load_16k};
use lipsync_stages::features::AudioEncoder;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::template::JpegTemplate;
use lipsync_stages::unet::{Batch, BatchSetting, Provider};

/// The offline render's JPEG frames for `audio` (its template held as JPEG frames).
fn offline(rt: &OrtRuntime, audio: &Path) -> Vec<Vec<u8>> {
    offline_with(rt, audio, 1 << 30)
}

/// [`offline`] with a template cache (a small one leaves the JPEG frames out: frames are
/// decoded and encoded whole).
fn offline_with(rt: &OrtRuntime, audio: &Path, cache: usize) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frames");
    let cfg = RenderConfig {
        batch: BatchSetting::Fixed(Batch::new(8).unwrap()),
        jpeg_quality: 90,
        template_cache: Some(cache),
        ..RenderConfig::new(
            Avatar::open(&fixture("golden/avatar")).unwrap(),
            audio.to_path_buf(),
            Output::Dir { path: out.clone(), format: ImageFormat::Jpeg },
        )
    };
    let n = render(rt, cfg).unwrap().frames;
    (0..n).map(|i| std::fs::read(out.join(format!("{i:06}.jpg"))).unwrap()).collect()
}

/// Frames a session wrote: (index, JPEG).
type Frames = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

struct Collect(Frames);

impl FrameSink for Collect {
    fn frame(&mut self, job: &FrameJob) -> Result<(), SinkError> {
        self.0.lock().unwrap().push((job.index, job.encoded.clone()));
        Ok(())
    }
}

struct Shared {
    avatar: Arc<Avatar>,
    template: Arc<lipsync_stages::template::SharedTemplate>,
    jpeg: Arc<JpegTemplate>,
    encoder: Arc<Mutex<AudioEncoder>>,
    unet: Arc<UnetService>,
    shared: Arc<SharedStageStats>,
}

fn shared(rt: &OrtRuntime, max_batch: usize, max_wait: Duration) -> Shared {
    let avatar = Avatar::open(&fixture("golden/avatar")).unwrap();
    let opened = open_template(&avatar, TemplatePlan { budget: 1 << 30, jpeg: Some((90, usize::MAX)) }).unwrap();
    let (template, jpeg) = (opened.template, opened.jpeg);
    let io = avatar.config.models.io.clone();
    let encoder = AudioEncoder::open(rt, &avatar.encoder, &io, 64, &SessionOptions::default()).unwrap();
    let max_batch = BatchSetting::Fixed(Batch::new(max_batch).unwrap());
    let cfg = UnetServiceConfig {
        max_batch,
        max_wait,
        intra_threads: 1,
        spinning: false,
        provider: Provider::Cpu,
        remote: None,
    };
    let unet = UnetService::start(rt, &avatar.unet_model(Default::default(), Provider::Cpu).unwrap(), &cfg).unwrap();
    Shared {
        avatar: Arc::new(avatar),
        template,
        jpeg: jpeg.expect("within the limit"),
        encoder: Arc::new(Mutex::new(encoder)),
        unet: Arc::new(unet),
        shared: Arc::new(SharedStageStats::default()),
    }
}

/// Settings of a session of the golden avatar (JPEG quality 90, start frame 0; staged threads
/// for even ids, compact for odd ones; ids 0 and 1 mod 4 read the template's JPEG frames, the
/// others decode frames).
fn config(sh: &Shared, id: u64, rate: u32, batch: usize, queue: usize) -> SessionConfig {
    SessionConfig {
        id,
        name: "golden".into(),
        avatar: sh.avatar.clone(),
        template: sh.template.clone(),
        template_cache: lipsync_stages::template::DEFAULT_CACHE,
        jpeg_template: (id % 4 < 2).then(|| sh.jpeg.clone()),
        encoder: sh.encoder.clone(),
        unet: sh.unet.clone(),
        sample_rate: rate,
        jpeg_quality: 90,
        batch: Batch::new(batch).unwrap(),
        queue,
        start_frame: 0,
        pin: PinPolicy::None,
        // Both thread layouts run the same stages: odd sessions are compact.
        layout: if id % 2 == 0 { Layout::Staged } else { Layout::Compact },
        shared: sh.shared.clone(),
        live: None,
    }
}

fn start(
    sh: &Shared,
    id: u64,
    rate: u32,
    batch: usize,
) -> (Session, Frames, std::sync::mpsc::Receiver<Result<u64, String>>) {
    let frames: Frames = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let cfg = config(sh, id, rate, batch, 8);
    let session = Session::start(
        cfg,
        Box::new(Collect(frames.clone())),
        Box::new(move |r| {
            let _ = tx.send(r.map(|o| o.frames).map_err(|e| e.to_string()));
        }),
    )
    .unwrap();
    (session, frames, rx)
}

/// Pushes `samples` in pseudo-random chunks (1..max samples), then ends the audio.
fn feed(session: &mut Session, samples: &[f32], seed: u64, max: usize) {
    let mut state = seed;
    let mut fed = 0;
    while fed < samples.len() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let take = (1 + (state >> 33) as usize % max).min(samples.len() - fed);
        session.push_audio(&samples[fed..fed + take]).unwrap();
        fed += take;
    }
    session.end_audio().unwrap();
}

fn check(frames: &Frames, want: &[Vec<u8>], what: &str) {
    let got = frames.lock().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: frame count");
    for (i, (index, jpeg)) in got.iter().enumerate() {
        assert_eq!(*index, i, "{what}: order");
        assert!(jpeg == &want[i], "{what}: frame {i} differs from the offline render");
    }
}

#[test]
fn one_session_equals_the_offline_render_for_any_chunking() {
    let rt = OrtRuntime::load(None).expect("ONNX Runtime (run scripts/setup.sh)");
    let audio = fixture("golden/speech_2s.wav");
    let want = offline(&rt, &audio);
    assert_eq!(want.len(), 49);
    // Spliced from the template's JPEG frames or encoded whole: the same bytes.
    assert!(offline_with(&rt, &audio, 1 << 10) == want, "a render decoding its template differs");
    let samples = load_16k(&audio).unwrap();
    let sh = shared(&rt, 8, Duration::from_millis(2));
    for (k, (max_chunk, batch)) in [(160usize, 8usize), (3000, 1), (7, 3), (40_000, 8)].into_iter().enumerate() {
        let (mut s, frames, done) = start(&sh, k as u64, 16_000, batch);
        feed(&mut s, &samples, k as u64 + 1, max_chunk);
        assert_eq!(done.recv_timeout(Duration::from_secs(60)).unwrap(), Ok(49));
        s.wait();
        check(&frames, &want, &format!("chunks up to {max_chunk}, batch {batch}"));
    }
}

#[test]
fn concurrent_sessions_share_batches_and_stay_exact() {
    let rt = OrtRuntime::load(None).expect("ONNX Runtime (run scripts/setup.sh)");
    let speech = fixture("golden/speech_2s.wav");
    let stereo = fixture("audio/clip_44k_stereo.wav");
    let want_speech = offline(&rt, &speech);
    let want_stereo = offline(&rt, &stereo);
    // A long max wait so that frames of different sessions meet in one batch.
    let sh = shared(&rt, 8, Duration::from_millis(30));
    let speech_16k = load_16k(&speech).unwrap();
    let stereo_native = decode_file(&stereo).unwrap();
    assert_eq!(stereo_native.rate, 44_100);
    std::thread::scope(|scope| {
        for k in 0..6u64 {
            let sh = &sh;
            let (want, samples, rate): (&[Vec<u8>], &[f32], u32) = if k % 2 == 0 {
                (&want_speech, &speech_16k, 16_000)
            } else {
                (&want_stereo, &stereo_native.samples, 44_100)
            };
            scope.spawn(move || {
                let (mut s, frames, done) = start(sh, 100 + k, rate, 8);
                feed(&mut s, samples, k, 4000);
                assert_eq!(done.recv_timeout(Duration::from_secs(120)).unwrap(), Ok(want.len() as u64));
                s.wait();
                check(&frames, want, &format!("session {k} at {rate} Hz"));
            });
        }
    });
    let st = sh.unet.stats();
    let batches = st.batches();
    let frames = st.frames();
    assert_eq!(frames as usize, 3 * want_speech.len() + 3 * want_stereo.len());
    assert!(frames > batches, "frames of several sessions share UNet runs: {frames} frames in {batches} runs");
    let sink = sh.shared.summary().into_iter().find(|(n, _)| n == "sink").expect("sink stats");
    assert_eq!(sink.1.count, frames + 6, "every frame, and each session's end, is timed under one name");
}

#[test]
fn failures_are_reported_not_hung() {
    let rt = OrtRuntime::load(None).expect("ONNX Runtime (run scripts/setup.sh)");
    let sh = shared(&rt, 4, Duration::from_millis(2));
    // 0.1 s of audio has no window: the session fails with the reason.
    let (mut s, frames, done) = start(&sh, 1, 16_000, 4);
    s.push_audio(&vec![0.1; 1600]).unwrap();
    s.end_audio().unwrap();
    let r = done.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(r.as_ref().is_err_and(|e| e.contains("audio too short")), "{r:?}");
    assert!(frames.lock().unwrap().is_empty());
    assert!(matches!(s.push_audio(&[0.0]), Err(SessionError::Ended)));
    s.wait();

    // A sink that fails stops the session; audio pushed afterwards is refused, not queued.
    struct Broken;
    impl FrameSink for Broken {
        fn frame(&mut self, _: &FrameJob) -> Result<(), SinkError> {
            Err(SinkError::Client(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away")))
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let cfg = config(&sh, 2, 16_000, 4, 4);
    let s = Session::start(cfg, Box::new(Broken), Box::new(move |r| tx.send(r.map(|o| o.frames)).unwrap())).unwrap();
    let speech = load_16k(&fixture("golden/speech_2s.wav")).unwrap();
    let mut refused = false;
    for chunk in speech.chunks(320).cycle().take(2000) {
        if let Err(e) = s.push_audio(chunk) {
            assert!(matches!(e, SessionError::Stopped), "{e}");
            refused = true;
            break;
        }
    }
    assert!(refused, "a failed session stops taking audio");
    assert!(s.is_stopped() && !s.audio_ended());
    let mut s = s;
    assert!(matches!(s.end_audio(), Err(SessionError::Stopped)));
    assert!(s.audio_ended(), "a stopped session counts as ended: its connection can open another");
    let r = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(r.as_ref().is_err_and(|e| e.message().contains("client went away")), "{r:?}");
    s.wait();

    // Dropping a session that was never ended cancels it and frees its threads.
    let (s, _frames, done) = start(&sh, 3, 16_000, 4);
    s.push_audio(&speech[..8000]).unwrap();
    drop(s);
    assert!(done.recv_timeout(Duration::from_secs(10)).unwrap().is_err());

    // Settings are checked.
    let cfg = SessionConfig { jpeg_quality: 0, ..config(&sh, 4, 16_000, 4, 4) };
    let e = Session::start(cfg, Box::new(Broken), Box::new(|_| {})).err().expect("quality 0 is refused");
    assert!(e.to_string().contains("JPEG quality 0"), "{e}");
}
