//! Audio decoding: files (WAV, MP3, AAC/M4A, FLAC, OGG/Vorbis, the audio track of MP4/MOV/MKV)
//! through symphonia, and raw PCM (s16le / f32le) for streaming; mixed down to mono and
//! resampled to 16 kHz with libsoxr (as librosa does). Output is f32 in [-1, 1] (int16 / 32768).

use std::path::{Path, PathBuf};

mod file;

pub use file::{decode_bytes, decode_file, AudioFileReader};

/// The sample rate every stage after decoding works at.
pub const SAMPLE_RATE: u32 = 16_000;

/// Lowest and highest input sample rates accepted.
pub const RATE_RANGE: std::ops::RangeInclusive<u32> = 4_000..=384_000;

/// Errors from decoding or resampling audio.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// The file does not exist.
    #[error("audio file not found: {0}")]
    Missing(PathBuf),
    /// The file could not be opened.
    #[error("could not open audio file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No demuxer recognises the file.
    #[error("unknown or unsupported audio format in {path}: {message} (expected WAV, MP3, AAC/M4A, FLAC, OGG/Vorbis or an MP4/MOV/MKV with an audio track)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// symphonia's message.
        message: String,
    },
    /// The container has no audio track.
    #[error("{0} has no audio track")]
    NoAudioTrack(PathBuf),
    /// The audio codec is not supported.
    #[error("unsupported audio codec in {path}: {message}")]
    UnsupportedCodec {
        /// The file.
        path: PathBuf,
        /// symphonia's message.
        message: String,
    },
    /// Reading or decoding failed part-way (corrupt or truncated data).
    #[error("corrupt audio in {path} after {decoded_seconds:.3} s of audio: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// How much audio decoded before the failure.
        decoded_seconds: f64,
        /// symphonia's message.
        message: String,
    },
    /// The file decodes to no samples at all.
    #[error("{0} contains no audio samples (zero-length audio)")]
    Empty(PathBuf),
    /// A sample rate outside [`RATE_RANGE`], or a track that states none.
    #[error("unsupported sample rate {0} Hz (expected 4000..=384000 Hz)")]
    BadRate(u32),
    /// A channel count of zero.
    #[error("audio has {0} channels (expected at least 1)")]
    BadChannels(usize),
    /// A sample that is NaN or infinite (float input only).
    #[error("audio sample {index} (at {seconds:.3} s) is {value}: expected finite samples")]
    NonFinite {
        /// Index of the first bad sample (per channel, from the start of the stream or file).
        index: usize,
        /// Its time.
        seconds: f64,
        /// What it is (`NaN`, `inf` or `-inf`).
        value: f32,
    },
    /// Raw PCM bytes that do not hold whole samples.
    #[error("raw {format} PCM needs a multiple of {frame_bytes} bytes per chunk (whole frames), got {len}")]
    PartialFrame {
        /// The PCM format.
        format: &'static str,
        /// Bytes per frame (sample size x channels).
        frame_bytes: usize,
        /// Bytes given.
        len: usize,
    },
    /// The resampler failed.
    #[error("resampling failed: {0}")]
    Resample(String),
}

/// Raw PCM sample formats for streaming input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcmFormat {
    /// Signed 16-bit little-endian.
    S16Le,
    /// 32-bit float little-endian.
    F32Le,
}

impl PcmFormat {
    /// Bytes per sample.
    pub fn sample_bytes(self) -> usize {
        match self {
            PcmFormat::S16Le => 2,
            PcmFormat::F32Le => 4,
        }
    }

    /// The format's name.
    pub fn name(self) -> &'static str {
        match self {
            PcmFormat::S16Le => "s16le",
            PcmFormat::F32Le => "f32le",
        }
    }
}

/// Decoded audio before resampling.
#[derive(Debug, Clone)]
pub struct DecodedAudio {
    /// Mono samples (channels averaged), f32 in [-1, 1].
    pub samples: Vec<f32>,
    /// Sample rate of `samples`.
    pub rate: u32,
    /// Channel count of the source.
    pub channels: usize,
}

