//! `lipsync bench render`: whole-render frames/s against UNet-only frames/s with the same
//! session settings, in one run (and, when the avatar names an int8 UNet, the same for it with
//! its PSNR against fp32); and the render figure `lipsync bench serve` compares with.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::unet::{Batch, Precision, PrecisionSetting, Provider};

use crate::Cli;

/// What `lipsync bench render` renders to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOutput {
    /// A frames directory of JPEGs.
    Jpeg,
    /// An MP4 with the sound track.
    Mp4,
}

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
    /// Frames whose int8 and fp32 predictions are compared, when the avatar names an int8 UNet.
    #[arg(long, default_value_t = 40)]
    pub quality_frames: usize,
    /// Render output: jpeg (a frames directory) or mp4.
    #[arg(long, value_enum, default_value_t = BenchOutput::Jpeg)]
    pub output: BenchOutput,
}

/// Runs `lipsync bench render`.
pub fn run(cli: &Cli, args: &BenchRenderArgs) -> Result<()> {
    use lipsync_stages::face::{input_len, output_len};
    use lipsync_stages::unet::run_slices;

    let avatar = Avatar::open(&args.avatar).with_context(|| format!("loading avatar {}", args.avatar.display()))?;
    let rt = cli.runtime()?;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let crop = avatar.config.crop;
    let n = args.batch.get();
    let opts = SessionOptions { intra_threads: threads, spinning: false };

    // UNet alone: real prepared inputs are not needed for timing; same shapes, same session options.
    let inference_fps = {
        let model = avatar.unet_model(PrecisionSetting::Fp32, Provider::Cpu)?;
        let mut unet = lipsync_stages::unet::open(&rt, &model, args.batch, &opts, Provider::Cpu, None)?;
        let images = vec![0.5f32; n * input_len(&crop)];
        let audio = vec![0.1f32; n * lipsync_stages::features::FRAME_AUDIO_LEN];
        let mut out = vec![0f32; n * output_len(&crop)];
        run_slices(unet.as_mut(), n, &images, &audio, &mut out)?; // warm-up
        let batches = args.frames.div_ceil(n).max(1);
        let t = Instant::now();
        for _ in 0..batches {
            run_slices(unet.as_mut(), n, &images, &audio, &mut out)?;
        }
        (batches * n) as f64 / t.elapsed().as_secs_f64()
    };

    let mp4 = args.output == BenchOutput::Mp4;
    let int8 = match avatar.unet_int8.is_some() {
        true => Some(int8_figures(&rt, &avatar, args, threads, mp4)?),
        false => None,
    };
    let outcome = render_once(&rt, avatar, &args.audio, args.batch, Precision::Fp32, threads, args.frames, mp4)?;
    let render_fps = outcome.report.steady_frames_per_second;
    let out = serde_json::json!({
        "frames": outcome.frames,
        "batch": n,
        "intra_threads": threads,
        "output": if mp4 { "mp4" } else { "jpeg" },
        "inference_only_fps": inference_fps,
        "render_fps": render_fps,
        "render_fps_with_startup": outcome.report.frames_per_second,
        "first_frame_s": outcome.report.first_frame_seconds,
        "render_over_inference": render_fps / inference_fps,
        "end_to_end_p50_ms": outcome.report.end_to_end_ms.p50,
        "int8": int8,
    });
    println!("{out}");
    Ok(())
}

/// The avatar's int8 UNet against its fp32 one in one run: UNet-only frames/s of both on real
/// prepared frames of the audio (batch 1, in turn), the int8 predictions' PSNR and SSIM in the
/// mouth box against fp32's, and the int8 whole-render frames/s.
fn int8_figures(
    rt: &OrtRuntime,
    avatar: &Avatar,
    args: &BenchRenderArgs,
    threads: usize,
    mp4: bool,
) -> Result<serde_json::Value> {
    use lipsync_stages::quantize::{make_samples, measure, QuantizeError};
    let count = args.quality_frames.min(args.frames).max(1);
    let mut samples = Vec::with_capacity(count);
    let short = |frames, _| QuantizeError::Engine(format!("the audio gives {frames} frames, {count} needed"));
    make_samples(rt, avatar, &args.audio, count, short, |_, image, audio| {
        samples.push((image.to_vec(), audio.to_vec()));
        Ok(())
    })?;
    let opts = SessionOptions { intra_threads: threads, spinning: false };
    let open = |p| -> Result<_> {
        let model = avatar.unet_model(p, Provider::Cpu)?;
        Ok(lipsync_stages::unet::open(rt, &model, Batch::ONE, &opts, Provider::Cpu, None)?)
    };
    let (mut fp32, mut int8) = (open(PrecisionSetting::Fp32)?, open(PrecisionSetting::Int8)?);
    let m = measure(fp32.as_mut(), int8.as_mut(), &samples, avatar.config.crop.mask.map(|v| v as usize))?;
    drop((fp32, int8));
    let outcome = render_once(rt, avatar.clone(), &args.audio, args.batch, Precision::Int8, threads, args.frames, mp4)?;
    Ok(serde_json::json!({
        "model": avatar.unet_int8,
        "frames_compared": samples.len(),
        "psnr_db": m.psnr,
        "worst_psnr_db": m.worst,
        "ssim": m.ssim,
        "inference_only_fps": m.int8_fps,
        "fp32_inference_only_fps_same_run": m.fp32_fps,
        "inference_speedup": m.int8_fps / m.fp32_fps,
        "render_fps": outcome.report.steady_frames_per_second,
        "end_to_end_p50_ms": outcome.report.end_to_end_ms.p50,
    }))
}

/// One offline render of up to `frames` frames into a temporary JPEG directory (or MP4),
/// removed afterwards.
#[allow(clippy::too_many_arguments)]
fn render_once(
    rt: &OrtRuntime,
    avatar: lipsync_stages::io::avatar::Avatar,
    audio: &std::path::Path,
    batch: Batch,
    precision: Precision,
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
        precision: match precision {
            Precision::Fp32 => PrecisionSetting::Fp32,
            Precision::Int8 => PrecisionSetting::Int8,
        },
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
    let outcome = render_once(&rt, a, audio, batch, Precision::Fp32, threads, frames, false)?;
    Ok(outcome.report.steady_frames_per_second)
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("lipsync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
