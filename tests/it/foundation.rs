//! Foundation: CLI surface, ONNX Runtime discovery, model signatures, avatars; the house's
//! rules on the source tree (`foundation/house.rs`).

mod house;

use crate::common::*;

#[test]
fn help_lists_subcommands() {
    let t = ok(&["--help"]);
    for cmd in ["doctor", "avatar"] {
        assert!(t.contains(cmd), "--help lacks {cmd}:\n{t}");
    }
    let t = ok(&["avatar", "--help"]);
    for cmd in ["create", "import-synctalk", "check"] {
        assert!(t.contains(cmd), "avatar --help lacks {cmd}:\n{t}");
    }
}

#[test]
fn doctor_reports_runtime_and_checks_tiny_models() {
    let unet = fixture("models/unet.onnx");
    let enc = fixture("models/audio_encoder.onnx");
    let t = ok(&["doctor", "--model", s(&unet), "--model", s(&enc)]);
    assert!(t.contains("ONNX Runtime: 1.31.1"), "{t}");
    assert!(t.contains("CPUExecutionProvider"), "{t}");
    assert!(t.contains("FFmpeg: "), "{t}");
    assert!(t.contains("CPUs: "), "{t}");
    assert!(
        t.contains("inputs `input` f32 [N,6,320,320], `audio` f32 [N,32,16,16] -> outputs `output` f32 [N,3,320,320]"),
        "{t}"
    );
    assert!(t.contains("matches the UNet signature"), "{t}");
    assert!(t.contains("inputs `mel_spectrogram` f32 [N,1,80,16] -> outputs `audio_features` f32 [N,512]"), "{t}");
    assert!(t.contains("matches the audio encoder signature"), "{t}");
}

#[test]
fn missing_ort_library_is_a_clear_error() {
    let t = fails(&["doctor", "--ort-lib", "/nonexistent/libonnxruntime.so"]);
    assert!(t.contains("--ort-lib does not exist: /nonexistent/libonnxruntime.so"), "{t}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lipsync"))
        .args(["doctor"])
        .env("LIPSYNC_ORT_LIB", "/nonexistent/lib.so")
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("$LIPSYNC_ORT_LIB does not exist"), "{t}");
}

#[test]
fn not_a_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.onnx");
    std::fs::write(&bogus, b"this is not an onnx model").unwrap();
    let t = fails(&["doctor", "--model", s(&bogus)]);
    assert!(t.contains("could not open model"), "{t}");
    let t = fails(&["doctor", "--model", s(&dir.path().join("absent.onnx"))]);
    assert!(t.contains("model not found"), "{t}");
}

fn create_args<'a>(out: &'a str, video: &'a str, boxes: &'a str, unet: &'a str, enc: &'a str) -> Vec<&'a str> {
    vec!["avatar", "create", out, "--video", video, "--boxes", boxes, "--unet", unet, "--encoder", enc]
}

#[test]
fn avatar_create_check_and_reject() {
    let tmp = tempfile::tempdir().unwrap();
    let frames = fixture("golden/avatar/frames");
    let boxes = fixture("golden/avatar/boxes.json");
    let unet = fixture("models/unet.onnx");
    let enc = fixture("models/audio_encoder.onnx");
    let out = tmp.path().join("av");
    let t = ok(&create_args(s(&out), s(&frames), s(&boxes), s(&unet), s(&enc)));
    assert!(t.contains("5 frames 640x360"), "{t}");
    assert!(out.join("avatar.toml").is_file() && out.join("frames/000004.png").is_file());
    let toml = std::fs::read_to_string(out.join("avatar.toml")).unwrap();
    assert!(toml.contains(s(&std::fs::canonicalize(&unet).unwrap())), "models referenced by path:\n{toml}");
    ok(&["avatar", "check", s(&out)]);
    ok(&["doctor", "--avatar", s(&out)]);

    // The output exists now: refused, untouched.
    let t = fails(&create_args(s(&out), s(&frames), s(&boxes), s(&unet), s(&enc)));
    assert!(t.contains("exists already"), "{t}");

    // --copy-models makes a self-contained avatar that survives a move.
    let copied = tmp.path().join("copied");
    let mut args = create_args(s(&copied), s(&frames), s(&boxes), s(&unet), s(&enc));
    args.push("--copy-models");
    ok(&args);
    let moved = tmp.path().join("moved");
    std::fs::rename(&copied, &moved).unwrap();
    ok(&["avatar", "check", s(&moved)]);

    // Swapped models: the error names what was expected and what the model has.
    let bad = tmp.path().join("swapped");
    let t = fails(&create_args(s(&bad), s(&frames), s(&boxes), s(&enc), s(&unet)));
    assert!(t.contains("UNet model"), "{t}");
    assert!(t.contains("wrong signature"), "{t}");
    assert!(t.contains("expected inputs `input` f32 [N,6,320,320]"), "{t}");
    assert!(t.contains("the model has inputs `mel_spectrogram`"), "{t}");
    assert!(!bad.exists(), "nothing written on failure");

    // Wrong box count.
    let few = tmp.path().join("few.json");
    std::fs::write(&few, "[[0,0,10,10],[0,0,10,10]]").unwrap();
    let t = fails(&create_args(s(&tmp.path().join("x")), s(&frames), s(&few), s(&unet), s(&enc)));
    assert!(t.contains("2 crop boxes for 5 template frames"), "{t}");

    // A box off the frame, and an empty one.
    for (json, msg) in [
        (
            "[[0,0,10,10],[0,0,10,10],[600,300,700,400],[0,0,10,10],[0,0,10,10]]",
            "crop box 2 [600, 300, 700, 400] extends past the frame",
        ),
        ("[[0,0,10,10],[5,5,5,9],[0,0,10,10],[0,0,10,10],[0,0,10,10]]", "crop box 1 [5, 5, 5, 9] is empty"),
        ("[[-1,0,10,10],[0,0,10,10],[0,0,10,10],[0,0,10,10],[0,0,10,10]]", "crop box 0 [-1, 0, 10, 10] starts outside"),
        ("{\"not\": \"a list\"}", "invalid boxes file"),
    ] {
        let f = tmp.path().join("b.json");
        std::fs::write(&f, json).unwrap();
        let t = fails(&create_args(s(&tmp.path().join("x")), s(&frames), s(&f), s(&unet), s(&enc)));
        assert!(t.contains(msg), "expected `{msg}` in:\n{t}");
        assert!(msg.contains("invalid") || t.contains("frame is 640x360"), "{t}");
    }
}

