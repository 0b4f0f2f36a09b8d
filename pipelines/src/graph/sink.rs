//! The sink stage: frames leave the graph, in order, through a [`FrameSink`] (files, stdout, a
//! socket); latency and progress are recorded; jobs go back to the pool.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::job::{FrameJob, FrameStats};
use crate::live::Live;
use crate::runtime::{lock, record, Out, Pool, Stage, StageError};

/// A sink's failure.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Writing failed.
    #[error("cannot write {what}: {source}")]
    Io {
        /// What was being written (a path, `stdout`, the client's socket).
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A frame could not be sent to the session's client.
    #[error("cannot send frame to the client: {0}")]
    Client(#[source] std::io::Error),
    /// The output could not be staged or moved into place.
    #[error(transparent)]
    Output(#[from] lipsync_stages::io::staged::StagedError),
}

/// Where a graph's frames go.
pub trait FrameSink: Send + 'static {
    /// Writes one frame (`job.encoded`, or `job.frame` for raw output). Frames come in order.
    fn frame(&mut self, job: &FrameJob) -> Result<(), SinkError>;

    /// Completes the output after the last frame (not called on failure).
    fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Progress callback: (frames done, total when known).
pub type ProgressFn = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

/// Frame in, nothing out: written, counted, returned to the pool.
pub struct SinkStage {
    sink: Box<dyn FrameSink>,
    pool: Pool<FrameJob>,
    stats: Arc<FrameStats>,
    progress: Option<ProgressFn>,
    next: usize,
    live: Option<Arc<Live>>,
}

impl SinkStage {
    /// A stage writing to `sink`, giving jobs back to `pool`.
    pub fn new(
        sink: Box<dyn FrameSink>,
        pool: Pool<FrameJob>,
        stats: Arc<FrameStats>,
        progress: Option<ProgressFn>,
    ) -> Self {
        Self { sink, pool, stats, progress, next: 0, live: None }
    }

    /// Makes this the sink of live session `live`: each frame leaves at its time on the
    /// session's clock ([`Live::send_time`]); frames an interrupt made stale are dropped.
    pub fn live(mut self, live: Arc<Live>) -> Self {
        self.live = Some(live);
        self
    }

    /// A frame that is not sent: back to the pool.
    fn drop_job(&self, job: FrameJob) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.pool.give(job);
    }
}

impl Stage for SinkStage {
    type In = FrameJob;
    type Out = ();

    fn process(&mut self, job: FrameJob, out: &mut Out<'_, ()>) -> Result<(), StageError> {
        if let Some(live) = self.live.clone() {
            if job.is_stale() {
                self.drop_job(job);
                return Ok(());
            }
            out.pace_until(live.send_time(job.index), || job.is_stale())?;
            if !live.claim(job.mark.generation, job.index) {
                self.drop_job(job);
                return Ok(());
            }
            // After an interrupt, numbering resumes right after the last frame sent, so the
            // order check below holds for live sessions too.
        }
        if job.index != self.next {
            return Err(StageError::at(job.index, format!("frame {} arrived out of order", job.index)));
        }
        self.sink.frame(&job).map_err(|e| StageError::failed(Some(job.index), e))?;
        let now = out.clock().now();
        let st = &self.stats;
        record(&st.latency, now.duration_since(job.t_audio));
        if let Some(shared) = out.shared() {
            record(&shared.frame_latency, now.duration_since(job.t_audio));
            if self.next == 0 {
                record(&shared.first_frame, st.started.elapsed());
            }
        }
        lock(&st.e2e).record(now.duration_since(job.t_in));
        {
            let mut span = lock(&st.span);
            *span = Some((span.map_or(now, |s| s.0), now));
        }
        if self.next == 0 {
            st.first_frame_us.store((st.started.elapsed().as_micros() as u64).max(1), Ordering::Relaxed);
        }
        st.in_flight.fetch_sub(1, Ordering::Relaxed);
        let done = st.frames.fetch_add(1, Ordering::SeqCst) + 1;
        self.next += 1;
        self.pool.give(job);
        if let Some(cb) = &self.progress {
            cb(done, st.total().map(|t| t as u64));
        }
        Ok(())
    }

    /// Every frame of the audio, or a failure: never a short, quiet end.
    fn finish(&mut self, _out: &mut Out<'_, ()>) -> Result<(), StageError> {
        if self.live.is_some() {
            // Frames dropped by interrupts are not owed.
            if self.stats.total().is_none() {
                return Err(StageError::msg("the audio stream stopped without its end"));
            }
            return self.sink.finish().map_err(|e| StageError::failed(None, e));
        }
        match self.stats.total() {
            Some(t) if t == self.next => {}
            None => return Err(StageError::msg("the audio stream stopped without its end")),
            Some(t) => {
                return Err(StageError::at(self.next, format!("only {} of {t} frames were produced", self.next)))
            }
        }
        self.sink.finish().map_err(|e| StageError::failed(None, e))
    }
}
