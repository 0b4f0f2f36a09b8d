//! `lipsync serve` through its socket: concurrent sessions equal the offline render bit for bit,
//! bad input gets an error and closes only that session, disconnects and slow clients free or
//! back up only their own session, busy limits, signals, socket ownership, avatar management,
//! the config file, stats, the Python client and the soak script; the HTTP side in `serve/http.rs`.

mod common;
#[path = "serve/http.rs"]
mod http;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::*;

const HELLO: u8 = 0x01;
const WELCOME: u8 = 0x02;
const OPEN: u8 = 0x10;
const OPENED: u8 = 0x11;
const AUDIO: u8 = 0x12;
const END_AUDIO: u8 = 0x13;
const CLOSE: u8 = 0x14;
const FRAME: u8 = 0x20;
const DONE: u8 = 0x21;
const SPEECH: u8 = 0x22;
const STATS_REQUEST: u8 = 0x30;
const STATS: u8 = 0x31;
const ERROR: u8 = 0x7F;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lipsync")
}

/// A daemon on a temporary socket serving `golden` (the fixture avatar) and `golden2` (the same
/// template and models, start frame 3, its own avatar.toml).
struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

fn write_avatars(dir: &Path) -> PathBuf {
    let avatars = dir.join("avatars");
    std::fs::create_dir_all(avatars.join("golden2")).unwrap();
    std::os::unix::fs::symlink(fixture("golden/avatar"), avatars.join("golden")).unwrap();
    let toml = format!(
        "fps = 25.0\nvideo = \"{}\"\nboxes = \"{}\"\nstart_frame = 3\njpeg_quality = 90\n\n[models]\nunet = \"{}\"\nencoder = \"{}\"\n",
        fixture("golden/avatar/frames").display(),
        fixture("golden/avatar/boxes.json").display(),
        fixture("models/unet.onnx").display(),
        fixture("models/audio_encoder.onnx").display()
    );
    std::fs::write(avatars.join("golden2/avatar.toml"), toml).unwrap();
    avatars
}

impl Daemon {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let avatars = write_avatars(dir.path());
        let socket = dir.path().join("serve.sock");
        let mut args: Vec<String> =
            vec!["serve".into(), "--socket".into(), s(&socket).into(), "--avatars".into(), s(&avatars).into()];
        args.extend(extra.iter().map(|a| a.to_string()));
        Self::spawn(dir, socket, &args)
    }

    fn spawn(dir: tempfile::TempDir, socket: PathBuf, args: &[String]) -> Self {
        Self::spawn_limited(dir, socket, args, None)
    }

    /// [`Daemon::spawn`] under a descriptor limit (soft and hard), if given.
    fn spawn_limited(dir: tempfile::TempDir, socket: PathBuf, args: &[String], nofile: Option<u64>) -> Self {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        if let Some(n) = nofile {
            let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd.spawn().unwrap();
        let mut d = Self { child: Some(child), dir, socket };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited at start ({status}): {}", d.log());
            }
            if let Ok(mut c) = UnixStream::connect(&d.socket) {
                if hello(&mut c).is_ok() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "daemon not listening: {}", d.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn sock(&self) -> &str {
        s(&self.socket)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Connects and does the handshake.
    fn connect(&self) -> UnixStream {
        let mut c = UnixStream::connect(&self.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        hello(&mut c).unwrap();
        c
    }

    fn stats(&self) -> serde_json::Value {
        let mut c = self.connect();
        send(&mut c, STATS_REQUEST, b"{}");
        let (k, p) = recv(&mut c).unwrap();
        assert_eq!(k, STATS, "{}", String::from_utf8_lossy(&p));
        serde_json::from_slice(&p).unwrap()
    }

    /// Waits until no session is open.
    fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.stats()["sessions_open"] != 0 {
            assert!(Instant::now() < deadline, "sessions still open: {}", self.stats());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.as_ref().unwrap().id() as libc::pid_t, sig) };
    }

    /// SIGTERM, then the exit status and log.
    fn stop(self) -> (std::process::ExitStatus, String) {
        let (status, log, _dir) = self.stop_keep_dir();
        (status, log)
    }

    /// [`Daemon::stop`], keeping its temporary directory (where its socket was).
    fn stop_keep_dir(mut self) -> (std::process::ExitStatus, String, tempfile::TempDir) {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not stop on SIGTERM: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (status, log, dir)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn send(c: &mut UnixStream, kind: u8, payload: &[u8]) {
    let mut m = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    m.push(kind);
    m.extend_from_slice(payload);
    c.write_all(&m).unwrap();
}

fn recv(c: &mut UnixStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    c.read_exact(&mut head)?;
    let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
    let mut p = vec![0u8; len - 1];
    c.read_exact(&mut p)?;
    Ok((head[4], p))
}

fn hello(c: &mut UnixStream) -> std::io::Result<()> {
    let body = br#"{"protocol": 2, "client": "tests/serve.rs"}"#;
    let mut m = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    m.push(HELLO);
    m.extend_from_slice(body);
    c.write_all(&m)?;
    let (k, _) = recv(c)?;
    assert_eq!(k, WELCOME);
    Ok(())
}

/// Expects an Error message with `code`; returns its text.
fn expect_error(c: &mut UnixStream, code: &str) -> String {
    loop {
        let (k, p) = recv(c).unwrap_or_else(|e| panic!("expected error `{code}`, got {e}"));
        if k == FRAME || k == SPEECH {
            continue;
        }
        assert_eq!(k, ERROR, "expected error `{code}`, got 0x{k:02x} {}", String::from_utf8_lossy(&p));
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["code"], code, "{v}");
        return v["message"].as_str().unwrap().to_string();
    }
}

/// The daemon closed the connection.
fn expect_closed(c: &mut UnixStream) {
    let mut b = [0u8; 1];
    match c.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the daemon to close the connection, got {other:?}"),
    }
}

fn open(c: &mut UnixStream, avatar: &str, rate: u32) -> u64 {
    let req = serde_json::json!({"avatar": avatar, "sample_rate": rate, "format": "s16le"});
    send(c, OPEN, req.to_string().as_bytes());
    let (k, p) = recv(c).unwrap();
    assert_eq!(k, OPENED, "{}", String::from_utf8_lossy(&p));
    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
    v["session"].as_u64().unwrap()
}

/// s16le bytes of the 16 kHz speech fixture (its WAV data).
fn speech_s16() -> Vec<u8> {
    let bytes = std::fs::read(fixture("golden/speech_2s.wav")).unwrap();
    let at = bytes.windows(4).position(|w| w == b"data").unwrap();
    let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    bytes[at + 8..at + 8 + len].to_vec()
}

/// Reads frames until Done; returns the JPEGs.
fn read_frames(c: &mut UnixStream) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    loop {
        let (k, p) = recv(c).unwrap();
        match k {
            FRAME => {
                let index = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
                assert_eq!(index, frames.len(), "frames in order");
                assert_eq!(p[8], 0, "a session without real time sends no idle frame");
                frames.push(p[9..].to_vec());
            }
            SPEECH => {
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                assert_eq!((v["utterance"].as_u64(), v["frame"].as_u64()), (Some(0), Some(0)));
                assert!(frames.is_empty(), "the one utterance starts at frame 0");
            }
            DONE => {
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                assert_eq!(v["frames"].as_u64().unwrap() as usize, frames.len());
                return frames;
            }
            _ => panic!("unexpected 0x{k:02x}: {}", String::from_utf8_lossy(&p)),
        }
    }
}

