//! `lipsync mel` and `lipsync features`: inspect the audio path.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lipsync_stages::audio::load_16k;
use lipsync_stages::features::{extract_windows, pad_features, AudioEncoder, FEATURE_DIM};
use lipsync_stages::io::npy::write_f32_2d;
use lipsync_stages::mel::{MelSpectrogram, N_MELS};
use lipsync_stages::onnx::{ModelIo, SessionOptions};
use ndarray::ArrayView2;

use crate::Cli;

/// Arguments of `lipsync mel`.
#[derive(Debug, Args)]
pub struct MelArgs {
    /// Audio file (any rate and channel count; resampled to 16 kHz mono).
    pub audio: PathBuf,
    /// Output .npy (T x 80 f32).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Arguments of `lipsync features`.
#[derive(Debug, Args)]
pub struct FeaturesArgs {
    /// Audio file (any rate and channel count; resampled to 16 kHz mono).
    pub audio: PathBuf,
    /// The audio encoder model (ONNX).
    #[arg(long, value_name = "ONNX")]
    pub encoder: PathBuf,
    /// Output .npy ((L + 2) x 512 f32: the padded feature list F).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Windows per encoder call.
    #[arg(long, default_value_t = lipsync_stages::features::DEFAULT_ENCODER_BATCH)]
    pub batch: usize,
    /// ONNX Runtime intra-op threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

fn mel_of(audio: &std::path::Path) -> Result<Vec<f32>> {
    let samples = load_16k(audio).with_context(|| format!("decoding {}", audio.display()))?;
    let mel = MelSpectrogram::new().compute(&samples);
    tracing::info!("{}: {} samples at 16 kHz -> {} mel frames", audio.display(), samples.len(), mel.len() / N_MELS);
    Ok(mel)
}

pub fn mel(args: &MelArgs) -> Result<()> {
    let mel = mel_of(&args.audio)?;
    let view = ArrayView2::from_shape((mel.len() / N_MELS, N_MELS), &mel).expect("whole rows");
    write_f32_2d(&args.output, view)?;
    println!("wrote {} ({} x {N_MELS})", args.output.display(), mel.len() / N_MELS);
    Ok(())
}

pub fn features(cli: &Cli, args: &FeaturesArgs) -> Result<()> {
    let rt = cli.runtime()?;
    let opts = SessionOptions { intra_threads: args.threads.max(1), spinning: false };
    let mut encoder = AudioEncoder::open(&rt, &args.encoder, &ModelIo::default(), args.batch, &opts)?;
    let mel = mel_of(&args.audio)?;
    let windows = extract_windows(&mel).with_context(|| format!("windows of {}", args.audio.display()))?;
    let mut o = Vec::new();
    encoder.encode(&windows, &mut o)?;
    let f = pad_features(&o);
    let rows = f.len() / FEATURE_DIM;
    let view = ArrayView2::from_shape((rows, FEATURE_DIM), &f).expect("whole rows");
    write_f32_2d(&args.output, view)?;
    println!("wrote {} ({rows} x {FEATURE_DIM}: L = {} windows, {rows} frames)", args.output.display(), rows - 2);
    Ok(())
}
