//! `lipsync serve` as its users' processes see it: a daemon started from the binary, spoken to
//! over its socket (helpers here), with the tests grouped by behaviour in `serve/`: `sessions`
//! (frames equal the offline render, both clients, real time, the soak), `hostile` (bad input,
//! disconnects, slow and stalled clients), `lifecycle` (signals, drains, socket ownership),
//! `admin` (avatars, the config file, stats) and `http` (the browser page and the HTTP side's
//! security).

mod admin;
mod hostile;
mod http;
mod lifecycle;
mod sessions;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::common::*;

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
    let body = br#"{"protocol": 2, "client": "tests/it/serve.rs"}"#;
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
