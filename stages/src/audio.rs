//! Audio decoding: files (WAV, MP3, AAC/M4A, FLAC, OGG/Vorbis, the audio track of MP4/MOV/MKV)
//! through symphonia, and raw PCM (s16le / f32le) for streaming; mixed down to mono and
//! resampled to 16 kHz with rubato. Output is f32 in [-1, 1] (int16 / 32768).

use std::fs::File;
use std::path::{Path, PathBuf};

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler};
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

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

/// Decodes an audio file (or the first audio track of a video file) to mono f32 at its own rate.
pub fn decode_file(path: &Path) -> Result<DecodedAudio, AudioError> {
    if !path.exists() {
        return Err(AudioError::Missing(path.to_path_buf()));
    }
    let file = File::open(path).map_err(|source| AudioError::Open { path: path.to_path_buf(), source })?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let mut format = symphonia::default::get_probe()
        .probe(&hint, mss, FormatOptions::default(), MetadataOptions::default())
        .map_err(|e| AudioError::UnknownFormat { path: path.to_path_buf(), message: e.to_string() })?;
    let track = format.default_track(TrackType::Audio).ok_or_else(|| AudioError::NoAudioTrack(path.to_path_buf()))?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| AudioError::NoAudioTrack(path.to_path_buf()))?
        .clone();
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| AudioError::UnsupportedCodec { path: path.to_path_buf(), message: e.to_string() })?;

    let mut samples = Vec::new();
    let mut interleaved: Vec<f32> = Vec::new();
    let mut rate = params.sample_rate.unwrap_or(0);
    let mut channels = params.channels.as_ref().map(|c| c.count()).unwrap_or(0);
    let corrupt = |samples: &Vec<f32>, rate: u32, message: String| AudioError::Corrupt {
        path: path.to_path_buf(),
        decoded_seconds: if rate > 0 { samples.len() as f64 / f64::from(rate) } else { 0.0 },
        message,
    };
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(corrupt(&samples, rate, e.to_string())),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = decoder.decode(&packet).map_err(|e| corrupt(&samples, rate, e.to_string()))?;
        let spec = buf.spec();
        rate = spec.rate();
        channels = spec.channels().count();
        if channels == 0 {
            return Err(AudioError::BadChannels(0));
        }
        interleaved.resize(buf.samples_interleaved(), 0.0);
        buf.copy_to_slice_interleaved(&mut interleaved[..]);
        mix_to_mono(&interleaved, channels, &mut samples);
    }
    if samples.is_empty() {
        return Err(AudioError::Empty(path.to_path_buf()));
    }
    if !RATE_RANGE.contains(&rate) {
        return Err(AudioError::BadRate(rate));
    }
    Ok(DecodedAudio { samples, rate, channels })
}

/// Decodes a file and returns mono f32 samples at [`SAMPLE_RATE`].
pub fn load_16k(path: &Path) -> Result<Vec<f32>, AudioError> {
    let decoded = decode_file(path)?;
    if decoded.rate == SAMPLE_RATE {
        return Ok(decoded.samples);
    }
    let mut rs = StreamResampler::new(decoded.rate)?;
    let mut out = Vec::with_capacity(rs.output_len(decoded.samples.len()));
    rs.push(&decoded.samples, &mut out)?;
    rs.finish(&mut out)?;
    Ok(out)
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

/// Frames per internal resampler chunk.
const RESAMPLE_CHUNK: usize = 1024;

/// A mono resampler to 16 kHz that accepts input in chunks of any size and gives the same
/// output for every chunking (it works in fixed internal chunks), with the filter delay trimmed
/// and exactly `ceil(n * 16000 / rate)` samples in total after [`StreamResampler::finish`].
pub struct StreamResampler {
    inner: Option<Fft<f32>>,
    ratio: f64,
    pending: Vec<f32>,
    out_buf: Vec<f32>,
    to_trim: usize,
    consumed: u64,
    produced: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler").field("ratio", &self.ratio).field("consumed", &self.consumed).finish()
    }
}