/// Averages interleaved frames of `channels` channels into mono, appending to `out`
/// (sum in channel order, then divide, in f32: what numpy's `mean(axis=1)` does).
pub fn mix_to_mono(interleaved: &[f32], channels: usize, out: &mut Vec<f32>) {
    if channels == 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let n = channels as f32;
    out.extend(interleaved.chunks_exact(channels).map(|f| f.iter().fold(0.0f32, |a, &b| a + b) / n));
}

/// Decodes a file and returns mono f32 samples at [`SAMPLE_RATE`] (resampled packet by packet,
/// so only the 16 kHz signal is ever held whole).
pub fn load_16k(path: &Path) -> Result<Vec<f32>, AudioError> {
    let mut file = AudioFile16k::open(path)?;
    let mut out = Vec::new();
    while file.read(&mut out)? {}
    Ok(out)
}

/// An audio file read packet by packet as mono f32 at [`SAMPLE_RATE`]: an [`AudioFileReader`]
/// through a [`StreamResampler`], whose flush ends the stream. The samples are
/// [`load_16k`]'s, however they are read.
#[derive(Debug)]
pub struct AudioFile16k {
    reader: AudioFileReader,
    resampler: Option<StreamResampler>,
    raw: Vec<f32>,
    ended: bool,
}

impl AudioFile16k {
    /// Opens `path` (errors as [`AudioFileReader::open`]).
    pub fn open(path: &Path) -> Result<Self, AudioError> {
        Ok(Self { reader: AudioFileReader::open(path)?, resampler: None, raw: Vec::new(), ended: false })
    }

    /// Appends the next packet's samples, at 16 kHz, to `out`; at the end of the stream appends
    /// the resampler's tail and returns `Ok(false)`.
    pub fn read(&mut self, out: &mut Vec<f32>) -> Result<bool, AudioError> {
        if self.ended {
            return Ok(false);
        }
        self.raw.clear();
        let more = self.reader.read(&mut self.raw)?;
        // The rate is known once a packet has decoded (the reader ends only after samples).
        let rs = match &mut self.resampler {
            Some(rs) => rs,
            None => self.resampler.insert(StreamResampler::new(self.reader.rate())?),
        };
        rs.push(&self.raw, out)?;
        if !more {
            rs.finish(out)?;
            self.ended = true;
        }
        Ok(more)
    }
}

/// Refuses NaN and infinite samples, naming the first (`offset`: samples before `samples` in
/// the stream). Finite values are taken as they are, beyond [-1, 1] too, as librosa takes
/// them: the mel is defined for any finite input and clips its own output.
pub fn check_finite(samples: &[f32], offset: usize, rate: u32) -> Result<(), AudioError> {
    match samples.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let index = offset + i;
            Err(AudioError::NonFinite { index, seconds: index as f64 / f64::from(rate.max(1)), value: samples[i] })
        }
    }
}

/// Converts raw PCM bytes (whole interleaved frames) to mono f32, appending to `out`.
/// `scratch` holds the interleaved samples and is reused between calls.
pub fn pcm_to_mono(
    bytes: &[u8],
    format: PcmFormat,
    channels: usize,
    scratch: &mut Vec<f32>,
    out: &mut Vec<f32>,
) -> Result<(), AudioError> {
    if channels == 0 {
        return Err(AudioError::BadChannels(0));
    }
    let frame_bytes = format.sample_bytes() * channels;
    if bytes.len() % frame_bytes != 0 {
        return Err(AudioError::PartialFrame { format: format.name(), frame_bytes, len: bytes.len() });
    }
    scratch.clear();
    match format {
        PcmFormat::S16Le => {
            scratch.extend(bytes.chunks_exact(2).map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32_768.0))
        }
        PcmFormat::F32Le => scratch.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
    }
    mix_to_mono(scratch, channels, out);
    Ok(())
}

/// Output frames per call into libsoxr (the output buffer is reused).
const RESAMPLE_CHUNK: usize = 4096;

