//! The daemon's life: SIGTERM drains open sessions, the drain timeout and a second SIGINT cut
//! it short, the socket is owned carefully, and two daemons started at once end with one.

use super::*;

#[test]
fn sigterm_drains_open_sessions_then_removes_the_socket() {
    let speech = fixture("golden/speech_2s.wav");
    let want = rendered(s(&speech));
    let d = Daemon::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("drained");
    // `--realtime` is `--paced`'s old name, kept as an alias.
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
