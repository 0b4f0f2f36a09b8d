//! `lipsync doctor`: what the binary found on this machine, and model checks.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::onnx::{check_signature, describe, ModelIo, SessionOptions};

use crate::Cli;

/// Arguments of `lipsync doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Check a model: print its inputs/outputs and which lipsync signature it matches.
    #[arg(long, value_name = "ONNX")]
    pub model: Vec<PathBuf>,
    /// Validate an avatar directory (template, boxes, models).
    #[arg(long, value_name = "DIR")]
    pub avatar: Option<PathBuf>,
}

pub fn run(cli: &Cli, args: &DoctorArgs) -> Result<()> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cores = core_affinity::get_core_ids().map(|c| c.len()).unwrap_or(0);
    println!("lipsync {}", env!("CARGO_PKG_VERSION"));
    println!("CPUs: {cpus} available to this process ({cores} pinnable cores)");
    println!("FFmpeg: {}", lipsync_stages::io::video::ffmpeg_version());
    let rt = cli.runtime()?;
    println!("ONNX Runtime: {} from {} (found via {})", rt.version(), rt.library.path.display(), rt.library.source);
    println!("ONNX Runtime build: {}", rt.build_info());
    println!("Execution providers: {}", rt.available_providers().join(", "));
    let cuda = if cfg!(feature = "cuda") { "built in" } else { "not built (cargo feature `cuda`)" };
    println!("UNet backends: onnxruntime cpu (fp32, int8 models); onnxruntime cuda {cuda}");

    let io = ModelIo::default();
    for path in &args.model {
        let session = rt
            .open_model("model", path, &SessionOptions::default())
            .with_context(|| format!("checking {}", path.display()))?;
        println!("Model {}: {}", path.display(), describe(&session));
        let unet = check_signature(&session, &io.unet_signature(320), "UNet", path);
        let enc = check_signature(&session, &io.encoder_signature(), "audio encoder", path);
        match (unet, enc) {
            (Ok(()), _) => println!("  matches the UNet signature: {}", io.unet_signature(320)),
            (_, Ok(())) => println!("  matches the audio encoder signature: {}", io.encoder_signature()),
            (Err(u), Err(e)) => {
                anyhow::bail!("{} matches no lipsync model:\n  {u}\n  {e}", path.display())
            }
        }
    }
    if let Some(dir) = &args.avatar {
        let avatar = Avatar::open(dir).with_context(|| format!("loading avatar {}", dir.display()))?;
        avatar.check_models(&rt).with_context(|| format!("checking the models of avatar {}", dir.display()))?;
        crate::avatar_cmd::print_summary(&avatar);
    }
    Ok(())
}
