//! The image path against OpenCV and the Python reference's dumps.

use lipsync_stages::frame::BgrFrame;
use lipsync_stages::image_io::read_image;
use lipsync_stages::resize::CubicResizer;

fn load(rel: &str) -> BgrFrame {
    let mut f = BgrFrame::default();
    read_image(&fixture(rel), &mut f).unwrap_or_else(|e| panic!("{rel}: {e}"));
    f
}

/// Bit for bit against OpenCV's own INTER_CUBIC algorithm; within one level on a few percent
/// of values against the IPP-accelerated path that `cv2.resize` takes by default.
#[test]
fn cubic_resize_matches_opencv() {
    let cases: Vec<(String, usize, usize)> =
        serde_json::from_str(&std::fs::read_to_string(fixture("resize/cases.json")).unwrap()).unwrap();
    let mut r = CubicResizer::new();
    for (name, w, h) in cases {
        let src = load(&format!("resize/{name}.png"));
        let mut got = BgrFrame::new(w, h);
        r.resize(&src.data, src.width, src.height, src.stride(), &mut got.data, w, h, w * 3);
        let generic = load(&format!("resize/{name}_{w}x{h}_generic.png"));
        assert!(got.data == generic.data, "{name} -> {w}x{h}: differs from OpenCV's generic resize");
        let ipp = load(&format!("resize/{name}_{w}x{h}.png"));
        let diffs: Vec<i32> =
            got.data.iter().zip(&ipp.data).map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs()).collect();
        let max = diffs.iter().copied().max().unwrap();
        let off = diffs.iter().filter(|&&d| d > 0).count() as f64 / diffs.len() as f64;
        assert!(max <= 1 && off < 0.1, "{name} -> {w}x{h}: max diff {max}, {:.2}% differ", off * 100.0);
    }
}

use crate::common::fixture;
use lipsync_stages::crop::CropParams;
use lipsync_stages::face::{input_len, output_len, template_index, template_len, Blend, Compositor, FacePrep};
use lipsync_stages::features::{frame_audio, FRAME_AUDIO_LEN};
use lipsync_stages::image_io::{decode_image, encode_png};
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::io::npy::read_f32_2d;
use lipsync_stages::io::video::VideoError;
use lipsync_stages::jpeg::JpegEncoder;
use lipsync_stages::onnx::{OrtRuntime, SessionOptions};
use lipsync_stages::template::{SharedTemplate, TemplateReader, VideoReader, DEFAULT_CACHE};
use lipsync_stages::unet::{self, Provider};