/// A mono resampler to 16 kHz with libsoxr at the settings `librosa.load(sr=16000)` uses
/// (python-soxr's `HQ` quality: 20-bit, linear phase; f32 in and out; one thread). It accepts
/// input in chunks of any size and gives the same output for every chunking. After
/// [`StreamResampler::finish`] the stream has exactly `ceil(n * 16000 / rate)` samples: the first
/// `round(n * 16000 / rate)` are libsoxr's (what python-soxr returns), the rest (at most one)
/// zero, as librosa's `fix_length` pads.
pub struct StreamResampler {
    inner: Option<soxr::Soxr<soxr::format::Mono<f32>>>,
    rate: u32,
    out_buf: Vec<f32>,
    consumed: u64,
    produced: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler").field("rate", &self.rate).field("consumed", &self.consumed).finish()
    }
}

fn soxr_error(e: soxr::Error) -> AudioError {
    AudioError::Resample(e.as_str().to_string())
}

impl StreamResampler {
    /// A resampler from `rate` Hz to 16 kHz (a pass-through when `rate` is 16 kHz).
    pub fn new(rate: u32) -> Result<Self, AudioError> {
        if !RATE_RANGE.contains(&rate) {
            return Err(AudioError::BadRate(rate));
        }
        let inner = if rate == SAMPLE_RATE { None } else { Some(Self::make(rate)?) };
        Ok(Self { inner, rate, out_buf: vec![0.0; RESAMPLE_CHUNK], consumed: 0, produced: 0 })
    }

    fn make(rate: u32) -> Result<soxr::Soxr<soxr::format::Mono<f32>>, AudioError> {
        use soxr::params::{QualityRecipe, QualitySpec, RuntimeSpec};
        soxr::Soxr::new_with_params(
            f64::from(rate),
            f64::from(SAMPLE_RATE),
            QualitySpec::new(QualityRecipe::high()),
            RuntimeSpec::new(1),
        )
        .map_err(soxr_error)
    }

    /// Total output length for `n` input samples.
    pub fn output_len(&self, n: usize) -> usize {
        (n as u64 * u64::from(SAMPLE_RATE)).div_ceil(u64::from(self.rate)) as usize
    }

    /// Samples libsoxr contributes for `n` input samples (python-soxr's rounded length).
    fn resampled_len(&self, n: u64) -> u64 {
        (n * u64::from(SAMPLE_RATE) * 2 + u64::from(self.rate)) / (2 * u64::from(self.rate))
    }

    /// Feeds samples; appends the output that is ready to `out`.
    pub fn push(&mut self, mut samples: &[f32], out: &mut Vec<f32>) -> Result<(), AudioError> {
        self.consumed += samples.len() as u64;
        let Some(rs) = self.inner.as_mut() else {
            out.extend_from_slice(samples);
            self.produced += samples.len() as u64;
            return Ok(());
        };
        loop {
            let done = rs.process(samples, &mut self.out_buf).map_err(soxr_error)?;
            out.extend_from_slice(&self.out_buf[..done.output_frames]);
            self.produced += done.output_frames as u64;
            samples = &samples[done.input_frames..];
            // libsoxr takes all input once it has room; a full output buffer means more is ready.
            if samples.is_empty() && done.output_frames < self.out_buf.len() {
                return Ok(());
            }
        }
    }

    /// Flushes the end of the stream and resets for a new stream.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> Result<(), AudioError> {
        let total = self.output_len(self.consumed as usize) as u64;
        let keep = self.resampled_len(self.consumed);
        if let Some(rs) = self.inner.as_mut() {
            loop {
                let n = rs.drain(&mut self.out_buf).map_err(soxr_error)?;
                let take = (n as u64).min(keep.saturating_sub(self.produced)) as usize;
                out.extend_from_slice(&self.out_buf[..take]);
                self.produced += take as u64;
                if n == 0 {
                    break;
                }
            }
            // librosa's fix_length: zeros up to ceil(n * 16000 / rate).
            out.extend(std::iter::repeat_n(0.0, total.saturating_sub(self.produced) as usize));
            *rs = Self::make(self.rate)?;
        }
        self.consumed = 0;
        self.produced = 0;
        Ok(())
    }
}
