//! Managing a running daemon: avatars loaded and unloaded over the socket; settings from the
//! config file with flags over them; stats.

use super::*;

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
