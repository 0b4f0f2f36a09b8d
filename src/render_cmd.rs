//! `lipsync render`: avatar + audio -> frames (directory, MJPEG on stdout, or MP4 with audio).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use lipsync_pipelines::render::{render, ImageFormat, Output, ProgressFn, RenderConfig, RenderOutcome};
use lipsync_pipelines::runtime::PinSetting;
use lipsync_serve::settings::{InferenceOptions, RemoteOptions, TemplateOptions};
use lipsync_stages::face::Blend;
use lipsync_stages::io::avatar::{read_boxes, Avatar};
use lipsync_stages::io::staged::check_new_file;

use crate::Cli;

/// The frame format of a directory output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FrameFormat {
    /// JPEG at `--jpeg-quality`.
    Jpeg,
    /// PNG (lossless).
    Png,
    /// Raw BGR24 with a JSON header (`frames.json`).
    Raw,
}

/// Arguments of `lipsync render`.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// Avatar directory (docs/avatar.md).
    #[arg(long, value_name = "DIR", required_unless_present = "video", conflicts_with_all = ["video", "boxes"])]
    pub avatar: Option<PathBuf>,
    /// Template video file or frames directory (instead of --avatar; needs --boxes, --unet, --encoder).
    #[arg(long, value_name = "FILE|DIR", requires_all = ["boxes", "unet", "encoder"])]
    pub video: Option<PathBuf>,
    /// Crop boxes (with --video).
    #[arg(long, value_name = "FILE")]
    pub boxes: Option<PathBuf>,
    /// UNet model (with --video, or to override the avatar's).
    #[arg(long, value_name = "ONNX")]
    pub unet: Option<PathBuf>,
    /// Audio encoder model (with --video, or to override the avatar's).
    #[arg(long, value_name = "ONNX")]
    pub encoder: Option<PathBuf>,
    /// Speech to lip-sync (any format lipsync decodes).
    #[arg(long, value_name = "FILE")]
    pub audio: PathBuf,
    /// Output: a new directory of frames, `-` for MJPEG on stdout, or a .mp4/.mkv/.mov file.
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,
    /// Frame format of a directory output.
    #[arg(long, value_enum, default_value_t = FrameFormat::Jpeg)]
    pub format: FrameFormat,
    /// Audio encoder batch size.
    #[arg(long, default_value_t = lipsync_stages::features::DEFAULT_ENCODER_BATCH as u16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub encoder_batch: u16,
    /// Capacity of each inter-stage channel (items).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub capacity: u16,
    /// Pin stage threads: auto, none, or a core list (0,1,2) (a daemon's sessions: none).
    #[arg(long, default_value = "auto")]
    pub pin: PinSetting,
    #[command(flatten)]
    pub inference: InferenceOptions,
    #[command(flatten)]
    pub remote: RemoteOptions,
    #[command(flatten)]
    pub template: TemplateOptions,
    /// JPEG quality (default: the avatar's, else 90).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: Option<u8>,
    /// Stop after this many frames.
    #[arg(long)]
    pub max_frames: Option<usize>,
    /// Take the template positions of frames N, N+1, ...: reproduces the frames of a
    /// live session's utterance that began at session frame N.
    #[arg(long, default_value_t = 0)]
    pub first_index: usize,
    /// Paste-back: hard (the reference) or feather=PX.
    #[arg(long, default_value = "hard")]
    pub blend: Blend,
    /// Resident memory (MB, 10^6 bytes) the default template cache (or JPEG frames) keeps the
    /// render within.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(64..=1_000_000))]
    pub memory_mb: u32,
    /// Write the latency report (JSON).
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Draw the latency percentiles (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub report_svg: Option<PathBuf>,
    /// Export the histograms in the HdrHistogram interval log format.
    #[arg(long, value_name = "FILE.hlog")]
    pub report_hlog: Option<PathBuf>,
}

fn load_avatar(args: &RenderArgs) -> Result<Avatar> {
    let mut avatar = if let Some(dir) = &args.avatar {
        Avatar::open(dir).with_context(|| format!("loading avatar {}", dir.display()))?
    } else {
        let video = args.video.as_ref().expect("clap requires --avatar or --video");
        let boxes = read_boxes(args.boxes.as_ref().expect("clap requires --boxes"))?;
        Avatar::from_parts(
            video,
            boxes,
            args.unet.as_ref().expect("clap requires --unet"),
            args.encoder.as_ref().expect("clap requires --encoder"),
            25.0,
            0,
            90,
        )?
    };
    if let Some(u) = &args.unet {
        avatar.unet = u.clone();
    }
    if let Some(e) = &args.encoder {
        avatar.encoder = e.clone();
    }
    Ok(avatar)
}

/// A render stopped by SIGINT or SIGTERM (its output removed); `main` exits with `code`.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {signal}: the render stopped and its output was removed")]
pub struct Interrupted {
    /// `SIGINT` or `SIGTERM`.
    pub signal: &'static str,
    /// 128 + the signal's number.
    pub code: u8,
}