fn diff_stats(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
    let mean = a.iter().zip(b).map(|(x, y)| f64::from(x.abs_diff(*y))).sum::<f64>() / a.len() as f64;
    (max, mean)
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

#[test]
fn ping_pong_order() {
    let seq: Vec<usize> = (0..13).map(|i| template_index(i, 5, 0)).collect();
    assert_eq!(seq, vec![1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4, 3]);
    assert_eq!((0..4).map(|i| template_index(i, 2, 0)).collect::<Vec<_>>(), vec![1, 0, 1, 0]);
    assert_eq!((0..3).map(|i| template_index(i, 1, 0)).collect::<Vec<_>>(), vec![0, 0, 0]);
    assert_eq!((0..4).map(|i| template_index(i, 5, 3)).collect::<Vec<_>>(), vec![4, 0, 1, 2]);
}

/// Prep, UNet and paste-back on the golden avatar against the reference's dumps: the crop, the
/// prediction and the finished frame (identical outside the box, PSNR >= 45 dB inside).
#[test]
fn image_path_matches_the_reference() {
    let avatar = Avatar::open(&fixture("golden/avatar")).unwrap();
    let crop: CropParams = avatar.config.crop;
    let mut template = open_template(&avatar.video, DEFAULT_CACHE).unwrap();
    assert_eq!(template.len(), 5);
    let f = read_f32_2d(&fixture("golden/ref/features.npy")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/ref/meta.json")).unwrap()).unwrap();
    let rt = OrtRuntime::load(None).unwrap();
    let model = avatar.unet_model(Default::default(), Provider::Cpu).unwrap();
    let batch = lipsync_stages::unet::Batch::new(4).unwrap();
    let mut unet = unet::open(&rt, &model, batch, &SessionOptions::default(), Provider::Cpu, None).unwrap();
    let mut prep = FacePrep::new();
    let mut comp = Compositor::new();
    let mut frame = BgrFrame::default();
    let mut tmpl = vec![0u8; template_len(&crop)];
    let mut tensor = vec![0f32; input_len(&crop)];
    let mut audio = vec![0f32; FRAME_AUDIO_LEN];
    let mut out = vec![0f32; output_len(&crop)];
    for i in meta["dumped_frames"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize) {
        let t = template_index(i, template.len(), avatar.config.start_frame);
        template.get(t, &mut frame).unwrap();
        let b = avatar.boxes[t];
        prep.prep(&frame, b, &crop, &mut tmpl, &mut tensor);

        let want = load(&format!("golden/ref/crop328_{i:06}.png"));
        let (max, mean) = diff_stats(&tmpl, &want.data);
        assert!(max <= 1 && mean <= 0.1, "frame {i} crop: max {max}, mean {mean}");
        // The input tensor is the crop / 255 with the mask: within 1/255, mean <= 0.1/255.
        let s = 320;
        let mut worst = 0f32;
        let mut total = 0f64;
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let r = f32::from(want.data[((y + 4) * 328 + x + 4) * 3 + c]) / 255.0;
                    let d = (tensor[c * s * s + y * s + x] - r).abs();
                    worst = worst.max(d);
                    total += f64::from(d);
                    let masked = tensor[(3 + c) * s * s + y * s + x];
                    let in_mask = (5..=309).contains(&y) && (5..=314).contains(&x);
                    assert_eq!(masked, if in_mask { 0.0 } else { tensor[c * s * s + y * s + x] });
                }
            }
        }
        assert!(worst <= 1.0 / 255.0 + 1e-7 && total / (3 * s * s) as f64 <= 0.1 / 255.0, "frame {i}: tensor {worst}");

        frame_audio(f.as_slice().unwrap(), i, &mut audio);
        unet::run_slices(unet.as_mut(), 1, &tensor, &audio, &mut out).unwrap();
        comp.paste(&mut frame, b, &crop, &tmpl, &out, Blend::Hard);
        let want = load(&format!("golden/ref/frame_{i:06}.png"));
        let (bx1, by1, bx2, by2) = (b.x1 as usize, b.y1 as usize, b.x2 as usize, b.y2 as usize);
        let (mut inside_a, mut inside_b, mut outside_diff) = (Vec::new(), Vec::new(), 0usize);
        for y in 0..frame.height {
            for x in 0..frame.width {
                let p = (y * frame.width + x) * 3;
                if (bx1..bx2).contains(&x) && (by1..by2).contains(&y) {
                    inside_a.extend_from_slice(&frame.data[p..p + 3]);
                    inside_b.extend_from_slice(&want.data[p..p + 3]);
                } else if frame.data[p..p + 3] != want.data[p..p + 3] {
                    outside_diff += 1;
                }
            }
        }
        assert_eq!(outside_diff, 0, "frame {i}: pixels outside the box differ");
        let p = psnr(&inside_a, &inside_b);
        assert!(p >= 45.0, "frame {i}: PSNR inside the box {p:.1} dB");
        eprintln!("frame {i}: crop max {max} mean {mean:.4}; box PSNR {p:.1} dB");
    }
}

#[test]
fn feather_blend_ramps_at_the_edge_only() {
    let crop = CropParams::default();
    let mut base = BgrFrame::new(200, 160);
    base.data.fill(10);
    let b = lipsync_stages::crop::CropBox { x1: 40, y1: 30, x2: 140, y2: 130 };
    let tmpl = vec![200u8; template_len(&crop)];
    let out = vec![1.0f32; output_len(&crop)];
    let mut hard = base.clone();
    Compositor::new().paste(&mut hard, b, &crop, &tmpl, &out, Blend::Hard);
    let mut soft = base.clone();
    Compositor::new().paste(&mut soft, b, &crop, &tmpl, &out, Blend::Feather { px: 8 });
    let at = |f: &BgrFrame, x: usize, y: usize| f.data[(y * f.width + x) * 3];
    assert_eq!(at(&hard, 90, 80), 255);
    assert_eq!(at(&soft, 90, 80), 255, "interior unchanged");
    assert_eq!(at(&soft, 10, 10), 10, "outside untouched");
    let edge = at(&soft, 40, 80);
    assert!(edge > 10 && edge < 60, "edge mostly original: {edge}");
    let mid = at(&soft, 44, 80);
    assert!(mid > 100 && mid < 200, "ramp: {mid}");
    assert!("feather=0".parse::<Blend>().is_err() && "soft".parse::<Blend>().is_err());
    assert_eq!("feather=12".parse::<Blend>().unwrap(), Blend::Feather { px: 12 });
}

