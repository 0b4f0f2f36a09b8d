//! `lipsync model quantize`: a static int8 UNet for an avatar, measured against fp32 on it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::quantize::{quantize, QuantizeSpec};

use crate::Cli;

/// `lipsync model ...`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Quantize an avatar's UNet to int8 (static QDQ, calibrated on its frames and a speech
    /// file), measure it against fp32 on held-out frames, and keep it only above --min-psnr.
    Quantize(QuantizeArgs),
}

/// Arguments of `lipsync model quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The avatar whose UNet is quantized (its frames calibrate and test it).
    #[arg(long)]
    pub avatar: PathBuf,
    /// Speech giving the audio inputs (at least --samples + --held-out frames at 25 frames/s).
    #[arg(long)]
    pub audio: PathBuf,
    /// Calibration samples (16..=2000).
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// Held-out samples the int8 model is measured on (4..=1000).
    #[arg(long, default_value_t = 40)]
    pub held_out: usize,
    /// Least PSNR (dB) inside the mouth box against fp32 for the model to be kept.
    #[arg(long, default_value_t = 35.0)]
    pub min_psnr: f64,
    /// Where the int8 model goes [default: unet.int8.onnx in the avatar].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Leave avatar.toml as it is (do not name the new model in it).
    #[arg(long)]
    pub no_set: bool,
    /// Python with onnxruntime.quantization [default: the project .venv's].
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// ONNX Runtime intra-op threads of the measurement [default: all CPUs].
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs `lipsync model ...`.
pub fn run(cli: &Cli, cmd: &ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Quantize(args) => run_quantize(cli, args),
    }
}

fn run_quantize(cli: &Cli, args: &QuantizeArgs) -> Result<()> {
    let avatar = Avatar::open(&args.avatar).with_context(|| format!("loading avatar {}", args.avatar.display()))?;
    let rt = cli.runtime()?;
    let python = match &args.python {
        Some(p) => p.clone(),
        None => lipsync_stages::onnx::find_venv_python()
            .context("no project .venv with Python found: run scripts/setup.sh or pass --python")?,
    };
    let spec = QuantizeSpec {
        audio: args.audio.clone(),
        calibration: args.samples,
        held_out: args.held_out,
        min_psnr: args.min_psnr,
        out: args.out.clone().unwrap_or_else(|| args.avatar.join("unet.int8.onnx")),
        python,
        threads: args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        set_avatar: !args.no_set,
    };
    let report = quantize(&rt, &avatar, &spec).context("quantizing the UNet")?;
    println!(
        "int8 UNet {}: {:.2} dB PSNR in the mouth box (worst frame {:.2} dB, SSIM {:.4}) on {} held-out frames; \
         {:.1} frames/s against {:.1} fp32 ({:.2}x, {} threads)",
        report.int8_model.display(),
        report.psnr_db,
        report.worst_psnr_db,
        report.ssim,
        report.held_out_samples,
        report.int8_fps,
        report.fp32_fps,
        report.speedup,
        report.threads
    );
    if spec.set_avatar {
        println!(
            "avatar {} now names it (models.unet_int8); render and serve use it on the CPU",
            args.avatar.display()
        );
    }
    Ok(())
}
