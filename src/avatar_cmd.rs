//! `lipsync avatar ...`: create an avatar from parts, import a SyncTalk_2D dataset, check one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lipsync_stages::io::avatar::{self, Avatar, CreateSpec, ModelStorage};
use lipsync_stages::io::synctalk;
use lipsync_stages::onnx::ModelIo;

use crate::client_cmd::{self as client, AvatarAction};
use crate::Cli;

/// `lipsync avatar` subcommands.
#[derive(Debug, Subcommand)]
pub enum AvatarCommand {
    /// Make an avatar directory from a template video (or frames directory), boxes and models.
    Create(CreateArgs),
    /// Convert a SyncTalk_2D dataset (full_body_img/N.jpg, landmarks/N.lms) into an avatar.
    ImportSynctalk(ImportArgs),
    /// Validate an avatar: template, boxes and both models' inputs/outputs.
    Check {
        /// The avatar directory.
        dir: PathBuf,
    },
    /// List a running daemon's avatars: loaded or not, memory, sessions, frames served.
    List {
        /// The daemon's socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
    /// Load an avatar into a running daemon's cache.
    Load {
        /// Avatar name.
        name: String,
        /// The daemon's socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
    /// Unload an avatar from a running daemon (refused while sessions use it).
    Unload {
        /// Avatar name.
        name: String,
        /// The daemon's socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
}

/// Options shared by `create` and `import-synctalk`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The lip-sync UNet (ONNX).
    #[arg(long, value_name = "ONNX")]
    pub unet: PathBuf,
    /// The audio encoder (ONNX).
    #[arg(long, value_name = "ONNX")]
    pub encoder: PathBuf,
    /// Copy the models into the avatar (self-contained) instead of referring to them by absolute path.
    #[arg(long)]
    pub copy_models: bool,
    /// Template frame rate.
    #[arg(long, default_value_t = 25.0)]
    pub fps: f64,
    /// Start offset into the ping-pong template sequence.
    #[arg(long, default_value_t = 0)]
    pub start_frame: usize,
    /// JPEG quality of encoded frames.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: u8,
}

/// Arguments of `lipsync avatar create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Output avatar directory (must not exist).
    pub out: PathBuf,
    /// Template video file or directory of numbered frames (copied into the avatar).
    #[arg(long, value_name = "FILE|DIR")]
    pub video: PathBuf,
    /// JSON list of [x1, y1, x2, y2], one per template frame.
    #[arg(long, value_name = "FILE")]
    pub boxes: PathBuf,
    #[command(flatten)]
    pub models: ModelArgs,
}

/// Arguments of `lipsync avatar import-synctalk`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// SyncTalk_2D dataset directory.
    pub dir: PathBuf,
    /// Output avatar directory (must not exist).
    pub out: PathBuf,
    #[command(flatten)]
    pub models: ModelArgs,
}

pub fn run(cli: &Cli, cmd: &AvatarCommand) -> Result<()> {
    match cmd {
        AvatarCommand::Create(args) => {
            let boxes = avatar::read_boxes(&args.boxes)?;
            create(cli, &args.out, args.video.clone(), boxes, &args.models)
        }
        AvatarCommand::ImportSynctalk(args) => {
            let data = synctalk::read_dataset(&args.dir)
                .with_context(|| format!("reading SyncTalk_2D dataset {}", args.dir.display()))?;
            tracing::info!("{} frames with landmarks in {}", data.frames.len(), args.dir.display());
            create(cli, &args.out, args.dir.join("full_body_img"), data.boxes, &args.models)
        }
        AvatarCommand::List { socket } => client::avatars(socket, AvatarAction::List),
        AvatarCommand::Load { name, socket } => client::avatars(socket, AvatarAction::Load(name)),
        AvatarCommand::Unload { name, socket } => client::avatars(socket, AvatarAction::Unload(name)),
        AvatarCommand::Check { dir } => {
            let avatar = Avatar::open(dir).with_context(|| format!("loading avatar {}", dir.display()))?;
            let rt = cli.runtime()?;
            avatar.check_models(&rt).with_context(|| format!("checking the models of avatar {}", dir.display()))?;
            print_summary(&avatar);
            Ok(())
        }
    }
}

fn create(
    cli: &Cli,
    out: &Path,
    video: PathBuf,
    boxes: Vec<lipsync_stages::crop::CropBox>,
    m: &ModelArgs,
) -> Result<()> {
    let rt = cli.runtime()?;
    let spec = CreateSpec {
        video,
        boxes,
        unet: m.unet.clone(),
        encoder: m.encoder.clone(),
        models: if m.copy_models { ModelStorage::Copy } else { ModelStorage::Reference },
        fps: m.fps,
        start_frame: m.start_frame,
        jpeg_quality: m.jpeg_quality,
        io: ModelIo::default(),
    };
    let avatar = avatar::create(out, &spec, &rt).with_context(|| format!("creating avatar {}", out.display()))?;
    print_summary(&avatar);
    Ok(())
}

pub fn print_summary(a: &Avatar) {
    let v = &a.video_info;
    println!(
        "avatar {}: {} frames {}x{} ({}{}), {} boxes, start frame {}, JPEG quality {}",
        a.root.display(),
        v.frames,
        v.width,
        v.height,
        v.codec,
        v.fps.map(|f| format!(" @ {f:.2} fps")).unwrap_or_default(),
        a.boxes.len(),
        a.config.start_frame,
        a.config.jpeg_quality
    );
    use lipsync_stages::unet::{PrecisionSetting, Provider};
    // What `render`/`serve` run with their defaults (--precision auto) on the CPU.
    let active = a.unet_model(PrecisionSetting::Auto, Provider::Cpu).map(|m| m.path).ok();
    let mark = |p: &std::path::Path| if active.as_deref() == Some(p) { " (active on the CPU)" } else { "" };
    println!("  unet: {}{}", a.unet.display(), mark(&a.unet));
    if let Some(int8) = &a.unet_int8 {
        println!("  unet_int8: {}{}", int8.display(), mark(int8));
        let report = lipsync_stages::quantize::report_path(int8);
        match std::fs::read_to_string(&report).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) {
            Some(r) => println!(
                "    measured: {:.2} dB PSNR in the mouth box, SSIM {:.4}, {:.2}x fp32's frames/s ({})",
                r["psnr_db"].as_f64().unwrap_or(f64::NAN),
                r["ssim"].as_f64().unwrap_or(f64::NAN),
                r["speedup"].as_f64().unwrap_or(f64::NAN),
                report.display()
            ),
            None => {
                println!("    no quantization report at {}: measure it with `lipsync model quantize`", report.display())
            }
        }
    }
    println!("  encoder: {}", a.encoder.display());
}
