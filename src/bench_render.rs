//! `lipsync bench render`: whole-render frames/s against UNet-only frames/s with the same
//! session settings, in one run; and the render figure `lipsync bench serve` compares with.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::unet::Batch;

use crate::Cli;

/// Arguments of `lipsync bench render`.
#[derive(Debug, Args)]
pub struct BenchRenderArgs {
    /// The avatar directory.
    #[arg(long)]
    pub avatar: PathBuf,
    /// Speech to render.
    #[arg(long)]
    pub audio: PathBuf,
    /// UNet batch size (1..=32).
    #[arg(long, default_value_t = Batch::new(8).expect("valid"))]
    pub batch: Batch,
    /// ONNX Runtime intra-op threads (default: all CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Frames to render (and to run through the UNet alone).
    #[arg(long, default_value_t = 200)]
    pub frames: usize,
    /// Render output: jpeg (a frames directory) or mp4.
    #[arg(long, default_value = "jpeg", value_parser = ["jpeg", "mp4"])]
    pub output: String,
}

/// Runs `lipsync bench render`.
pub fn run(cli: &Cli, args: &BenchRenderArgs) -> Result<()> {
    use lipsync_stages::face::{input_len, output_len};
    use lipsync_stages::io::avatar::Avatar;
    use lipsync_stages::unet::{Provider, Unet};

    let avatar = Avatar::open(&args.avatar).with_context(|| format!("loading avatar {}", args.avatar.display()))?;
    let rt = cli.runtime()?;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let crop = avatar.config.crop;
    let n = args.batch.get();
    let opts = SessionOptions { intra_threads: threads, spinning: false };

    // UNet alone: real prepared inputs are not needed for timing; same shapes, same session options.
    let inference_fps = {
        let mut unet =
            Unet::open(&rt, &avatar.unet, &avatar.config.models.io, &crop, args.batch, &opts, Provider::Cpu)?;
        let images = vec![0.5f32; n * input_len(&crop)];
        let audio = vec![0.1f32; n * lipsync_stages::features::FRAME_AUDIO_LEN];
        let mut out = vec![0f32; n * output_len(&crop)];
        unet.run(n, &images, &audio, &mut out)?; // warm-up
        let batches = args.frames.div_ceil(n).max(1);
        let t = Instant::now();
        for _ in 0..batches {
            unet.run(n, &images, &audio, &mut out)?;
        }
        (batches * n) as f64 / t.elapsed().as_secs_f64()
    };

    let outcome = render_once(&rt, avatar, &args.audio, args.batch, threads, args.frames, args.output == "mp4")?;
    let render_fps = outcome.report.steady_frames_per_second;
    let out = serde_json::json!({
        "frames": outcome.frames,
        "batch": n,
        "intra_threads": threads,
        "output": args.output,
        "inference_only_fps": inference_fps,
        "render_fps": render_fps,
        "render_fps_with_startup": outcome.report.frames_per_second,
        "first_frame_s": outcome.report.first_frame_seconds,
        "render_over_inference": render_fps / inference_fps,
        "end_to_end_p50_ms": outcome.report.end_to_end_ms.p50,
    });
    println!("{out}");
    Ok(())
}

/// One offline render of up to `frames` frames into a temporary JPEG directory (or MP4),
/// removed afterwards.
fn render_once(
    rt: &OrtRuntime,
    avatar: lipsync_stages::io::avatar::Avatar,
    audio: &std::path::Path,
    batch: Batch,
    threads: usize,
    frames: usize,
    mp4: bool,
) -> Result<lipsync_pipelines::render::RenderOutcome> {
    use lipsync_pipelines::render::{render, ImageFormat, Output, RenderConfig};
    use lipsync_pipelines::runtime::PinPolicy;

    let tmp = tempfile_dir()?;
    let output = if mp4 {
        Output::Video(tmp.join("bench.mp4"))
    } else {
        Output::Dir { path: tmp.join("frames"), format: ImageFormat::Jpeg }
    };
    let cfg = RenderConfig {
        batch: lipsync_stages::unet::BatchSetting::Fixed(batch),
        intra_threads: threads,
        pin: PinPolicy::Auto { reserved: threads },
        max_frames: Some(frames),
        ..RenderConfig::new(avatar, audio.to_path_buf(), output)
    };
    let outcome = render(rt, cfg);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(outcome?)
}

/// Steady-state frames/s of the offline render (for `lipsync bench serve`).
pub fn render_fps(
    cli: &Cli,
    avatar: &std::path::Path,
    audio: &std::path::Path,
    batch: Batch,
    threads: usize,
    frames: usize,
) -> Result<f64> {
    let a = lipsync_stages::io::avatar::Avatar::open(avatar)
        .with_context(|| format!("loading avatar {}", avatar.display()))?;
    let rt = cli.runtime()?;
    let outcome = render_once(&rt, a, audio, batch, threads, frames, false)?;
    Ok(outcome.report.steady_frames_per_second)
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("lipsync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
