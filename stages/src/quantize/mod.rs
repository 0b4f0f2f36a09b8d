//! Static int8 quantization of an avatar's UNet, calibrated and measured on that avatar
//! (docs/avatar.md, "Quantized UNet").
//!
//! Samples are made by the engine's own path: the avatar's template frames in ping-pong order,
//! cropped and prepared like a render, and the per-frame audio tensors of a speech file. Most
//! go to ONNX Runtime's quantizer (a Python tool, `quantize_unet.py` beside this file, carried
//! inside the binary); evenly spaced held-out samples run through the fp32 and the int8 model in turn,
//! and their predictions (as paste-back's bytes) are compared inside the mouth box (the crop's
//! mask): PSNR over all of them, the worst frame's PSNR, and mean SSIM, with frames/s of both.
//! Below the PSNR gate the int8 model is not kept.

pub mod quality;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::audio::load_16k;
use crate::face::{input_len, quantize_output, template_index, template_len, FacePrep};
use crate::features::{extract_windows, frame_audio, pad_features, AudioEncoder, FEATURE_DIM, FRAME_AUDIO_LEN};
use crate::frame::BgrFrame;
use crate::io::avatar::{write_atomic, Avatar};
use crate::io::npy::NpyStream;
use crate::mel::MelSpectrogram;
use crate::onnx::{OrtRuntime, SessionOptions};
use crate::template::{SharedTemplate, DEFAULT_CACHE};
use crate::unet::{run_slices, Batch, OrtUnet, Precision, UnetBackend, UnetModel};

/// The quantizer, as the binary carries it.
const SCRIPT: &str = include_str!("quantize_unet.py");

/// Errors of `lipsync model quantize`.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// A setting out of range.
    #[error("{name} is {value}: expected {allowed}")]
    Setting {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: String,
        /// The allowed range.
        allowed: &'static str,
    },
    /// The speech gives fewer frames than the samples need.
    #[error(
        "calibration audio {path} is too short: {frames} frames ({seconds:.1} s) at 25 frames/s, but \
         {needed} samples were asked for ({calibration} calibration + {held_out} held out); give longer \
         speech or fewer --samples/--held-out"
    )]
    AudioTooShort {
        /// The audio file.
        path: PathBuf,
        /// Frames it gives.
        frames: usize,
        /// Its length.
        seconds: f64,
        /// Samples needed.
        needed: usize,
        /// Calibration samples asked for.
        calibration: usize,
        /// Held-out samples asked for.
        held_out: usize,
    },
    /// The quantizer's Python is missing.
    #[error("no Python with onnxruntime.quantization: {0}")]
    NoPython(String),
    /// The quantizer failed.
    #[error("the quantizer ({python}) failed: {message}")]
    Tool {
        /// The Python run.
        python: PathBuf,
        /// Its last error line.
        message: String,
    },
    /// The int8 model is below the PSNR gate: not kept.
    #[error(
        "the int8 UNet reaches {psnr:.2} dB PSNR in the mouth box against fp32 on {held_out} held-out frames \
         (worst frame {worst:.2} dB, SSIM {ssim:.4}), below the {min:.1} dB gate: not kept (report: {report})"
    )]
    BelowGate {
        /// PSNR reached.
        psnr: f64,
        /// Worst frame.
        worst: f64,
        /// Mean SSIM.
        ssim: f64,
        /// The gate.
        min: f64,
        /// Held-out frames measured.
        held_out: usize,
        /// Where the report was written.
        report: PathBuf,
    },
    /// Anything the engine's own stages reported (audio, template, models, files).
    #[error("{0}")]
    Engine(String),
}

fn engine(e: impl std::fmt::Display) -> QuantizeError {
    QuantizeError::Engine(e.to_string())
}

/// What to quantize and how.
#[derive(Debug, Clone)]
pub struct QuantizeSpec {
    /// Speech for the audio inputs (any length covering the samples).
    pub audio: PathBuf,
    /// Calibration samples (16..=2000).
    pub calibration: usize,
    /// Held-out samples measured (4..=1000).
    pub held_out: usize,
    /// PSNR gate in dB.
    pub min_psnr: f64,
    /// Where the int8 model goes.
    pub out: PathBuf,
    /// The Python with `onnxruntime.quantization`.
    pub python: PathBuf,
    /// ONNX Runtime intra-op threads of the measurement.
    pub threads: usize,
    /// Whether the avatar is changed to name the kept model.
    pub set_avatar: bool,
}

