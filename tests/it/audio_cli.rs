//! `lipsync mel` and `lipsync features` through the CLI: parity with the Python reference's
//! fixtures and clear errors for bad input.

use crate::common::*;
use lipsync_stages::io::npy::read_f32_2d;

fn max_diff(a: &ndarray::Array2<f32>, b: &ndarray::Array2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn mel_and_features_match_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = fixture("golden/speech_2s.wav");
    let mel = tmp.path().join("mel.npy");
    let t = ok(&["mel", s(&wav), "-o", s(&mel)]);
    assert!(t.contains("161 x 80"), "{t}");
    let got = read_f32_2d(&mel).unwrap();
    let d = max_diff(&got, &read_f32_2d(&fixture("golden/ref/mel.npy")).unwrap());
    assert!(d <= 1e-4, "mel max |diff| {d}");

    let feats = tmp.path().join("feats.npy");
    let enc = fixture("models/audio_encoder.onnx");
    let t = ok(&["features", s(&wav), "--encoder", s(&enc), "-o", s(&feats), "--batch", "7"]);
    assert!(t.contains("49 x 512"), "{t}");
    let got = read_f32_2d(&feats).unwrap();
    // The reference ran ONNX Runtime on another CPU (other SIMD kernels, other summation
    // order); see stages/tests/encoder.rs for the bound.
    let d = max_diff(&got, &read_f32_2d(&fixture("golden/ref/features.npy")).unwrap());
    assert!(d <= 5e-4, "features max |diff| {d}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only the two outputs, no temporary files: {leftovers:?}");
}

#[test]
fn stereo_44k_input_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.npy");
    let t = ok(&["mel", s(&fixture("audio/clip_44k_stereo.wav")), "-o", s(&out)]);
    assert!(t.contains("49 x 80"), "9600 samples at 16 kHz -> 49 rows: {t}");
}

#[test]
fn bad_audio_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.npy");
    let enc = fixture("models/audio_encoder.onnx");
    for (file, msg) in [
        ("audio/absent.wav", "audio file not found"),
        ("audio/not_audio.wav", "unknown or unsupported audio format"),
        ("audio/video_only.mp4", "has no audio track"),
        ("audio/empty.wav", "zero-length audio"),
        ("audio/corrupt.m4a", "corrupt audio"),
        ("audio/short_0.1s.wav", "audio too short: 9 mel frames"),
    ] {
        let t = fails(&["features", s(&fixture(file)), "--encoder", s(&enc), "-o", s(&out)]);
        assert!(t.contains(msg), "{file}: expected `{msg}` in:\n{t}");
        assert!(!out.exists(), "{file}: no output on failure");
    }
    let t = fails(&[
        "features",
        s(&fixture("golden/speech_2s.wav")),
        "--encoder",
        s(&fixture("models/unet.onnx")),
        "-o",
        s(&out),
    ]);
    assert!(t.contains("audio encoder model") && t.contains("wrong signature"), "{t}");
    let t = fails(&["mel", s(&fixture("golden/speech_2s.wav")), "-o", "/nonexistent/dir/m.npy"]);
    assert!(t.contains("could not write /nonexistent/dir/m.npy"), "{t}");
}
