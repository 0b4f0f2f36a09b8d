//! Live sessions of an in-process daemon: idle frames before, between and after speech;
//! speech frames byte-identical to `render --first-index`; interrupts; frames on the clock.

use std::path::Path;
use std::time::Duration;

use crate::common::{fixture, runtime};
use lipsync_pipelines::render::{render, ImageFormat, Output, RenderConfig};
use lipsync_serve::client::live::{stream_live, LiveOutcome, LiveSpec};
use lipsync_serve::client::{ClientError, Connection};
use lipsync_serve::protocol::{write_parts, ErrorCode, Kind};
use lipsync_serve::settings::InferenceOptions;
use lipsync_serve::{Daemon, ServeOptions};
use lipsync_stages::audio::decode_file;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::unet::{Batch, BatchSetting};

fn daemon(tmp: &Path) -> Daemon {
    daemon_with(tmp, None)
}

fn daemon_with(tmp: &Path, delay_ms: Option<f64>) -> Daemon {
    let avatars = tmp.join("avatars");
    std::fs::create_dir_all(&avatars).unwrap();
    std::os::unix::fs::symlink(fixture("golden/avatar"), avatars.join("golden")).unwrap();
    let options = ServeOptions {
        socket: Some(tmp.join("d.sock")),
        avatars: Some(avatars),
        inference: InferenceOptions { threads: Some(1), ..Default::default() },
        live_delay_ms: delay_ms,
        ..Default::default()
    };
    Daemon::start(options.validate().unwrap(), runtime()).unwrap()
}

/// The render's JPEGs of the golden speech with template positions from `first_index`.
fn rendered(tmp: &Path, first_index: usize) -> Vec<Vec<u8>> {
    let dir = tmp.join(format!("render-{first_index}"));
    let cfg = RenderConfig {
        batch: BatchSetting::Fixed(Batch::new(1).unwrap()),
        jpeg_quality: 90,
        first_index,
        ..RenderConfig::new(
            Avatar::open(&fixture("golden/avatar")).unwrap(),
            fixture("golden/speech_2s.wav"),
            Output::Dir { path: dir.clone(), format: ImageFormat::Jpeg },
        )
    };
    let n = render(&runtime(), cfg).unwrap().frames;
    (0..n).map(|i| std::fs::read(dir.join(format!("{i:06}.jpg"))).unwrap()).collect()
}

fn spec() -> LiveSpec {
    let audio = decode_file(&fixture("golden/speech_2s.wav")).unwrap();
    LiveSpec {
        avatar: "golden".into(),
        samples: audio.samples,
        rate: audio.rate,
        chunk_ms: 20.0,
        idle: Duration::from_millis(600),
        idle_after: Duration::from_millis(600),
        utterances: 1,
        interrupt_after: None,
        jpeg_quality: Some(90),
        start_frame: None,
    }
}

fn run(d: &Daemon, spec: &LiveSpec) -> (LiveOutcome, Vec<(bool, Vec<u8>)>) {
    let mut frames = Vec::new();
    let out = stream_live(d.socket(), spec, |i, idle, jpeg| {
        assert_eq!(i as usize, frames.len());
        frames.push((idle, jpeg.to_vec()));
        Ok(())
    })
    .unwrap();
    (out, frames)
}

