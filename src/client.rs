//! Clients of `lipsync serve`: `lipsync client` (stream an audio file, write the frames,
//! print latencies), `lipsync stats` and `lipsync avatar list|load|unload --socket`. The
//! streaming function is shared with `lipsync bench serve`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use lipsync_pipelines::metrics::{histogram, Percentiles};
use lipsync_stages::audio::decode_file;
use lipsync_stages::features::{window_count, window_start_unclamped, WINDOW};
use lipsync_stages::mel::mel_frames;
use lipsync_stages::staged::{check_new_dir, parent_dir, temp_sibling, StagedDir};
use serde::{Deserialize, Serialize};

use crate::protocol::{
    parse_frame, read_message, write_json, write_parts, AudioFormat, Done, ErrorReply, Hello, Kind, OpenRequest,
    Opened, PROTOCOL_VERSION,
};
use crate::serve::StatsReply;

/// A connected, greeted client connection.
pub struct Connection {
    stream: UnixStream,
    payload: Vec<u8>,
}

/// The daemon answered with an `Error` message.
#[derive(Debug, thiserror::Error)]
#[error("the daemon replied `{code}`: {message}")]
pub struct RemoteError {
    /// Its code.
    pub code: String,
    /// Its message.
    pub message: String,
}

impl Connection {
    /// Connects to `socket` and does the handshake.
    pub fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("cannot connect to {} (is `lipsync serve` running?)", socket.display()))?;
        let mut c = Self { stream, payload: Vec::new() };
        write_json(&mut c.stream, Kind::Hello, &Hello { protocol: PROTOCOL_VERSION, client: "lipsync".into() })
            .context("sending Hello")?;
        match c.read()? {
            Kind::Welcome => Ok(c),
            k => bail!("expected Welcome, got {k:?}"),
        }
    }

    /// Reads one message; an `Error` message becomes a [`RemoteError`].
    fn read(&mut self) -> Result<Kind> {
        let kind = read_message(&mut self.stream, &mut self.payload).context("reading from the daemon")?;
        if kind == Kind::Error {
            let e: ErrorReply = serde_json::from_slice(&self.payload).context("invalid Error message")?;
            return Err(RemoteError { code: e.code, message: e.message }.into());
        }
        Ok(kind)
    }

    /// Sends a request and returns the JSON payload of the reply of kind `want`.
    pub fn request<T: for<'de> Deserialize<'de>>(
        &mut self,
        kind: Kind,
        body: &impl Serialize,
        want: Kind,
    ) -> Result<T> {
        write_json(&mut self.stream, kind, body).with_context(|| format!("sending {kind:?}"))?;
        let got = self.read()?;
        if got != want {
            bail!("expected {want:?}, got {got:?}");
        }
        serde_json::from_slice(&self.payload).with_context(|| format!("invalid {want:?} message"))
    }

    /// The daemon's statistics.
    pub fn stats(&mut self) -> Result<StatsReply> {
        self.request(Kind::StatsRequest, &serde_json::json!({}), Kind::Stats)
    }
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
    /// Frames expected for the audio (SPEC: L + 2).
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

/// 16 kHz samples frame `i` needs before it is final (SPEC.md section 2, streaming): mel row
/// `s_{i+6} + 15`, which needs samples up to `200 (s_{i+6} + 15) + 400`.
pub fn samples_needed_16k(i: usize) -> u64 {
    let last_row = window_start_unclamped(i + 6) + WINDOW - 1;
    (200 * last_row + 400) as u64
}

