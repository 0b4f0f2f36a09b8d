//! The client library of `lipsync serve`: connect and greet, request/reply, and stream an
//! audio signal through a session with per-frame latency (used by `lipsync client`,
//! `lipsync bench serve` and the tests); [`live`]: live sessions; [`bench`]: rounds of
//! concurrent sessions, measured; [`frame_out`]: where a client's frames go.

pub mod bench;
pub mod frame_out;
pub mod live;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lipsync_pipelines::metrics::{histogram, Percentiles};
use lipsync_stages::features::{window_count, window_start_unclamped, FeatureError, WINDOW};
use lipsync_stages::mel::mel_frames;
use serde::{Deserialize, Serialize};

use crate::daemon::registry::AvatarInfo;
use crate::daemon::stats::StatsReply;
use crate::protocol::{
    parse_frame, read_message, write_json, write_parts, AudioFormat, Done, ErrorCode, ErrorReply, Hello, Kind,
    OpenRequest, Opened, WireError, PROTOCOL_VERSION,
};

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon's socket could not be reached.
    #[error("cannot connect to {socket} (is `lipsync serve` running?): {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A write or read failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A message could not be read.
    #[error("reading from the daemon: {0}")]
    Wire(#[from] WireError),
    /// The daemon answered with an `Error` message.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The daemon sent something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The audio makes no frame.
    #[error(transparent)]
    Audio(#[from] FeatureError),
    /// Frames went missing or came out of order.
    #[error("{0}")]
    Frames(String),
}

impl ClientError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| ClientError::Io { what, source }
    }
}

/// A connected, greeted client connection.
pub struct Connection {
    pub(crate) stream: UnixStream,
    pub(crate) payload: Vec<u8>,
}

/// The daemon answered with an `Error` message.
#[derive(Debug, thiserror::Error)]
#[error("the daemon replied `{code}`: {message}")]
pub struct RemoteError {
    /// Its code.
    pub code: ErrorCode,
    /// Its message.
    pub message: String,
}

impl Connection {
    /// Connects to `socket` and does the handshake.
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(socket)
            .map_err(|source| ClientError::Connect { socket: socket.to_path_buf(), source })?;
        let mut c = Self { stream, payload: Vec::new() };
        write_json(&mut c.stream, Kind::Hello, &Hello { protocol: PROTOCOL_VERSION, client: "lipsync".into() })
            .map_err(ClientError::io("sending Hello"))?;
        match c.read()? {
            Kind::Welcome => Ok(c),
            k => Err(ClientError::Protocol(format!("expected Welcome, got {k:?}"))),
        }
    }

    /// Reads one message; an `Error` message becomes a [`RemoteError`].
    pub(crate) fn read(&mut self) -> Result<Kind, ClientError> {
        let kind = read_message(&mut self.stream, &mut self.payload)?;
        if kind == Kind::Error {
            let e: ErrorReply = serde_json::from_slice(&self.payload)
                .map_err(|e| ClientError::Protocol(format!("invalid Error message: {e}")))?;
            return Err(RemoteError { code: e.code, message: e.message }.into());
        }
        Ok(kind)
    }

    /// The raw stream (to shut it down from another thread, or to set options).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends a request and returns the JSON payload of the reply of kind `want`.
    pub fn request<T: for<'de> Deserialize<'de>>(
        &mut self,
        kind: Kind,
        body: &impl Serialize,
        want: Kind,
    ) -> Result<T, ClientError> {
        write_json(&mut self.stream, kind, body).map_err(ClientError::io(format!("sending {kind:?}")))?;
        let got = self.read()?;
        if got != want {
            return Err(ClientError::Protocol(format!("expected {want:?}, got {got:?}")));
        }
        serde_json::from_slice(&self.payload)
            .map_err(|e| ClientError::Protocol(format!("invalid {want:?} message: {e}")))
    }

    /// The daemon's statistics.
    pub fn stats(&mut self) -> Result<StatsReply, ClientError> {
        self.request(Kind::StatsRequest, &serde_json::json!({}), Kind::Stats)
    }

    /// The daemon's avatars: loaded or not, sessions, frames served and memory.
    pub fn avatars(&mut self) -> Result<Vec<AvatarInfo>, ClientError> {
        let list: AvatarList = self.request(Kind::ListAvatars, &serde_json::json!({}), Kind::Avatars)?;
        Ok(list.avatars)
    }
}

/// The payload of an `Avatars` reply.
#[derive(Debug, Deserialize)]
struct AvatarList {
    avatars: Vec<AvatarInfo>,
}

/// What to stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Avatar name.
    pub avatar: String,
    /// Mono samples.
    pub samples: Vec<f32>,
    /// Their rate.
    pub rate: u32,
    /// Pace the audio at real time (else as fast as the daemon takes it).
    pub realtime: bool,
    /// Audio per message, ms.
    pub chunk_ms: f64,
    /// JPEG quality (default: the avatar's).
    pub jpeg_quality: Option<u8>,
    /// Frames of this session per UNet run (default: the daemon's).
    pub batch: Option<usize>,
    /// Start offset into the template sequence.
    pub start_frame: Option<usize>,
}