#[test]
fn video_containers_decode_like_ffmpeg() {
    let want0 = load("video/h264_decoded_0.png");
    let want4 = load("video/h264_decoded_4.png");
    let mut frame = BgrFrame::default();
    let mut t = open_template(&fixture("video/h264.mp4"), DEFAULT_CACHE).unwrap();
    assert_eq!((t.len(), t.size(), t.fps()), (5, (640, 360), Some(25.0)));
    t.get(0, &mut frame).unwrap();
    assert!(frame.data == want0.data, "frame 0 equals the reference's decode");
    t.get(4, &mut frame).unwrap();
    assert!(frame.data == want4.data, "frame 4 equals the reference's decode");
    // A video is held as its packets: a small fraction of its decoded frames.
    assert!(t.template().memory_bytes() < 5 * 640 * 360 * 3 / 4, "{}", t.template().memory_bytes());
    assert_eq!(t.compressed_frames(), 0);
    for name in ["h264.mov", "h264.mkv", "vp9.webm", "mjpeg.avi"] {
        let mut v = open_template(&fixture(&format!("video/{name}")), DEFAULT_CACHE).unwrap();
        assert_eq!((v.len(), v.size()), (5, (640, 360)), "{name}");
        v.get(0, &mut frame).unwrap();
        let (_, mean) = diff_stats(&frame.data, &load("golden/avatar/frames/000000.png").data);
        assert!(mean < 4.0, "{name}: mean abs diff to the source frame {mean}");
    }
    let v = open_template(&fixture("video/h264_30fps.mp4"), DEFAULT_CACHE).unwrap();
    assert_eq!(v.fps(), Some(30.0));
}

/// Every frame of `name`, decoded from the start in order.
fn sequential(name: &str) -> Vec<BgrFrame> {
    let mut r = VideoReader::open(&fixture(name)).unwrap();
    let mut frames = Vec::new();
    let mut f = BgrFrame::default();
    while r.next(&mut f).unwrap() {
        frames.push(f.clone());
    }
    frames
}

/// Bytes of every decoded frame of `t`.
fn n_bytes(t: &SharedTemplate) -> usize {
    t.len() * t.decoded_frame_bytes()
}

/// A reader with a ring of a few frames walks the ping-pong (forwards, then backwards, then
/// forwards again) and a random order, restarting at keyframes (closed and open GOPs, with
/// B-frames), and serves exactly the frames of a decode from the start, at a bounded cost.
#[test]
fn template_reader_serves_any_order_exactly() {
    for name in ["video/gop10.mp4", "video/opengop10.mp4"] {
        let want = sequential(name);
        assert_eq!(want.len(), 60, "{name}");
        let shared = std::sync::Arc::new(SharedTemplate::open(&fixture(name), 0).unwrap());
        assert_eq!(shared.len(), 60);
        assert!(shared.restart_points() >= 5, "{name}: keyframes every 10 frames, got {}", shared.restart_points());
        // Room for 4 decoded frames.
        assert!(shared.decoded_frame_bytes() >= 160 * 96 * 3 / 2);
        let mut reader = shared.clone().reader(4 * shared.decoded_frame_bytes());
        assert_eq!(shared.reader_bytes(4 * shared.decoded_frame_bytes()), 4 * shared.decoded_frame_bytes());
        // The backward pass's estimated cost: (half a 10-frame GOP + a 4-frame ring) / 4; one
        // decode a frame when the ring holds the whole template.
        let per_frame = shared.backward_decodes_per_frame(4 * shared.decoded_frame_bytes());
        assert!((per_frame - 9.0 / 4.0).abs() < 1e-9, "{name}: {per_frame}");
        assert_eq!(shared.backward_decodes_per_frame(n_bytes(&shared)), 1.0);
        let mut frame = BgrFrame::default();
        let n = shared.len();
        let cycle: Vec<usize> = (0..3 * n).map(|i| lipsync_stages::face::template_index(i, n, 0)).collect();
        for &i in &cycle {
            reader.get(i, &mut frame).unwrap();
            assert!(frame.data == want[i].data, "{name}: frame {i}");
        }
        // Forward passes decode each frame once; a backward pass at most a GOP plus a ring per
        // ring's worth of frames: far from the quadratic cost of decoding from the start.
        assert!(reader.decoded() < 3 * n as u64 + n as u64 * 4, "{name}: {} decodes", reader.decoded());
        let mut order: Vec<usize> = (0..n).collect();
        let mut seed = 7u64;
        for k in (1..n).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(k, (seed >> 33) as usize % (k + 1));
        }
        for &i in &order {
            reader.get(i, &mut frame).unwrap();
            assert!(frame.data == want[i].data, "{name}: random frame {i}");
        }
        assert!(reader.get(n, &mut frame).unwrap_err().to_string().contains("holds 60 frames"));
    }
}