/// Frames `lipsync render` makes for `n` samples at `rate` (SPEC: L + 2).
pub fn expected_frames(n: usize, rate: u32) -> Result<usize> {
    let n16 = (n as f64 * 16_000.0 / f64::from(rate)).ceil() as usize;
    Ok(window_count(mel_frames(n16)).map_err(|e| anyhow!("{e}"))? + 2)
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

/// Streams `spec` through a session on `socket`; `on_frame(index, jpeg)` gets every frame.
pub fn stream(
    socket: &Path,
    spec: &StreamSpec,
    mut on_frame: impl FnMut(u32, &[u8]) -> Result<()> + Send,
) -> Result<StreamOutcome> {
    let expected = expected_frames(spec.samples.len(), spec.rate)?;
    let mut conn = Connection::connect(socket)?;
    let open = OpenRequest {
        avatar: spec.avatar.clone(),
        sample_rate: spec.rate,
        format: AudioFormat::F32le,
        channels: 1,
        jpeg_quality: spec.jpeg_quality,
        batch: spec.batch,
        start_frame: spec.start_frame,
    };
    let opened: Opened = conn.request(Kind::Open, &open, Kind::Opened).context("opening a session")?;
    let chunk = ((f64::from(spec.rate) * spec.chunk_ms / 1000.0).round() as usize).max(1);
    // About 100 ms of audio in the kernel at most.
    set_send_buffer(&conn.stream, spec.rate as usize * 4 / 10);
    let mut writer = conn.stream.try_clone().context("cloning the socket")?;
    let killer = conn.stream.try_clone().context("cloning the socket")?;
    let t0 = Instant::now();
    // (samples sent so far, when), appended after each Audio message.
    let mut sent: Vec<(u64, Instant)> = Vec::with_capacity(spec.samples.len() / chunk + 2);

    let (records, done, end_time) = std::thread::scope(|scope| -> Result<_> {
        let reader = scope.spawn(move || -> Result<(Vec<Arrival>, Done)> {
            let mut recs = Vec::with_capacity(expected);
            let result = (|| loop {
                match conn.read()? {
                    Kind::Frame => {
                        let now = Instant::now();
                        let (index, ts, jpeg) = parse_frame(&conn.payload).context("malformed Frame")?;
                        if index as usize != recs.len() {
                            bail!("frame {index} arrived where frame {} was expected", recs.len());
                        }
                        on_frame(index, jpeg)?;
                        recs.push((index, ts, now));
                    }
                    Kind::Done => {
                        let done: Done = serde_json::from_slice(&conn.payload).context("invalid Done")?;
                        return Ok((recs, done));
                    }
                    k => bail!("unexpected {k:?} during a session"),
                }
            })();
            if result.is_err() {
                // Unblock the sender: the daemon stops reading audio once nobody reads frames.
                let _ = killer.shutdown(std::net::Shutdown::Both);
            }
            result
        });
        let mut send = || -> Result<Instant> {
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
                write_parts(&mut writer, Kind::Audio, &[&bytes]).context("sending audio")?;
                let total = sent.last().map_or(0, |s| s.0) + part.len() as u64;
                sent.push((total, Instant::now()));
            }
            write_parts(&mut writer, Kind::EndAudio, &[]).context("sending EndAudio")?;
            Ok(Instant::now())
        };
        let sent_result = send();
        let read_result = reader.join().map_err(|_| anyhow!("the frame reader panicked"))?;
        // A daemon error explains a failed send better than the broken pipe does.
        let (records, done) = read_result?;
        let end = sent_result?;
        Ok((records, done, end))
    })?;

    if done.frames as usize != records.len() {
        bail!("Done says {} frames but {} arrived", done.frames, records.len());
    }
    if records.len() != expected {
        bail!(
            "received {} frames, expected {expected} for {} samples at {} Hz",
            records.len(),
            spec.samples.len(),
            spec.rate
        );
    }
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
    Ok(StreamOutcome {
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
    })
}

/// `lipsync client` flags.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The daemon's socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Avatar name (a directory under the daemon's avatars directory).
    #[arg(long)]
    pub avatar: String,
    /// Audio file to stream (any format `lipsync render` reads; sent at its own rate).
    #[arg(long)]
    pub audio: PathBuf,
    /// Where frames go: a new directory of JPEGs, `-` for MJPEG on stdout, or a `.mjpeg` file;
    /// none: frames are counted and timed only.
    #[arg(short, long, value_name = "DIR|-|FILE.mjpeg")]
    pub output: Option<PathBuf>,
    /// Pace the audio at real time (else as fast as the daemon takes it).
    #[arg(long)]
    pub realtime: bool,
    /// Audio per message, ms.
    #[arg(long, default_value_t = 20.0)]
    pub chunk_ms: f64,
    /// JPEG quality (default: the avatar's).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: Option<u8>,
    /// Frames of this session per UNet run (default: the daemon's --max-batch, at most its
    /// --session-queue).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Start offset into the template sequence (default: the avatar's).
    #[arg(long)]
    pub start_frame: Option<usize>,
    /// Print the result as JSON (with per-frame records) instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Frames written by the client: a directory built under a temporary name, stdout or a file