/// What a quantization measured (written beside the model as JSON).
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    /// The fp32 model.
    pub fp32_model: PathBuf,
    /// The int8 model (kept only when `accepted`).
    pub int8_model: PathBuf,
    /// Whether it passed the gate and was kept.
    pub accepted: bool,
    /// Calibration samples.
    pub calibration_samples: usize,
    /// Held-out samples measured.
    pub held_out_samples: usize,
    /// PSNR (dB) over all held-out frames, inside the mouth box (`null`: identical).
    pub psnr_db: f64,
    /// The worst held-out frame's PSNR (dB).
    pub worst_psnr_db: f64,
    /// Mean SSIM inside the mouth box.
    pub ssim: f64,
    /// The gate (dB).
    pub min_psnr_db: f64,
    /// UNet-only frames/s of the fp32 model (batch 1, same run, interleaved).
    pub fp32_fps: f64,
    /// UNet-only frames/s of the int8 model.
    pub int8_fps: f64,
    /// `int8_fps / fp32_fps`.
    pub speedup: f64,
    /// ONNX Runtime intra-op threads of the measurement.
    pub threads: usize,
    /// Op types quantized.
    pub quantized_ops: Vec<String>,
    /// Op types left in fp32 (no int8 kernel on the CPU).
    pub excluded_ops: Vec<String>,
}

/// The report path beside a model: `unet.int8.onnx` -> `unet.int8.report.json`.
pub fn report_path(model: &Path) -> PathBuf {
    model.with_extension("report.json")
}

/// Held-out sample indices: `held` evenly spaced among `total`.
fn held_out_indices(total: usize, held: usize) -> Vec<usize> {
    (0..held).map(|k| ((2 * k + 1) * total) / (2 * held)).collect()
}

/// Quantizes `avatar`'s fp32 UNet (see the module docs). On success the int8 model is at
/// `spec.out` (and named by the avatar when `spec.set_avatar`); below the gate the report is
/// written and [`QuantizeError::BelowGate`] returned.
pub fn quantize(rt: &OrtRuntime, avatar: &Avatar, spec: &QuantizeSpec) -> Result<QuantizeReport, QuantizeError> {
    check(spec)?;
    let io = avatar.config.models.io.clone();
    let crop = avatar.config.crop;
    let fp32 = UnetModel { path: avatar.unet.clone(), precision: Precision::Fp32, io: io.clone(), crop };
    let opts = SessionOptions { intra_threads: spec.threads, spinning: false };
    // Checks the model is a UNet for this avatar's crop before any work.
    let mut fp32_unet = OrtUnet::open(rt, &fp32, Batch::ONE, &opts).map_err(engine)?;

    let out_dir = crate::io::staged::parent_dir(&spec.out);
    let work = tempfile::Builder::new().prefix(".lipsync-quantize").tempdir_in(out_dir).map_err(engine)?;
    let held_inputs = write_samples(rt, avatar, spec, work.path())?;
    let tool = work.path().join("quantize_unet.py");
    std::fs::write(&tool, SCRIPT).map_err(engine)?;
    let int8_tmp = work.path().join("unet.int8.onnx");
    let ops = run_tool(spec, &tool, work.path(), &fp32.path, &int8_tmp, &io)?;

    let int8 = UnetModel { path: int8_tmp.clone(), precision: Precision::Int8, io, crop };
    let mut int8_unet = OrtUnet::open(rt, &int8, Batch::ONE, &opts).map_err(engine)?;
    let m = measure(&mut fp32_unet, &mut int8_unet, &held_inputs, crop.mask.map(|v| v as usize))?;
    let accepted = m.psnr >= spec.min_psnr;
    let report = report(spec, &fp32.path, &m, accepted, ops);
    let report_file = report_path(&spec.out);
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    write_atomic(&report_file, format!("{json}\n").as_bytes()).map_err(engine)?;
    if !accepted {
        return Err(QuantizeError::BelowGate {
            psnr: m.psnr,
            worst: m.worst,
            ssim: m.ssim,
            min: spec.min_psnr,
            held_out: spec.held_out,
            report: report_file,
        });
    }
    drop(int8_unet);
    std::fs::rename(&int8_tmp, &spec.out)
        .map_err(|e| engine(format!("could not write {}: {e}", spec.out.display())))?;
    if spec.set_avatar {
        crate::io::avatar::set_int8_model(&avatar.root, &spec.out).map_err(engine)?;
    }
    Ok(report)
}

/// The settings in their ranges and the Python interpreter present, before any work.
fn check(spec: &QuantizeSpec) -> Result<(), QuantizeError> {
    let range = |name, value: usize, lo: usize, hi: usize, allowed| {
        if (lo..=hi).contains(&value) {
            Ok(())
        } else {
            Err(QuantizeError::Setting { name, value: value.to_string(), allowed })
        }
    };
    range("--samples", spec.calibration, 16, 2000, "16..=2000")?;
    range("--held-out", spec.held_out, 4, 1000, "4..=1000")?;
    range("--threads", spec.threads, 1, 256, "1..=256")?;
    if !(spec.min_psnr.is_finite() && (0.0..=100.0).contains(&spec.min_psnr)) {
        let value = spec.min_psnr.to_string();
        return Err(QuantizeError::Setting { name: "--min-psnr", value, allowed: "0..=100 dB" });
    }
    if !spec.python.is_file() {
        return Err(QuantizeError::NoPython(format!(
            "{} does not exist; run scripts/setup.sh or pass --python",
            spec.python.display()
        )));
    }
    Ok(())
}