/// A frames directory is decoded at open: raw frames within the budget, the rest compressed,
/// the same pixels either way.
#[test]
fn frames_directory_templates_hold_raw_or_compressed_frames() {
    let dir = fixture("golden/avatar/frames");
    let raw = open_template(&dir, 1 << 30).unwrap();
    let z = open_template(&dir, 0).unwrap();
    assert_eq!((raw.compressed_frames(), z.compressed_frames()), (0, z.len()));
    assert!(z.memory_bytes() < raw.memory_bytes());
    let (mut a, mut b) = (BgrFrame::default(), BgrFrame::default());
    let (mut raw, mut z) = (raw, z);
    for i in (0..raw.len()).rev() {
        raw.get(i, &mut a).unwrap();
        z.get(i, &mut b).unwrap();
        assert!(a.data == b.data, "frame {i}");
    }
    assert!(a.data == load("golden/avatar/frames/000000.png").data);
}

#[test]
fn bad_videos_have_clear_errors() {
    let e = open_template(&fixture("audio/clip.wav"), DEFAULT_CACHE).unwrap_err();
    assert!(matches!(e, VideoError::NoVideoStream(_)), "{e}");
    let e = open_template(&fixture("video/absent.mp4"), DEFAULT_CACHE).unwrap_err();
    assert!(matches!(e, VideoError::Missing(_)), "{e}");
    let e = open_template(&fixture("audio/not_audio.wav"), DEFAULT_CACHE).unwrap_err();
    assert!(e.to_string().contains("could not read video"), "{e}");
    // A truncated file yields the frames before the cut, or an error naming the problem.
    match open_template(&fixture("video/truncated.mkv"), DEFAULT_CACHE) {
        Ok(t) => assert!(t.len() < 5, "truncated file cannot hold all frames"),
        Err(e) => assert!(e.to_string().contains("truncated.mkv"), "{e}"),
    }
    match open_template(&fixture("video/corrupt.mp4"), DEFAULT_CACHE) {
        Ok(t) => assert_eq!(t.len(), 5, "corrupt payload may decode with artefacts"),
        Err(e) => assert!(e.to_string().contains("corrupt.mp4"), "{e}"),
    }
}

#[test]
fn jpeg_and_png_round_trip() {
    let src = load("golden/avatar/frames/000000.png");
    let mut enc = JpegEncoder::new(90).unwrap();
    let jpeg = enc.encode(&src).unwrap().to_vec();
    assert!(jpeg.starts_with(&[0xFF, 0xD8]) && jpeg.len() < src.data.len() / 5);
    let mut back = BgrFrame::default();
    decode_image(&jpeg, &mut back).unwrap();
    assert_eq!((back.width, back.height), (640, 360));
    let p = psnr(&back.data, &src.data);
    assert!(p > 33.0, "JPEG q90 PSNR {p:.1}");
    let (mut png, mut scratch) = (Vec::new(), Vec::new());
    encode_png(&src, &mut png, &mut scratch).unwrap();
    decode_image(&png, &mut back).unwrap();
    assert!(back.data == src.data, "PNG is lossless");
    assert!(decode_image(b"garbage", &mut back).is_err());
}

/// Opens a template and a reader of it with the default cache.
fn open_template(
    path: &std::path::Path,
    budget: usize,
) -> Result<TemplateReader, lipsync_stages::io::video::VideoError> {
    Ok(std::sync::Arc::new(SharedTemplate::open(path, budget)?).reader(DEFAULT_CACHE))
}
