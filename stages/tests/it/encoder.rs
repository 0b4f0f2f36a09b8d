//! The batched audio encoder (tiny model) and the whole streaming audio path against offline.

use crate::common::fixture;
use lipsync_stages::audio::load_16k;
use lipsync_stages::features::{
    extract_windows, frame_audio, pad_features, AudioEncoder, FeatureAssembler, WindowTracker, FEATURE_DIM,
    FRAME_AUDIO_LEN,
};
use lipsync_stages::io::npy::read_f32_2d;
use lipsync_stages::mel::MelSpectrogram;
use lipsync_stages::onnx::{ModelIo, OrtRuntime, SessionOptions};

fn encoder(batch: usize) -> AudioEncoder {
    let rt = OrtRuntime::load(None).expect("ONNX Runtime (run scripts/setup.sh)");
    AudioEncoder::open(
        &rt,
        &fixture("models/audio_encoder.onnx"),
        &ModelIo::default(),
        batch,
        &SessionOptions::default(),
    )
    .unwrap()
}

fn speech_mel() -> Vec<f32> {
    MelSpectrogram::new().compute(&load_16k(&fixture("golden/speech_2s.wav")).unwrap())
}

#[test]
fn features_match_the_reference() {
    let windows = extract_windows(&speech_mel()).unwrap();
    let mut o = Vec::new();
    encoder(64).encode(&windows, &mut o).unwrap();
    let f = pad_features(&o);
    let want = read_f32_2d(&fixture("golden/ref/features.npy")).unwrap();
    assert_eq!(f.len(), want.len());
    // The reference ran ONNX Runtime on another CPU, whose SIMD kernels accumulate in another
    // order: Python's ONNX Runtime on this machine differs from the committed reference by up
    // to 1.1e-4 on features of magnitude up to 57 (mean 5.7). A real error would be O(1).
    let d = f.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(d <= 5e-4, "max |diff| {d}");
}

#[test]
fn batch_size_does_not_change_features() {
    let windows = extract_windows(&speech_mel()).unwrap();
    let run = |batch| {
        let mut o = Vec::new();
        encoder(batch).encode(&windows, &mut o).unwrap();
        o
    };
    let b64 = run(64);
    for batch in [1, 5, 47] {
        assert_eq!(run(batch), b64, "batch {batch}");
    }
}

#[test]
fn wrong_model_is_rejected_with_both_signatures() {
    let rt = OrtRuntime::load(None).unwrap();
    let err = AudioEncoder::open(&rt, &fixture("models/unet.onnx"), &ModelIo::default(), 8, &SessionOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no input named `mel_spectrogram`"), "{err}");
    assert!(
        err.contains("expected inputs `mel_spectrogram` f32 [N,1,80,16] -> outputs `audio_features` f32 [N,512]"),
        "{err}"
    );
    assert!(err.contains("the model has inputs `input` f32 [N,6,320,320]"), "{err}");
    let err = AudioEncoder::open(
        &rt,
        &fixture("models/audio_encoder.onnx"),
        &ModelIo::default(),
        0,
        &SessionOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
}

/// PCM in random chunks -> incremental mel -> streaming windows -> encoder in whatever batches
/// are ready -> feature assembler: every frame tensor equals the offline one bit for bit, and
/// each frame is out as soon as its inputs are final.
#[test]
fn streaming_audio_path_equals_offline() {
    let samples = load_16k(&fixture("golden/speech_2s.wav")).unwrap();
    let offline_f = {
        let windows = extract_windows(&MelSpectrogram::new().compute(&samples)).unwrap();
        let mut o = Vec::new();
        encoder(64).encode(&windows, &mut o).unwrap();
        pad_features(&o)
    };
    let total_frames = offline_f.len() / FEATURE_DIM;
    let mut enc = encoder(16);
    let mut mel = MelSpectrogram::new();
    let mut rows = Vec::new();
    let mut tracker = WindowTracker::new();
    let mut asm = FeatureAssembler::new();
    let mut frames: Vec<(usize, Vec<f32>)> = Vec::new();
    let mut windows = Vec::new();
    let mut o = Vec::new();
    let mut state = 12345u64;
    let mut fed = 0;
    while fed < samples.len() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let take = (1 + (state >> 33) as usize % 1500).min(samples.len() - fed);
        rows.clear();
        mel.push(&samples[fed..fed + take], &mut rows);
        fed += take;
        windows.clear();
        tracker.push(&rows, &mut windows);
        o.clear();
        enc.encode(&windows, &mut o).unwrap();
        asm.push(&o, |i, t| frames.push((i, t.to_vec())));
        // Frame i is out once o_{i+6} is: its window i+6 ends at mel row 16(i+6)/5 + 16.
        let rows_known = tracker.rows();
        let windows_known = (0..).take_while(|&k| 16 * k / 5 + 16 <= rows_known).count();
        assert_eq!(asm.frames(), windows_known.saturating_sub(6), "after {fed} samples");
    }
    rows.clear();
    mel.finish(&mut rows);
    windows.clear();
    tracker.push(&rows, &mut windows);
    tracker.finish(&mut windows).unwrap();
    o.clear();
    enc.encode(&windows, &mut o).unwrap();
    asm.push(&o, |i, t| frames.push((i, t.to_vec())));
    let streamed_before_end = frames.len();
    asm.finish(|i, t| frames.push((i, t.to_vec())));
    assert!(streamed_before_end + 10 > total_frames, "most frames stream before the end");
    assert_eq!(frames.len(), total_frames);
    let mut want = vec![0f32; FRAME_AUDIO_LEN];
    for (i, (idx, t)) in frames.iter().enumerate() {
        assert_eq!(*idx, i);
        frame_audio(&offline_f, i, &mut want);
        assert!(t.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "frame {i} differs");
    }
}
