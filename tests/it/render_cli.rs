//! `lipsync render` end to end through the CLI on the golden avatar (tiny model): frame count,
//! order, parity with the Python reference, MP4 validity, MJPEG on stdout, reports, failures.

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn render(out: &Path, extra: &[&str]) -> String {
    let avatar = fixture("golden/avatar");
    let audio = fixture("golden/speech_2s.wav");
    let mut args = vec!["render", "--avatar", s(&avatar), "--audio", s(&audio), "-o", s(out), "--batch", "3"];
    args.extend_from_slice(extra);
    ok(&args)
}

fn png(path: &Path) -> (usize, usize, Vec<u8>) {
    let mut f = lipsync_stages::frame::BgrFrame::default();
    lipsync_stages::image_io::read_image(path, &mut f).unwrap();
    (f.width, f.height, f.data)
}

#[test]
fn png_frames_match_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("frames");
    let report = tmp.path().join("report.json");
    render(&out, &["--format", "png", "--report", s(&report), "--pin", "none"]);
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    // 2 s of audio: T = 161, L = 47, frames = L + 2 = 49, numbered in order.
    assert_eq!(names.len(), 49);
    assert_eq!(names.first().unwrap(), "000000.png");
    assert_eq!(names.last().unwrap(), "000048.png");
    let boxes: Vec<[usize; 4]> =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/avatar/boxes.json")).unwrap()).unwrap();
    for (i, t) in [(0usize, 1usize), (7, 0), (48, 1)] {
        // template index of frame i for 5 frames: ping-pong 1 2 3 4 3 2 1 0 ...
        let (w, h, got) = png(&out.join(format!("{i:06}.png")));
        let (_, _, want) = png(&fixture(&format!("golden/ref/frame_{i:06}.png")));
        let [x1, y1, x2, y2] = boxes[t];
        let (mut sq, mut n, mut outside) = (0f64, 0usize, 0usize);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let k = (y * w + x) * 3 + c;
                    if (x1..x2).contains(&x) && (y1..y2).contains(&y) {
                        sq += (f64::from(got[k]) - f64::from(want[k])).powi(2);
                        n += 1;
                    } else if got[k] != want[k] {
                        outside += 1;
                    }
                }
            }
        }
        assert_eq!(outside, 0, "frame {i}: identical outside the box");
        let psnr = if sq == 0.0 { f64::INFINITY } else { 10.0 * (255f64.powi(2) / (sq / n as f64)).log10() };
        assert!(psnr >= 45.0, "frame {i}: PSNR {psnr:.1} dB inside the box");
    }
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["frames"], 49);
    let stages: Vec<&str> = r["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    for st in ["source", "audio", "frames", "prep", "unet", "composite", "encode", "sink"] {
        assert!(stages.contains(&st), "{st} in {stages:?}");
    }
    assert!(r["end_to_end_ms"]["p99"].as_f64().unwrap() > 0.0);
}

#[test]
fn mp4_has_every_frame_and_the_audio() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("talk.mp4");
    render(&out, &[]);
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=codec_type,codec_name,nb_read_frames,start_time,duration",
            "-of",
            "json",
        ])
        .arg(&out)
        .output()
        .expect("ffprobe (scripts/setup.sh installs ffmpeg)");
    assert!(probe.status.success(), "{}", String::from_utf8_lossy(&probe.stderr));
    let v: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    let streams = v["streams"].as_array().unwrap();
    let video = streams.iter().find(|s| s["codec_type"] == "video").expect("video stream");
    let audio = streams.iter().find(|s| s["codec_type"] == "audio").expect("audio stream");
    assert_eq!(video["codec_name"], "h264");
    assert_eq!(video["nb_read_frames"], "49");
    assert_eq!(audio["codec_name"], "aac");
    let num = |s: &serde_json::Value| s.as_str().unwrap().parse::<f64>().unwrap();
    assert_eq!(num(&video["start_time"]), 0.0, "video starts at 0");
    assert!(num(&audio["start_time"]).abs() < 0.07, "audio starts at 0: {}", audio["start_time"]);
    let dur = num(&audio["duration"]);
    assert!((dur - 2.0).abs() < 0.1, "audio lasts the input's 2 s: {dur}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
}

