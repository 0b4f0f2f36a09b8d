//! `lipsync`: speech to talking-head video in real time (SyncTalk_2D family on ONNX Runtime).

mod audio_cmd;
mod avatar_cmd;
mod bench_cmd;
mod bench_render;
mod bench_serve;
mod client_cmd;
mod doctor;
mod model_cmd;
mod render_cmd;
mod report;
mod serve_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgAction, Parser, Subcommand};
use lipsync_stages::onnx::OrtRuntime;

/// Turn speech into a talking-head video, exactly and fast.
#[derive(Debug, Parser)]
#[command(name = "lipsync", version, about, long_about = None)]
pub struct Cli {
    /// ONNX Runtime shared library (else $LIPSYNC_ORT_LIB, $ORT_DYLIB_PATH, then the project .venv).
    #[arg(long, global = true, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// Less logging (errors only).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Loads ONNX Runtime from `--ort-lib` (else `$LIPSYNC_ORT_LIB`, `$ORT_DYLIB_PATH`, the
    /// project `.venv`): the one place every command gets it.
    pub fn runtime(&self) -> anyhow::Result<OrtRuntime> {
        OrtRuntime::load(self.ort_lib.as_deref()).context("loading ONNX Runtime")
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what lipsync found: ONNX Runtime, execution providers, FFmpeg, CPUs; check models.
    Doctor(doctor::DoctorArgs),
    /// Create, import and check avatars (template video + crop boxes + models).
    #[command(subcommand)]
    Avatar(avatar_cmd::AvatarCommand),
    /// Render a talking-head video: avatar + audio -> frames (directory, MJPEG stream or MP4).
    Render(Box<render_cmd::RenderArgs>),
    /// Print a saved latency report as a table (and draw it as SVG).
    Report(report::ReportArgs),
    /// Compute the mel spectrogram of an audio file (T x 80 .npy).
    Mel(audio_cmd::MelArgs),
    /// Compute the padded audio feature list F of an audio file ((L+2) x 512 .npy).
    Features(audio_cmd::FeaturesArgs),
    /// Run the streaming daemon: sessions stream audio in over a Unix socket and get frames back.
    Serve(Box<serve_cmd::ServeArgs>),
    /// Stream an audio file through a running daemon; write the frames; print latencies.
    Client(Box<client_cmd::ClientArgs>),
    /// Show a running daemon's live statistics: stages, UNet batches, sessions, frames/s.
    Stats(client_cmd::StatsArgs),
    /// Model tools: quantize an avatar's UNet to int8, measured against fp32.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Time stages on real input (JSON), for comparisons with the Python reference.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
}

fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// `e` and its causes joined by `: ` (as `{e:#}` writes them), leaving out a cause whose text
/// the ones before already hold: the stages' errors say their cause in their own message and
/// keep it as their source too.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

fn main() -> ExitCode {
    // ONNX Runtime 1.31 keeps a device id and an event store under ~/.cache (or
    // $XDG_CACHE_HOME) unless this is set: lipsync writes nothing under the user's HOME.
    // Set here, before any other thread exists (a user's own setting wins).
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        std::env::set_var("ORT_DISABLE_TELEMETRY", "1");
    }
    // One allocator setting for the whole process (lipsync_pipelines::allocator says why).
    lipsync_pipelines::allocator::fix_mmap_threshold();
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    let result = match &cli.command {
        Command::Doctor(args) => doctor::run(&cli, args),
        Command::Avatar(cmd) => avatar_cmd::run(&cli, cmd),
        Command::Render(args) => render_cmd::run(&cli, args),
        Command::Report(args) => report::run(args),
        Command::Mel(args) => audio_cmd::mel(args),
        Command::Features(args) => audio_cmd::features(&cli, args),
        Command::Serve(args) => serve_cmd::run(&cli, args),
        Command::Client(args) => client_cmd::run(args),
        Command::Stats(args) => client_cmd::stats(args),
        Command::Model(cmd) => model_cmd::run(&cli, cmd),
        Command::Bench(cmd) => bench_cmd::run(&cli, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            match e.downcast_ref::<render_cmd::Interrupted>() {
                Some(i) => ExitCode::from(i.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("could not read x: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_shows_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        let e = anyhow::Error::new(Outer(io)).context("render failed");
        assert_eq!(super::error_text(&e), "render failed: could not read x: disk on fire");
        let plain = anyhow::Error::new(std::io::Error::other("inner")).context("outer");
        assert_eq!(super::error_text(&plain), "outer: inner", "a cause not in the message is shown");
    }
}
