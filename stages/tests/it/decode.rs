//! Decoding every supported container/codec, resampling, and each kind of bad input.

use std::path::PathBuf;

use lipsync_stages::audio::{decode_file, load_16k, AudioError};

fn audio(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/audio").join(name)
}

#[test]
fn wav_and_flac_decode_to_the_same_samples() {
    let wav = decode_file(&audio("clip.wav")).unwrap();
    assert_eq!((wav.rate, wav.channels), (16_000, 1));
    assert_eq!(wav.samples.len(), 9_600);
    let flac = decode_file(&audio("clip.flac")).unwrap();
    assert_eq!(flac.samples, wav.samples, "FLAC is lossless");
    assert!(wav.samples.iter().all(|s| (-1.0..=1.0).contains(s)));
    assert!(wav.samples.iter().any(|s| s.abs() > 0.05), "real speech, not silence");
}

/// Normalised cross-correlation of `a` against `b` at the best lag in `0..max_lag`.
fn best_match(a: &[f32], b: &[f32], max_lag: usize) -> (usize, f32) {
    let n = b.len().min(a.len().saturating_sub(max_lag));
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    let nb = dot(&b[..n], &b[..n]).sqrt();
    (0..max_lag)
        .map(|lag| {
            let seg = &a[lag..lag + n];
            (lag, dot(seg, &b[..n]) / (dot(seg, seg).sqrt() * nb))
        })
        .fold((0, f32::MIN), |best, x| if x.1 > best.1 { x } else { best })
}

fn energy(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32
}

#[test]
fn lossy_and_video_containers_decode_and_resample() {
    let reference = load_16k(&audio("clip.wav")).unwrap();
    // The stereo fixtures were upmixed by FFmpeg at -3 dB per channel, so their average (what
    // docs/spec.md and the reference do) has half the energy. AAC keeps its encoder priming samples
    // (symphonia's MP4 reader is not gapless): up to 2112 samples at 22.05 kHz.
    for (name, rate, channels, gain, max_lag) in [
        ("clip.mp3", 44_100, 2, 0.5, 40),
        ("clip.m4a", 22_050, 1, 1.0, 1600),
        ("clip.ogg", 48_000, 2, 0.5, 40),
        ("clip_av.mp4", 16_000, 1, 1.0, 1100),
    ] {
        let d = decode_file(&audio(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((d.rate, d.channels), (rate, channels), "{name}");
        let s = load_16k(&audio(name)).unwrap();
        assert!(s.len().abs_diff(reference.len()) < 3_000, "{name}: {} samples vs {}", s.len(), reference.len());
        let (lag, corr) = best_match(&s, &reference[..8000], max_lag);
        assert!(corr > 0.9, "{name}: correlation {corr} at lag {lag}");
        let ratio = energy(&s[lag..lag + 8000]) / energy(&reference[..8000]);
        assert!((ratio / gain - 1.0).abs() < 0.2, "{name}: energy ratio {ratio}, expected {gain}");
    }
}

#[test]
fn stereo_44k_is_mixed_and_resampled_to_exact_length() {
    let d = decode_file(&audio("clip_44k_stereo.wav")).unwrap();
    assert_eq!((d.rate, d.channels), (44_100, 2));
    let s = load_16k(&audio("clip_44k_stereo.wav")).unwrap();
    assert_eq!(s.len(), (d.samples.len() as f64 * 16_000.0 / 44_100.0).ceil() as usize);
    let reference = load_16k(&audio("clip.wav")).unwrap();
    let (lag, corr) = best_match(&s, &reference[..9000], 5);
    assert_eq!(lag, 0, "no delay after resampling");
    assert!(corr > 0.99, "correlation {corr}");
    let ratio = energy(&s) / energy(&reference);
    assert!((ratio - 0.5).abs() < 0.02, "channels averaged (-3 dB upmix): energy ratio {ratio}");
}

#[test]
fn bad_inputs_have_their_own_errors() {
    let err = |name: &str| decode_file(&audio(name)).map(|d| d.samples.len()).unwrap_err();
    let e = err("absent.wav");
    assert!(matches!(e, AudioError::Missing(_)), "{e}");
    let e = err("not_audio.wav");
    assert!(matches!(e, AudioError::UnknownFormat { .. }), "{e}");
    assert!(e.to_string().contains("expected WAV"), "{e}");
    let e = err("video_only.mp4");
    assert!(matches!(e, AudioError::NoAudioTrack(_)), "{e}");
    let e = err("empty.wav");
    assert!(matches!(e, AudioError::Empty(_)), "{e}");
    assert!(e.to_string().contains("zero-length"), "{e}");
    let e = err("corrupt.m4a");
    assert!(matches!(e, AudioError::Corrupt { .. }), "{e}");
    // Too short decodes; the window stage rejects it (see audio_path.rs and the CLI tests).
    assert_eq!(decode_file(&audio("short_0.1s.wav")).unwrap().samples.len(), 1_600);
}