#[test]
fn mjpeg_on_stdout_and_raw_frames() {
    let avatar = fixture("golden/avatar");
    let audio = fixture("golden/speech_2s.wav");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lipsync"))
        .args(["-q", "render", "--avatar", s(&avatar), "--audio", s(&audio), "-o", "-", "--max-frames", "12"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = &out.stdout;
    let starts = b.windows(3).filter(|w| w == &[0xFF, 0xD8, 0xFF]).count();
    assert_eq!(starts, 12, "12 JPEGs back to back");
    assert!(b.starts_with(&[0xFF, 0xD8]) && b.ends_with(&[0xFF, 0xD9]));

    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    render(&raw, &["--format", "raw", "--max-frames", "3"]);
    assert_eq!(std::fs::metadata(raw.join("000002.bgr")).unwrap().len(), 640 * 360 * 3);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(raw.join("frames.json")).unwrap()).unwrap();
    assert_eq!(meta, serde_json::json!({"format": "bgr24", "width": 640, "height": 360, "frames": 3}));
}

#[test]
fn parts_instead_of_an_avatar_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f");
    let (svg, hlog, json) = (tmp.path().join("r.svg"), tmp.path().join("r.hlog"), tmp.path().join("r.json"));
    let (frames, boxes, unet, enc, audio) = (
        fixture("golden/avatar/frames"),
        fixture("golden/avatar/boxes.json"),
        fixture("models/unet.onnx"),
        fixture("models/audio_encoder.onnx"),
        fixture("golden/speech_2s.wav"),
    );
    let args = [
        "render",
        "--video",
        s(&frames),
        "--boxes",
        s(&boxes),
        "--unet",
        s(&unet),
        "--encoder",
        s(&enc),
        "--audio",
        s(&audio),
        "-o",
        s(&out),
        "--max-frames",
        "10",
        "--blend",
        "feather=6",
        "--report",
        s(&json),
        "--report-svg",
        s(&svg),
        "--report-hlog",
        s(&hlog),
    ];
    let t = ok(&args);
    assert!(t.contains("svc p50"), "table on stderr: {t}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 10);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    assert!(std::fs::read_to_string(&hlog).unwrap().contains("Tag=unet.service"));
    let t = ok(&["report", s(&json), "--svg", s(&tmp.path().join("again.svg"))]);
    assert!(t.contains("10 frames") && t.contains("composite"), "{t}");
    let t = fails(&["report", s(&fixture("golden/avatar/boxes.json"))]);
    assert!(t.contains("not a lipsync report"), "{t}");
}

#[test]
fn failures_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let avatar = fixture("golden/avatar");
    let out = tmp.path().join("out");
    // Bad audio: error, nothing written.
    for (audio, msg, stage) in [
        ("audio/not_audio.wav", "unknown or unsupported audio format", "stage `source`"),
        ("audio/short_0.1s.wav", "audio too short", "stage `audio`"),
    ] {
        let t = fails(&["render", "--avatar", s(&avatar), "--audio", s(&fixture(audio)), "-o", s(&out)]);
        assert!(t.contains(msg) && t.contains(stage), "{t}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing left behind");
    }
    // An existing, non-empty output directory is refused.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let t = fails(&["render", "--avatar", s(&avatar), "--audio", s(&fixture("golden/speech_2s.wav")), "-o", s(&out)]);
    assert!(t.contains("exists and is not empty"), "{t}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    std::fs::remove_dir_all(&out).unwrap();

    // A template frame that fails to decode: the error names the template and the file (a frames
    // directory is read whole when the template opens, before any frame), and neither the
    // output nor a temporary directory is left.
    let frames = tmp.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    for i in 0..5 {
        std::fs::copy(fixture(&format!("golden/avatar/frames/{i:06}.png")), frames.join(format!("{i:06}.png")))
            .unwrap();
    }
    let broken = std::fs::read(frames.join("000003.png")).unwrap();
    std::fs::write(frames.join("000003.png"), &broken[..broken.len() / 3]).unwrap();
    let t = fails(&[
        "render",
        "--video",
        s(&frames),
        "--boxes",
        s(&fixture("golden/avatar/boxes.json")),
        "--unet",
        s(&fixture("models/unet.onnx")),
        "--encoder",
        s(&fixture("models/audio_encoder.onnx")),
        "--audio",
        s(&fixture("golden/speech_2s.wav")),
        "-o",
        s(&out),
    ]);
    assert!(t.contains("`template` failed: could not read frame image"), "{t}");
    assert!(t.contains("000003.png"), "{t}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("frames")], "no output, no temp dir");
}
