//! `lipsync bench audio`: time the audio stages on a file, single-threaded, as JSON (used by
//! scripts/compare_audio.py to race the Python reference in the same run).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lipsync_stages::audio::load_16k;
use lipsync_stages::features::{extract_windows, AudioEncoder};
use lipsync_stages::mel::{MelSpectrogram, N_MELS};
use lipsync_stages::onnx::{ModelIo, OrtRuntime, SessionOptions};

use crate::Cli;

/// `lipsync bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time decode, mel, windows (and the encoder with --encoder) on one audio file.
    Audio(BenchAudioArgs),
}

/// Arguments of `lipsync bench audio`.
#[derive(Debug, Args)]
pub struct BenchAudioArgs {
    /// Audio file.
    pub audio: PathBuf,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 9)]
    pub repeat: usize,
    /// Also time the audio encoder on all windows.
    #[arg(long, value_name = "ONNX")]
    pub encoder: Option<PathBuf>,
    /// Encoder batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
}

fn median_secs<T>(repeat: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut last = f()?; // warm-up
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        last = f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], last))
}

pub fn run(cli: &Cli, cmd: &BenchCommand) -> Result<()> {
    let BenchCommand::Audio(args) = cmd;
    let (decode_s, samples) = median_secs(args.repeat, || Ok(load_16k(&args.audio)?))?;
    let mut mel = MelSpectrogram::new();
    let (mel_s, rows) = median_secs(args.repeat, || Ok(mel.compute(&samples)))?;
    let (windows_s, windows) = median_secs(args.repeat, || Ok(extract_windows(&rows)?))?;
    let mut out = serde_json::json!({
        "audio": args.audio.display().to_string(),
        "samples": samples.len(),
        "seconds_of_audio": samples.len() as f64 / 16_000.0,
        "mel_frames": rows.len() / N_MELS,
        "windows": windows.len() / lipsync_stages::features::WINDOW_LEN,
        "decode_s": decode_s,
        "mel_s": mel_s,
        "windows_s": windows_s,
    });
    if let Some(path) = &args.encoder {
        let rt = OrtRuntime::load(cli.ort_lib.as_deref()).context("loading ONNX Runtime")?;
        let mut enc = AudioEncoder::open(&rt, path, &ModelIo::default(), args.batch, &SessionOptions::default())?;
        let (enc_s, _) = median_secs(args.repeat, || {
            let mut o = Vec::new();
            enc.encode(&windows, &mut o)?;
            Ok(o)
        })?;
        out["encoder_s"] = enc_s.into();
        out["encoder_batch"] = args.batch.into();
    }
    println!("{out}");
    Ok(())
}
