//! The client side of a live session: idle before and between utterances, speech sent at
//! the pace of real time, optional interrupts, then `Finish`. Measures first-frame latency,
//! interrupt latency and the drift of frames against the session's clock.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lipsync_pipelines::metrics::{histogram, Percentiles};
use lipsync_pipelines::runtime::lock;
use serde::Serialize;

use crate::client::{open_stream, ClientError, Connection, OpenStream};
use crate::protocol::{parse_frame, write_parts, AudioFormat, Done, Interrupted, Kind, OpenRequest, SpeechStart};

/// What a live session streams.
#[derive(Debug, Clone)]
pub struct LiveSpec {
    /// Avatar name.
    pub avatar: String,
    /// Mono samples of one utterance.
    pub samples: Vec<f32>,
    /// Their rate.
    pub rate: u32,
    /// Audio per message, ms.
    pub chunk_ms: f64,
    /// Idle time before the first utterance and between utterances.
    pub idle: Duration,
    /// Idle time after the last utterance, before `Finish`.
    pub idle_after: Duration,
    /// How many times the utterance is spoken.
    pub utterances: usize,
    /// Interrupt each utterance this long after its first audio was sent.
    pub interrupt_after: Option<Duration>,
    /// JPEG quality (default: the avatar's).
    pub jpeg_quality: Option<u8>,
    /// Start offset into the template sequence.
    pub start_frame: Option<usize>,
}

/// One frame of a live session.
#[derive(Debug, Clone, Serialize)]
pub struct LiveFrame {
    /// Frame index.
    pub index: u32,
    /// Presentation time, ms.
    pub pts_ms: u32,
    /// An idle frame.
    pub idle: bool,
    /// Received, seconds after `Opened`.
    pub received_s: f64,
}

/// What a live session returned.
#[derive(Debug, Clone, Serialize)]
pub struct LiveOutcome {
    /// Session id.
    pub session: u64,
    /// Frames per second.
    pub fps: f64,
    /// Frames received.
    pub frames: usize,
    /// Of which idle.
    pub idle_frames: usize,
    /// `(utterance, first frame)` of each utterance that made frames.
    pub utterances: Vec<(u32, u32)>,
    /// From `Opened` to the first frame, ms.
    pub first_frame_ms: f64,
    /// From each utterance's first audio sent to its first frame received, ms.
    pub speech_first_frame_ms: Vec<f64>,
    /// From each `Interrupt` sent to the first frame after it (an idle frame), ms.
    pub interrupt_ms: Percentiles,
    /// Interrupts sent.
    pub interrupts: usize,
    /// Arrival minus presentation time, ms: its floor over the first quarter of the frames (at
    /// most 10 s of them) and over the last.
    pub offset_start_ms: f64,
    /// See `offset_start_ms`.
    pub offset_end_ms: f64,
    /// `(offset_end - offset_start) * fps / 1000`, rounded: frames gained or lost against the
    /// session's clock over the run.
    pub drift_frames: i64,
    /// The latest frame's lateness beyond the starting floor, ms (a stall; not drift).
    pub max_late_ms: f64,
    /// Seconds from `Opened` to `Done`.
    pub seconds: f64,
    /// Per-frame records.
    #[serde(skip)]
    pub records: Vec<LiveFrame>,
}

/// What the reader of a live session saw: frames (with when they came), utterance starts
/// (utterance, first frame, when), interrupts (next frame, when), and `Done`.
struct Seen {
    frames: Vec<(LiveFrame, Instant)>,
    starts: Vec<(u32, u32, Instant)>,
    interrupts: Vec<(u64, Instant)>,
    done: Done,
}

/// When the sender's messages went out: each utterance's first audio, each interrupt.
#[derive(Default)]
struct Sent {
    speech: Mutex<Vec<Instant>>,
    interrupts: Mutex<Vec<Instant>>,
}

