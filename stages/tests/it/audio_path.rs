//! Audio path against docs/spec.md sections 1, 2 and 7, the seed references and the librosa fixtures.

use crate::common::fixture;
use lipsync_stages::audio::{self, pcm_to_mono, AudioError, PcmFormat, StreamResampler};
use lipsync_stages::features::{
    extract_windows, frame_audio, pad_features, window_count, window_start, FeatureAssembler, FeatureError,
    WindowTracker, FEATURE_DIM, FRAME_AUDIO_LEN, WINDOW_LEN,
};
use lipsync_stages::io::npy::read_f32_2d;
use lipsync_stages::mel::{mel_filterbank, mel_frames, MelSpectrogram, N_BINS, N_MELS};

fn json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A deterministic pseudo-random generator (xorshift) for signals and chunk sizes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn signal(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((self.next() % 20001) as f32 / 10000.0 - 1.0) * 0.3 + (i as f32 * 0.05).sin() * 0.4).collect()
    }
}

#[test]
fn filterbank_equals_librosa_bit_for_bit() {
    let want: Vec<f32> =
        json("seed-mel/mel_filters.json")["filters"].as_array().unwrap().iter().flat_map(f32s).collect();
    let got = mel_filterbank();
    assert_eq!(got.len(), N_MELS * N_BINS);
    let mismatches = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(mismatches, 0, "max diff {}", max_diff(&got, &want));
}

#[test]
fn mel_matches_seed_references() {
    for name in ["seed-mel/ref_correct.json", "seed-mel/ref_video.json"] {
        let v = json(name);
        let audio = f32s(&v["audio"]);
        let want: Vec<f32> = v["mel_spectrogram"].as_array().unwrap().iter().flat_map(f32s).collect();
        let got = MelSpectrogram::new().compute(&audio);
        assert_eq!(got.len(), 52 * N_MELS, "{name}");
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "{name}: max |diff| {d}");
    }
}

#[test]
fn mel_matches_librosa_on_real_speech() {
    let samples = audio::load_16k(&fixture("golden/speech_2s.wav")).unwrap();
    assert_eq!(samples.len(), 32_000);
    let want = read_f32_2d(&fixture("golden/ref/mel.npy")).unwrap();
    let got = MelSpectrogram::new().compute(&samples);
    let d = max_diff(&got, want.as_slice().unwrap());
    assert!(d <= 1e-4, "max |diff| {d}");
}

/// 44.1 and 48 kHz stereo speech give librosa's mel (`librosa.load(sr=16000)`: channels averaged,
/// then libsoxr HQ), whole-file and streamed in odd chunks through the resampler.
#[test]
fn resampled_input_matches_librosa_load() {
    for name in ["clip_44k_stereo", "clip_48k_stereo"] {
        let path = fixture(&format!("audio/{name}.wav"));
        let want = read_f32_2d(&fixture(&format!("audio/librosa_mel_{name}.npy"))).unwrap();
        let want = want.as_slice().unwrap();
        let got = MelSpectrogram::new().compute(&audio::load_16k(&path).unwrap());
        assert_eq!(got.len(), want.len(), "{name}: frame count");
        let d = max_diff(&got, want);
        assert!(d <= 1e-4, "{name}: max |diff| {d} against librosa");
        let decoded = audio::decode_file(&path).unwrap();
        let mut rs = StreamResampler::new(decoded.rate).unwrap();
        let mut streamed = Vec::new();
        for chunk in decoded.samples.chunks(333) {
            rs.push(chunk, &mut streamed).unwrap();
        }
        rs.finish(&mut streamed).unwrap();
        assert_eq!(MelSpectrogram::new().compute(&streamed), got, "{name}: streamed equals whole-file");
    }
}

#[test]
fn incremental_equals_whole_signal_for_every_chunking() {
    let mut rng = Rng(0x5eed);
    for case in 0..40 {
        let n = match case {
            0 => 0,
            1 => 1,
            2 => 399,
            3 => 400,
            4 => 3_000,
            _ => rng.below(12_000),
        };
        let signal = rng.signal(n);
        let whole = MelSpectrogram::new().compute(&signal);
        assert_eq!(whole.len(), mel_frames(n) * N_MELS);
        let mut mel = MelSpectrogram::new();
        let mut out = Vec::new();
        let mut rest = &signal[..];
        let max_chunk = [1, 7, 200, 1000, n + 5000][case % 5];
        while !rest.is_empty() {
            let take = (1 + rng.below(max_chunk)).min(rest.len());
            let before = out.len();
            let rows = mel.push(&rest[..take], &mut out);
            assert_eq!(out.len() - before, rows * N_MELS);
            rest = &rest[take..];
            // Rows are emitted as soon as final: row j needs samples up to 200 j + 400.
            assert_eq!(mel.rows(), if mel.samples() >= 400 { (mel.samples() - 400) / 200 + 1 } else { 0 });
        }
        mel.finish(&mut out);
        assert_eq!(out.len(), whole.len(), "n = {n}");
        assert!(out.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()), "n = {n}: rows differ");
    }
}

