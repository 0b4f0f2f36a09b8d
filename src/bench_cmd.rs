//! `lipsync bench audio`: time the audio stages on a file, single-threaded, as JSON (used by
//! scripts/compare_audio.py to race the Python reference in the same run).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lipsync_stages::audio::load_16k;
use lipsync_stages::features::{extract_windows, AudioEncoder};
use lipsync_stages::mel::{MelSpectrogram, N_MELS};
use lipsync_stages::onnx::{ModelIo, SessionOptions};

use crate::Cli;

/// `lipsync bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time decode, mel, windows (and the encoder with --encoder) on one audio file.
    Audio(BenchAudioArgs),
    /// Time the per-frame image work on an avatar: decode, prep, paste-back, JPEG encode.
    Image(BenchImageArgs),
    /// Whole-render frames/s against UNet-only frames/s (same session settings, same batch).
    Render(crate::bench_render::BenchRenderArgs),
    /// Streaming daemon: latency and frames/s for 1, 2, 4... concurrent live sessions,
    /// next to the offline render's frames/s.
    Serve(crate::bench_serve::BenchServeArgs),
}

/// Arguments of `lipsync bench image`.
#[derive(Debug, Args)]
pub struct BenchImageArgs {
    /// The avatar directory.
    #[arg(long)]
    pub avatar: PathBuf,
    /// Frames to time (cycling through the template).
    #[arg(long, default_value_t = 100)]
    pub frames: usize,
    /// JPEG quality.
    #[arg(long, default_value_t = 90)]
    pub quality: u8,
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
    match cmd {
        BenchCommand::Audio(args) => audio(cli, args),
        BenchCommand::Image(args) => image(args),
        BenchCommand::Render(args) => crate::bench_render::run(cli, args),
        BenchCommand::Serve(args) => crate::bench_serve::run(cli, args),
    }
}

fn per_frame_median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn image(args: &BenchImageArgs) -> Result<()> {
    use lipsync_stages::face::{input_len, output_len, template_index, template_len, Blend, Compositor, FacePrep};
    use lipsync_stages::frame::BgrFrame;
    use lipsync_stages::io::avatar::Avatar;
    use lipsync_stages::jpeg::JpegEncoder;
    use lipsync_stages::template::{SharedTemplate, VideoReader, DEFAULT_CACHE};

    let avatar = Avatar::open(&args.avatar).with_context(|| format!("loading avatar {}", args.avatar.display()))?;
    let crop = avatar.config.crop;
    let n = args.frames.max(1);
    let mut decode = Vec::with_capacity(n);
    let mut frame = BgrFrame::default();
    if avatar.video.is_file() {
        let mut reader = VideoReader::open(&avatar.video)?;
        for _ in 0..n {
            let t = Instant::now();
            if !reader.next(&mut frame)? {
                break;
            }
            decode.push(t.elapsed().as_secs_f64());
        }
    }
    let template = std::sync::Arc::new(SharedTemplate::open(&avatar.video, DEFAULT_CACHE)?);
    let (frames_n, (w, h)) = (template.len(), template.size());
    let mut template = template.reader(DEFAULT_CACHE);
    let (mut fetch, mut prep_t, mut paste_t, mut jpeg_t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut prep = FacePrep::new();
    let mut comp = Compositor::new();
    let mut enc = JpegEncoder::new(args.quality)?;
    let mut tmpl = vec![0u8; template_len(&crop)];
    let mut tensor = vec![0f32; input_len(&crop)];
    let output = vec![0.5f32; output_len(&crop)];
    let mut jpeg_bytes = 0usize;
    for i in 0..n {
        let ti = template_index(i, frames_n, avatar.config.start_frame);
        let b = avatar.boxes[ti];
        let t = Instant::now();
        template.get(ti, &mut frame)?;
        fetch.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        prep.prep(&frame, b, &crop, &mut tmpl, &mut tensor);
        prep_t.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        comp.paste(&mut frame, b, &crop, &tmpl, &output, Blend::Hard);
        paste_t.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        jpeg_bytes = enc.encode(&frame)?.len();
        jpeg_t.push(t.elapsed().as_secs_f64());
    }
    let b = avatar.boxes[0];
    let mut out = serde_json::json!({
        "avatar": args.avatar.display().to_string(),
        "frame": format!("{w}x{h}"),
        "box": format!("{}x{}", b.width(), b.height()),
        "frames": n,
        "template_fetch_s": per_frame_median(&mut fetch),
        "prep_s": per_frame_median(&mut prep_t),
        "paste_s": per_frame_median(&mut paste_t),
        "jpeg_s": per_frame_median(&mut jpeg_t),
        "jpeg_bytes": jpeg_bytes,
    });
    if !decode.is_empty() {
        out["decode_s"] = per_frame_median(&mut decode).into();
    }
    println!("{out}");
    Ok(())
}

fn audio(cli: &Cli, args: &BenchAudioArgs) -> Result<()> {
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
        let rt = cli.runtime()?;
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