impl StreamResampler {
    /// A resampler from `rate` Hz to 16 kHz (a pass-through when `rate` is 16 kHz).
    pub fn new(rate: u32) -> Result<Self, AudioError> {
        if !RATE_RANGE.contains(&rate) {
            return Err(AudioError::BadRate(rate));
        }
        let (inner, to_trim, out_max) = if rate == SAMPLE_RATE {
            (None, 0, 0)
        } else {
            let fft = Fft::<f32>::new(rate as usize, SAMPLE_RATE as usize, RESAMPLE_CHUNK, 1, FixedSync::Input)
                .map_err(|e| AudioError::Resample(e.to_string()))?;
            let delay = fft.output_delay();
            let max = fft.output_frames_max();
            (Some(fft), delay, max)
        };
        Ok(Self {
            inner,
            ratio: f64::from(SAMPLE_RATE) / f64::from(rate),
            pending: Vec::with_capacity(RESAMPLE_CHUNK),
            out_buf: vec![0.0; out_max],
            to_trim,
            consumed: 0,
            produced: 0,
        })
    }

    /// Total output length for `n` input samples.
    pub fn output_len(&self, n: usize) -> usize {
        (n as f64 * self.ratio).ceil() as usize
    }

    fn run_chunk(&mut self, partial: Option<usize>, out: &mut Vec<f32>, limit: u64) -> Result<(), AudioError> {
        let fft = self.inner.as_mut().expect("resampling path");
        let input = InterleavedSlice::new(&self.pending[..], 1, RESAMPLE_CHUNK)
            .map_err(|e| AudioError::Resample(e.to_string()))?;
        let frames = self.out_buf.len();
        let mut output = InterleavedSlice::new_mut(&mut self.out_buf[..], 1, frames)
            .map_err(|e| AudioError::Resample(e.to_string()))?;
        let indexing = Indexing { input_offset: 0, output_offset: 0, active_channels_mask: None, partial_len: partial };
        let (_, produced) = fft
            .process_into_buffer(&input, &mut output, Some(&indexing))
            .map_err(|e| AudioError::Resample(e.to_string()))?;
        let skip = self.to_trim.min(produced);
        self.to_trim -= skip;
        let take = (produced - skip).min(limit.saturating_sub(self.produced) as usize);
        out.extend_from_slice(&self.out_buf[skip..skip + take]);
        self.produced += take as u64;
        Ok(())
    }

    /// Feeds samples; appends the output that is ready to `out`.
    pub fn push(&mut self, mut samples: &[f32], out: &mut Vec<f32>) -> Result<(), AudioError> {
        self.consumed += samples.len() as u64;
        if self.inner.is_none() {
            out.extend_from_slice(samples);
            self.produced += samples.len() as u64;
            return Ok(());
        }
        while !samples.is_empty() {
            let take = (RESAMPLE_CHUNK - self.pending.len()).min(samples.len());
            self.pending.extend_from_slice(&samples[..take]);
            samples = &samples[take..];
            if self.pending.len() == RESAMPLE_CHUNK {
                self.run_chunk(None, out, u64::MAX)?;
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// Flushes the end of the stream (zero padding past it) and resets for a new stream.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> Result<(), AudioError> {
        if self.inner.is_some() {
            let total = self.output_len(self.consumed as usize) as u64;
            let mut partial = Some(self.pending.len());
            while self.produced < total {
                self.pending.resize(RESAMPLE_CHUNK, 0.0);
                self.run_chunk(partial, out, total)?;
                self.pending.clear();
                partial = Some(0);
            }
            let fft = self.inner.as_mut().expect("resampling path");
            fft.reset();
            self.to_trim = fft.output_delay();
        }
        self.pending.clear();
        self.consumed = 0;
        self.produced = 0;
        Ok(())
    }
}