/// Runs a live session on `socket` as `spec` says; `on_frame(index, idle, jpeg)` gets
/// every frame.
pub fn stream_live(
    socket: &Path,
    spec: &LiveSpec,
    mut on_frame: impl FnMut(u32, bool, &[u8]) -> Result<(), ClientError> + Send,
) -> Result<LiveOutcome, ClientError> {
    let open = OpenRequest {
        avatar: spec.avatar.clone(),
        sample_rate: spec.rate,
        format: AudioFormat::F32le,
        channels: 1,
        jpeg_quality: spec.jpeg_quality,
        batch: None,
        start_frame: spec.start_frame,
        realtime: true,
    };
    let OpenStream { mut conn, opened, mut writer, killer, chunk } = open_stream(socket, &open, spec.chunk_ms)?;
    let t0 = Instant::now();
    let sent = Sent::default();
    let seen = std::thread::scope(|scope| -> Result<Seen, ClientError> {
        let reader = scope.spawn(|| {
            let seen = read(&mut conn, t0, &mut on_frame);
            if seen.is_err() {
                // The sender stops at once too.
                let _ = killer.shutdown(std::net::Shutdown::Both);
            }
            seen
        });
        let sending = send(&mut writer, spec, chunk, &sent);
        let seen = reader.join().map_err(|_| ClientError::Frames("the frame reader panicked".into()))?;
        let seen = seen?;
        sending?;
        Ok(seen)
    })?;
    if seen.done.frames as usize != seen.frames.len() {
        let (said, came) = (seen.done.frames, seen.frames.len());
        return Err(ClientError::Frames(format!("Done says {said} frames but {came} arrived")));
    }
    Ok(outcome(seen, &sent, opened.session, opened.fps, t0))
}

/// Reads the session's messages until `Done`, checking that frames come in order.
fn read(
    conn: &mut Connection,
    t0: Instant,
    on_frame: &mut impl FnMut(u32, bool, &[u8]) -> Result<(), ClientError>,
) -> Result<Seen, ClientError> {
    let (mut frames, mut starts, mut interrupts) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let kind = conn.read()?;
        let now = Instant::now();
        let json = |what: &str| ClientError::Protocol(format!("invalid {what}"));
        match kind {
            Kind::Frame => {
                let (h, jpeg) =
                    parse_frame(&conn.payload).ok_or_else(|| ClientError::Protocol("malformed Frame".into()))?;
                let expect = frames.last().map_or(0, |f: &(LiveFrame, Instant)| f.0.index + 1);
                if h.index != expect {
                    return Err(ClientError::Frames(format!("frame {} came where {expect} was due", h.index)));
                }
                on_frame(h.index, h.idle, jpeg)?;
                let received_s = now.duration_since(t0).as_secs_f64();
                frames.push((LiveFrame { index: h.index, pts_ms: h.pts_ms, idle: h.idle, received_s }, now));
            }
            Kind::Speech => {
                let s: SpeechStart = serde_json::from_slice(&conn.payload).map_err(|_| json("Speech"))?;
                starts.push((s.utterance, s.frame, now));
            }
            Kind::Interrupted => {
                let i: Interrupted = serde_json::from_slice(&conn.payload).map_err(|_| json("Interrupted"))?;
                interrupts.push((i.next_frame, now));
            }
            Kind::Done => {
                let done: Done = serde_json::from_slice(&conn.payload).map_err(|_| json("Done"))?;
                return Ok(Seen { frames, starts, interrupts, done });
            }
            k => return Err(ClientError::Protocol(format!("unexpected {k:?} during a session"))),
        }
    }
}