/// One received frame.
#[derive(Debug, Clone, Serialize)]
pub struct FrameRecord {
    /// Frame index.
    pub index: u32,
    /// Presentation timestamp (ms).
    pub ts_ms: u32,
    /// Received, seconds after the first audio was sent.
    pub received_s: f64,
    /// Latency from the moment its audio was all sent (or the end of the audio, for the
    /// frames that wait for it) to its arrival, ms.
    pub latency_ms: f64,
}

/// What a stream returned.
#[derive(Debug, Clone, Serialize)]
pub struct StreamOutcome {
    /// Session id.
    pub session: u64,
    /// Frame size and rate.
    pub width: usize,
    /// Frame height.
    pub height: usize,
    /// Frames per second of the video.
    pub fps: f64,
    /// Frames expected for the audio (docs/spec.md section 2: L + 2).
    pub expected_frames: usize,
    /// Frames received.
    pub frames: usize,
    /// From the first audio sent to the first frame received, ms.
    pub first_frame_ms: f64,
    /// Per-frame latency percentiles, ms.
    pub latency_ms: Percentiles,
    /// Seconds from the first audio sent to `Done`.
    pub seconds: f64,
    /// Audio length, seconds.
    pub audio_seconds: f64,
    /// Per-frame records.
    #[serde(skip)]
    pub records: Vec<FrameRecord>,
}

/// A frame's (index, timestamp ms, arrival).
type Arrival = (u32, u32, Instant);

/// 16 kHz samples frame `i` needs before it is final (docs/spec.md section 7): mel row
/// `s_{i+6} + 15`, which needs samples up to `200 (s_{i+6} + 15) + 400`.
pub fn samples_needed_16k(i: usize) -> u64 {
    let last_row = window_start_unclamped(i + 6) + WINDOW - 1;
    (200 * last_row + 400) as u64
}

/// Frames `lipsync render` makes for `n` samples at `rate` (docs/spec.md section 2: L + 2).
pub fn expected_frames(n: usize, rate: u32) -> Result<usize, ClientError> {
    let n16 = (n as f64 * 16_000.0 / f64::from(rate)).ceil() as usize;
    Ok(window_count(mel_frames(n16))? + 2)
}

