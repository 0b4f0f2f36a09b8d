//! `lipsync bench serve`: starts a daemon on a temporary socket, streams the same audio through
//! 1, 2, 4, ... concurrent sessions (real-time paced by default), and reports first-frame
//! latency, p50/p99 frame latency, latency drift and total frames/s, next to the offline render's
//! frames/s measured in the same run with the same UNet settings.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use lipsync_serve::client::bench;
use lipsync_serve::client::{stream, Connection, StreamSpec};
use lipsync_serve::settings::LayoutSetting;
use lipsync_stages::audio::decode_file;
use lipsync_stages::unet::Batch;

use crate::Cli;

/// Arguments of `lipsync bench serve`.
#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// The avatar directory.
    #[arg(long)]
    pub avatar: PathBuf,
    /// Speech each session streams.
    #[arg(long)]
    pub audio: PathBuf,
    /// Concurrent session counts to run, one round each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub sessions: Vec<usize>,
    /// Most frames per UNet run across sessions (the daemon's --max-batch).
    #[arg(long, default_value_t = Batch::new(8).expect("valid"))]
    pub max_batch: Batch,
    /// Threads of each session: staged, compact or auto (the daemon's --session-layout).
    #[arg(long, value_enum, default_value_t = LayoutSetting::Auto)]
    pub session_layout: LayoutSetting,
    /// Longest a frame waits for its batch to fill, ms.
    #[arg(long, default_value_t = 2.0)]
    pub max_wait_ms: f64,
    /// Frames a session may have in flight (the daemon's --session-queue): with a machine that
    /// cannot keep up, this caps the latency a backlog adds.
    #[arg(long, default_value_t = 8)]
    pub session_queue: usize,
    /// ONNX Runtime intra-op threads (default: all CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Send audio as fast as the daemon takes it instead of at real time.
    #[arg(long)]
    pub fast: bool,
    /// Use only the first this many seconds of the audio.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Play the audio this many times back to back in each session (longer sessions show
    /// whether latency drifts).
    #[arg(long, default_value_t = 1)]
    pub loops: usize,
    /// Frames for the offline render comparison (0 skips it).
    #[arg(long, default_value_t = 200)]
    pub render_frames: usize,
}

/// One round's figures.
/// The daemon runs as its own process, as in production: in-process, it shares the allocator
/// and the scheduler with the bench's clients (measured: 8 ms later first frames with 4
/// sessions on 2 cores).
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: drain and remove the socket.
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_daemon(cli: &Cli, args: &BenchServeArgs, threads: usize) -> Result<(Daemon, PathBuf, String)> {
    let dir = std::env::temp_dir().join(format!("lipsync-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("avatars")).with_context(|| format!("creating {}", dir.display()))?;
    let avatar = args.avatar.canonicalize().with_context(|| format!("avatar {}", args.avatar.display()))?;
    let name = "bench".to_string();
    std::os::unix::fs::symlink(&avatar, dir.join("avatars").join(&name)).context("linking the avatar")?;
    let socket = dir.join("serve.sock");
    let exe = std::env::current_exe().context("finding the lipsync binary")?;
    let mut cmd = Command::new(exe);
    if let Some(lib) = &cli.ort_lib {
        cmd.arg("--ort-lib").arg(lib);
    }
    cmd.arg("--quiet")
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--avatars")
        .arg(dir.join("avatars"))
        .args(["--preload", &name, "--max-sessions", "64"])
        .args(["--max-batch", &args.max_batch.to_string()])
        .args(["--session-layout", &value_name(args.session_layout)])
        .args(["--max-wait-ms", &args.max_wait_ms.to_string()])
        .args(["--session-queue", &args.session_queue.to_string()])
        .args(["--threads", &threads.to_string()])
        .stdin(Stdio::null());
    let child = cmd.spawn().context("starting lipsync serve")?;
    let mut daemon = Daemon { child, dir };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = daemon.child.try_wait()? {
            bail!("lipsync serve exited during start-up ({status})");
        }
        if Connection::connect(&socket).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("lipsync serve did not start listening within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((daemon, socket, name))
}

/// Runs `lipsync bench serve`.
pub fn run(cli: &Cli, args: &BenchServeArgs) -> Result<()> {
    if args.sessions.is_empty() || args.sessions.iter().any(|&n| n == 0 || n > 64) {
        bail!("--sessions must list counts in 1..=64");
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let mut audio = decode_file(&args.audio).with_context(|| format!("reading audio {}", args.audio.display()))?;
    if let Some(s) = args.seconds {
        audio.samples.truncate((s * f64::from(audio.rate)) as usize);
    }
    if args.loops > 1 {
        audio.samples = audio.samples.repeat(args.loops);
    }
    let render = if args.render_frames > 0 {
        Some(crate::bench_render::render_fps(
            cli,
            &args.avatar,
            &args.audio,
            args.max_batch,
            threads,
            args.render_frames,
        )?)
    } else {
        None
    };
    let (daemon, socket, name) = start_daemon(cli, args, threads)?;
    let spec = |realtime: bool, samples: Vec<f32>| StreamSpec {
        avatar: name.clone(),
        samples,
        rate: audio.rate,
        realtime,
        chunk_ms: 20.0,
        jpeg_quality: None,
        batch: None,
        start_frame: None,
    };
    // Warm-up (first runs of a model are slower): one second, as fast as possible.
    let warm: Vec<f32> = audio.samples[..audio.samples.len().min(audio.rate as usize)].to_vec();
    stream(&socket, &spec(false, warm), |_, _| Ok(())).context("warm-up session")?;

    let mut rounds = Vec::new();
    for &n in &args.sessions {
        rounds.push(bench::round(&socket, n, &spec(!args.fast, audio.samples.clone()))?);
    }
    drop(daemon);

    eprint!("{}", bench::table(&rounds));
    if let Some(r) = &render {
        let best = rounds.iter().map(|r| r.frames_per_second).fold(0.0, f64::max);
        eprintln!(
            "offline render: {:.1} frames/s (batch {}); best serve round {:.1} frames/s = {:.2}x render",
            r,
            args.max_batch,
            best,
            best / r
        );
    }
    let out = serde_json::json!({
        "avatar": args.avatar.display().to_string(),
        "audio": args.audio.display().to_string(),
        "audio_seconds": audio.samples.len() as f64 / f64::from(audio.rate),
        "realtime": !args.fast,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "session_queue": args.session_queue,
        "session_layout": value_name(args.session_layout),
        "intra_threads": threads,
        "render_fps": render,
        "rounds": rounds,
    });
    println!("{out}");
    Ok(())
}

/// A choice's name on the command line.
fn value_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value().map_or_else(String::new, |p| p.get_name().to_string())
}