#[test]
fn worked_frame_count_table() {
    for (n, t, l, frames) in
        [(3000, 16, 2, 4), (10240, 52, 13, 15), (14720, 74, 20, 22), (16000, 81, 22, 24), (25600, 129, 37, 39)]
    {
        assert_eq!(mel_frames(n), t);
        assert_eq!(window_count(t).unwrap(), l);
        assert_eq!(l + 2, frames);
        let mel = MelSpectrogram::new().compute(&vec![0.01; n]);
        assert_eq!(extract_windows(&mel).unwrap().len(), l * WINDOW_LEN);
    }
}

#[test]
fn window_boundaries() {
    // T = 16: two windows, both the only possible one.
    assert_eq!(window_count(16).unwrap(), 2);
    assert_eq!((window_start(0, 16), window_start(1, 16)), (0, 0));
    // T just over a window edge: window 1 starts at 3 (int(80 * 1/25) = 3), needs 19 rows.
    assert_eq!(window_count(19).unwrap(), 2);
    assert_eq!(window_start(1, 19), 3);
    assert_eq!(window_start(1, 18), 2, "clamped to T - 16");
    // Starts follow floor(16 k / 5).
    for k in 0..2000 {
        assert_eq!(window_start(k, usize::MAX / 2), 16 * k / 5);
    }
    // The last windows clamp to T - 16.
    let t = 81;
    let l = window_count(t).unwrap();
    assert_eq!(l, 22);
    assert_eq!(window_start(l - 1, t), 65);
    assert_eq!(window_start(20, t), 64);
    // Too short: a clear error, no panic.
    for t in [0, 1, 15] {
        assert!(matches!(window_count(t), Err(FeatureError::TooShort { .. })));
    }
    let msg = window_count(15).unwrap_err().to_string();
    assert!(msg.contains("0.1875 s"), "{msg}");
}

#[test]
fn window_layout_is_transposed() {
    let t = 20;
    let mel: Vec<f32> = (0..t * N_MELS).map(|i| i as f32).collect();
    let w = extract_windows(&mel).unwrap();
    // window 1 starts at row 3; w[m * 16 + c] = mel[(3 + c) * 80 + m]
    let w1 = &w[WINDOW_LEN..2 * WINDOW_LEN];
    for m in 0..N_MELS {
        for c in 0..16 {
            assert_eq!(w1[m * 16 + c], mel[(3 + c) * N_MELS + m]);
        }
    }
}

#[test]
fn streaming_windows_equal_offline() {
    let mut rng = Rng(99);
    for n in [3000usize, 3199, 10_240, 16_000, 25_600, 31_999, 64_000, 160_123] {
        let mel = MelSpectrogram::new().compute(&rng.signal(n));
        let offline = extract_windows(&mel).unwrap();
        let mut tracker = WindowTracker::new();
        let mut out = Vec::new();
        let rows = mel.len() / N_MELS;
        let mut known = 0;
        while known < rows {
            let before = known;
            known = (known + 1 + rng.below(9)).min(rows);
            tracker.push(&mel[before * N_MELS..known * N_MELS], &mut out);
            // Bounded: one window, the rows not yet used, and the drop slack.
            assert!(tracker.held_rows() <= 16 + 9 + 64 + 4, "n = {n}: {} rows held", tracker.held_rows());
        }
        tracker.finish(&mut out).unwrap();
        assert_eq!(out, offline, "n = {n}");
    }
}

#[test]
fn padded_features_and_frame_tensors() {
    let l = 5;
    let o: Vec<f32> = (0..l * FEATURE_DIM).map(|i| (i / FEATURE_DIM + 1) as f32).collect();
    let f = pad_features(&o);
    let row = |i: usize| f[i * FEATURE_DIM];
    assert_eq!((0..l + 2).map(row).collect::<Vec<_>>(), vec![1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0]);
    let mut t = vec![0f32; FRAME_AUDIO_LEN];
    frame_audio(&f, 0, &mut t);
    let rows: Vec<f32> = t.chunks_exact(FEATURE_DIM).map(|r| r[0]).collect();
    assert_eq!(rows, vec![0., 0., 0., 0., 0., 0., 0., 0., 1., 1., 2., 3., 4., 5., 5., 0.]);
    frame_audio(&f, 6, &mut t);
    let rows: Vec<f32> = t.chunks_exact(FEATURE_DIM).map(|r| r[0]).collect();
    assert_eq!(rows, vec![0., 0., 1., 1., 2., 3., 4., 5., 5., 0., 0., 0., 0., 0., 0., 0.]);
}

