//! Entry points for fuzzing: each takes arbitrary bytes and must never panic, hang or allocate
//! without bound, whatever they hold. `fuzz/` drives them with AFL++ (coverage-guided,
//! `scripts/fuzz.sh`); `tests/it/fuzz_corpus.rs` replays the committed corpus through them.

use std::path::Path;

use lipsync_stages::audio::{check_finite, decode_bytes, pcm_to_mono, PcmFormat, StreamResampler};
use lipsync_stages::io::avatar::{parse_boxes, AvatarConfig};

use crate::protocol::{parse_frame, read_message, AvatarName, Hello, Kind, OpenRequest};

/// The wire protocol as the daemon reads it: a stream of messages, each payload parsed as
/// its type says (JSON requests, PCM audio in both formats and up to 3 channels, frames).
pub fn protocol(data: &[u8]) {
    let mut r = data;
    let mut payload = Vec::new();
    let (mut scratch, mut mono) = (Vec::new(), Vec::new());
    for _ in 0..64 {
        let kind = match read_message(&mut r, &mut payload) {
            Ok(k) => k,
            Err(_) => return,
        };
        match kind {
            Kind::Hello => drop(serde_json::from_slice::<Hello>(&payload)),
            Kind::Open => {
                if let Ok(req) = serde_json::from_slice::<OpenRequest>(&payload) {
                    let _ = StreamResampler::new(req.sample_rate);
                }
            }
            Kind::LoadAvatar | Kind::UnloadAvatar => drop(serde_json::from_slice::<AvatarName>(&payload)),
            Kind::Audio => {
                for format in [PcmFormat::S16Le, PcmFormat::F32Le] {
                    for channels in 1..=3 {
                        mono.clear();
                        if pcm_to_mono(&payload, format, channels, &mut scratch, &mut mono).is_ok() {
                            let _ = check_finite(&mono, 0, 16_000);
                        }
                    }
                }
            }
            Kind::Frame => drop(parse_frame(&payload)),
            _ => {}
        }
    }
}

/// The audio decoder entry (every container and codec `lipsync render` reads, guessed from the
/// bytes), then resampling to 16 kHz.
pub fn audio(data: &[u8]) {
    for name in ["in.wav", "in.mp3", "in.bin"] {
        if let Ok(d) = decode_bytes(data.to_vec(), Path::new(name)) {
            if let Ok(mut rs) = StreamResampler::new(d.rate) {
                let mut out = Vec::new();
                // Bounded work: a short prefix is enough to exercise the resampler.
                let n = d.samples.len().min(48_000);
                if rs.push(&d.samples[..n], &mut out).is_ok() {
                    let _ = rs.finish(&mut out);
                }
            }
        }
    }
}

/// The avatar's text formats: `boxes.json` and `avatar.toml`.
pub fn avatar(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_boxes(text, Path::new("boxes.json"));
        let _ = AvatarConfig::parse(text, Path::new("avatar.toml"));
    }
}

/// The connection state machine: `data` is sent as a client's whole byte stream to a daemon
/// running in this process (started once, serving the golden test avatar with the tiny models,
/// short deadlines); then the client half-closes and reads whatever comes back until the daemon
/// closes. The daemon must answer or close, never panic or hang.
pub fn session(data: &[u8]) {
    use std::io::{Read, Write};
    let Some(socket) = daemon() else { return };
    let Ok(mut c) = std::os::unix::net::UnixStream::connect(socket) else { return };
    let _ = c.set_write_timeout(Some(std::time::Duration::from_secs(2)));
    let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let _ = c.write_all(data);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 64 << 10];
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// The in-process daemon of [`session`] (its socket), started on first use. Its files are
/// under `$TMPDIR/lipsync-fuzz-session/` (one socket per process; scripts/fuzz.sh removes the
/// directory after a run).
fn daemon() -> Option<&'static std::path::Path> {
    use std::sync::OnceLock;
    static DAEMON: OnceLock<Option<crate::Daemon>> = OnceLock::new();
    DAEMON
        .get_or_init(|| {
            let dir = std::env::temp_dir().join("lipsync-fuzz-session");
            let avatars = dir.join("avatars");
            std::fs::create_dir_all(&avatars).ok()?;
            let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden/avatar");
            let link = avatars.join("golden");
            if !link.exists() {
                let _ = std::os::unix::fs::symlink(golden, &link);
            }
            let options = crate::ServeOptions {
                socket: Some(dir.join(format!("fuzz-{}.sock", std::process::id()))),
                avatars: Some(avatars),
                preload: Some(vec!["golden".into()]),
                max_sessions: Some(4),
                inference: crate::settings::InferenceOptions { threads: Some(1), ..Default::default() },
                handshake_timeout: Some(1.0),
                idle_timeout: Some(1.0),
                message_timeout: Some(1.0),
                client_timeout: Some(1.0),
                drain_timeout: Some(0.0),
                ..Default::default()
            };
            let rt = lipsync_stages::onnx::OrtRuntime::load(None).ok()?;
            crate::Daemon::start(options.validate().ok()?, rt).ok()
        })
        .as_ref()
        .map(|d| d.socket())
}
