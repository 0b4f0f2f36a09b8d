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

use crate::job::{AudioIn, AudioTensor, FrameKind, FrameMark, FrameStats};
use crate::live::Live;
use crate::runtime::{lock, Out, Pool, Stage, StageError};

/// A live session's state in the audio stage: which frame comes next, and whether an
/// utterance owns the frame sequence.
struct LiveAudio {
    live: Arc<Live>,
    /// The input rate (to start a new resampler per utterance).
    rate: Option<u32>,
    generation: u64,
    /// The index the next frame takes.
    next: usize,
    /// An utterance has begun (audio came since the last end of utterance or interrupt).
    speaking: bool,
    /// The index of the current utterance's frame 0, once it has been sent on.
    base: Option<usize>,
    /// The current (or next) utterance's number.
    utterance: u32,
}

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
    live: Option<LiveAudio>,
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
            live: None,
        }
    }

    /// Makes this the audio stage of live session `live` (input at `rate`, `None` for
    /// 16 kHz): audio comes as utterances, idle frames fill the time between them, and an
    /// interrupt drops what is queued.
    pub fn live(mut self, live: Arc<Live>, rate: Option<u32>) -> Self {
        self.live = Some(LiveAudio { live, rate, generation: 0, next: 0, speaking: false, base: None, utterance: 0 });
        self
    }

    /// Forgets the audio of the current utterance (a new one starts from scratch).
    fn reset(&mut self) -> Result<(), StageError> {
        self.mel.reset();
        self.tracker = WindowTracker::new();
        self.asm = FeatureAssembler::new();
        if let Some(rate) = self.live.as_ref().and_then(|l| l.rate) {
            self.resampler = Some(StreamResampler::new(rate).map_err(|e| StageError::failed(None, e))?);
        }
        Ok(())
    }

    /// Runs the chain on `self.pcm`; at the end of the stream, flushes every part. `Ok(false)`:
    /// a real-time utterance too short for a single window (it makes no frame).
    fn compute(&mut self, end: bool) -> Result<bool, StageError> {
        let (ready, flat) = (&mut self.ready, &mut self.flat);
        self.rows.clear();
        self.mel.push(&self.pcm, &mut self.rows);
        if end {
            self.mel.finish(&mut self.rows);
        }
        self.windows.clear();
        self.tracker.push(&self.rows, &mut self.windows);
        if end {
            if let Err(e) = self.tracker.finish(&mut self.windows) {
                if self.live.is_some() {
                    tracing::warn!("an utterance made no frame: {e}");
                    self.asm = FeatureAssembler::new();
                    return Ok(false);
                }
                return Err(StageError::failed(None, e));
            }
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
            if self.live.is_none() {
                self.stats.total.store(n.min(self.max_frames), Ordering::SeqCst);
            }
        }
        Ok(true)
    }

    /// Sends the tensors that became final.
    fn emit(&mut self, t_audio: quanta::Instant, out: &mut Out<'_, AudioTensor>) -> Result<(), StageError> {
        let cap = self.max_frames;
        for (k, &i) in self.ready.iter().enumerate() {
            if i >= cap {
                break;
            }
            let mut tensor = out.take(&self.pool)?;
            tensor.mark = FrameMark { kind: FrameKind::Speech, generation: 0, utterance: 0, frame: i as u32 };
            tensor.index = i;
            let mut end = self.ended;
            if let Some(l) = &mut self.live {
                // The utterance's frames follow whatever came before its first one.
                let base = *l.base.get_or_insert(l.next);
                tensor.index = base + i;
                tensor.mark.generation = l.generation;
                tensor.mark.utterance = l.utterance;
                l.next = tensor.index + 1;
                end = !l.speaking;
            }
            tensor.t_audio = t_audio;
            tensor.last = i + 1 == cap || (end && k + 1 == self.ready.len());
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

impl AudioStage {
    /// A live session's input: utterances, ticks and interrupts.
    fn process_live(&mut self, item: AudioIn, out: &mut Out<'_, AudioTensor>) -> Result<(), StageError> {
        let l = self.live.as_mut().expect("a live stage");
        let current = l.live.is_current(l.generation);
        match item {
            AudioIn::Samples(samples, t) => {
                if current {
                    if !l.speaking {
                        l.speaking = true;
                        l.base = None;
                        self.reset()?;
                    }
                    self.pcm.clear();
                    match &mut self.resampler {
                        Some(rs) => rs.push(&samples, &mut self.pcm).map_err(|e| StageError::failed(None, e))?,
                        None => self.pcm.extend_from_slice(&samples),
                    }
                    if self.compute(false)? {
                        self.emit(t, out)?;
                    }
                }
                if let Some(r) = &self.recycle {
                    let _ = r.try_send(samples);
                }
                Ok(())
            }
            AudioIn::EndUtterance(t) => {
                if current {
                    self.end_utterance(t, out)?;
                }
                Ok(())
            }
            AudioIn::End(t) => {
                if current {
                    self.end_utterance(t, out)?;
                }
                self.ended = true;
                let next = self.live.as_ref().map_or(0, |l| l.next);
                self.stats.total.store(next, Ordering::SeqCst);
                Ok(())
            }
            AudioIn::Tick(slot) => {
                // Idle frames while no utterance owns the sequence (before its first frame).
                if l.speaking && l.base.is_some() {
                    return Ok(());
                }
                while self.live.as_ref().is_some_and(|l| l.next <= slot) {
                    let mut tensor = out.take(&self.pool)?;
                    let l = self.live.as_mut().expect("a live stage");
                    tensor.index = l.next;
                    tensor.mark = FrameMark { kind: FrameKind::Idle, generation: l.generation, utterance: 0, frame: 0 };
                    tensor.last = false;
                    tensor.t_audio = out.clock().now();
                    l.next += 1;
                    out.send(tensor)?;
                }
                Ok(())
            }
            AudioIn::Interrupt { generation, resume } => {
                l.generation = generation;
                l.next = resume;
                if l.speaking {
                    l.speaking = false;
                    l.utterance += 1;
                }
                l.base = None;
                self.reset()
            }
        }
    }

    /// Ends the current utterance: its last frames, then idle again. Audio too short for a
    /// frame makes none (and is said in the log).
    fn end_utterance(&mut self, t: quanta::Instant, out: &mut Out<'_, AudioTensor>) -> Result<(), StageError> {
        let l = self.live.as_mut().expect("a live stage");
        if !l.speaking {
            return Ok(());
        }
        l.speaking = false;
        self.pcm.clear();
        if let Some(rs) = &mut self.resampler {
            rs.finish(&mut self.pcm).map_err(|e| StageError::failed(None, e))?;
        }
        if self.compute(true)? {
            self.emit(t, out)?;
        }
        let l = self.live.as_mut().expect("a live stage");
        l.utterance += 1;
        l.base = None;
        self.reset()
    }
}

impl Stage for AudioStage {
    type In = AudioIn;
    type Out = AudioTensor;

    fn process(&mut self, item: AudioIn, out: &mut Out<'_, AudioTensor>) -> Result<(), StageError> {
        if self.ended {
            return Err(StageError::msg("audio arrived after the end of the audio"));
        }
        if self.live.is_some() {
            return self.process_live(item, out);
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
            AudioIn::EndUtterance(_) | AudioIn::Tick(_) | AudioIn::Interrupt { .. } => {
                return Err(StageError::msg("a live session's message reached a graph that is not live"))
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
