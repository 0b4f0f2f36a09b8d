//! Audio files through symphonia: [`AudioFileReader`] decodes packet by packet (any length in
//! bounded memory), [`decode_file`] and [`decode_bytes`] decode all of it.

use std::fs::File;
use std::path::{Path, PathBuf};

use symphonia::core::codecs::audio::{AudioDecoder, AudioDecoderOptions};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;

use super::{check_finite, mix_to_mono, AudioError, DecodedAudio, RATE_RANGE};

/// An audio file (or the first audio track of a video file) decoded packet by packet to mono
/// f32 at its own rate, channels averaged: the streaming form of [`decode_file`], which reads
/// through it. Errors are those of [`decode_file`], raised when the packet that causes them is
/// read.
pub struct AudioFileReader {
    path: PathBuf,
    format: Box<dyn FormatReader>,
    decoder: Box<dyn AudioDecoder>,
    track_id: u32,
    rate: u32,
    channels: usize,
    interleaved: Vec<f32>,
    /// Mono samples given so far.
    samples: usize,
    ended: bool,
}

impl std::fmt::Debug for AudioFileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioFileReader").field("path", &self.path).field("samples", &self.samples).finish()
    }
}

/// Runs `f`; a panic inside symphonia (its parsers have overflowed on crafted MP4 atoms under
/// the fuzzer) becomes a `Corrupt` error, never a crash.
fn guarded<T>(path: &Path, seconds: f64, f: impl FnOnce() -> Result<T, AudioError>) -> Result<T, AudioError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = crate::panic_message(&*panic);
        Err(AudioError::Corrupt {
            path: path.to_path_buf(),
            decoded_seconds: seconds,
            message: format!("the decoder failed on malformed data ({what})"),
        })
    })
}

impl AudioFileReader {
    /// Opens `path` and its first audio track.
    pub fn open(path: &Path) -> Result<Self, AudioError> {
        if !path.exists() {
            return Err(AudioError::Missing(path.to_path_buf()));
        }
        let file = File::open(path).map_err(|source| AudioError::Open { path: path.to_path_buf(), source })?;
        Self::from_source(Box::new(file), path)
    }

    /// Reads audio from `source` (`name`, with its extension as a format hint, names it in
    /// errors).
    pub fn from_source(source: Box<dyn MediaSource>, name: &Path) -> Result<Self, AudioError> {
        guarded(name, 0.0, || Self::open_unguarded(source, name))
    }

    fn open_unguarded(source: Box<dyn MediaSource>, path: &Path) -> Result<Self, AudioError> {
        let mss = MediaSourceStream::new(source, Default::default());
        let mut hint = Hint::new();
        if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
            hint.with_extension(ext);
        }
        let format = symphonia::default::get_probe()
            .probe(&hint, mss, FormatOptions::default(), MetadataOptions::default())
            .map_err(|e| AudioError::UnknownFormat { path: path.to_path_buf(), message: e.to_string() })?;
        let track =
            format.default_track(TrackType::Audio).ok_or_else(|| AudioError::NoAudioTrack(path.to_path_buf()))?;
        let track_id = track.id;
        let params = track
            .codec_params
            .as_ref()
            .and_then(|p| p.audio())
            .ok_or_else(|| AudioError::NoAudioTrack(path.to_path_buf()))?
            .clone();
        let decoder = symphonia::default::get_codecs()
            .make_audio_decoder(&params, &AudioDecoderOptions::default())
            .map_err(|e| AudioError::UnsupportedCodec { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Self {
            path: path.to_path_buf(),
            format,
            decoder,
            track_id,
            rate: params.sample_rate.unwrap_or(0),
            channels: params.channels.as_ref().map(|c| c.count()).unwrap_or(0),
            interleaved: Vec::new(),
            samples: 0,
            ended: false,
        })
    }

    /// The sample rate (the track's stated rate until the first packet decodes, then the
    /// decoded one; 0 when neither is known yet).
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// The source's channel count.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Mono samples read so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Appends the next packet's mono samples to `out`; `Ok(false)` once the stream has ended
    /// (an error if it held no samples at all).
    pub fn read(&mut self, out: &mut Vec<f32>) -> Result<bool, AudioError> {
        if self.ended {
            return Ok(false);
        }
        let seconds = self.samples as f64 / f64::from(self.rate.max(1));
        let path = self.path.clone();
        guarded(&path, seconds, || self.read_unguarded(out))
    }

    fn corrupt(&self, message: String) -> AudioError {
        AudioError::Corrupt {
            path: self.path.clone(),
            decoded_seconds: if self.rate > 0 { self.samples as f64 / f64::from(self.rate) } else { 0.0 },
            message,
        }
    }

    fn read_unguarded(&mut self, out: &mut Vec<f32>) -> Result<bool, AudioError> {
        loop {
            let packet = match self.format.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return self.end(),
                Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return self.end(),
                Err(e) => return Err(self.corrupt(e.to_string())),
            };
            if packet.track_id != self.track_id {
                continue;
            }
            let buf = match self.decoder.decode(&packet) {
                Ok(buf) => buf,
                Err(e) => return Err(self.corrupt(e.to_string())),
            };
            let spec = buf.spec();
            let (rate, channels) = (spec.rate(), spec.channels().count());
            if channels == 0 {
                return Err(AudioError::BadChannels(0));
            }
            if self.samples > 0 && rate != self.rate {
                let message = format!("the sample rate changes from {} to {rate} Hz", self.rate);
                return Err(self.corrupt(message));
            }
            if !RATE_RANGE.contains(&rate) {
                return Err(AudioError::BadRate(rate));
            }
            (self.rate, self.channels) = (rate, channels);
            self.interleaved.resize(buf.samples_interleaved(), 0.0);
            buf.copy_to_slice_interleaved(&mut self.interleaved[..]);
            let from = out.len();
            mix_to_mono(&self.interleaved, channels, out);
            check_finite(&out[from..], self.samples, rate)?;
            self.samples += out.len() - from;
            if out.len() > from {
                return Ok(true);
            }
        }
    }

    fn end(&mut self) -> Result<bool, AudioError> {
        self.ended = true;
        if self.samples == 0 {
            return Err(AudioError::Empty(self.path.clone()));
        }
        Ok(false)
    }
}

/// Decodes an audio file (or the first audio track of a video file) to mono f32 at its own rate.
pub fn decode_file(path: &Path) -> Result<DecodedAudio, AudioError> {
    read_all(AudioFileReader::open(path)?)
}

/// Decodes audio held in memory (`name`, with its extension as a format hint, names it in
/// errors): the same decoder as [`decode_file`].
pub fn decode_bytes(bytes: Vec<u8>, name: &Path) -> Result<DecodedAudio, AudioError> {
    read_all(AudioFileReader::from_source(Box::new(std::io::Cursor::new(bytes)), name)?)
}

fn read_all(mut reader: AudioFileReader) -> Result<DecodedAudio, AudioError> {
    let mut samples = Vec::new();
    while reader.read(&mut samples)? {}
    Ok(DecodedAudio { samples, rate: reader.rate, channels: reader.channels })
}
