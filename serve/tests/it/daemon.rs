//! The daemon started in-process (`Daemon::start`): a session streamed through the client
//! library gives the offline render's JPEG bytes (from the avatar's JPEG frames or from decoded
//! ones), a stop drains it and removes the socket, and a daemon that cannot start says why.

use crate::common::{fixture, runtime};
use lipsync_pipelines::render::{render, ImageFormat, Output, RenderConfig};
use lipsync_serve::client::{stream, ClientError, Connection, StreamSpec};
use lipsync_serve::protocol::ErrorCode;
use lipsync_serve::settings::{InferenceOptions, TemplateOptions};
use lipsync_serve::{Daemon, ServeError, ServeOptions};
use lipsync_stages::audio::decode_file;
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::unet::{Batch, BatchSetting};

#[test]
fn an_in_process_daemon_serves_the_render_frames_and_drains() {
    let tmp = tempfile::tempdir().unwrap();
    let avatars = tmp.path().join("avatars");
    std::fs::create_dir_all(&avatars).unwrap();
    std::os::unix::fs::symlink(fixture("golden/avatar"), avatars.join("golden")).unwrap();
    let audio = fixture("golden/speech_2s.wav");

    let frames_dir = tmp.path().join("frames");
    let cfg = RenderConfig {
        batch: BatchSetting::Fixed(Batch::new(4).unwrap()),
        jpeg_quality: 90,
        ..RenderConfig::new(
            Avatar::open(&fixture("golden/avatar")).unwrap(),
            audio.clone(),
            Output::Dir { path: frames_dir.clone(), format: ImageFormat::Jpeg },
        )
    };
    let n = render(&runtime(), cfg).unwrap().frames;

    let socket = tmp.path().join("d.sock");
    let options = ServeOptions {
        socket: Some(socket.clone()),
        avatars: Some(avatars),
        inference: InferenceOptions { threads: Some(1), ..Default::default() },
        ..Default::default()
    };
    let daemon = Daemon::start(options.clone().validate().unwrap(), runtime()).unwrap();
    let decoded = decode_file(&audio).unwrap();
    let spec = StreamSpec {
        avatar: "golden".into(),
        samples: decoded.samples,
        rate: decoded.rate,
        realtime: false,
        chunk_ms: 20.0,
        jpeg_quality: Some(90),
        batch: None,
        start_frame: None,
    };
    let mut got = Vec::new();
    let outcome = stream(daemon.socket(), &spec, |i, jpeg| {
        got.push((i, jpeg.to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(outcome.frames, n);
    assert_eq!(got.len(), n);
    for (i, jpeg) in &got {
        let want = std::fs::read(frames_dir.join(format!("{i:06}.jpg"))).unwrap();
        assert!(jpeg == &want, "frame {i} differs from the render's");
    }
    // Errors come back typed.
    let spec = StreamSpec { avatar: "nobody".into(), ..spec };
    match stream(daemon.socket(), &spec, |_, _| Ok(())) {
        Err(ClientError::Remote(e)) => assert_eq!(e.code, ErrorCode::UnknownAvatar),
        other => panic!("expected unknown_avatar, got {:?}", other.map(|o| o.frames)),
    }
    let mut conn = Connection::connect(daemon.socket()).unwrap();
    let stats = conn.stats().unwrap();
    assert_eq!(stats.frames_total as usize, n);
    let names: Vec<&str> = stats.stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["audio", "frames", "prep", "composite", "encode", "sink"]);
    // The avatar's real memory: its template (shared), what a session holds and its models.
    let list = conn.avatars().unwrap();
    let golden = list.iter().find(|a| a.name == "golden").expect("golden is listed");
    assert!(golden.loaded);
    assert_eq!(golden.frames_served as usize, n);
    assert!(golden.template_bytes > 0 && golden.model_bytes > 0, "{golden:?}");
    assert_eq!(golden.session_bytes, 0, "no session is open");
    assert_eq!(golden.memory_bytes, golden.template_bytes + golden.model_bytes);
    let with_jpeg_frames = golden.template_bytes;
    daemon.stop().unwrap();
    assert!(!socket.exists(), "the socket is removed when the daemon stops");

    // Without JPEG frames (sessions decode the template and encode whole frames): the same
    // bytes, and the template holds less.
    let options =
        ServeOptions { template: TemplateOptions { jpeg_template_mb: Some(0), ..Default::default() }, ..options };
    let daemon = Daemon::start(options.validate().unwrap(), runtime()).unwrap();
    let spec = StreamSpec { avatar: "golden".into(), ..spec };
    let mut again = Vec::new();
    stream(daemon.socket(), &spec, |i, jpeg| {
        again.push((i, jpeg.to_vec()));
        Ok(())
    })
    .unwrap();
    assert!(again == got, "frames encoded whole differ from frames spliced into JPEG frames");
    let list = Connection::connect(daemon.socket()).unwrap().avatars().unwrap();
    let golden = list.iter().find(|a| a.name == "golden").expect("golden is listed");
    assert!(golden.template_bytes < with_jpeg_frames, "{golden:?} against {with_jpeg_frames} with JPEG frames");
    daemon.stop().unwrap();
}

#[test]
fn a_daemon_that_cannot_start_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let options = ServeOptions {
        socket: Some(tmp.path().join("d.sock")),
        avatars: Some(tmp.path().into()),
        preload: Some(vec!["ghost".into()]),
        ..Default::default()
    };
    match Daemon::start(options.validate().unwrap(), runtime()) {
        Err(ServeError::Preload { name, .. }) => assert_eq!(name, "ghost"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a daemon with an unknown preload started"),
    }
    assert!(!tmp.path().join("d.sock").exists());
}
