//! `--http`: `/metrics` of an in-process daemon, parsed by Prometheus' own Python parser
//! (`prometheus_client` in the project's `.venv`); the token; settings that cannot work.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::common::fixture;
use lipsync_serve::client::live::{stream_live, LiveSpec};
use lipsync_serve::settings::http::HttpOptions;
use lipsync_serve::settings::InferenceOptions;
use lipsync_serve::{Daemon, ServeOptions};
use lipsync_stages::audio::decode_file;
use lipsync_stages::onnx::OrtRuntime;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// (status, body) of `GET path` with an optional bearer token.
fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(c, "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// The metrics as `{name: [(labels, value)]}`, parsed by prometheus_client's OpenMetrics parser.
fn parse(text: &str) -> serde_json::Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(root.join(".venv/bin/python"))
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(".venv/bin/python (run scripts/setup.sh)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "the parser refused the metrics: {}\n{text}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn value(m: &serde_json::Value, name: &str, label: Option<(&str, &str)>) -> f64 {
    let samples = m[name].as_array().unwrap_or_else(|| panic!("no {name} in {m}"));
    samples.iter().find(|s| label.is_none_or(|(k, v)| s[0][k] == v)).unwrap_or_else(|| panic!("no {name} {label:?}"))[1]
        .as_f64()
        .unwrap()
}

#[test]
fn metrics_are_prometheus_text_with_every_stage_session_and_model() {
    let tmp = tempfile::tempdir().unwrap();
    let avatars = tmp.path().join("avatars");
    std::fs::create_dir_all(&avatars).unwrap();
    std::os::unix::fs::symlink(fixture("golden/avatar"), avatars.join("golden")).unwrap();
    let port = free_port();
    let options = ServeOptions {
        socket: Some(tmp.path().join("d.sock")),
        avatars: Some(avatars),
        inference: InferenceOptions { threads: Some(1), ..Default::default() },
        http: HttpOptions {
            addr: Some(format!("127.0.0.1:{port}")),
            http_token: Some("s3cret-0123456789".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let d = Daemon::start(options.validate().unwrap(), OrtRuntime::load(None).unwrap()).unwrap();
    let audio = decode_file(&fixture("golden/speech_2s.wav")).unwrap();
    let spec = LiveSpec {
        avatar: "golden".into(),
        samples: audio.samples,
        rate: audio.rate,
        chunk_ms: 20.0,
        idle: Duration::from_millis(300),
        idle_after: Duration::from_millis(300),
        utterances: 1,
        interrupt_after: None,
        jpeg_quality: None,
        start_frame: None,
    };
    let out = stream_live(d.socket(), &spec, |_, _, _| Ok(())).unwrap();

    assert_eq!(get(port, "/metrics", None).0, 401, "no token");
    assert_eq!(get(port, "/metrics", Some("wrong")).0, 401, "a wrong token");
    assert_eq!(get(port, "/nothing", Some("s3cret-0123456789")).0, 404);
    let (status, text) = get(port, "/metrics", Some("s3cret-0123456789"));
    assert_eq!(status, 200, "{text}");
    let m = parse(&text);
    assert_eq!(value(&m, "lipsync_frames_total", None), out.frames as f64);
    assert_eq!(value(&m, "lipsync_idle_frames_total", None), out.idle_frames as f64);
    assert_eq!(value(&m, "lipsync_sessions_total", None), 1.0);
    assert_eq!(value(&m, "lipsync_sessions_failed_total", None), 0.0);
    assert_eq!(value(&m, "lipsync_sessions_active", None), 0.0);
    for stage in ["audio", "frames", "prep", "composite", "encode", "sink"] {
        assert!(value(&m, "lipsync_stage_service_seconds_count", Some(("stage", stage))) > 0.0, "{stage}");
    }
    // Queue waits: the stages that read a channel in either thread layout (in the compact
    // one, prep, encode and sink run in their thread after another stage).
    for stage in ["audio", "frames", "composite"] {
        assert!(value(&m, "lipsync_stage_queue_wait_seconds_count", Some(("stage", stage))) > 0.0, "{stage}");
    }
    // Every frame sent has its latency; the one session its first frame.
    assert_eq!(value(&m, "lipsync_frame_latency_seconds_count", None), out.frames as f64);
    assert_eq!(value(&m, "lipsync_first_frame_seconds_count", None), 1.0);
    let inf = m["lipsync_frame_latency_seconds_bucket"].as_array().unwrap().iter().find(|s| s[0]["le"] == "+Inf");
    assert_eq!(inf.unwrap()[1].as_f64().unwrap(), out.frames as f64, "buckets are cumulative up to +Inf");
    let speech = (out.frames - out.idle_frames) as f64;
    assert_eq!(value(&m, "lipsync_unet_batch_frames_sum", None), speech, "only speech frames run the UNet");
    assert!(value(&m, "lipsync_unet_request_seconds_count", None) > 0.0);
    assert_eq!(value(&m, "lipsync_unet_errors_total", None), 0.0);
    assert_eq!(value(&m, "lipsync_avatars_loaded", None), 1.0);
    assert!(value(&m, "lipsync_avatar_memory_bytes", Some(("avatar", "golden"))) > 0.0);
    d.stop().unwrap();
}

#[test]
fn http_settings_that_cannot_work_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = || ServeOptions {
        socket: Some(tmp.path().join("d.sock")),
        avatars: Some(tmp.path().into()),
        ..Default::default()
    };
    let wide = ServeOptions { http: HttpOptions { addr: Some("0.0.0.0:9100".into()), ..Default::default() }, ..base() };
    let e = wide.validate().unwrap_err().to_string();
    assert!(e.contains("not a loopback address") && e.contains("--http-token"), "{e}");
    let no_host = || ServeOptions {
        http: HttpOptions {
            addr: Some("0.0.0.0:9100".into()),
            http_token: Some("t0123456789abcdef".into()),
            ..Default::default()
        },
        ..base()
    };
    let e = no_host().validate().unwrap_err().to_string();
    assert!(e.contains("listens on every address") && e.contains("--http-host"), "{e}");
    let mut ok = no_host();
    ok.http.http_host = Some(vec!["avatars.example.com".into()]);
    assert!(ok.validate().is_ok());
    let bad = ServeOptions { http: HttpOptions { addr: Some("localhost".into()), ..Default::default() }, ..base() };
    assert!(bad.validate().unwrap_err().to_string().contains("IP:PORT"));
    let lone = ServeOptions {
        http: HttpOptions { http_token: Some("t0123456789abcdef".into()), ..Default::default() },
        ..base()
    };
    assert!(lone.validate().unwrap_err().to_string().contains("without --http"));
}
