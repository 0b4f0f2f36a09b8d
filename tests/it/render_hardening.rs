//! `lipsync render` under signals and hostile input: SIGINT/SIGTERM stop it with 130/143 and
//! leave no output; an output path that is a directory, and NaN/Inf audio, are refused before
//! any work, naming the problem.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A 16 kHz mono WAV of `samples` in the given sample format (1 = PCM16, 3 = float32).
fn write_wav(path: &Path, format: u16, data: &[u8]) {
    let bits: u16 = if format == 3 { 32 } else { 16 };
    let block = bits / 8;
    let mut h = Vec::new();
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&format.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&16_000u32.to_le_bytes());
    h.extend_from_slice(&(16_000 * u32::from(block)).to_le_bytes());
    h.extend_from_slice(&block.to_le_bytes());
    h.extend_from_slice(&bits.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    h.extend_from_slice(data);
    std::fs::write(path, h).unwrap();
}

/// The golden speech (PCM16) `times` over: 2 s each.
fn repeated_speech(path: &Path, times: usize) {
    let wav = std::fs::read(fixture("golden/speech_2s.wav")).unwrap();
    let data = &wav[wav.windows(4).position(|w| w == b"data").unwrap() + 8..];
    write_wav(path, 1, &data.repeat(times));
}

/// 30 s of the golden speech, long enough to interrupt.
fn long_speech(path: &Path) {
    repeated_speech(path, 15);
}

fn render_args<'a>(audio: &'a str, out: &'a str, avatar: &'a str) -> Vec<&'a str> {
    vec!["render", "--avatar", avatar, "--audio", audio, "-o", out, "--batch", "2"]
}

/// [`render_args`] run, with stderr piped.
fn spawn_render(audio: &Path, out: &Path, avatar: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_lipsync"))
        .args(render_args(s(audio), s(out), s(avatar)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn signals_stop_a_render_and_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = tmp.path().join("long.wav");
    long_speech(&audio);
    let avatar = fixture("golden/avatar");
    for (sig, code, out) in [(libc::SIGINT, 130, "frames"), (libc::SIGTERM, 143, "talk.mp4")] {
        let out = tmp.path().join(out);
        let child = spawn_render(&audio, &out, &avatar);
        // Wait until frames are being written (a temporary output exists).
        let t = Instant::now();
        while std::fs::read_dir(tmp.path()).unwrap().count() < 2 && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let done = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&done.stderr).to_string();
        assert_eq!(done.status.code(), Some(code), "{err}");
        assert!(err.contains("interrupted") && err.contains("output was removed"), "{err}");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("long.wav")], "nothing left behind");
    }
}

#[test]
fn an_output_that_is_a_directory_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.mp4");
    std::fs::create_dir(&out).unwrap();
    let avatar = fixture("golden/avatar");
    let audio = fixture("golden/speech_2s.wav");
    let t = Instant::now();
    let e = fails(&render_args(s(&audio), s(&out), s(&avatar)));
    assert!(e.contains("is an existing directory"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "refused up front, not after the render");
    let report = tmp.path().join("no/such/dir/r.json");
    let out = tmp.path().join("frames");
    let mut args = render_args(s(&audio), s(&out), s(&avatar));
    args.extend(["--report", s(&report)]);
    let e = fails(&args);
    assert!(e.contains("does not exist") && !out.exists(), "{e}");
}

#[test]
fn non_finite_audio_is_refused_with_its_position() {
    let tmp = tempfile::tempdir().unwrap();
    let avatar = fixture("golden/avatar");
    for (bad, name) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")] {
        let mut samples: Vec<f32> = (0..16_000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        samples[1234] = bad;
        let data: Vec<u8> = samples.iter().flat_map(|v| v.to_le_bytes()).collect();
        let audio = tmp.path().join("bad.wav");
        write_wav(&audio, 3, &data);
        for out in ["frames", "talk.mp4"] {
            let out = tmp.path().join(out);
            let e = fails(&render_args(s(&audio), s(&out), s(&avatar)));
            assert!(e.contains(&format!("audio sample 1234 (at 0.077 s) is {name}")), "{e}");
            assert!(!out.exists());
        }
    }
    // Loud but finite float audio renders (the sound track is clipped to [-1, 1]).
    let samples: Vec<f32> = (0..16_000).map(|i| (i as f32 * 0.05).sin() * 3.0).collect();
    let data: Vec<u8> = samples.iter().flat_map(|v| v.to_le_bytes()).collect();
    let audio = tmp.path().join("loud.wav");
    write_wav(&audio, 3, &data);
    let out = tmp.path().join("loud.mp4");
    ok(&render_args(s(&audio), s(&out), s(&avatar)));
    assert!(out.is_file());
}

/// ONNX Runtime 1.31 writes a device id and an event store under `~/.cache` unless told not
/// to: a render writes nothing under HOME.
#[test]
fn nothing_is_written_under_home() {
    let home = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("frames");
    let avatar = fixture("golden/avatar");
    let audio = fixture("golden/speech_2s.wav");
    let o = Command::new(env!("CARGO_BIN_EXE_lipsync"))
        .args(render_args(s(&audio), s(&out), s(&avatar)))
        .args(["--max-frames", "3"])
        .env("HOME", home.path())
        .env_remove("XDG_CACHE_HOME")
        .env_remove("ORT_DISABLE_TELEMETRY")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written: Vec<_> = walk(home.path());
    assert!(written.is_empty(), "written under HOME: {written:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// An avatar at another frame rate than the audio's 25 frames/s clock renders to MP4 to the end
/// (the encoder once waited for sound-track samples the blocked source could not send, after
/// about 7 s of audio at 20 frames/s).
#[test]
fn an_mp4_at_20_fps_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let audio = tmp.path().join("ten.wav");
    repeated_speech(&audio, 5);
    let golden = fixture("golden/avatar");
    let avatar = tmp.path().join("avatar20");
    std::fs::create_dir(&avatar).unwrap();
    let toml = std::fs::read_to_string(golden.join("avatar.toml")).unwrap();
    let toml = toml
        .replace("fps = 25.0", "fps = 20.0")
        .replace("\"frames\"", &format!("{:?}", golden.join("frames")))
        .replace("\"boxes.json\"", &format!("{:?}", golden.join("boxes.json")))
        .replace("\"../../models/", &format!("\"{}/", fixture("models").display()));
    std::fs::write(avatar.join("avatar.toml"), toml).unwrap();
    let out = tmp.path().join("talk.mp4");
    let mut child = spawn_render(&audio, &out, &avatar);
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(240) {
            child.kill().unwrap();
            panic!("the render hung");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(std::fs::metadata(&out).unwrap().len() > 0);
}
