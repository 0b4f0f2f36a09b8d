//! Audio path benchmarks: mel for 1 s and 60 s, window extraction for 60 s, the audio encoder
//! at batch 1 and 64 (tiny model from the fixtures; the full-size one when `models/full`
//! exists, made by scripts/make_sample.sh).
//!
//! `cargo bench --bench audio`

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lipsync_stages::audio::load_16k;
use lipsync_stages::features::{extract_windows, AudioEncoder, WINDOW_LEN};
use lipsync_stages::mel::MelSpectrogram;
use lipsync_stages::onnx::{ModelIo, OrtRuntime, SessionOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `seconds` of real speech (the 2 s fixture repeated).
fn speech(seconds: usize) -> Vec<f32> {
    let clip = load_16k(&root().join("tests/fixtures/golden/speech_2s.wav")).expect("fixture");
    clip.iter().cycle().take(seconds * 16_000).copied().collect()
}

fn mel(c: &mut Criterion) {
    let mut g = c.benchmark_group("mel");
    let mut m = MelSpectrogram::new();
    for seconds in [1usize, 60] {
        let samples = speech(seconds);
        g.throughput(Throughput::Elements(seconds as u64));
        g.bench_function(BenchmarkId::new("whole_signal", format!("{seconds}s")), |b| b.iter(|| m.compute(&samples)));
    }
    let samples = speech(60);
    let mut out = Vec::with_capacity(128 * 80);
    g.throughput(Throughput::Elements(60));
    g.bench_function("incremental_20ms_chunks/60s", |b| {
        b.iter(|| {
            for chunk in samples.chunks(320) {
                out.clear();
                m.push(chunk, &mut out);
            }
            m.finish(&mut out);
        })
    });
    g.finish();
}

fn windows(c: &mut Criterion) {
    let mel = MelSpectrogram::new().compute(&speech(60));
    c.bench_function("windows/60s", |b| b.iter(|| extract_windows(&mel).unwrap()));
}

fn encoder(c: &mut Criterion) {
    let rt = OrtRuntime::load(None).expect("ONNX Runtime: run scripts/setup.sh");
    let mel = MelSpectrogram::new().compute(&speech(4));
    let windows = extract_windows(&mel).unwrap();
    let mut g = c.benchmark_group("encoder");
    g.sample_size(10);
    let models: Vec<(&str, PathBuf)> = [
        ("tiny", root().join("tests/fixtures/models/audio_encoder.onnx")),
        ("full", root().join("models/full/audio_encoder.onnx")),
    ]
    .into_iter()
    .filter(|(name, p)| {
        let ok = Path::new(p).is_file();
        if !ok {
            eprintln!("skipping the {name} encoder: {} missing (scripts/make_sample.sh makes it)", p.display());
        }
        ok
    })
    .collect();
    for (name, path) in models {
        for batch in [1usize, 64] {
            let mut enc =
                AudioEncoder::open(&rt, &path, &ModelIo::default(), batch, &SessionOptions::default()).unwrap();
            let input = &windows[..batch * WINDOW_LEN];
            let mut out = Vec::new();
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(BenchmarkId::new(name, format!("batch{batch}")), |b| {
                b.iter(|| {
                    out.clear();
                    enc.encode(input, &mut out).unwrap();
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, mel, windows, encoder);
criterion_main!(benches);