/// A UNet input sample: its `[6,S,S]` image tensor and its `[32,16,16]` audio.
type Sample = (Vec<f32>, Vec<f32>);

/// Writes the calibration samples (images and audio, `.npy`) into `work` and returns the
/// held-out samples: `spec.calibration + spec.held_out` samples of the engine's own path.
fn write_samples(
    rt: &OrtRuntime,
    avatar: &Avatar,
    spec: &QuantizeSpec,
    work: &Path,
) -> Result<Vec<Sample>, QuantizeError> {
    let crop = avatar.config.crop;
    let total = spec.calibration + spec.held_out;
    let s = crop.model_size as usize;
    let mut images = NpyStream::create(&work.join("images.npy"), &[spec.calibration, 6, s, s]).map_err(engine)?;
    let mut audio = NpyStream::create(&work.join("audio.npy"), &[spec.calibration, 32, 16, 16]).map_err(engine)?;
    let held = held_out_indices(total, spec.held_out);
    let mut held_inputs: Vec<Sample> = Vec::with_capacity(spec.held_out);
    let too_short = |frames, seconds| QuantizeError::AudioTooShort {
        path: spec.audio.clone(),
        frames,
        seconds,
        needed: total,
        calibration: spec.calibration,
        held_out: spec.held_out,
    };
    make_samples(rt, avatar, &spec.audio, total, too_short, |i, tensor, aud| {
        if held.binary_search(&i).is_ok() {
            held_inputs.push((tensor.to_vec(), aud.to_vec()));
            Ok(())
        } else {
            images.push(tensor).and_then(|()| audio.push(aud)).map_err(engine)
        }
    })?;
    images.finish().map_err(engine)?;
    audio.finish().map_err(engine)?;

    Ok(held_inputs)
}

/// The report of a quantization measured as `m`.
fn report(
    spec: &QuantizeSpec,
    fp32: &Path,
    m: &Measured,
    accepted: bool,
    ops: (Vec<String>, Vec<String>),
) -> QuantizeReport {
    QuantizeReport {
        fp32_model: fp32.to_path_buf(),
        int8_model: spec.out.clone(),
        accepted,
        calibration_samples: spec.calibration,
        held_out_samples: spec.held_out,
        psnr_db: m.psnr,
        worst_psnr_db: m.worst,
        ssim: m.ssim,
        min_psnr_db: spec.min_psnr,
        fp32_fps: m.fp32_fps,
        int8_fps: m.int8_fps,
        speedup: m.int8_fps / m.fp32_fps,
        threads: spec.threads,
        quantized_ops: ops.0,
        excluded_ops: ops.1,
    }
}

/// Makes the first `count` UNet input samples of a render of `audio` by `avatar`, by the
/// engine's own path (template frames in ping-pong order, prep, per-frame audio tensors), and
/// hands each to `sink` (`index`, `[6,S,S]` image tensor, `[32,16,16]` audio). When the audio
/// gives fewer frames, `too_short(frames, seconds)` is the error.
pub fn make_samples(
    rt: &OrtRuntime,
    avatar: &Avatar,
    audio: &Path,
    count: usize,
    too_short: impl FnOnce(usize, f64) -> QuantizeError,
    mut sink: impl FnMut(usize, &[f32], &[f32]) -> Result<(), QuantizeError>,
) -> Result<(), QuantizeError> {
    // Per-frame audio tensors of the speech (docs/spec.md sections 2 and 7).
    let samples = load_16k(audio).map_err(engine)?;
    let mel = MelSpectrogram::new().compute(&samples);
    let windows = extract_windows(&mel).map_err(engine)?;
    let enc_opts = SessionOptions { intra_threads: 1, spinning: false };
    let io = &avatar.config.models.io;
    let mut encoder = AudioEncoder::open(rt, &avatar.encoder, io, crate::features::DEFAULT_ENCODER_BATCH, &enc_opts)
        .map_err(engine)?;
    let mut o = Vec::new();
    encoder.encode(&windows, &mut o).map_err(engine)?;
    let f = pad_features(&o);
    let frames = f.len() / FEATURE_DIM;
    if frames < count {
        return Err(too_short(frames, samples.len() as f64 / 16_000.0));
    }
    let crop = avatar.config.crop;
    let template = Arc::new(SharedTemplate::open(&avatar.video, DEFAULT_CACHE).map_err(engine)?);
    let mut reader = template.reader(DEFAULT_CACHE);
    let (mut prep, mut frame) = (FacePrep::new(), BgrFrame::default());
    let mut tmpl = vec![0u8; template_len(&crop)];
    let mut tensor = vec![0f32; input_len(&crop)];
    let mut aud = vec![0f32; FRAME_AUDIO_LEN];
    for i in 0..count {
        let t = template_index(i, avatar.boxes.len(), avatar.config.start_frame);
        reader.get(t, &mut frame).map_err(engine)?;
        prep.prep(&frame, avatar.boxes[t], &crop, &mut tmpl, &mut tensor);
        frame_audio(&f, i, &mut aud);
        sink(i, &tensor, &aud)?;
    }
    Ok(())
}