#[test]
fn avatar_open_rejects_bad_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let t = fails(&["avatar", "check", s(tmp.path())]);
    assert!(t.contains("not an avatar directory"), "{t}");

    // Copy the golden avatar and break it in several ways.
    let src = fixture("golden/avatar");
    let make = |name: &str, toml: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("avatar.toml"), toml).unwrap();
        dir
    };
    let frames = s(&src.join("frames")).to_string();
    let boxes = s(&src.join("boxes.json")).to_string();
    let unet = s(&fixture("models/unet.onnx")).to_string();
    let enc = s(&fixture("models/audio_encoder.onnx")).to_string();
    let good = format!("video = \"{frames}\"\nboxes = \"{boxes}\"\n[models]\nunet = \"{unet}\"\nencoder = \"{enc}\"\n");
    ok(&["avatar", "check", s(&make("good", &good))]);

    let t = fails(&["avatar", "check", s(&make("syntax", "video = [unclosed"))]);
    assert!(t.contains("invalid") && t.contains("avatar.toml"), "{t}");
    let t = fails(&["avatar", "check", s(&make("unknown", &format!("{good}\nbogus = 1\n")))]);
    assert!(t.contains("unknown field"), "{t}");
    let t = fails(&["avatar", "check", s(&make("quality", &format!("jpeg_quality = 0\n{good}")))]);
    assert!(t.contains("jpeg_quality"), "{t}");
    let t = fails(&["avatar", "check", s(&make("nomodel", &good.replace(&unet, "/nonexistent/unet.onnx")))]);
    assert!(t.contains("UNet model not found: /nonexistent/unet.onnx"), "{t}");
    let t = fails(&["avatar", "check", s(&make("novideo", &good.replace(&frames, "/nonexistent/video.mp4")))]);
    assert!(t.contains("template video not found"), "{t}");

    // A corrupt video file.
    let corrupt = tmp.path().join("corrupt.mp4");
    std::fs::write(&corrupt, vec![0x5au8; 4096]).unwrap();
    let t = fails(&["avatar", "check", s(&make("corrupt", &good.replace(&frames, s(&corrupt))))]);
    assert!(t.contains("could not read video"), "{t}");

    // An empty frames directory.
    let empty = tmp.path().join("emptyframes");
    std::fs::create_dir_all(&empty).unwrap();
    let t = fails(&["avatar", "check", s(&make("empty", &good.replace(&frames, s(&empty))))]);
    assert!(t.contains("has no frames"), "{t}");
}

#[test]
fn import_synctalk_boxes_follow_the_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("st");
    let unet = fixture("models/unet.onnx");
    let enc = fixture("models/audio_encoder.onnx");
    let ds = fixture("synctalk");
    let t = ok(&["avatar", "import-synctalk", s(&ds), s(&out), "--unet", s(&unet), "--encoder", s(&enc)]);
    assert!(t.contains("3 frames 160x90"), "{t}");
    let boxes: Vec<[i64; 4]> = serde_json::from_str(&std::fs::read_to_string(out.join("boxes.json")).unwrap()).unwrap();
    // lms[1].x = 60.7 + i, lms[31].x = 100.9 + i, lms[52].y = 30.6 + i, truncated first.
    assert_eq!(boxes, vec![[60, 30, 100, 70], [61, 31, 101, 71], [62, 32, 102, 72]]);
    assert!(out.join("frames/0.jpg").is_file());

    // A dataset with a missing landmark file.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(broken.join("full_body_img")).unwrap();
    std::fs::create_dir_all(broken.join("landmarks")).unwrap();
    std::fs::copy(ds.join("full_body_img/0.jpg"), broken.join("full_body_img/0.jpg")).unwrap();
    let t = fails(&[
        "avatar",
        "import-synctalk",
        s(&broken),
        s(&tmp.path().join("o")),
        "--unet",
        s(&unet),
        "--encoder",
        s(&enc),
    ]);
    assert!(t.contains("missing landmark file"), "{t}");
    // A short landmark file.
    std::fs::write(broken.join("landmarks/0.lms"), "1 2\n3 4\n").unwrap();
    let t = fails(&[
        "avatar",
        "import-synctalk",
        s(&broken),
        s(&tmp.path().join("o")),
        "--unet",
        s(&unet),
        "--encoder",
        s(&enc),
    ]);
    assert!(t.contains("expected 110 lines"), "{t}");
    // Not a dataset at all.
    let t = fails(&[
        "avatar",
        "import-synctalk",
        s(tmp.path()),
        s(&tmp.path().join("o")),
        "--unet",
        s(&unet),
        "--encoder",
        s(&enc),
    ]);
    assert!(t.contains("missing full_body_img/"), "{t}");
}
