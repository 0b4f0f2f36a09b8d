//! Per-frame image benchmarks at 1280x720: decode (H.264), template fetch, prep (crop + 328
//! bicubic + tensor), paste-back, JPEG encode of the whole frame and of the face region spliced
//! into the template frame's JPEG (the same bytes, lipsync_stages::jpeg); UNet inference at
//! batch 1 and 8 (tiny model, and the full-size one when `models/full` exists).
//!
//! `cargo bench --bench image`

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lipsync_stages::crop::{CropBox, CropParams};
use lipsync_stages::face::{input_len, output_len, template_len, Blend, Compositor, FacePrep};
use lipsync_stages::features::FRAME_AUDIO_LEN;
use lipsync_stages::frame::BgrFrame;
use lipsync_stages::image_io::read_image;
use lipsync_stages::jpeg::{JpegEncoder, JpegLayout, JpegSplicer, McuRegion};
use lipsync_stages::onnx::{ModelIo, OrtRuntime, SessionOptions};
use lipsync_stages::resize::CubicResizer;
use lipsync_stages::template::VideoReader;
use lipsync_stages::unet::{self, Precision, Provider, UnetModel};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A real 1280x720 frame (the golden 640x360 frame scaled up) and its face box.
fn frame_720p() -> (BgrFrame, CropBox) {
    let mut small = BgrFrame::default();
    read_image(&root().join("tests/fixtures/golden/avatar/frames/000000.png"), &mut small).unwrap();
    let mut big = BgrFrame::new(1280, 720);
    CubicResizer::new().resize(&small.data, 640, 360, 1920, &mut big.data, 1280, 720, 3840);
    let boxes: Vec<[i64; 4]> =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/golden/avatar/boxes.json")).unwrap())
            .unwrap();
    let [x1, y1, x2, y2] = boxes[0].map(|v| v * 2);
    (big, CropBox { x1, y1, x2, y2 })
}

fn image(c: &mut Criterion) {
    let crop = CropParams::default();
    let (frame, b) = frame_720p();
    let mut g = c.benchmark_group("frame_720p");
    g.throughput(Throughput::Elements(1));
    let video = root().join("sample/template.mp4");
    if video.is_file() {
        let mut reader = VideoReader::open(&video).unwrap();
        let mut out = BgrFrame::default();
        g.bench_function("decode_h264", |bch| {
            bch.iter(|| {
                if !reader.next(&mut out).unwrap() {
                    reader = VideoReader::open(&video).unwrap();
                }
            })
        });
    } else {
        eprintln!("skipping decode_h264: {} missing (scripts/make_sample.sh makes it)", video.display());
    }
    let mut copy = BgrFrame::default();
    g.bench_function("template_fetch", |bch| bch.iter(|| copy.copy_from(&frame)));
    let mut prep = FacePrep::new();
    let mut tmpl = vec![0u8; template_len(&crop)];
    let mut tensor = vec![0f32; input_len(&crop)];
    g.bench_function("prep", |bch| bch.iter(|| prep.prep(&frame, b, &crop, &mut tmpl, &mut tensor)));
    let output = vec![0.5f32; output_len(&crop)];
    let mut comp = Compositor::new();
    let mut target = frame.clone();
    g.bench_function("paste_hard", |bch| bch.iter(|| comp.paste(&mut target, b, &crop, &tmpl, &output, Blend::Hard)));
    g.bench_function("paste_feather8", |bch| {
        bch.iter(|| comp.paste(&mut target, b, &crop, &tmpl, &output, Blend::Feather { px: 8 }))
    });
    let mut enc = JpegEncoder::new(90).unwrap();
    g.bench_function("jpeg_q90", |bch| bch.iter(|| enc.encode(&frame).unwrap().len()));
    let base = enc.encode(&frame).unwrap().to_vec();
    let region = McuRegion::around(b, frame.width, frame.height);
    let mut pixels = BgrFrame::default();
    region.copy_out(&frame, &mut pixels);
    let mut layout = JpegLayout::default();
    layout.parse(&base).unwrap();
    let mut splicer = JpegSplicer::new(90).unwrap();
    let mut out = Vec::with_capacity(lipsync_stages::jpeg::max_len(frame.width, frame.height));
    let size = (frame.width, frame.height);
    g.bench_function("jpeg_splice_q90", |bch| {
        bch.iter(|| {
            splicer.splice(&base, &layout, size, &pixels, region, &mut out).unwrap();
            out.len()
        })
    });
    g.finish();
}

fn unet(c: &mut Criterion) {
    let rt = OrtRuntime::load(None).expect("ONNX Runtime: run scripts/setup.sh");
    let crop = CropParams::default();
    let mut g = c.benchmark_group("unet");
    g.sample_size(10);
    for (name, path) in
        [("tiny", root().join("tests/fixtures/models/unet.onnx")), ("full", root().join("models/full/unet.onnx"))]
    {
        if !path.is_file() {
            eprintln!("skipping the {name} UNet: {} missing", path.display());
            continue;
        }
        for batch in [1usize, 8] {
            let opts = SessionOptions { intra_threads: 2, spinning: false };
            let b = lipsync_stages::unet::Batch::new(batch).unwrap();
            let model = UnetModel { path: path.clone(), precision: Precision::Fp32, io: ModelIo::default(), crop };
            let mut u = unet::open(&rt, &model, b, &opts, Provider::Cpu, None).unwrap();
            let images = vec![0.4f32; batch * input_len(&crop)];
            let audio = vec![0.3f32; batch * FRAME_AUDIO_LEN];
            let mut out = vec![0f32; batch * output_len(&crop)];
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(BenchmarkId::new(name, format!("batch{batch}")), |bch| {
                bch.iter(|| unet::run_slices(u.as_mut(), batch, &images, &audio, &mut out).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, image, unet);
criterion_main!(benches);