/// Runs the quantizer; the op types it quantized and left out.
fn run_tool(
    spec: &QuantizeSpec,
    tool: &Path,
    calib: &Path,
    model: &Path,
    out: &Path,
    io: &crate::onnx::ModelIo,
) -> Result<(Vec<String>, Vec<String>), QuantizeError> {
    let fail = |message: String| QuantizeError::Tool { python: spec.python.clone(), message };
    let output = std::process::Command::new(&spec.python)
        .arg(tool)
        .args(["--model".as_ref(), model.as_os_str(), "--calib".as_ref(), calib.as_os_str()])
        .args(["--out".as_ref(), out.as_os_str()])
        .args(["--image-input", &io.unet_image_input, "--audio-input", &io.unet_audio_input])
        .output()
        .map_err(|e| fail(format!("could not run it: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        return Err(fail(format!("{} ({})", last.trim(), output.status)));
    }
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| fail("no summary line on its output".into()))?;
    let list = |key: &str| -> Vec<String> {
        summary[key]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    Ok((list("quantized_ops"), list("excluded_ops")))
}

/// What the held-out comparison measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// PSNR over all frames (pooled squared error).
    pub psnr: f64,
    /// Worst frame's PSNR.
    pub worst: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// fp32 frames/s.
    pub fp32_fps: f64,
    /// int8 frames/s.
    pub int8_fps: f64,
}

/// Runs every held-out sample through both models in turn (so machine noise hits both) and
/// compares their predictions inside `mask`.
pub fn measure(
    fp32: &mut dyn UnetBackend,
    int8: &mut dyn UnetBackend,
    samples: &[(Vec<f32>, Vec<f32>)],
    mask: quality::Rect,
) -> Result<Measured, QuantizeError> {
    let s = fp32.size();
    let len = 3 * s * s;
    let (mut out_a, mut out_b) = (vec![0f32; len], vec![0f32; len]);
    let (mut pa, mut pb) = (vec![0u8; len], vec![0u8; len]);
    let (mut t_a, mut t_b) = (0f64, 0f64);
    let (mut sq, mut n, mut worst, mut ssim) = (0f64, 0usize, f64::INFINITY, 0f64);
    // A warm-up run each: ONNX Runtime's first run sizes its memory.
    if let Some((img, aud)) = samples.first() {
        run_slices(fp32, 1, img, aud, &mut out_a).map_err(engine)?;
        run_slices(int8, 1, img, aud, &mut out_b).map_err(engine)?;
    }
    for (img, aud) in samples {
        let t = Instant::now();
        run_slices(fp32, 1, img, aud, &mut out_a).map_err(engine)?;
        t_a += t.elapsed().as_secs_f64();
        let t = Instant::now();
        run_slices(int8, 1, img, aud, &mut out_b).map_err(engine)?;
        t_b += t.elapsed().as_secs_f64();
        quantize_output(&out_a, &mut pa);
        quantize_output(&out_b, &mut pb);
        let (frame_sq, values) = quality::squared_error(&pa, &pb, s, mask);
        sq += frame_sq;
        n += values;
        worst = worst.min(quality::psnr_from_mse(frame_sq / values.max(1) as f64));
        ssim += quality::ssim(&pa, &pb, s, mask);
    }
    let k = samples.len().max(1) as f64;
    Ok(Measured {
        psnr: quality::psnr_from_mse(sq / n.max(1) as f64),
        worst,
        ssim: ssim / k,
        fp32_fps: k / t_a.max(f64::MIN_POSITIVE),
        int8_fps: k / t_b.max(f64::MIN_POSITIVE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_samples_are_spread_and_distinct() {
        assert_eq!(held_out_indices(10, 2), vec![2, 7]);
        let h = held_out_indices(240, 40);
        assert_eq!(h.len(), 40);
        assert!(h.windows(2).all(|w| w[1] > w[0]), "distinct and sorted");
        assert!(*h.last().unwrap() < 240);
    }

    #[test]
    fn the_report_sits_beside_the_model() {
        assert_eq!(report_path(Path::new("a/unet.int8.onnx")), PathBuf::from("a/unet.int8.report.json"));
    }
}
