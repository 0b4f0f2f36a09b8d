//! `lipsync model quantize` on a copy of the golden avatar (tiny model): the gate keeps or
//! refuses the int8 model, the avatar names a kept one, render and doctor use and show it, and
//! bad input gets clear errors.

use std::path::{Path, PathBuf};

use crate::common::*;

/// A copy of the golden avatar in `dir` with absolute model paths (so it can be changed).
fn avatar_copy(dir: &Path) -> PathBuf {
    let src = fixture("golden/avatar");
    let dst = dir.join("avatar");
    std::fs::create_dir_all(dst.join("frames")).unwrap();
    for e in std::fs::read_dir(src.join("frames")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join("frames").join(e.file_name())).unwrap();
    }
    std::fs::copy(src.join("boxes.json"), dst.join("boxes.json")).unwrap();
    let toml = std::fs::read_to_string(src.join("avatar.toml"))
        .unwrap()
        .replace("../../models/", &format!("{}/", s(&fixture("models"))));
    std::fs::write(dst.join("avatar.toml"), toml).unwrap();
    dst
}

fn quantize(avatar: &Path, extra: &[&str]) -> std::process::Output {
    let audio = fixture("golden/speech_2s.wav");
    let mut args = vec!["model", "quantize", "--avatar", s(avatar), "--audio", s(&audio), "--held-out", "4"];
    if !extra.contains(&"--samples") {
        args.extend_from_slice(&["--samples", "16"]);
    }
    args.extend_from_slice(extra);
    lipsync(&args)
}

fn render(avatar: &Path, out: &Path, extra: &[&str]) {
    let audio = fixture("golden/speech_2s.wav");
    let mut args = vec!["render", "--avatar", s(avatar), "--audio", s(&audio), "-o", s(out), "--max-frames", "6"];
    args.extend_from_slice(extra);
    ok(&args);
}

fn frames(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn a_model_above_the_gate_is_kept_named_by_the_avatar_and_rendered_with() {
    let tmp = tempfile::tempdir().unwrap();
    let avatar = avatar_copy(tmp.path());
    let before = tmp.path().join("before");
    render(&avatar, &before, &[]);

    let out = quantize(&avatar, &["--min-psnr", "0"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("dB PSNR in the mouth box") && t.contains("frames/s"), "{t}");
    let model = avatar.join("unet.int8.onnx");
    assert!(model.is_file());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(avatar.join("unet.int8.report.json")).unwrap()).unwrap();
    assert_eq!(report["accepted"], true);
    assert_eq!(report["calibration_samples"], 16);
    assert_eq!(report["held_out_samples"], 4);
    let psnr = report["psnr_db"].as_f64().unwrap();
    assert!(psnr > 10.0 && psnr < 99.0, "int8 differs from fp32, but not wildly: {psnr}");
    assert!(report["ssim"].as_f64().unwrap() > 0.0 && report["int8_fps"].as_f64().unwrap() > 0.0);
    assert!(report["quantized_ops"].as_array().unwrap().iter().any(|o| o == "Conv"));
    assert!(std::fs::read_to_string(avatar.join("avatar.toml")).unwrap().contains("unet_int8 = \"unet.int8.onnx\""));
    // No calibration data is left behind.
    let left: Vec<_> = std::fs::read_dir(&avatar)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.starts_with(".lipsync"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Doctor shows the int8 model as the active one, with its measured figures.
    let d = ok(&["doctor", "--avatar", s(&avatar)]);
    assert!(d.contains("unet.int8.onnx (active on the CPU)") && d.contains("dB PSNR in the mouth box"), "{d}");

    // Render uses it by default; --precision fp32 gives exactly the frames of before.
    let (int8, fp32) = (tmp.path().join("int8"), tmp.path().join("fp32"));
    render(&avatar, &int8, &[]);
    render(&avatar, &fp32, &["--precision", "fp32"]);
    assert_eq!(frames(&fp32), frames(&before), "fp32 frames are unchanged");
    assert_ne!(frames(&int8), frames(&before), "the int8 model ran");
}

#[test]
fn a_model_below_the_gate_is_refused_with_the_measured_figure() {
    let tmp = tempfile::tempdir().unwrap();
    let avatar = avatar_copy(tmp.path());
    let toml = std::fs::read_to_string(avatar.join("avatar.toml")).unwrap();
    let out = quantize(&avatar, &["--min-psnr", "99"]);
    let t = text(&out);
    assert!(!out.status.success() && !t.contains("panicked"), "{t}");
    assert!(t.contains("below the 99.0 dB gate: not kept") && t.contains("dB PSNR in the mouth box"), "{t}");
    assert!(!avatar.join("unet.int8.onnx").exists(), "a refused model is not kept");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(avatar.join("unet.int8.report.json")).unwrap()).unwrap();
    assert_eq!(report["accepted"], false);
    assert_eq!(std::fs::read_to_string(avatar.join("avatar.toml")).unwrap(), toml, "the avatar is not changed");
}

#[test]
fn bad_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let avatar = avatar_copy(tmp.path());
    // 2 s of speech gives 49 frames.
    let t = text(&quantize(&avatar, &["--samples", "100"]));
    assert!(t.contains("calibration audio") && t.contains("too short: 49 frames"), "{t}");
    let t = fails(&["model", "quantize", "--avatar", s(&avatar), "--audio", "/nonexistent.wav"]);
    assert!(t.contains("/nonexistent.wav"), "{t}");
    let t = text(&quantize(&avatar, &["--python", "/nonexistent/python"]));
    assert!(t.contains("no Python with onnxruntime.quantization") && t.contains("/nonexistent/python"), "{t}");
    let t = text(&quantize(&avatar, &["--samples", "3"]));
    assert!(t.contains("--samples is 3: expected 16..=2000"), "{t}");

    // An avatar whose "UNet" is the audio encoder: not a UNet.
    let toml = std::fs::read_to_string(avatar.join("avatar.toml")).unwrap();
    std::fs::write(avatar.join("avatar.toml"), toml.replace("models/unet.onnx", "models/audio_encoder.onnx")).unwrap();
    let t = fails(&["model", "quantize", "--avatar", s(&avatar), "--audio", s(&fixture("golden/speech_2s.wav"))]);
    assert!(t.contains("wrong signature") && t.contains("audio_encoder.onnx"), "{t}");

    // An avatar whose crops are 160 pixels for a 320-pixel model.
    let crop = "\n[crop]\ntemplate_size = 168\ninner_offset = 4\nmodel_size = 160\nmask = [5, 5, 150, 150]\n";
    std::fs::write(avatar.join("avatar.toml"), format!("{toml}{crop}")).unwrap();
    let t = text(&quantize(&avatar, &[]));
    assert!(t.contains("wrong signature: input `input` axis 2 is 320, expected 160"), "{t}");

    // int8 asked for where the avatar names none.
    std::fs::write(avatar.join("avatar.toml"), &toml).unwrap();
    let out = tmp.path().join("o");
    let audio = fixture("golden/speech_2s.wav");
    let t = fails(&["render", "--avatar", s(&avatar), "--audio", s(&audio), "-o", s(&out), "--precision", "int8"]);
    assert!(t.contains("names no int8 UNet") && t.contains("lipsync model quantize"), "{t}");
    assert!(!out.exists());
}
