//! Commands that talk to `lipsync serve` through its client library: `lipsync client` (stream an
//! audio file, write the frames, print latencies), `lipsync stats` and
//! `lipsync avatar list|load|unload --socket`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use lipsync_serve::client::frame_out::FrameOut;
use lipsync_serve::client::live::{stream_live, LiveSpec};
use lipsync_serve::client::{stream, Connection, StreamSpec};
use lipsync_serve::protocol::Kind;
use lipsync_stages::audio::decode_file;

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
    /// Send the audio at its own pace (else as fast as the daemon takes it).
    #[arg(long, alias = "realtime")]
    pub paced: bool,
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
    /// A live session: frames at the avatar's rate on the session's clock, idle frames
    /// before, between and after utterances; the audio is one utterance, sent at real time.
    #[arg(long)]
    pub live: bool,
    /// Live: idle seconds before each utterance.
    #[arg(long, default_value_t = 1.0, requires = "live")]
    pub idle_s: f64,
    /// Live: idle seconds after the last utterance, before the session ends.
    #[arg(long, default_value_t = 1.0, requires = "live")]
    pub idle_after_s: f64,
    /// Live: how many times the audio is spoken.
    #[arg(long, default_value_t = 1, requires = "live")]
    pub utterances: usize,
    /// Live: interrupt each utterance this many ms after its first audio.
    #[arg(long, requires = "live")]
    pub interrupt_after_ms: Option<u64>,
}

/// Runs `lipsync client`.
pub fn run(args: &ClientArgs) -> Result<()> {
    if !(1.0..=1000.0).contains(&args.chunk_ms) {
        bail!("--chunk-ms {} is not in 1..=1000", args.chunk_ms);
    }
    let audio = decode_file(&args.audio).with_context(|| format!("reading audio {}", args.audio.display()))?;
    if args.live {
        return live(args, audio.samples, audio.rate);
    }
    let spec = StreamSpec {
        avatar: args.avatar.clone(),
        samples: audio.samples,
        rate: audio.rate,
        realtime: args.paced,
        chunk_ms: args.chunk_ms,
        jpeg_quality: args.jpeg_quality,
        batch: args.batch,
        start_frame: args.start_frame,
    };
    let mut out = FrameOut::open(args.output.as_deref())?;
    // On failure `out` is dropped unfinished, which removes what was written.
    let outcome = stream(&args.socket, &spec, |i, jpeg| out.write(i, jpeg))?;
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

/// `lipsync client --live`.
fn live(args: &ClientArgs, samples: Vec<f32>, rate: u32) -> Result<()> {
    let secs = |name: &str, v: f64| {
        if (0.0..=86_400.0).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            bail!("--{name} {v} is not in 0..=86400 seconds")
        }
    };
    let spec = LiveSpec {
        avatar: args.avatar.clone(),
        samples,
        rate,
        chunk_ms: args.chunk_ms,
        idle: secs("idle-s", args.idle_s)?,
        idle_after: secs("idle-after-s", args.idle_after_s)?,
        utterances: args.utterances,
        interrupt_after: args.interrupt_after_ms.map(Duration::from_millis),
        jpeg_quality: args.jpeg_quality,
        start_frame: args.start_frame,
    };
    let mut out = FrameOut::open(args.output.as_deref())?;
    let outcome = stream_live(&args.socket, &spec, |i, _idle, jpeg| out.write(i, jpeg))?;
    out.finish()?;
    if args.json {
        let mut v = serde_json::to_value(&outcome)?;
        v["records"] = serde_json::to_value(&outcome.records)?;
        print_out(&format!("{v}\n"))?;
        return Ok(());
    }
    eprintln!(
        "session {}: {} frames ({} idle) in {:.2} s at {} fps; utterances at frames {:?}",
        outcome.session,
        outcome.frames,
        outcome.idle_frames,
        outcome.seconds,
        outcome.fps,
        outcome.utterances.iter().map(|u| u.1).collect::<Vec<_>>()
    );
    eprintln!("first frame: {:.1} ms after Opened", outcome.first_frame_ms);
    let speech: Vec<String> = outcome.speech_first_frame_ms.iter().map(|v| format!("{v:.0}")).collect();
    eprintln!("first speech frame after its first audio, ms: {}", speech.join(", "));
    if outcome.interrupts > 0 {
        let i = &outcome.interrupt_ms;
        eprintln!(
            "interrupt -> first idle frame, ms ({} interrupts): p50 {:.1}  p99 {:.1}  max {:.1}",
            outcome.interrupts, i.p50, i.p99, i.max
        );
    }
    eprintln!(
        "arrival - presentation time: {:.1} ms at the start, {:.1} ms at the end: drift {} frames \
         (latest frame {:.0} ms late)",
        outcome.offset_start_ms, outcome.offset_end_ms, outcome.drift_frames, outcome.max_late_ms
    );
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
        let text = if args.json { format!("{}\n", serde_json::to_string(&s)?) } else { s.table(rate) };
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
            let mut t = format!(
                "{:<24} {:>6} {:>8} {:>7} {:>11} {:>11} {:>9} {:>8}\n",
                "avatar", "loaded", "sessions", "frames", "template MB", "sessions MB", "models MB", "total MB"
            );
            let mb = |b: usize| b as f64 / (1 << 20) as f64;
            for a in conn.avatars()? {
                t += &format!(
                    "{:<24} {:>6} {:>8} {:>7} {:>11.1} {:>11.1} {:>9.1} {:>8.1}\n",
                    a.name,
                    if a.loaded { "yes" } else { "no" },
                    a.sessions,
                    a.frames_served,
                    mb(a.template_bytes),
                    mb(a.session_bytes),
                    mb(a.model_bytes),
                    mb(a.memory_bytes),
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
