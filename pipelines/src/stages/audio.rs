//! The audio stage: samples in, one audio tensor per frame out, each as soon as it is final
//! (docs/spec.md sections 1, 2 and 7): resample to 16 kHz, incremental mel, windows, the
//! (shared) audio encoder, feature assembly.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use lipsync_stages::audio::StreamResampler;
use lipsync_stages::features::{
    AudioEncoder, FeatureAssembler, WindowTracker, FEATURE_DIM, FRAME_AUDIO_LEN, WINDOW_LEN,
};
use lipsync_stages::mel::{MelSpectrogram, N_MELS};

use crate::job::{AudioIn, AudioTensor, FrameStats};
use crate::runtime::{lock, Out, Pool, Stage, StageError};

/// Audio in, per-frame tensors out. Every buffer is reused: no allocation per chunk in steady
/// state (beyond what ONNX Runtime allocates per encoder run).
pub struct AudioStage {
    resampler: Option<StreamResampler>,
    encoder: Arc<Mutex<AudioEncoder>>,
    pool: Pool<AudioTensor>,
    recycle: Option<crossbeam_channel::Sender<Vec<f32>>>,
    stats: Arc<FrameStats>,
    max_frames: usize,
    mel: MelSpectrogram,
    tracker: WindowTracker,
    asm: FeatureAssembler,
    pcm: Vec<f32>,
    rows: Vec<f32>,
    windows: Vec<f32>,
    o: Vec<f32>,
    ready: Vec<usize>,
    flat: Vec<f32>,
    ended: bool,
}

impl AudioStage {
    /// A stage for input at the rate `resampler` converts from (`None`: already 16 kHz).
    /// Tensors come from `pool`; frames past `max_frames` are not made; sample buffers go back
    /// to the source through `recycle`.
    pub fn new(
        resampler: Option<StreamResampler>,
        encoder: Arc<Mutex<AudioEncoder>>,
        pool: Pool<AudioTensor>,
        recycle: Option<crossbeam_channel::Sender<Vec<f32>>>,
        stats: Arc<FrameStats>,
        max_frames: usize,
    ) -> Self {
        Self {
            resampler,
            encoder,
            pool,
            recycle,
            stats,
            max_frames,
            mel: MelSpectrogram::new(),
            tracker: WindowTracker::new(),
            asm: FeatureAssembler::new(),
            pcm: Vec::with_capacity(8192),
            rows: Vec::with_capacity(64 * N_MELS),
            windows: Vec::with_capacity(16 * WINDOW_LEN),
            o: Vec::with_capacity(16 * FEATURE_DIM),
            ready: Vec::with_capacity(16),
            flat: Vec::with_capacity(16 * FRAME_AUDIO_LEN),
            ended: false,
        }
    }

    /// Runs the chain on `self.pcm`; at the end of the stream, flushes every part.
    fn compute(&mut self, end: bool) -> Result<(), StageError> {
        let (ready, flat) = (&mut self.ready, &mut self.flat);
        self.rows.clear();
        self.mel.push(&self.pcm, &mut self.rows);
        if end {
            self.mel.finish(&mut self.rows);
        }
        self.windows.clear();
        self.tracker.push(&self.rows, &mut self.windows);
        if end {
            self.tracker.finish(&mut self.windows).map_err(|e| StageError::failed(None, e))?;
        }
        self.o.clear();
        if !self.windows.is_empty() {
            lock(&self.encoder).encode(&self.windows, &mut self.o).map_err(|e| StageError::failed(None, e))?;
        }
        self.asm.push(&self.o, |i, tensor| {
            ready.push(i);
            flat.extend_from_slice(tensor);
        });
        if end {
            let n = self.asm.finish(|i, tensor| {
                ready.push(i);
                flat.extend_from_slice(tensor);
            });
            self.stats.total.store(n.min(self.max_frames), Ordering::SeqCst);
        }
        Ok(())
    }

    /// Sends the tensors that became final.
    fn emit(&mut self, t_audio: quanta::Instant, out: &mut Out<'_, AudioTensor>) -> Result<(), StageError> {
        let cap = self.max_frames;
        for (k, &i) in self.ready.iter().enumerate() {
            if i >= cap {
                break;
            }
            let mut tensor = out.take(&self.pool)?;
            tensor.index = i;
            tensor.t_audio = t_audio;
            tensor.last = i + 1 == cap || (self.ended && k + 1 == self.ready.len());
            tensor.data.copy_from_slice(&self.flat[k * FRAME_AUDIO_LEN..(k + 1) * FRAME_AUDIO_LEN]);
            out.send(tensor)?;
            if i + 1 == cap {
                // The frame cap is reached: the stream is complete.
                self.stats.total.store(cap, Ordering::SeqCst);
            }
        }
        self.ready.clear();
        self.flat.clear();
        Ok(())
    }
}

impl Stage for AudioStage {
    type In = AudioIn;
    type Out = AudioTensor;

    fn process(&mut self, item: AudioIn, out: &mut Out<'_, AudioTensor>) -> Result<(), StageError> {
        if self.ended {
            return Err(StageError::msg("audio arrived after the end of the audio"));
        }
        self.pcm.clear();
        let t_audio = match item {
            AudioIn::Samples(samples, t) => {
                match &mut self.resampler {
                    Some(rs) => rs.push(&samples, &mut self.pcm).map_err(|e| StageError::failed(None, e))?,
                    None => self.pcm.extend_from_slice(&samples),
                }
                if let Some(r) = &self.recycle {
                    // Back to the source for the next chunk (dropped if it has enough).
                    let _ = r.try_send(samples);
                }
                t
            }
            AudioIn::End(t) => {
                if let Some(rs) = &mut self.resampler {
                    rs.finish(&mut self.pcm).map_err(|e| StageError::failed(None, e))?;
                }
                self.ended = true;
                t
            }
        };
        if self.stats.total().is_some() {
            // The frame cap was reached: later audio makes no frame.
            return Ok(());
        }
        self.compute(self.ended)?;
        self.emit(t_audio, out)
    }

    fn finish(&mut self, _out: &mut Out<'_, AudioTensor>) -> Result<(), StageError> {
        if self.ended || self.stats.total().is_some() {
            Ok(())
        } else {
            // The source went away without ending the audio: nothing more will come.
            Err(StageError::Cancelled)
        }
    }
}