/// (temporary sibling, renamed when complete).
enum FrameOut {
    None,
    Dir { dir: StagedDir, name: String },
    Stream(Box<dyn Write + Send>),
    File { tmp: PathBuf, path: PathBuf, file: std::io::BufWriter<std::fs::File> },
}

impl FrameOut {
    fn open(output: Option<&Path>) -> Result<Self> {
        let Some(path) = output else { return Ok(FrameOut::None) };
        if path == Path::new("-") {
            return Ok(FrameOut::Stream(Box::new(std::io::BufWriter::new(std::io::stdout()))));
        }
        let parent = parent_dir(path);
        if !parent.is_dir() {
            bail!("directory {} does not exist", parent.display());
        }
        if path.file_name().is_none() {
            bail!("output path {} has no file name", path.display());
        }
        if path.extension().is_some_and(|e| e == "mjpeg" || e == "mjpg") {
            let tmp = temp_sibling(path);
            let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            return Ok(FrameOut::File { tmp, path: path.to_path_buf(), file: std::io::BufWriter::new(file) });
        }
        check_new_dir(path).map_err(anyhow::Error::msg)?;
        Ok(FrameOut::Dir { dir: StagedDir::create(path).map_err(anyhow::Error::msg)?, name: String::new() })
    }

    fn write(&mut self, index: u32, jpeg: &[u8]) -> Result<()> {
        match self {
            FrameOut::None => Ok(()),
            FrameOut::Dir { dir, name } => {
                use std::fmt::Write as _;
                name.clear();
                let _ = write!(name, "{index:06}.jpg");
                let p = dir.dir().join(&*name);
                std::fs::write(&p, jpeg).with_context(|| format!("writing {}", p.display()))
            }
            FrameOut::Stream(w) => w.write_all(jpeg).context("writing to stdout"),
            FrameOut::File { file, tmp, .. } => {
                file.write_all(jpeg).with_context(|| format!("writing {}", tmp.display()))
            }
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            FrameOut::None => Ok(()),
            FrameOut::Dir { mut dir, .. } => dir.commit().map_err(anyhow::Error::msg),
            FrameOut::Stream(mut w) => w.flush().context("writing to stdout"),
            FrameOut::File { tmp, path, file } => {
                file.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&tmp, &path)
                    .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
            }
        }
    }

    /// Removes what was written (a staged directory removes itself when dropped).
    fn discard(self) {
        if let FrameOut::File { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Runs `lipsync client`.
pub fn run(args: &ClientArgs) -> Result<()> {
    if !(1.0..=1000.0).contains(&args.chunk_ms) {
        bail!("--chunk-ms {} is not in 1..=1000", args.chunk_ms);
    }
    let audio = decode_file(&args.audio).with_context(|| format!("reading audio {}", args.audio.display()))?;
    let spec = StreamSpec {
        avatar: args.avatar.clone(),
        samples: audio.samples,
        rate: audio.rate,
        realtime: args.realtime,
        chunk_ms: args.chunk_ms,
        jpeg_quality: args.jpeg_quality,
        batch: args.batch,
        start_frame: args.start_frame,
    };
    let mut out = FrameOut::open(args.output.as_deref())?;
    let result = stream(&args.socket, &spec, |i, jpeg| out.write(i, jpeg));
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            out.discard();
            return Err(e);
        }
    };
    out.finish()?;
    if args.json {
        let mut v = serde_json::to_value(&outcome)?;
        v["records"] = serde_json::to_value(&outcome.records)?;
        print_out(&format!("{v}\n"))?;
    } else {
        let l = &outcome.latency_ms;
        eprintln!(
            "session {}: {} frames ({}x{} at {} fps) for {:.2} s of audio in {:.2} s ({:.1} frames/s)",
            outcome.session,
            outcome.frames,
            outcome.width,
            outcome.height,
            outcome.fps,
            outcome.audio_seconds,
            outcome.seconds,
            outcome.frames as f64 / outcome.seconds.max(1e-9)
        );
        eprintln!("first frame: {:.1} ms after the first audio was sent", outcome.first_frame_ms);
        eprintln!(
            "frame latency (audio final -> frame received), ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            l.p50, l.p90, l.p99, l.max
        );
    }
    Ok(())
}

/// `lipsync stats` flags.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The daemon's socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Print the raw JSON reply.
    #[arg(long)]
    pub json: bool,
    /// Refresh every this many seconds until interrupted (frames/s over the interval).
    #[arg(long, value_name = "SECS")]
    pub watch: Option<f64>,
}