/// SIGINT/SIGTERM handling for a render: the first stops the pipeline (which removes its
/// temporary output), a second SIGINT exits at once.
struct Signals {
    stop: Arc<AtomicBool>,
    term: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let stop = Arc::new(AtomicBool::new(false));
        let term = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, stop.clone())
            .context("installing signal handlers")?;
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
        }
        signal_hook::flag::register(SIGTERM, term.clone()).context("installing signal handlers")?;
        Ok(Self { stop, term })
    }

    fn interrupted(&self) -> Interrupted {
        if self.term.load(Ordering::SeqCst) {
            Interrupted { signal: "SIGTERM", code: 143 }
        } else {
            Interrupted { signal: "SIGINT", code: 130 }
        }
    }
}

pub fn run(cli: &Cli, args: &RenderArgs) -> Result<()> {
    let signals = Signals::install()?;
    for path in [&args.report, &args.report_svg, &args.report_hlog].into_iter().flatten() {
        check_new_file(path).context("report path")?;
    }
    let avatar = load_avatar(args)?;
    let rt = cli.runtime()?;
    let output = output_of(args)?;
    let inference = args.inference.resolve(&args.remote)?;
    let pin = args.pin.policy(inference.threads);
    let (progress, cb) = progress_bar(cli.quiet);
    let cfg = RenderConfig {
        jpeg_quality: args.jpeg_quality.unwrap_or(avatar.config.jpeg_quality),
        avatar,
        audio: args.audio.clone(),
        output: output.clone(),
        batch: inference.max_batch,
        encoder_batch: args.encoder_batch as usize,
        capacity: args.capacity as usize,
        intra_threads: inference.threads,
        spinning: inference.spin,
        provider: inference.provider,
        precision: inference.precision,
        remote: inference.remote,
        pin,
        max_frames: args.max_frames,
        first_index: args.first_index,
        blend: args.blend,
        template_cache: args.template.template_cache()?,
        jpeg_template: args.template.jpeg_template()?,
        memory_budget: args.memory_mb as usize * 1_000_000,
        progress: cb,
        cancel: Some(signals.stop.clone()),
    };
    let outcome = match render(&rt, cfg) {
        Ok(o) => o,
        Err(e) if e.is_cancelled() => return Err(signals.interrupted().into()),
        Err(e) => return Err(anyhow::Error::new(e).context("render failed")),
    };
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if !cli.quiet {
        eprint!("{}", outcome.report.table());
    }
    write_reports(args, &outcome)?;
    if !matches!(output, Output::Stdout) {
        eprintln!("wrote {} frames to {}", outcome.frames, args.output.display());
    }
    Ok(())
}

/// Where frames go: stdout (`-`), a video file (.mp4, .mkv, .mov), or a new directory; a name
/// that looks like an image or another video file is refused.
fn output_of(args: &RenderArgs) -> Result<Output> {
    Ok(if args.output.as_os_str() == "-" {
        Output::Stdout
    } else {
        match args.output.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("mp4" | "mkv" | "mov") => Output::Video(args.output.clone()),
            Some(ext) if ["jpg", "jpeg", "png", "avi", "webm"].contains(&ext) => {
                bail!(
                    "output {} looks like a file: use a directory, `-`, or a .mp4/.mkv/.mov file",
                    args.output.display()
                )
            }
            _ => Output::Dir {
                path: args.output.clone(),
                format: match args.format {
                    FrameFormat::Png => ImageFormat::Png,
                    FrameFormat::Raw => ImageFormat::Raw,
                    FrameFormat::Jpeg => ImageFormat::Jpeg,
                },
            },
        }
    })
}

/// A progress bar on a terminal (not with `-q`), and the callback that moves it.
fn progress_bar(quiet: bool) -> (Option<indicatif::ProgressBar>, Option<ProgressFn>) {
    let progress = (std::io::stderr().is_terminal() && !quiet).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} frames [{elapsed_precise}] {per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        bar
    });
    let cb: Option<ProgressFn> = progress.clone().map(|bar| {
        Arc::new(move |done: u64, total: Option<u64>| {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
        }) as ProgressFn
    });
    (progress, cb)
}

/// The latency report as JSON, SVG and HdrHistogram log, where asked.
fn write_reports(args: &RenderArgs, outcome: &RenderOutcome) -> Result<()> {
    if let Some(path) = &args.report {
        crate::report::write_json(&outcome.report, path)?;
    }
    if let Some(path) = &args.report_svg {
        crate::report::write_svg(&outcome.report, path)?;
    }
    if let Some(path) = &args.report_hlog {
        let mut buf = Vec::new();
        lipsync_pipelines::metrics::write_hlog(
            &mut buf,
            &outcome.histograms,
            &outcome.e2e.e2e,
            std::time::Duration::from_secs_f64(outcome.report.wall_seconds),
        )?;
        lipsync_stages::io::avatar::write_atomic(path, &buf)?;
    }
    Ok(())
}