/// Sends the utterances at the pace of real time (each after `spec.idle`, each cut by an
/// interrupt if asked), then `Finish` after `spec.idle_after`.
fn send(writer: &mut UnixStream, spec: &LiveSpec, chunk: usize, sent: &Sent) -> Result<(), ClientError> {
    let io = ClientError::io;
    let mut bytes = Vec::with_capacity(chunk * 4);
    for _ in 0..spec.utterances {
        std::thread::sleep(spec.idle);
        let start = Instant::now();
        lock(&sent.speech).push(start);
        let mut interrupted = false;
        for (k, part) in spec.samples.chunks(chunk).enumerate() {
            let due = start + Duration::from_secs_f64((k * chunk) as f64 / f64::from(spec.rate));
            if let Some(after) = spec.interrupt_after.filter(|&after| due >= start + after) {
                sleep_until(start + after);
                write_parts(writer, Kind::Interrupt, &[]).map_err(io("sending Interrupt"))?;
                lock(&sent.interrupts).push(Instant::now());
                interrupted = true;
                break;
            }
            sleep_until(due);
            bytes.clear();
            bytes.extend(part.iter().flat_map(|v| v.to_le_bytes()));
            write_parts(writer, Kind::Audio, &[&bytes]).map_err(io("sending audio"))?;
        }
        if !interrupted {
            write_parts(writer, Kind::EndAudio, &[]).map_err(io("sending EndAudio"))?;
        }
    }
    std::thread::sleep(spec.idle_after);
    write_parts(writer, Kind::Finish, &[]).map_err(io("sending Finish"))
}

fn sleep_until(t: Instant) {
    if let Some(wait) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

/// The session's figures: latencies of speech and interrupts, and the drift of frames against
/// the session's clock.
fn outcome(seen: Seen, sent: &Sent, session: u64, fps: f64, t0: Instant) -> LiveOutcome {
    let Seen { frames, starts, interrupts, .. } = seen;
    let speech_sent = lock(&sent.speech).clone();
    let interrupt_sent = lock(&sent.interrupts).clone();
    let speech_first_frame_ms = starts
        .iter()
        .filter_map(|&(u, first, _)| {
            let sent = speech_sent.get(u as usize)?;
            let got = frames.iter().find(|f| f.0.index == first)?.1;
            Some(got.duration_since(*sent).as_secs_f64() * 1e3)
        })
        .collect();
    let mut hist = histogram();
    for (k, &(next, _)) in interrupts.iter().enumerate() {
        let (Some(sent), Some(f)) = (interrupt_sent.get(k), frames.iter().find(|f| u64::from(f.0.index) >= next))
        else {
            continue;
        };
        hist.saturating_record((f.1.duration_since(*sent).as_nanos() as u64).max(1));
    }
    // Frames never leave early, only late (a stall): the floor of arrival - presentation over a
    // window is the pace, and its change from the first window to the last is the drift.
    let offsets: Vec<f64> = frames.iter().map(|f| f.0.received_s * 1e3 - f64::from(f.0.pts_ms)).collect();
    let window = ((offsets.len() / 4).min(10 * fps.round() as usize)).max(1);
    let floor = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (offset_start_ms, offset_end_ms) = if offsets.is_empty() {
        (0.0, 0.0)
    } else {
        (floor(&offsets[..window.min(offsets.len())]), floor(&offsets[offsets.len().saturating_sub(window)..]))
    };
    let late = offsets.iter().map(|o| o - offset_start_ms).fold(0.0, f64::max);
    let records: Vec<LiveFrame> = frames.into_iter().map(|f| f.0).collect();
    LiveOutcome {
        session,
        fps,
        frames: records.len(),
        idle_frames: records.iter().filter(|r| r.idle).count(),
        utterances: starts.iter().map(|&(u, f, _)| (u, f)).collect(),
        first_frame_ms: records.first().map_or(0.0, |r| r.received_s * 1e3),
        speech_first_frame_ms,
        interrupt_ms: Percentiles::of(&hist),
        interrupts: interrupt_sent.len(),
        offset_start_ms,
        offset_end_ms,
        drift_frames: ((offset_end_ms - offset_start_ms) * fps / 1000.0).round() as i64,
        max_late_ms: late,
        seconds: t0.elapsed().as_secs_f64(),
        records,
    }
}
