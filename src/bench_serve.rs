//! `lipsync bench serve`: starts a daemon on a temporary socket, streams the same audio through
//! 1, 2, 4, ... concurrent sessions (real-time paced by default), and reports first-frame
//! latency, p50/p99 frame latency, latency drift and total frames/s, next to the offline render's
//! frames/s measured in the same run with the same UNet settings.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use lipsync_pipelines::metrics::{histogram, Percentiles};
use lipsync_stages::audio::decode_file;
use serde::Serialize;

use lipsync_serve::client::{stream, Connection, StreamOutcome, StreamSpec};
use lipsync_serve::stats::StatsReply;
use lipsync_serve::{Daemon, ServeOptions};
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
#[derive(Debug, Serialize)]
struct Round {
    sessions: usize,
    frames: usize,
    wall_seconds: f64,
    frames_per_second: f64,
    real_time_fps_demand: f64,
    keeps_up: bool,
    first_frame_ms_mean: f64,
    first_frame_ms_max: f64,
    latency_ms: Percentiles,
    latency_p50_first_quarter_ms: f64,
    latency_p50_last_quarter_ms: f64,
    mean_unet_batch: f64,
}

/// The in-process daemon and its temporary directory (removed when dropped, after the
/// daemon has drained).
struct Bench {
    daemon: Option<Daemon>,
    dir: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            if let Err(e) = d.stop() {
                tracing::warn!("bench daemon: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a daemon in this process on a temporary socket, serving `args.avatar` as `bench`.
fn start_daemon(cli: &Cli, args: &BenchServeArgs, threads: usize) -> Result<(Bench, PathBuf, String)> {
    let dir = std::env::temp_dir().join(format!("lipsync-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("avatars")).with_context(|| format!("creating {}", dir.display()))?;
    let mut bench = Bench { daemon: None, dir: dir.clone() };
    let avatar = args.avatar.canonicalize().with_context(|| format!("avatar {}", args.avatar.display()))?;
    let name = "bench".to_string();
    std::os::unix::fs::symlink(&avatar, dir.join("avatars").join(&name)).context("linking the avatar")?;
    let socket = dir.join("serve.sock");
    let options = ServeOptions {
        socket: Some(socket.clone()),
        avatars: Some(dir.join("avatars")),
        preload: Some(vec![name.clone()]),
        max_sessions: Some(64),
        max_batch: Some(args.max_batch),
        max_wait_ms: Some(args.max_wait_ms),
        session_queue: Some(args.session_queue),
        intra_threads: Some(threads),
        ..Default::default()
    };
    let settings = options.validate()?;
    bench.daemon = Some(Daemon::start(settings, cli.runtime()?).context("starting the daemon")?);
    Ok((bench, socket, name))
}

fn quarter_p50(outcomes: &[StreamOutcome], last: bool) -> f64 {
    let mut v: Vec<f64> = outcomes
        .iter()
        .flat_map(|o| {
            let q = (o.records.len() / 4).max(1);
            let part = if last {
                &o.records[o.records.len().saturating_sub(q)..]
            } else {
                &o.records[..q.min(o.records.len())]
            };
            part.iter().map(|r| r.latency_ms)
        })
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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

    let fps = 25.0;
    let mut rounds = Vec::new();
    for &n in &args.sessions {
        let before = Connection::connect(&socket)?.stats()?;
        let t = Instant::now();
        let outcomes: Vec<Result<StreamOutcome, anyhow::Error>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    let s = spec(!args.fast, audio.samples.clone());
                    let socket = &socket;
                    scope.spawn(move || stream(socket, &s, |_, _| Ok(())).map_err(anyhow::Error::from))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| bail!("a client thread panicked"))).collect()
        });
        let wall = t.elapsed().as_secs_f64();
        let outcomes = outcomes.into_iter().collect::<Result<Vec<_>, _>>()?;
        let after = Connection::connect(&socket)?.stats()?;
        let batch = {
            let b = |s: &StatsReply| {
                s.unet.iter().map(|u| (u.batches, u.frames)).fold((0, 0), |a, x| (a.0 + x.0, a.1 + x.1))
            };
            let (b0, f0) = b(&before);
            let (b1, f1) = b(&after);
            (f1 - f0) as f64 / ((b1 - b0).max(1)) as f64
        };
        let mut hist = histogram();
        for o in &outcomes {
            for r in &o.records {
                hist.saturating_record(((r.latency_ms * 1e6) as u64).max(1));
            }
        }
        let frames: usize = outcomes.iter().map(|o| o.frames).sum();
        let ff: Vec<f64> = outcomes.iter().map(|o| o.first_frame_ms).collect();
        let demand = n as f64 * fps;
        let achieved = frames as f64 / wall;
        rounds.push(Round {
            sessions: n,
            frames,
            wall_seconds: wall,
            frames_per_second: achieved,
            real_time_fps_demand: demand,
            keeps_up: !args.fast && wall <= outcomes[0].audio_seconds * 1.05 + 1.0,
            first_frame_ms_mean: ff.iter().sum::<f64>() / ff.len() as f64,
            first_frame_ms_max: ff.iter().copied().fold(0.0, f64::max),
            latency_ms: Percentiles::of(&hist),
            latency_p50_first_quarter_ms: quarter_p50(&outcomes, false),
            latency_p50_last_quarter_ms: quarter_p50(&outcomes, true),
            mean_unet_batch: batch,
        });
    }
    drop(daemon);

    eprintln!(
        "{:>8} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>7} {:>6}",
        "sessions",
        "frames",
        "fps",
        "first ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p50 1st 1/4",
        "p50 4th 1/4",
        "batch",
        "keeps"
    );
    for r in &rounds {
        eprintln!(
            "{:>8} {:>7} {:>8.1} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>7.2} {:>6}",
            r.sessions,
            r.frames,
            r.frames_per_second,
            r.first_frame_ms_mean,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.max,
            r.latency_p50_first_quarter_ms,
            r.latency_p50_last_quarter_ms,
            r.mean_unet_batch,
            if r.keeps_up { "yes" } else { "no" }
        );
    }
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
        "intra_threads": threads,
        "render_fps": render,
        "rounds": rounds,
    });
    println!("{out}");
    Ok(())
}
