//! The settings: the example config, merging, ranges, config errors.

use super::*;

#[test]
fn a_config_error_never_quotes_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("serve.toml");
    std::fs::write(&file, "max_sessions = 4\nhttp_token = sekrit-unquoted-0123\n").unwrap();
    let e = ServeOptions::from_file(&file).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("http_token: not shown") && !e.contains("sekrit"), "{e}");
    std::fs::write(&file, "http_token = \"fine-0123456789abc\"\nmax_sessions = many\n").unwrap();
    let e = ServeOptions::from_file(&file).unwrap_err().to_string();
    assert!(e.contains("max_sessions") && !e.contains("fine-0123"), "other errors are shown whole: {e}");
}

#[test]
fn the_documented_example_config_parses() {
    let file: ServeOptions = toml::from_str(include_str!("../../../docs/serve.example.toml")).unwrap();
    assert_eq!(file.max_sessions, Some(16));
    assert_eq!(file.preload, Some(vec!["alice".to_string()]));
    assert_eq!(file.client_timeout, Some(30.0));
}

#[test]
fn flags_win_over_the_file_and_ranges_are_checked_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = ServeOptions {
        avatars: Some(dir.path().into()),
        max_sessions: Some(3),
        session_queue: Some(5),
        ..Default::default()
    };
    let flags = ServeOptions { socket: Some("/tmp/x.sock".into()), max_sessions: Some(7), ..Default::default() };
    let s = flags.over(file).validate().unwrap();
    assert_eq!((s.max_sessions, s.session_queue, s.max_batch), (7, 5, BatchSetting::Auto));
    assert_eq!(s.summary()["socket_mode"], "0600");

    let bad = ServeOptions {
        max_wait_ms: Some(5000.0),
        ..ServeOptions { socket: Some("s".into()), avatars: Some(dir.path().into()), ..Default::default() }
    };
    let e = bad.validate().unwrap_err().to_string();
    assert_eq!(e, "max wait (ms) 5000 is out of range: expected 0..=1000");
    let e: Result<ServeOptions, _> = toml::from_str("max_batch = 64");
    assert!(e.unwrap_err().to_string().contains("expected 1..=32"));
    let o: ServeOptions = toml::from_str("max_batch = \"auto\"\ntemplate_cache_mb = 16").unwrap();
    assert_eq!((o.inference.max_batch, o.template.template_cache_mb), (Some(BatchSetting::Auto), Some(16)));
    let o: ServeOptions = toml::from_str("max_batch = 4").unwrap();
    assert_eq!(o.inference.max_batch.unwrap().to_string(), "4");
    let zero = ServeOptions {
        template: TemplateOptions { template_cache_mb: Some(0), ..Default::default() },
        ..ServeOptions { socket: Some("s".into()), avatars: Some(dir.path().into()), ..Default::default() }
    };
    let e = zero.validate().unwrap_err().to_string();
    assert_eq!(e, "template cache (MiB) 0 is out of range: expected 1..=65536");
    let big = ServeOptions {
        template: TemplateOptions { jpeg_template_mb: Some(65537), ..Default::default() },
        ..ServeOptions { socket: Some("s".into()), avatars: Some(dir.path().into()), ..Default::default() }
    };
    let e = big.validate().unwrap_err().to_string();
    assert_eq!(e, "JPEG template (MiB) 65537 is out of range: expected 0..=65536");
}

#[test]
fn the_shared_groups_keep_their_old_keys_and_refuse_unknown_ones() {
    let o: ServeOptions = toml::from_str(
        "intra_threads = 3\nprovider = \"cpu\"\nprecision = \"fp32\"\nremote_retries = 2\nhttp = \"127.0.0.1:1\"",
    )
    .unwrap();
    assert_eq!(o.inference.threads, Some(3), "intra_threads is threads' old key");
    assert_eq!((o.inference.provider, o.inference.precision), (Some(Provider::Cpu), Some(PrecisionSetting::Fp32)));
    assert_eq!((o.remote.remote_retries, o.http.addr.as_deref()), (Some(2), Some("127.0.0.1:1")));
    let o: ServeOptions = toml::from_str("threads = 2\nbatch = 1\nspin = true").unwrap();
    assert_eq!(
        (o.inference.threads, o.inference.max_batch.map(|b| b.to_string()), o.inference.spin),
        (Some(2), Some("1".into()), true)
    );
    for bad in ["max_sesions = 4", "threds = 2", "http_tokn = \"x\"", "remote_urll = \"grpc://h:1\""] {
        let e = toml::from_str::<ServeOptions>(bad).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{bad}: {e}");
    }
    let o: ServeOptions = toml::from_str("pin = \"0,1\"").unwrap();
    assert_eq!(o.pin, Some(lipsync_pipelines::runtime::PinSetting::List(vec![0, 1])));
    let e = toml::from_str::<ServeOptions>("pin = \"0,x\"").unwrap_err().to_string();
    assert!(e.contains("bad core id `x`"), "{e}");
    let e = toml::from_str::<ServeOptions>("provider = \"gpu\"").unwrap_err().to_string();
    assert!(e.contains("cpu") && e.contains("cuda") && e.contains("remote"), "{e}");
}

#[test]
fn the_http_settings_come_from_the_config_file_too() {
    let o: ServeOptions = toml::from_str(
        "http = \"0.0.0.0:9100\"\nhttp_token = \"config-token-0123456789\"\nhttp_host = [\"avatars.example.com\"]\n\
         http_allow_origin = [\"https://app.example.com\"]\nhttp_max_websockets = 10\nhttp_idle_timeout = 2.5\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = ServeOptions { socket: Some("s".into()), avatars: Some(dir.path().into()), ..o }.validate().unwrap();
    let h = s.http.unwrap();
    assert!(
        h.hosts.contains(&"avatars.example.com".to_string())
            && h.origins.contains(&"https://app.example.com".to_string())
    );
    assert_eq!((h.max_websockets, h.idle_timeout.as_secs_f64()), (10, 2.5));
    assert_eq!(h.token.map(|t| t.0).as_deref(), Some("config-token-0123456789"));
}