#[test]
fn a_realtime_session_idles_then_speaks_the_render_frames_on_the_clock() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path());
    let (out, frames) = run(&d, &spec());
    assert_eq!(out.utterances.len(), 1, "{:?}", out.utterances);
    let first = out.utterances[0].1 as usize;
    // 600 ms of idle at 25 frames/s, then the audio's own 452.5 ms until its first frame.
    assert!(first >= 20, "speech began at frame {first}");
    let want = rendered(tmp.path(), first);
    assert!(frames[..first].iter().all(|f| f.0), "frames before the speech are idle");
    for (k, w) in want.iter().enumerate() {
        let (idle, jpeg) = &frames[first + k];
        assert!(!idle && jpeg == w, "speech frame {k} (session frame {}) differs from the render's", first + k);
    }
    let after = &frames[first + want.len()..];
    assert!(!after.is_empty() && after.iter().all(|f| f.0), "idle frames follow the speech until Finish");
    assert_eq!(out.idle_frames, frames.len() - want.len());
    // Idle frames are the template frames themselves: the same position gives the same bytes
    // whether before or after the speech (the ping-pong period of 8 boxes is 14 frames).
    let n = Avatar::open(&fixture("golden/avatar")).unwrap().boxes.len();
    let period = 2 * (n - 1);
    let late = first + want.len() + period;
    if late < frames.len() {
        let early = late % period;
        assert!(early < first, "needs an idle frame at the same position before the speech");
        assert!(frames[early].1 == frames[late].1, "idle frames {early} and {late} differ");
    }
    // Paced on the session's clock: presentation times follow the index, and no frame leaves
    // before its time (frames may leave late when the machine cannot keep up, as a debug build
    // under parallel tests may not; the drift over a long run is measured by `lipsync client
    // --live`, docs/protocol.md).
    for r in &out.records {
        assert_eq!(f64::from(r.pts_ms), (f64::from(r.index) * 40.0).round());
        let offset = r.received_s * 1e3 - f64::from(r.pts_ms);
        // The daemon's default delay is 200 ms after the slot; `Opened` came a moment after the
        // session's clock started.
        assert!(offset >= 180.0, "frame {} left early: {offset} ms after its time", r.index);
    }
    d.stop().unwrap();
}

#[test]
fn an_interrupt_drops_the_speech_and_idles_within_a_frame_or_so() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path());
    let spec = LiveSpec { utterances: 2, interrupt_after: Some(Duration::from_millis(1200)), ..spec() };
    let (out, frames) = run(&d, &spec);
    assert_eq!(out.interrupts, 2);
    assert_eq!(out.utterances.len(), 2, "{:?}", out.utterances);
    let full = rendered(tmp.path(), 0).len();
    for &(_, first) in &out.utterances {
        let first = first as usize;
        let speech = frames[first..].iter().take_while(|f| !f.0).count();
        assert!(speech > 0 && speech < full, "utterance at {first}: {speech} of {full} frames before the cut");
        // What was sent of it is the render's, frame for frame.
        let want = rendered(tmp.path(), first);
        for k in 0..speech {
            assert!(frames[first + k].1 == want[k], "frame {} differs from the render's", first + k);
        }
    }
    // Measured, not a benchmark: the bound is a frame period (40 ms), the tiny model's batch and
    // a generous margin for a loaded machine; without the drop it would be the rest of the
    // utterance (over 500 ms).
    assert!(out.interrupt_ms.max < 300.0, "interrupt took {:?}", out.interrupt_ms);
    d.stop().unwrap();
}

#[test]
fn interrupt_and_end_of_utterance_need_a_realtime_session() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon(tmp.path());
    let mut c = Connection::connect(d.socket()).unwrap();
    let open = serde_json::json!({"avatar": "golden", "sample_rate": 16000, "format": "f32le"});
    let _: serde_json::Value = c.request(Kind::Open, &open, Kind::Opened).unwrap();
    let mut w = c.stream().try_clone().unwrap();
    write_parts(&mut w, Kind::Interrupt, &[]).unwrap();
    // The error leaves the connection open: statistics still come.
    match c.stats() {
        Err(ClientError::Remote(e)) => assert_eq!(e.code, ErrorCode::NotRealtime),
        other => panic!("expected not_realtime, got {:?}", other.map(|s| s.frames_total)),
    }
    assert!(c.stats().is_ok());
    d.stop().unwrap();
}

#[test]
fn opened_comes_before_the_first_frame_even_without_delay() {
    let tmp = tempfile::tempdir().unwrap();
    let d = daemon_with(tmp.path(), Some(0.0));
    for _ in 0..5 {
        let spec = LiveSpec { utterances: 0, idle_after: Duration::from_millis(200), ..spec() };
        let (out, frames) = run(&d, &spec);
        assert!(!frames.is_empty() && frames.iter().all(|f| f.0), "{out:?}");
    }
    d.stop().unwrap();
}
