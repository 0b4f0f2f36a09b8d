//! `lipsync render`: avatar + audio -> frames (directory, MJPEG on stdout, or MP4 with audio).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use lipsync_pipelines::render::{render, ImageFormat, Output, ProgressFn, RenderConfig};
use lipsync_pipelines::runtime::PinPolicy;
use lipsync_stages::face::Blend;
use lipsync_stages::io::avatar::{read_boxes, Avatar};
use lipsync_stages::io::staged::check_new_file;
use lipsync_stages::unet::{BatchSetting, PrecisionSetting, Provider, RemoteSettings};

use crate::Cli;

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
    #[arg(long, default_value = "jpeg", value_parser = ["jpeg", "png", "raw"])]
    pub format: String,
    /// UNet batch: auto (1 on the CPU, measured on a GPU) or a size (1..=32).
    #[arg(long, default_value_t = BatchSetting::Auto)]
    pub batch: BatchSetting,
    /// Audio encoder batch size.
    #[arg(long, default_value_t = lipsync_stages::features::DEFAULT_ENCODER_BATCH as u16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub encoder_batch: u16,
    /// Capacity of each inter-stage channel (items).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub capacity: u16,
    /// ONNX Runtime intra-op threads for the UNet (default: all CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Let ONNX Runtime's threads spin while idle.
    #[arg(long)]
    pub spin: bool,
    /// Pin stage threads: auto, none, or a core list (0,1,2).
    #[arg(long, default_value = "auto")]
    pub pin: String,
    /// Execution provider for the UNet: cpu, cuda, or remote (an Open Inference Protocol server).
    #[arg(long, default_value = "cpu")]
    pub provider: Provider,
    /// Inference server of `--provider remote`: grpc://HOST:PORT (Open Inference Protocol:
    /// Triton, KServe, MLServer).
    #[arg(long)]
    pub remote_url: Option<String>,
    /// The UNet's model name on the remote server.
    #[arg(long)]
    pub remote_model: Option<String>,
    /// Deadline of each remote request, ms (1..=600000) [default: 10000].
    #[arg(long)]
    pub remote_timeout_ms: Option<u64>,
    /// Retries of a request the remote server could not take (0..=10) [default: 3].
    #[arg(long)]
    pub remote_retries: Option<u32>,
    /// Which of the avatar's UNets to run: auto (its int8 model on the CPU when it names one,
    /// made by `lipsync model quantize`), fp32 or int8.
    #[arg(long, default_value_t = PrecisionSetting::Auto)]
    pub precision: PrecisionSetting,
    /// JPEG quality (default: the avatar's, else 90).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: Option<u8>,
    /// Stop after this many frames.
    #[arg(long)]
    pub max_frames: Option<usize>,
    /// Take the template positions of frames N, N+1, ...: reproduces the frames of a
    /// real-time session's utterance that began at session frame N.
    #[arg(long, default_value_t = 0)]
    pub first_index: usize,
    /// Paste-back: hard (the reference) or feather=PX.
    #[arg(long, default_value = "hard")]
    pub blend: Blend,
    /// MiB of decoded template frames kept for the ping-pong's backward pass (a frames
    /// directory: raw frames held, the rest compressed), and for JPEG output the most the
    /// template's JPEG frames and face regions may take (held when they fit: then nothing is
    /// decoded); default: what `--memory-mb` leaves after the models, up to the whole template.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub template_cache_mb: Option<u32>,
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
    let output = if args.output.as_os_str() == "-" {
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
                format: match args.format.as_str() {
                    "png" => ImageFormat::Png,
                    "raw" => ImageFormat::Raw,
                    _ => ImageFormat::Jpeg,
                },
            },
        }
    };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = args.threads.unwrap_or(cpus).max(1);
    let pin = PinPolicy::parse(&args.pin, threads).map_err(anyhow::Error::msg)?;
    let progress = (std::io::stderr().is_terminal() && !cli.quiet).then(|| {
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
    let cfg = RenderConfig {
        jpeg_quality: args.jpeg_quality.unwrap_or(avatar.config.jpeg_quality),
        avatar,
        audio: args.audio.clone(),
        output: output.clone(),
        batch: args.batch,
        encoder_batch: args.encoder_batch as usize,
        capacity: args.capacity as usize,
        intra_threads: threads,
        spinning: args.spin,
        provider: args.provider,
        precision: args.precision,
        remote: RemoteSettings::from_flags(
            args.provider,
            args.remote_url.as_deref(),
            args.remote_model.as_deref(),
            args.remote_timeout_ms,
            args.remote_retries,
        )
        .map_err(anyhow::Error::msg)?,
        pin,
        max_frames: args.max_frames,
        first_index: args.first_index,
        blend: args.blend,
        template_cache: args.template_cache_mb.map(|mb| (mb as usize) << 20),
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
    if !matches!(output, Output::Stdout) {
        eprintln!("wrote {} frames to {}", outcome.frames, args.output.display());
    }
    Ok(())
}