#[test]
fn feature_assembler_streams_bit_identical_frames() {
    let mut rng = Rng(7);
    for l in [1usize, 2, 6, 7, 8, 13, 40, 75, 200] {
        let o: Vec<f32> = (0..l * FEATURE_DIM).map(|_| rng.below(1000) as f32 / 7.0).collect();
        let f = pad_features(&o);
        let mut asm = FeatureAssembler::new();
        let mut got: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut fed = 0;
        while fed < l {
            let take = (1 + rng.below(4)).min(l - fed);
            asm.push(&o[fed * FEATURE_DIM..(fed + take) * FEATURE_DIM], |i, t| got.push((i, t.to_vec())));
            fed += take;
            assert!(asm.held_rows() <= 16 + 8 + 64, "l = {l}: {} rows held", asm.held_rows());
            // Frame i is out as soon as o_{i+6} is known.
            assert_eq!(asm.frames(), fed.saturating_sub(6));
        }
        let total = asm.finish(|i, t| got.push((i, t.to_vec())));
        assert_eq!(total, l + 2);
        assert_eq!(got.len(), l + 2);
        let mut want = vec![0f32; FRAME_AUDIO_LEN];
        for (i, (idx, t)) in got.iter().enumerate() {
            assert_eq!(*idx, i);
            frame_audio(&f, i, &mut want);
            assert_eq!(t, &want, "l = {l}, frame {i}");
        }
    }
}

#[test]
fn pcm_conversion_and_errors() {
    let mut scratch = Vec::new();
    let mut out = Vec::new();
    let bytes: Vec<u8> = [i16::MIN, 0, 16384, -16384].iter().flat_map(|v| v.to_le_bytes()).collect();
    pcm_to_mono(&bytes, PcmFormat::S16Le, 1, &mut scratch, &mut out).unwrap();
    assert_eq!(out, vec![-1.0, 0.0, 0.5, -0.5]);
    out.clear();
    pcm_to_mono(&bytes, PcmFormat::S16Le, 2, &mut scratch, &mut out).unwrap();
    assert_eq!(out, vec![-0.5, 0.0]);
    out.clear();
    let fb: Vec<u8> = [0.25f32, 0.75].iter().flat_map(|v| v.to_le_bytes()).collect();
    pcm_to_mono(&fb, PcmFormat::F32Le, 2, &mut scratch, &mut out).unwrap();
    assert_eq!(out, vec![0.5]);
    let err = pcm_to_mono(&bytes[..3], PcmFormat::S16Le, 1, &mut scratch, &mut out).unwrap_err();
    assert!(matches!(err, AudioError::PartialFrame { .. }), "{err}");
    assert!(matches!(
        pcm_to_mono(&bytes, PcmFormat::S16Le, 0, &mut scratch, &mut out),
        Err(AudioError::BadChannels(0))
    ));
    assert!(matches!(StreamResampler::new(0), Err(AudioError::BadRate(0))));
    assert!(matches!(StreamResampler::new(1_000_000), Err(AudioError::BadRate(_))));
}

#[test]
fn resampler_is_chunking_invariant_and_exact_length() {
    let mut rng = Rng(3);
    for rate in [8_000u32, 22_050, 44_100, 48_000] {
        let input = rng.signal(rate as usize / 3 + 17);
        let mut rs = StreamResampler::new(rate).unwrap();
        let mut whole = Vec::new();
        rs.push(&input, &mut whole).unwrap();
        rs.finish(&mut whole).unwrap();
        assert_eq!(whole.len(), rs.output_len(input.len()));
        assert_eq!(whole.len(), (input.len() as f64 * 16_000.0 / rate as f64).ceil() as usize);
        let mut chunked = Vec::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            let take = (1 + rng.below(3000)).min(rest.len());
            rs.push(&rest[..take], &mut chunked).unwrap();
            rest = &rest[take..];
        }
        rs.finish(&mut chunked).unwrap();
        assert_eq!(chunked, whole, "rate {rate}");
    }
    // A sine keeps its level through resampling (the filter delay is trimmed).
    let rate = 44_100;
    let sine: Vec<f32> =
        (0..rate).map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate as f32).sin() * 0.5).collect();
    let mut out = Vec::new();
    let mut rs = StreamResampler::new(rate as u32).unwrap();
    rs.push(&sine, &mut out).unwrap();
    rs.finish(&mut out).unwrap();
    let want: Vec<f32> =
        (0..16_000).map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16_000.0).sin() * 0.5).collect();
    let d = max_diff(&out[1000..15000], &want[1000..15000]);
    // One sample of misalignment would be 0.086 (the sine's slope); libsoxr's linear-phase
    // filter, its delay trimmed, leaves well under a quarter of that.
    assert!(d < 0.03, "resampled sine off by {d}");
}
