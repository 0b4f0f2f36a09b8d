//! `--provider remote`: the UNet on a real Open Inference Protocol server (MLServer running the
//! same ONNX model with onnxruntime, scripts/v2_server.py), started by each test and stopped
//! after it. Frames equal local inference; a server that is down, the wrong model, the wrong
//! tensors, a server past the deadline and a server killed mid-run each get a clear error and
//! leave no output.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A running server, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts MLServer with the tiny UNet as `unet` and the tiny encoder as `encoder`.
fn server(delay_ms: u32) -> Server {
    server_on(delay_ms, free_port())
}

/// [`server`] on a given gRPC port.
fn server_on(delay_ms: u32, port: u16) -> Server {
    let http = free_port();
    let dir = tempfile::tempdir().unwrap().keep();
    // The same UNet taking its image as uint8 (scripts/make_u8_unet.py).
    let u8_model = dir.join("unet_u8.onnx");
    let made = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scripts/make_u8_unet.py"))
        .args([s(&fixture("models/unet.onnx")), s(&u8_model)])
        .status()
        .unwrap();
    assert!(made.success(), "make_u8_unet.py failed");
    let child = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scripts/v2_server.py"))
        .args(["--model", &format!("unet={}", s(&fixture("models/unet.onnx")))])
        .args(["--model", &format!("encoder={}", s(&fixture("models/audio_encoder.onnx")))])
        .args(["--model", &format!("unet_u8={}", s(&u8_model))])
        .args(["--grpc-port", &port.to_string(), "--http-port", &http.to_string()])
        .args(["--delay-ms", &delay_ms.to_string(), "--dir", s(&dir)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start scripts/v2_server.py (scripts/setup.sh installs MLServer)");
    let mut server = Server { child, port };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(server.child.try_wait().unwrap().is_none(), "the V2 server exited at start");
        assert!(start.elapsed() < Duration::from_secs(90), "the V2 server did not start in 90 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    server
}

fn run(out: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    let (avatar, audio) = (fixture("golden/avatar"), fixture("golden/speech_2s.wav"));
    Command::new(env!("CARGO_BIN_EXE_lipsync"))
        .args(["render", "--avatar", s(&avatar), "--audio", s(&audio), "-o", s(out), "--provider", "remote"])
        .args(["--remote-url", url])
        .args(extra)
        .output()
        .unwrap()
}

fn failed(out: &std::process::Output) -> String {
    let t = text(out);
    assert!(!out.status.success() && !t.contains("panicked"), "{t}");
    t
}

#[test]
fn frames_through_a_v2_server_equal_local_inference_and_bad_models_are_refused() {
    let srv = server(0);
    let url = format!("grpc://127.0.0.1:{}", srv.port);
    let tmp = tempfile::tempdir().unwrap();
    let (local, remote) = (tmp.path().join("local"), tmp.path().join("remote"));
    let (avatar, audio) = (fixture("golden/avatar"), fixture("golden/speech_2s.wav"));
    ok(&["render", "--avatar", s(&avatar), "--audio", s(&audio), "-o", s(&local), "--batch", "3"]);
    let out = run(&remote, &url, &["--remote-model", "unet", "--batch", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    let names: Vec<_> = std::fs::read_dir(&local).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 49);
    for n in &names {
        // Same ONNX Runtime, same model, same inputs: the same bytes.
        assert_eq!(std::fs::read(local.join(n)).unwrap(), std::fs::read(remote.join(n)).unwrap(), "{n:?}");
    }

    // Images sent as uint8 to a model that takes them so: the same frames again.
    let u8 = tmp.path().join("u8");
    let out = run(&u8, &url, &["--remote-model", "unet_u8", "--batch", "3"]);
    assert!(out.status.success(), "{}", text(&out));
    for n in &names {
        assert_eq!(std::fs::read(local.join(n)).unwrap(), std::fs::read(u8.join(n)).unwrap(), "uint8 {n:?}");
    }

    let t = failed(&run(&tmp.path().join("a"), &url, &["--remote-model", "nope"]));
    assert!(t.contains("model `nope` on grpc://127.0.0.1") && t.contains("model ready"), "{t}");
    let t = failed(&run(&tmp.path().join("b"), &url, &["--remote-model", "encoder"]));
    assert!(t.contains("model `encoder`") && t.contains("no input `input`"), "{t}");
    assert!(!tmp.path().join("a").exists() && !tmp.path().join("b").exists());
}

#[test]
fn a_server_that_is_down_slow_or_killed_fails_the_render_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let down = format!("grpc://127.0.0.1:{}", free_port());
    let start = Instant::now();
    let t = failed(&run(&tmp.path().join("a"), &down, &["--remote-model", "unet", "--remote-timeout-ms", "2000"]));
    assert!(t.contains("cannot connect") && t.contains(&down), "{t}");
    assert!(start.elapsed() < Duration::from_secs(30), "no hang");
    let t = failed(&run(&tmp.path().join("a"), &down, &[]));
    assert!(t.contains("needs --remote-url grpc://HOST:PORT and --remote-model NAME"), "{t}");

    // Every answer takes 1.5 s; the deadline is 300 ms.
    let slow = server(1500);
    let url = format!("grpc://127.0.0.1:{}", slow.port);
    let t = failed(&run(&tmp.path().join("b"), &url, &["--remote-model", "unet", "--remote-timeout-ms", "300"]));
    assert!(t.contains("no answer within the 300 ms deadline") && t.contains("model `unet`"), "{t}");
    assert!(!tmp.path().join("b").exists());
    drop(slow);

    // Killed while the render runs (each answer takes 150 ms: 49 frames take about 7 s).
    let mut srv = server(150);
    let url = format!("grpc://127.0.0.1:{}", srv.port);
    let out = tmp.path().join("c");
    let (avatar, audio) = (fixture("golden/avatar"), fixture("golden/speech_2s.wav"));
    let render = Command::new(env!("CARGO_BIN_EXE_lipsync"))
        .args(["render", "--avatar", s(&avatar), "--audio", s(&audio), "-o", s(&out), "--batch", "1"])
        .args(["--provider", "remote", "--remote-url", &url, "--remote-model", "unet", "--remote-retries", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    let done = render.wait_with_output().unwrap();
    let t = failed(&done);
    assert!(t.contains("remote UNet (model `unet` on grpc://127.0.0.1"), "{t}");
    assert!(!out.exists(), "no partial output");
}

/// A daemon with `--provider remote`: sessions get the local frames; when the server dies a
/// session fails with an error naming it, the daemon lives on (stats count the failed
/// requests) and serves again once the server is back.
#[test]
fn a_daemon_on_a_remote_server_survives_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let srv = server(0);
    let port = srv.port;
    let url = format!("grpc://127.0.0.1:{port}");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_lipsync"))
        .args(["serve", "--socket", s(&socket), "--avatars", s(&fixture("golden"))])
        .args(["--provider", "remote", "--remote-url", &url, "--remote-model", "unet", "--remote-retries", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stats = || lipsync(&["stats", "--socket", s(&socket), "--json"]);
    let start = Instant::now();
    while !stats().status.success() {
        assert!(start.elapsed() < Duration::from_secs(60), "the daemon did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let audio = fixture("golden/speech_2s.wav");
    let client = |out: &Path| {
        lipsync(&["client", "--socket", s(&socket), "--avatar", "avatar", "--audio", s(&audio), "-o", s(out)])
    };
    let (local, first) = (tmp.path().join("local"), tmp.path().join("first"));
    ok(&["render", "--avatar", s(&fixture("golden/avatar")), "--audio", s(&audio), "-o", s(&local)]);
    let out = client(&first);
    assert!(out.status.success(), "{}", text(&out));
    let frames = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v.iter().map(|p| std::fs::read(p).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(frames(&first), frames(&local), "the daemon's remote frames equal the local render's");

    drop(srv);
    let t = failed(&client(&tmp.path().join("second")));
    assert!(t.contains(&url) || t.contains("remote UNet"), "{t}");
    let st = stats();
    assert!(st.status.success(), "the daemon is still up: {}", text(&st));
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["unet"][0]["provider"], "remote");
    assert!(v["unet"][0]["errors"].as_u64().unwrap() >= 1, "{v}");

    // The server comes back on the same port: the daemon serves again.
    let back = server_on(0, port);
    let third = tmp.path().join("third");
    let out = client(&third);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(frames(&third), frames(&local));
    drop(back);
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// Daemons whose remote UNet is wrong, slow or missing: the session gets an error naming the
/// server, and the daemon stays up.
#[test]
fn daemons_with_a_bad_remote_refuse_sessions_and_stay_up() {
    let slow = server(1500);
    let url = format!("grpc://127.0.0.1:{}", slow.port);
    let down = format!("grpc://127.0.0.1:{}", free_port());
    let audio = fixture("golden/speech_2s.wav");
    for (name, url, extra, want) in [
        ("wrong model", url.as_str(), vec!["--remote-model", "nope"], "model ready"),
        ("wrong tensors", url.as_str(), vec!["--remote-model", "encoder"], "no input `input`"),
        ("slow", url.as_str(), vec!["--remote-model", "unet", "--remote-timeout-ms", "300"], "deadline"),
        ("down", down.as_str(), vec!["--remote-model", "unet", "--remote-timeout-ms", "2000"], "cannot connect"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("s.sock");
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_lipsync"))
            .args(["serve", "--socket", s(&socket), "--avatars", s(&fixture("golden"))])
            .args(["--provider", "remote", "--remote-url", url, "--remote-retries", "0", "--max-batch", "1"])
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stats = || lipsync(&["stats", "--socket", s(&socket), "--json"]);
        let start = Instant::now();
        while !stats().status.success() {
            assert!(start.elapsed() < Duration::from_secs(60), "{name}: the daemon did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = tmp.path().join("frames");
        let t = failed(&lipsync(&[
            "client",
            "--socket",
            s(&socket),
            "--avatar",
            "avatar",
            "--audio",
            s(&audio),
            "-o",
            s(&out),
        ]));
        assert!(t.contains(want) && t.contains(url), "{name}: {t}");
        assert!(!out.exists(), "{name}: no partial output");
        assert!(stats().status.success(), "{name}: the daemon is still up");
        assert!(daemon.try_wait().unwrap().is_none(), "{name}: the daemon is still running");
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
}