/// Caps the socket's send buffer at about `bytes` so that backpressure reaches the sender
/// instead of piling audio up in the kernel.
fn set_send_buffer(stream: &UnixStream, bytes: usize) {
    let v = bytes.clamp(4096, 1 << 20) as libc::c_int;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A session opened for mono f32le audio, ready to stream: the connection (for the frame
/// reader), a write handle for audio, a handle to shut the socket down, and the chunk size.
pub(crate) struct OpenStream {
    pub(crate) conn: Connection,
    pub(crate) opened: Opened,
    pub(crate) writer: UnixStream,
    pub(crate) killer: UnixStream,
    /// Samples per Audio message.
    pub(crate) chunk: usize,
}

/// Connects, opens a session with `open` (mono f32le at `open.sample_rate`) and sets the socket
/// up for streaming `chunk_ms` messages: about 100 ms of audio in the kernel at most, so that
/// backpressure reaches the sender.
pub(crate) fn open_stream(socket: &Path, open: &OpenRequest, chunk_ms: f64) -> Result<OpenStream, ClientError> {
    let mut conn = Connection::connect(socket)?;
    let opened: Opened = conn.request(Kind::Open, open, Kind::Opened)?;
    let rate = open.sample_rate;
    let chunk = ((f64::from(rate) * chunk_ms / 1000.0).round() as usize).max(1);
    set_send_buffer(&conn.stream, rate as usize * 4 / 10);
    let writer = conn.stream.try_clone().map_err(ClientError::io("cloning the socket"))?;
    let killer = conn.stream.try_clone().map_err(ClientError::io("cloning the socket"))?;
    Ok(OpenStream { conn, opened, writer, killer, chunk })
}

/// Streams `spec` through a session on `socket`; `on_frame(index, jpeg)` gets every frame.
pub fn stream(
    socket: &Path,
    spec: &StreamSpec,
    mut on_frame: impl FnMut(u32, &[u8]) -> Result<(), ClientError> + Send,
) -> Result<StreamOutcome, ClientError> {
    let expected = expected_frames(spec.samples.len(), spec.rate)?;
    let open = OpenRequest {
        avatar: spec.avatar.clone(),
        sample_rate: spec.rate,
        format: AudioFormat::F32le,
        channels: 1,
        jpeg_quality: spec.jpeg_quality,
        batch: spec.batch,
        start_frame: spec.start_frame,
        realtime: false,
    };
    let OpenStream { mut conn, opened, mut writer, killer, chunk } = open_stream(socket, &open, spec.chunk_ms)?;
    let t0 = Instant::now();
    // (samples sent so far, when), appended after each Audio message.
    let mut sent: Vec<(u64, Instant)> = Vec::with_capacity(spec.samples.len() / chunk + 2);
    let (records, done, end_time) = std::thread::scope(|scope| -> Result<_, ClientError> {
        let reader = scope.spawn(move || {
            let read = read_frames(&mut conn, expected, &mut on_frame);
            if read.is_err() {
                // Unblock the sender: the daemon stops reading audio once nobody reads frames.
                let _ = killer.shutdown(std::net::Shutdown::Both);
            }
            read
        });
        let sent_result = send_audio(&mut writer, spec, chunk, t0, &mut sent);
        let read_result = reader.join().map_err(|_| ClientError::Frames("the frame reader panicked".into()))?;
        // A daemon error explains a failed send better than the broken pipe does.
        let (records, done) = read_result?;
        let end = sent_result?;
        Ok((records, done, end))
    })?;
    if done.frames as usize != records.len() {
        return Err(ClientError::Frames(format!("Done says {} frames but {} arrived", done.frames, records.len())));
    }
    if records.len() != expected {
        return Err(ClientError::Frames(format!(
            "received {} frames, expected {expected} for {} samples at {} Hz",
            records.len(),
            spec.samples.len(),
            spec.rate
        )));
    }
    Ok(outcome(spec, &opened, expected, records, &sent, end_time, t0))
}

/// Reads frames (in order, `expected` of them at most) until `Done`.
fn read_frames(
    conn: &mut Connection,
    expected: usize,
    on_frame: &mut impl FnMut(u32, &[u8]) -> Result<(), ClientError>,
) -> Result<(Vec<Arrival>, Done), ClientError> {
    let mut recs = Vec::with_capacity(expected);
    loop {
        match conn.read()? {
            Kind::Frame => {
                let now = Instant::now();
                let (head, jpeg) =
                    parse_frame(&conn.payload).ok_or_else(|| ClientError::Protocol("malformed Frame".into()))?;
                let (index, ts) = (head.index, head.pts_ms);
                if index as usize != recs.len() {
                    let e = format!("frame {index} arrived where frame {} was expected", recs.len());
                    return Err(ClientError::Frames(e));
                }
                on_frame(index, jpeg)?;
                recs.push((index, ts, now));
            }
            Kind::Done => {
                let done: Done = serde_json::from_slice(&conn.payload)
                    .map_err(|e| ClientError::Protocol(format!("invalid Done: {e}")))?;
                return Ok((recs, done));
            }
            // The one utterance begins at frame 0.
            Kind::Speech => {}
            k => return Err(ClientError::Protocol(format!("unexpected {k:?} during a session"))),
        }
    }
}

/// Sends the audio in `chunk`-sample messages (at its own pace when `spec.realtime`), then
/// `EndAudio`; records in `sent` how many samples had gone when. Returns when it was done.
fn send_audio(
    writer: &mut UnixStream,
    spec: &StreamSpec,
    chunk: usize,
    t0: Instant,
    sent: &mut Vec<(u64, Instant)>,
) -> Result<Instant, ClientError> {
    let mut bytes = Vec::with_capacity(chunk * 4);
    for (k, part) in spec.samples.chunks(chunk).enumerate() {
        if spec.realtime {
            let due = t0 + Duration::from_secs_f64(k as f64 * chunk as f64 / f64::from(spec.rate));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        bytes.clear();
        bytes.extend(part.iter().flat_map(|v| v.to_le_bytes()));
        write_parts(writer, Kind::Audio, &[&bytes]).map_err(ClientError::io("sending audio"))?;
        let total = sent.last().map_or(0, |s| s.0) + part.len() as u64;
        sent.push((total, Instant::now()));
    }
    write_parts(writer, Kind::EndAudio, &[]).map_err(ClientError::io("sending EndAudio"))?;
    Ok(Instant::now())
}

/// The session's figures: each frame's latency from when its audio was all sent.
fn outcome(
    spec: &StreamSpec,
    opened: &Opened,
    expected: usize,
    records: Vec<Arrival>,
    sent: &[(u64, Instant)],
    end_time: Instant,
    t0: Instant,
) -> StreamOutcome {
    let mut hist = histogram();
    let ratio = f64::from(spec.rate) / 16_000.0;
    let records: Vec<FrameRecord> = records
        .into_iter()
        .map(|(index, ts_ms, at)| {
            let need = (samples_needed_16k(index as usize) as f64 * ratio).ceil() as u64;
            let final_at = sent.iter().find(|(n, _)| *n >= need).map_or(end_time, |s| s.1).min(end_time);
            let latency = at.saturating_duration_since(final_at);
            hist.saturating_record((latency.as_nanos() as u64).max(1));
            FrameRecord {
                index,
                ts_ms,
                received_s: at.duration_since(t0).as_secs_f64(),
                latency_ms: latency.as_secs_f64() * 1e3,
            }
        })
        .collect();
    StreamOutcome {
        session: opened.session,
        width: opened.width,
        height: opened.height,
        fps: opened.fps,
        expected_frames: expected,
        frames: records.len(),
        first_frame_ms: records.first().map_or(0.0, |r| r.received_s * 1e3),
        latency_ms: Percentiles::of(&hist),
        seconds: t0.elapsed().as_secs_f64(),
        audio_seconds: spec.samples.len() as f64 / f64::from(spec.rate),
        records,
    }
}