/// The offline render's JPEG frames of the golden avatar for `audio` (cached per audio file).
fn rendered(audio: &str) -> &'static Vec<Vec<u8>> {
    static SPEECH: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    static STEREO: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let cell = if audio.ends_with("speech_2s.wav") { &SPEECH } else { &STEREO };
    cell.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("frames");
        ok(&["render", "--avatar", s(&fixture("golden/avatar")), "--audio", audio, "-o", s(&out)]);
        read_dir_frames(&out)
    })
}

fn read_dir_frames(dir: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn assert_same(got: &[Vec<u8>], want: &[Vec<u8>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: frame count");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(a == b, "{what}: frame {i} differs from lipsync render");
    }
}

/// Starts `lipsync client` streaming `audio` as avatar `golden` into the directory `out`.
fn spawn_client(d: &Daemon, audio: &Path, out: &Path, extra: &[&str]) -> Child {
    Command::new(bin())
        .args(["client", "--socket", d.sock(), "--avatar", "golden", "--audio", s(audio), "-o", s(out)])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

#[test]
fn concurrent_clients_get_exactly_the_offline_frames() {
    let speech = fixture("golden/speech_2s.wav");
    let stereo = fixture("audio/clip_44k_stereo.wav");
    let want_speech = rendered(s(&speech));
    let want_stereo = rendered(s(&stereo));
    // A long max wait, so that frames of different sessions meet in one UNet run.
    let d = Daemon::start(&["--max-batch", "8", "--max-wait-ms", "30"]);
    let tmp = tempfile::tempdir().unwrap();
    let children: Vec<(Child, PathBuf, &Vec<Vec<u8>>)> = (0..8)
        .map(|k| {
            let out = tmp.path().join(format!("c{k}"));
            let (audio, want) = if k % 2 == 0 { (&speech, want_speech) } else { (&stereo, want_stereo) };
            let child = spawn_client(&d, audio, &out, &[]);
            (child, out, want)
        })
        .collect();
    for (k, (child, out, want)) in children.into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "client {k}: {}\n{}", text(&o), d.log());
        assert!(text(&o).contains("first frame:"), "{}", text(&o));
        assert_same(&read_dir_frames(&out), want, &format!("client {k}"));
    }
    let st = d.stats();
    assert_eq!(st["sessions_total"], 8);
    assert_eq!(st["frames_total"].as_u64().unwrap() as usize, 4 * want_speech.len() + 4 * want_stereo.len());
    let unet = &st["unet"][0];
    assert_eq!(unet["provider"], "cpu");
    assert!(unet["mean_batch"].as_f64().unwrap() > 1.0, "frames of several sessions share UNet runs: {unet}");
    let sizes: Vec<u64> = unet["batch_sizes"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(sizes.len(), 8, "{unet}");
    let frames: u64 = sizes.iter().enumerate().map(|(k, n)| (k as u64 + 1) * n).sum();
    assert_eq!(frames, unet["frames"].as_u64().unwrap(), "{unet}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn python_client_gets_the_same_frames() {
    let speech = fixture("golden/speech_2s.wav");
    let want = rendered(s(&speech));
    let d = Daemon::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("py");
    let o = Command::new("python3")
        .arg(root().join("scripts/client.py"))
        .args(["--socket", d.sock(), "--avatar", "golden", "--audio", s(&speech), "-o", s(&out), "--json"])
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}\n{}", text(&o), d.log());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["frames"], 49);
    assert_eq!(v["expected_frames"], 49);
    assert!(v["first_frame_ms"].as_f64().unwrap() > 0.0 && v["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{v}");
    assert_same(&read_dir_frames(&out), want, "python client");
    // `lipsync client` as an MJPEG stream on stdout and into an .mjpeg file: the same bytes.
    let mjpeg: Vec<u8> = want.concat();
    let o = run(&["client", "--socket", d.sock(), "--avatar", "golden", "--audio", s(&speech), "-o", "-"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == mjpeg, "MJPEG on stdout");
    let file = tmp.path().join("talk.mjpeg");
    let o = run(&["client", "--socket", d.sock(), "--avatar", "golden", "--audio", s(&speech), "-o", s(&file)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&file).unwrap() == mjpeg, "MJPEG file");
    // Audio too short for one frame: refused before anything is sent, no output left behind.
    let short = fixture("audio/short_0.1s.wav");
    let o = run(&[
        "client",
        "--socket",
        d.sock(),
        "--avatar",
        "golden",
        "--audio",
        s(&short),
        "-o",
        s(&tmp.path().join("none")),
    ]);
    assert!(!o.status.success() && text(&o).contains("audio too short"), "{}", text(&o));
    assert!(!tmp.path().join("none").exists());
    // Errors are reported, not raised as tracebacks.
    let o = Command::new("python3")
        .arg(root().join("scripts/client.py"))
        .args(["--socket", d.sock(), "--avatar", "nobody", "--audio", s(&speech)])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("unknown_avatar") && !text(&o).contains("Traceback"), "{}", text(&o));
}

#[test]
fn both_clients_run_realtime_sessions_with_idle_frames_and_interrupts() {
    let speech = fixture("golden/speech_2s.wav");
    let d = Daemon::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("py-live");
    let o = Command::new("python3")
        .arg(root().join("scripts/client.py"))
        .args(["--socket", d.sock(), "--avatar", "golden", "--audio", s(&speech), "-o", s(&out), "--json"])
        .args(["--live", "--idle-s", "0.5", "--utterances", "2", "--interrupt-after-ms", "1000"])
        .output()
        .expect("python3");
    assert!(o.status.success(), "{}\n{}", text(&o), d.log());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let frames = v["frames"].as_u64().unwrap() as usize;
    assert!(v["idle_frames"].as_u64().unwrap() >= 20, "{v}");
    assert_eq!(v["interrupts"], 2, "{v}");
    assert_eq!(v["utterance_frames"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(read_dir_frames(&out).len(), frames, "every frame written");
    // `lipsync client --live`: the same kind of session, its figures as JSON.
    let o = run(&[
        "client",
        "--socket",
        d.sock(),
        "--avatar",
        "golden",
        "--audio",
        s(&speech),
        "--live",
        "--idle-s",
        "0.4",
        "--idle-after-s",
        "0.4",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let utterances = v["utterances"].as_array().unwrap();
    assert_eq!(utterances.len(), 1, "{v}");
    let records = v["records"].as_array().unwrap();
    let speech_frames = records.iter().filter(|r| r["idle"] == false).count();
    assert_eq!(speech_frames, 49, "the whole utterance: {v}");
    assert_eq!(v["frames"].as_u64().unwrap() as usize, records.len());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn bad_input_gets_an_error_and_closes_only_that_session() {
    let speech = fixture("golden/speech_2s.wav");
    let want = rendered(s(&speech));
    let d = Daemon::start(&[]);
    // A healthy real-time session runs through all of it.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("healthy");
    let healthy = spawn_client(&d, &speech, &out, &["--realtime"]);

    let raw = || {
        let c = UnixStream::connect(&d.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c
    };
    // Wrong protocol version.
    let mut c = raw();
    send(&mut c, HELLO, br#"{"protocol": 3, "client": "future"}"#);
    assert!(expect_error(&mut c, "version").contains("protocol version 3"));
    expect_closed(&mut c);
    // The old version is refused clearly too, naming the one this server speaks.
    let mut c = raw();
    send(&mut c, HELLO, br#"{"protocol": 1, "client": "old"}"#);
    let m = expect_error(&mut c, "version");
    assert!(m.contains("protocol version 1 is not supported") && m.contains("speaks 2"), "{m}");
    expect_closed(&mut c);
    // Anything but Hello first.
    let mut c = raw();
    send(&mut c, OPEN, br#"{"avatar": "golden"}"#);
    expect_error(&mut c, "handshake");
    expect_closed(&mut c);
    // Malformed JSON in Open: an error, no session, the connection stays usable.
    let mut c = d.connect();
    send(&mut c, OPEN, b"{not json");
    expect_error(&mut c, "bad_request");
    open(&mut c, "golden", 16_000);
    send(&mut c, CLOSE, b"");
    expect_closed(&mut c);
    // Audio before Open.
    let mut c = d.connect();
    send(&mut c, AUDIO, &[0, 0, 0, 0]);
    assert!(expect_error(&mut c, "no_session").contains("before Open"));
    expect_closed(&mut c);
    // Oversize length.
    let mut c = d.connect();
    c.write_all(&[0x7f, 0xff, 0xff, 0xff, AUDIO]).unwrap();
    assert!(expect_error(&mut c, "oversize").contains("2147483647"));
    expect_closed(&mut c);
    // Zero length.
    let mut c = d.connect();
    c.write_all(&[0, 0, 0, 0]).unwrap();
    expect_error(&mut c, "bad_length");
    expect_closed(&mut c);
    // Unknown type.
    let mut c = d.connect();
    send(&mut c, 0x99, b"");
    assert!(expect_error(&mut c, "unknown_type").contains("0x99"));
    expect_closed(&mut c);
    // Truncated: the header promises 100 bytes, 10 come, then the client stops writing.
    let mut c = d.connect();
    c.write_all(&[0, 0, 0, 100, AUDIO]).unwrap();
    c.write_all(&[0; 9]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(expect_error(&mut c, "truncated").contains("14 of 104"));
    // Unknown avatar and bad names: an error, the connection stays usable.
    let mut c = d.connect();
    send(&mut c, OPEN, br#"{"avatar": "nobody", "sample_rate": 16000, "format": "s16le"}"#);
    expect_error(&mut c, "unknown_avatar");
    send(&mut c, OPEN, br#"{"avatar": "../golden", "sample_rate": 16000, "format": "s16le"}"#);
    expect_error(&mut c, "unknown_avatar");
    // Out-of-range options.
    send(&mut c, OPEN, br#"{"avatar": "golden", "sample_rate": 16000, "format": "s16le", "batch": 99}"#);
    expect_error(&mut c, "bad_request");
    send(&mut c, OPEN, br#"{"avatar": "golden", "sample_rate": 1000, "format": "s16le"}"#);
    assert!(expect_error(&mut c, "bad_request").contains("1000 Hz"));
    send(&mut c, OPEN, br#"{"avatar": "golden", "sample_rate": 16000, "format": "u8"}"#);
    expect_error(&mut c, "bad_request");
    // A second Open while a session streams.
    open(&mut c, "golden", 16_000);
    send(&mut c, OPEN, br#"{"avatar": "golden", "sample_rate": 16000, "format": "s16le"}"#);
    expect_error(&mut c, "session_open");
    send(&mut c, CLOSE, b"");
    expect_closed(&mut c);
    // A session whose audio is too short fails with the reason; the connection stays open and
    // serves the next session.
    let mut c = d.connect();
    open(&mut c, "golden", 16_000);
    send(&mut c, AUDIO, &speech_s16()[..3200]);
    send(&mut c, END_AUDIO, b"");
    assert!(expect_error(&mut c, "session").contains("audio too short"));
    open(&mut c, "golden", 16_000);
    send(&mut c, AUDIO, &speech_s16());
    send(&mut c, END_AUDIO, b"");
    assert_same(&read_frames(&mut c), want, "session after a failed one");
    // Audio that is not whole samples.
    open(&mut c, "golden", 16_000);
    send(&mut c, AUDIO, &[1, 2, 3]);
    assert!(expect_error(&mut c, "bad_audio").contains("3"));
    expect_closed(&mut c);
    // Float audio with a NaN: refused, naming the sample (counted across Audio messages).
    let mut c = d.connect();
    let req = serde_json::json!({"avatar": "golden", "sample_rate": 16000, "format": "f32le"});
    send(&mut c, OPEN, req.to_string().as_bytes());
    assert_eq!(recv(&mut c).unwrap().0, OPENED);
    let mut pcm: Vec<f32> = vec![0.1; 1600];
    send(&mut c, AUDIO, &pcm.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    pcm[100] = f32::NAN;
    send(&mut c, AUDIO, &pcm.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let e = expect_error(&mut c, "bad_audio");
    assert!(e.contains("audio sample 1700 (at 0.106 s) is NaN"), "{e}");
    expect_closed(&mut c);

    let o = healthy.wait_with_output().unwrap();
    assert!(o.status.success(), "{}\n{}", text(&o), d.log());
    assert_same(&read_dir_frames(&out), want, "healthy session");
    d.wait_idle();
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_client_that_disconnects_frees_its_session_and_busy_is_clear() {
    let speech = fixture("golden/speech_2s.wav");
    let d = Daemon::start(&["--max-sessions", "2"]);
    let pcm = speech_s16();
    // Two open sessions fill the daemon.
    let mut a = d.connect();
    open(&mut a, "golden", 16_000);
    send(&mut a, AUDIO, &pcm[..pcm.len() / 2]);
    let mut b = d.connect();
    open(&mut b, "golden2", 16_000);
    let mut c = d.connect();
    send(&mut c, OPEN, br#"{"avatar": "golden", "sample_rate": 16000, "format": "s16le"}"#);
    assert!(expect_error(&mut c, "busy").contains("maximum of 2 sessions"));
    // A disconnects mid-stream: its session is freed.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        send(&mut c, OPEN, br#"{"avatar": "golden", "sample_rate": 16000, "format": "s16le"}"#);
        let (k, p) = recv(&mut c).unwrap();
        if k == OPENED {
            break;
        }
        assert_eq!(k, ERROR);
        assert!(String::from_utf8_lossy(&p).contains("busy"));
        assert!(Instant::now() < deadline, "the disconnected session was not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Close stops B at once.
    send(&mut b, CLOSE, b"");
    expect_closed(&mut b);
    // Connections are bounded too (4 per session slot + 16): the next one is told, not hung.
    let mut idle: Vec<UnixStream> = Vec::new();
    let refused = loop {
        let mut x = UnixStream::connect(&d.socket).unwrap();
        x.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = br#"{"protocol": 2}"#;
        let mut m = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        m.push(HELLO);
        m.extend_from_slice(body);
        let _ = x.write_all(&m);
        let (k, p) = recv(&mut x).unwrap();
        if k == ERROR {
            break String::from_utf8_lossy(&p).to_string();
        }
        assert_eq!(k, WELCOME);
        idle.push(x);
        assert!(idle.len() <= 24, "no connection limit");
    };
    assert!(refused.contains("busy") && refused.contains("24 connections"), "{refused}");
    assert!((20..=23).contains(&idle.len()), "c and {} idle connections were open", idle.len());
    drop(idle);
    send(&mut c, AUDIO, &pcm);
    send(&mut c, END_AUDIO, b"");
    assert_same(&read_frames(&mut c), rendered(s(&speech)), "session after the busy error");
    drop(c);
    d.wait_idle();
    assert_eq!(d.stats()["sessions_total"], 3);
}

#[test]
fn a_slow_client_backs_up_only_its_own_session() {
    let speech = fixture("golden/speech_2s.wav");
    let want = rendered(s(&speech));
    let d = Daemon::start(&["--session-queue", "4", "--max-batch", "4"]);
    // The slow client sends 20 s of audio and reads nothing for now.
    let mut slow = d.connect();
    let sndbuf: libc::c_int = 16 << 10;
    // SAFETY: setsockopt with a live c_int on our socket.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            slow.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&sndbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    open(&mut slow, "golden", 16_000);
    let pcm: Vec<u8> = speech_s16().repeat(10);
    let sent = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let mut writer = slow.try_clone().unwrap();
    let sender = {
        let (sent, finished, pcm) = (sent.clone(), finished.clone(), pcm.clone());
        std::thread::spawn(move || {
            for chunk in pcm.chunks(640) {
                send(&mut writer, AUDIO, chunk);
                sent.fetch_add(chunk.len(), Ordering::SeqCst);
            }
            send(&mut writer, END_AUDIO, b"");
            finished.store(true, Ordering::SeqCst);
        })
    };
    // Meanwhile other clients are served in full.
    let tmp = tempfile::tempdir().unwrap();
    for k in 0..2 {
        let out = tmp.path().join(format!("other{k}"));
        let o = run(&["client", "--socket", d.sock(), "--avatar", "golden", "--audio", s(&speech), "-o", s(&out)]);
        assert!(o.status.success(), "{}\n{}", text(&o), d.log());
        assert_same(&read_dir_frames(&out), want, "a client beside the slow one");
    }
    // The slow session is held by backpressure: its audio intake stopped, its frames in
    // flight are bounded by its queue.
    let a = sent.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    let b = sent.load(Ordering::SeqCst);
    assert!(!finished.load(Ordering::SeqCst) && a == b && b < pcm.len(), "sent {a} then {b} of {}", pcm.len());
    let st = d.stats();
    let slow_session = st["sessions"].as_array().unwrap().iter().find(|s| s["frames"].as_u64() < Some(100)).cloned();
    let slow_session = slow_session.unwrap_or_else(|| panic!("{st}"));
    assert!(slow_session["in_flight"].as_u64().unwrap() <= 4, "{slow_session}");
    // Once it reads, every frame arrives, in order, none lost.
    let frames = read_frames(&mut slow);
    sender.join().unwrap();
    assert_eq!(frames.len(), 499, "20 s of audio: T = 1601, L = 497, frames = 499");
    // Frames 0..=38 need only mel rows up to 158, final within the first 2 s (the 10 copies
    // start with the 2 s fixture): identical to the 2 s render's.
    assert_same(&frames[..39], &want[..39], "slow client's early frames");
}

#[test]
fn half_close_after_end_audio_still_gets_every_frame_and_unread_frames_time_out() {
    let speech = fixture("golden/speech_2s.wav");
    let want = rendered(s(&speech));
    let d = Daemon::start(&["--client-timeout", "1"]);
    // All the audio in one message (split inside the daemon), EndAudio, then half-close.
    let mut c = d.connect();
    open(&mut c, "golden", 16_000);
    send(&mut c, AUDIO, &speech_s16());
    send(&mut c, END_AUDIO, b"");
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_same(&read_frames(&mut c), want, "half-closed client");
    // A client that reads nothing loses its session and its connection after the timeout.
    let mut c = d.connect();
    open(&mut c, "golden", 16_000);
    let pcm = speech_s16().repeat(5);
    let _ = c.set_write_timeout(Some(Duration::from_secs(20)));
    for chunk in pcm.chunks(3200) {
        let mut m = ((chunk.len() + 1) as u32).to_be_bytes().to_vec();
        m.push(AUDIO);
        m.extend_from_slice(chunk);
        if c.write_all(&m).is_err() {
            break;
        }
    }
    d.wait_idle();
    let mut got = 0usize;
    loop {
        match recv(&mut c) {
            Ok((FRAME, _)) => got += 1,
            Ok((SPEECH, _)) => {}
            Ok((k, p)) => panic!("unexpected 0x{k:02x} {}", String::from_utf8_lossy(&p)),
            Err(_) => break,
        }
    }
    assert!(got < 249, "the session was dropped ({got} frames)");
    assert!(d.log().contains("cannot send frame to the client"), "{}", d.log());
}

#[test]
fn sigterm_drains_open_sessions_then_removes_the_socket() {
    let speech = fixture("golden/speech_2s.wav");
    let want = rendered(s(&speech));
    let d = Daemon::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("drained");
    let client = spawn_client(&d, &speech, &out, &["--realtime"]);
    // Wait until its session is open, then ask the daemon to stop.
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.stats()["sessions_open"] == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    d.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // No new connections while draining; the socket name is free for a new daemon at once.
    assert!(UnixStream::connect(&d.socket).is_err(), "the listener is closed");
    assert!(!d.socket.exists(), "the socket file is removed when the listener closes");
    let next_dir = tempfile::tempdir().unwrap();
    let next_avatars = write_avatars(next_dir.path());
    let next = Daemon::spawn(
        next_dir,
        d.socket.clone(),
        &["serve", "--socket", d.sock(), "--avatars", s(&next_avatars)].map(String::from),
    );
    let o = client.wait_with_output().unwrap();
    assert!(o.status.success(), "the open session finished: {}\n{}", text(&o), d.log());
    assert_same(&read_dir_frames(&out), want, "drained session");
    let socket = d.socket.clone();
    let (status, log, _dir) = d.stop_keep_dir();
    assert!(status.success(), "{log}");
    assert!(log.contains("draining 1 open session"), "{log}");
    // The old daemon left the new one's socket alone.
    assert!(socket.exists() && next.stats()["sessions_open"] == 0);
    let (status, _) = next.stop();
    assert!(status.success());
    assert!(!socket.exists(), "socket removed");
}

#[test]
fn the_socket_is_owned_carefully() {
    // A stale socket file (nobody listening) is replaced; the default mode is 0600.
    let keep = tempfile::tempdir().unwrap();
    let avatars = write_avatars(keep.path());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("serve.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let args: Vec<String> =
        ["serve", "--socket", s(&socket), "--avatars", s(&avatars)].iter().map(|a| a.to_string()).collect();
    let d = Daemon::spawn(dir, socket.clone(), &args);
    assert!(d.log().contains("removing stale socket"), "{}", d.log());
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    // A second daemon on a live socket refuses to start and leaves it alone.
    let o = run(&["serve", "--socket", s(&socket), "--avatars", s(&avatars)]);
    assert!(!o.status.success());
    assert!(text(&o).contains("another daemon is starting or running"), "{}", text(&o));
    assert!(d.connect().peer_addr().is_ok(), "the first daemon still serves");
    let (status, _) = d.stop();
    assert!(status.success());
    assert!(!socket.exists());

    // A path that is not a socket is never replaced.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let o = run(&["serve", "--socket", s(&file), "--avatars", s(&avatars)]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is not a socket"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    // --socket-mode.
    let d = Daemon::start(&["--socket-mode", "0660"]);
    assert_eq!(std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777, 0o660);
    let o =
        run(&["serve", "--socket", s(&tmp.path().join("x.sock")), "--avatars", s(&avatars), "--socket-mode", "999"]);
    assert!(!o.status.success() && text(&o).contains("socket mode"), "{}", text(&o));
    // A mode that lets others connect needs an explicit flag.
    let o =
        run(&["serve", "--socket", s(&tmp.path().join("x.sock")), "--avatars", s(&avatars), "--socket-mode", "0666"]);
    assert!(!o.status.success() && text(&o).contains("--allow-shared-socket"), "{}", text(&o));
    let d = Daemon::start(&["--socket-mode", "0666", "--allow-shared-socket"]);
    assert_eq!(std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777, 0o666);
    drop(d);
    // A FIFO planted at the lock file's name is refused, not waited on.
    let fifo_dir = tempfile::tempdir().unwrap();
    let sock = fifo_dir.path().join("f.sock");
    let lock = std::ffi::CString::new(format!("{}.lock", sock.display())).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(lock.as_ptr(), 0o666) }, 0);
    let t = Instant::now();
    let o = run(&["serve", "--socket", s(&sock), "--avatars", s(&avatars)]);
    // (Opening a FIFO without a reader fails at once; a regular-file check covers the rest.)
    assert!(!o.status.success() && text(&o).contains("f.sock.lock"), "{}", text(&o));
    assert!(t.elapsed() < Duration::from_secs(10));
    // A socket directory that others may write to (and not sticky) is warned about.
    let open_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = open_dir.path().join("serve.sock");
    let args: Vec<String> =
        ["serve", "--socket", s(&socket), "--avatars", s(&avatars)].iter().map(|a| a.to_string()).collect();
    let d = Daemon::spawn(tempfile::tempdir().unwrap(), socket, &args);
    assert!(d.log().contains("is writable by others"), "{}", d.log());
}

#[test]
fn two_daemons_started_together_on_a_stale_socket_end_with_one_listener() {
    let keep = tempfile::tempdir().unwrap();
    let avatars = write_avatars(keep.path());
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("serve.sock");
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let start = || {
            Command::new(bin())
                .args(["serve", "--socket", s(&socket), "--avatars", s(&avatars)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (mut a, mut b) = (start(), start());
        // One of them exits with a clear error; the other listens on the socket file.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut loser, mut winner) = loop {
            if a.try_wait().unwrap().is_some() {
                break (a, b);
            }
            if b.try_wait().unwrap().is_some() {
                break (b, a);
            }
            assert!(Instant::now() < deadline, "neither daemon gave up");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        loser.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(!loser.wait().unwrap().success());
        assert!(err.contains("another daemon"), "{err}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut c = loop {
            if let Ok(c) = UnixStream::connect(&socket) {
                break c;
            }
            assert!(Instant::now() < deadline, "the winner does not listen on the socket file");
            std::thread::sleep(Duration::from_millis(20));
        };
        hello(&mut c).unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(winner.id() as libc::pid_t, libc::SIGTERM) };
        assert!(winner.wait().unwrap().success());
    }
}

#[test]
fn deadlines_bound_whole_messages_and_idle_connections() {
    let d = Daemon::start(&["--handshake-timeout", "1", "--idle-timeout", "1", "--message-timeout", "1"]);
    let raw = || {
        let c = UnixStream::connect(&d.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c
    };
    // A Hello sent one byte at a time cannot outlast the handshake deadline.
    let mut c = raw();
    let body = br#"{"protocol": 2, "client": "trickle"}"#;
    let mut hello_msg = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    hello_msg.push(HELLO);
    hello_msg.extend_from_slice(body);
    let t = Instant::now();
    for b in &hello_msg[..20] {
        if c.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(expect_error(&mut c, "handshake").contains("no Hello within 1 s"));
    assert!(t.elapsed() < Duration::from_secs(4), "closed after {:?}", t.elapsed());
    // A message that stops half-way is dropped (and its buffer with it).
    let mut c = d.connect();
    let mut m = ((1 << 20) as u32 + 1).to_be_bytes().to_vec();
    m.push(AUDIO);
    m.extend_from_slice(&[0u8; 1000]);
    c.write_all(&m).unwrap();
    assert!(expect_error(&mut c, "timeout").contains("not complete within 1 s"));
    // An idle connection without a session is closed.
    let mut c = d.connect();
    let t = Instant::now();
    assert!(expect_error(&mut c, "timeout").contains("no message for 1 s"));
    assert!(t.elapsed() < Duration::from_secs(4));
    // A session streaming frames to a client that sends nothing more is not idle.
    let mut c = d.connect();
    open(&mut c, "golden", 16_000);
    send(&mut c, AUDIO, &speech_s16());
    send(&mut c, END_AUDIO, b"");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(read_frames(&mut c).len(), 49);
    // Once its session is done, a silent connection is idle again.
    let t = Instant::now();
    assert!(expect_error(&mut c, "timeout").contains("no message for 1 s"));
    assert!(t.elapsed() < Duration::from_secs(5), "closed after {:?}", t.elapsed());
}

#[test]
fn a_client_that_reads_a_trickle_is_dropped_in_time() {
    let d = Daemon::start(&["--client-timeout", "1"]);
    let mut c = d.connect();
    open(&mut c, "golden", 16_000);
    let pcm = speech_s16().repeat(3);
    send(&mut c, AUDIO, &pcm);
    send(&mut c, END_AUDIO, b"");
    // Read 64 bytes every 50 ms: far slower than frames come, so a frame write cannot
    // finish within the second it is given, however the bytes trickle out. (What the kernel
    // already holds stays readable after the daemon drops the connection: watch its log.)
    let t = Instant::now();
    let mut buf = [0u8; 64];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let dropped = loop {
        if d.log().contains("cannot send frame to the client") {
            break true;
        }
        if t.elapsed() > Duration::from_secs(20) {
            break false;
        }
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break d.log().contains("cannot send frame to the client"),
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(dropped, "the trickling client was never dropped: {}", d.log());
}

#[test]
fn at_the_drain_timeout_open_sessions_get_an_error() {
    let d = Daemon::start(&["--drain-timeout", "0.5"]);
    let mut c = d.connect();
    open(&mut c, "golden", 16_000);
    // Real time is slow enough: 1 s of audio, then the daemon is told to stop.
    let pcm = speech_s16();
    send(&mut c, AUDIO, &pcm[..32_000]);
    d.signal(libc::SIGTERM);
    let mut got_error = None;
    loop {
        match recv(&mut c) {
            Ok((FRAME | SPEECH, _)) => {}
            Ok((ERROR, p)) => {
                got_error = Some(String::from_utf8_lossy(&p).to_string());
            }
            Ok((k, p)) => panic!("unexpected 0x{k:02x} {}", String::from_utf8_lossy(&p)),
            Err(_) => break,
        }
    }
    let e = got_error.expect("an Error before the connection closed");
    assert!(e.contains("shutting_down") && e.contains("drain timeout"), "{e}");
    let (status, _) = d.stop();
    assert!(status.success());
}

#[test]
fn avatars_are_managed_over_the_socket() {
    let speech = fixture("golden/speech_2s.wav");
    // Room for one decoded template (3.3 MiB each) in the cache.
    let d = Daemon::start(&["--cache-mb", "5"]);
    let list = || {
        let o = run(&["avatar", "list", "--socket", d.sock()]);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let row = |l: &str, name: &str| {
        l.lines().find(|r| r.starts_with(name)).map(|r| r.split_whitespace().map(String::from).collect::<Vec<_>>())
    };
    let l = list();
    assert_eq!(row(&l, "golden ").unwrap()[1], "no", "{l}");
    assert_eq!(row(&l, "golden2").unwrap()[1], "no", "{l}");
    let o = run(&["avatar", "load", "golden", "--socket", d.sock()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"frames\":5"));
    let l = list();
    let g = row(&l, "golden ").unwrap();
    assert_eq!(g[1], "yes", "{l}");
    // Columns: name, loaded, sessions, frames, template MB, sessions MB, models MB, total MB.
    let mb = |c: &str| c.parse::<f64>().unwrap();
    assert!(mb(&g[4]) > 0.0 && mb(&g[6]) > 0.0, "template and models: {l}");
    assert!((mb(&g[4]) + mb(&g[5]) + mb(&g[6]) - mb(&g[7])).abs() < 0.2, "total: {l}");
    // Loading the second evicts the first (least recently used, not in use).
    assert!(run(&["avatar", "load", "golden2", "--socket", d.sock()]).status.success());
    let l = list();
    assert_eq!(row(&l, "golden ").unwrap()[1], "no", "{l}");
    assert_eq!(row(&l, "golden2").unwrap()[1], "yes", "{l}");
    // Unload is refused while a session uses the avatar.
    let mut c = d.connect();
    open(&mut c, "golden2", 16_000);
    let o = run(&["avatar", "unload", "golden2", "--socket", d.sock()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("in_use") && text(&o).contains("in use by 1 session"), "{}", text(&o));
    let g = row(&list(), "golden2").unwrap();
    assert_eq!(g[2], "1", "one session");
    assert!(mb(&g[5]) > 0.0, "a session's memory is counted: {g:?}");
    send(&mut c, AUDIO, &speech_s16());
    send(&mut c, END_AUDIO, b"");
    let frames = read_frames(&mut c);
    assert_eq!(frames.len(), 49);
    drop(c);
    d.wait_idle();
    assert_eq!(row(&list(), "golden2").unwrap()[3], "49", "frames served");
    let o = run(&["avatar", "unload", "golden2", "--socket", d.sock()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(row(&list(), "golden2").unwrap()[1], "no");
    let o = run(&["avatar", "load", "nobody", "--socket", d.sock()]);
    assert!(!o.status.success() && text(&o).contains("unknown_avatar"), "{}", text(&o));
    // A session loads its avatar on demand; golden2 starts 3 frames later in the template.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g2");
    let o = run(&["client", "--socket", d.sock(), "--avatar", "golden2", "--audio", s(&speech), "-o", s(&out)]);
    assert!(o.status.success(), "{}", text(&o));
    let offline = tmp.path().join("offline");
    ok(&["render", "--avatar", s(&d.dir.path().join("avatars/golden2")), "--audio", s(&speech), "-o", s(&offline)]);
    assert_same(&read_dir_frames(&out), &read_dir_frames(&offline), "golden2 (start frame 3)");
}

#[test]
fn settings_come_from_the_config_file_and_flags_override_them() {
    let dir = tempfile::tempdir().unwrap();
    let avatars = write_avatars(dir.path());
    let socket = dir.path().join("serve.sock");
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"{}\"\navatars = \"{}\"\nmax_sessions = 3\nmax_batch = 4\nsession_queue = 6\npreload = [\"golden\"]\n",
            socket.display(),
            avatars.display()
        ),
    )
    .unwrap();
    let args: Vec<String> =
        ["serve", "--config", s(&config), "--max-sessions", "5"].iter().map(|a| a.to_string()).collect();
    let d = Daemon::spawn(dir, socket, &args);
    let st = d.stats();
    assert_eq!(st["settings"]["max_sessions"], 5, "flag overrides the file");
    assert_eq!(st["settings"]["max_batch"], 4, "from the file");
    assert_eq!(st["settings"]["session_queue"], 6);
    let o = run(&["avatar", "list", "--socket", d.sock()]);
    assert!(
        String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("golden ") && l.contains("yes")),
        "preloaded"
    );
    // Stats as a table and as JSON.
    let o = run(&["stats", "--socket", d.sock()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    for word in ["uptime", "stage (service, ms)", "audio", "prep", "composite", "encode", "unet"] {
        assert!(t.contains(word), "{word} in {t}");
    }
    let o = run(&["stats", "--socket", d.sock(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["sessions_open"], 0);
    drop(d);

    // Bad settings are refused with the reason.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "socket = \"/tmp/x.sock\"\nmax_sesions = 3\n").unwrap();
    let o = run(&["serve", "--config", s(&bad)]);
    assert!(!o.status.success() && text(&o).contains("max_sesions"), "{}", text(&o));
    let sock = tmp.path().join("y.sock");
    let o = run(&["serve", "--socket", s(&sock), "--avatars", s(&tmp.path().join("none"))]);
    assert!(!o.status.success() && text(&o).contains("does not exist"), "{}", text(&o));
    let o = run(&["serve", "--socket", s(&sock), "--avatars", s(tmp.path()), "--max-batch", "99"]);
    assert!(!o.status.success() && text(&o).contains("batch size 99 is out of range: expected 1..=32"), "{}", text(&o));
    let o = run(&["serve", "--socket", s(&sock), "--avatars", s(tmp.path()), "--preload", "nobody"]);
    assert!(!o.status.success() && text(&o).contains("nobody"), "{}", text(&o));
    assert!(!sock.exists(), "a daemon that failed to start leaves no socket");
    let o = run(&["stats", "--socket", s(&sock)]);
    assert!(!o.status.success() && text(&o).contains("is `lipsync serve` running"), "{}", text(&o));
    assert!(!text(&o).contains("panicked"));
}

/// The short churn soak: 16 real-time sessions, a fifth of them dropped half-way, for 8 s
/// (the long one is documented in docs/architecture.md). Every session that finished got all
/// its frames; memory, threads and file descriptors come back to their warm-up level.
#[test]
fn soak_keeps_memory_threads_and_descriptors_flat() {
    let o = Command::new("python3")
        .arg(root().join("scripts/soak.py"))
        .args(["--binary", bin(), "--seconds", "8", "--sessions", "16", "--realtime", "--json"])
        .output()
        .expect("python3");
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["sessions"].as_u64().unwrap() >= 16, "{v}");
    assert!(v["aborted_sessions"].as_u64().unwrap() >= 3, "{v}");
    assert!(v["rss_growth_mib"].as_f64().unwrap() < 32.0, "{v}");
    assert!(v["threads_end"].as_u64() <= v["threads_start"].as_u64(), "{v}");
    assert!(v["fds_end"].as_u64() <= v["fds_start"].as_u64(), "{v}");
    eprintln!("soak: {v}");
}

#[test]
fn a_second_sigint_cuts_the_drain_short() {
    let mut d = Daemon::start(&["--drain-timeout", "120"]);
    let mut c = d.connect();
    open(&mut c, "golden", 16_000);
    send(&mut c, AUDIO, &speech_s16()[..32_000]);
    d.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.log().contains("draining 1 open session"), "{}", d.log());
    let t = Instant::now();
    d.signal(libc::SIGINT);
    let child = d.child.as_mut().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the second SIGINT did not end the drain");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    assert!(!d.socket.exists());
}