/// Runs `lipsync stats`.
pub fn stats(args: &StatsArgs) -> Result<()> {
    let mut conn = Connection::connect(&args.socket)?;
    let mut last: Option<(Instant, u64)> = None;
    loop {
        let s = conn.stats()?;
        let now = Instant::now();
        let rate = last.map(|(t, f)| (s.frames_total - f) as f64 / now.duration_since(t).as_secs_f64().max(1e-9));
        last = Some((now, s.frames_total));
        let text = if args.json { format!("{}\n", serde_json::to_string(&s)?) } else { format_stats(&s, rate) };
        if !print_out(&text)? {
            // `lipsync stats --watch 1 | head`: the reader has had enough.
            return Ok(());
        }
        match args.watch {
            Some(secs) if secs > 0.0 => std::thread::sleep(Duration::from_secs_f64(secs)),
            _ => return Ok(()),
        }
    }
}

fn pct_row(name: &str, p: &Percentiles) -> String {
    format!("  {name:<22} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n", p.count, p.p50, p.p90, p.p99, p.max)
}

/// The `lipsync stats` table.
pub fn format_stats(s: &StatsReply, rate: Option<f64>) -> String {
    let mut t = String::new();
    let fps = rate.unwrap_or(s.frames_total as f64 / s.uptime_seconds.max(1e-9));
    t += &format!(
        "uptime {:.1} s  sessions {} open / {} total  frames {}  {:.1} frames/s{}\n",
        s.uptime_seconds,
        s.sessions_open,
        s.sessions_total,
        s.frames_total,
        fps,
        if rate.is_some() { " (last interval)" } else { " (since start)" }
    );
    t += &format!(
        "  {:<22} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
        "stage (service, ms)", "count", "p50", "p90", "p99", "max"
    );
    for (name, p) in &s.stages {
        t += &pct_row(name, p);
    }
    for u in &s.unet {
        let name = format!("unet (batch {:.1})", u.mean_batch);
        t += &pct_row(&name, &u.service_ms);
    }
    if !s.sessions.is_empty() {
        t += &format!(
            "  {:<22} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
            "session (latency, ms)", "frames", "p50", "p90", "p99", "max"
        );
        for x in &s.sessions {
            let name = format!("#{} {} {:.0} f/s", x.id, x.avatar, x.frames_per_second);
            let mut p = x.latency_ms.clone();
            p.count = x.frames;
            t += &pct_row(&name, &p);
        }
    }
    t
}

/// What `lipsync avatar ... --socket` asks a daemon.
pub enum AvatarAction<'a> {
    /// List every avatar.
    List,
    /// Load this one.
    Load(&'a str),
    /// Unload this one.
    Unload(&'a str),
}

/// `lipsync avatar list|load|unload --socket`.
pub fn avatars(socket: &Path, action: AvatarAction<'_>) -> Result<()> {
    let mut conn = Connection::connect(socket)?;
    match action {
        AvatarAction::List => {
            let v: serde_json::Value = conn.request(Kind::ListAvatars, &serde_json::json!({}), Kind::Avatars)?;
            let list = v["avatars"].as_array().cloned().unwrap_or_default();
            let mut t = format!(
                "{:<24} {:>7} {:>10} {:>9} {:>14}\n",
                "avatar", "loaded", "memory MB", "sessions", "frames served"
            );
            for a in list {
                t += &format!(
                    "{:<24} {:>7} {:>10.1} {:>9} {:>14}\n",
                    a["name"].as_str().unwrap_or("?"),
                    if a["loaded"].as_bool().unwrap_or(false) { "yes" } else { "no" },
                    a["memory_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                    a["sessions"].as_u64().unwrap_or(0),
                    a["frames_served"].as_u64().unwrap_or(0)
                );
            }
            print_out(&t).map(drop)
        }
        AvatarAction::Load(name) | AvatarAction::Unload(name) => {
            let kind = if matches!(action, AvatarAction::Load(_)) { Kind::LoadAvatar } else { Kind::UnloadAvatar };
            let v: serde_json::Value = conn.request(kind, &serde_json::json!({ "name": name }), Kind::Ok)?;
            print_out(&format!("{v}\n")).map(drop)
        }
    }
}

/// Writes to stdout; `Ok(false)` when the reader has closed the pipe (`| head`), which is
/// not an error.
fn print_out(text: &str) -> Result<bool> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}
