//! [`TemplateReader`]: one consumer's view of a [`SharedTemplate`], with its own decoder and a
//! ring of the frames it decoded last (module docs of [`crate::template`]).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ffmpeg_next as ff;
use xxhash_rust::xxh3::xxh3_64;

use super::decode::{corrupt, decode_next, ToBgr};
use super::{copy_stored, SharedTemplate, Store, VideoStore};
use crate::frame::BgrFrame;
use crate::io::video::{at, ReadFailure, VideoError};

/// Frames a ring of `cache` bytes holds (at least 1).
pub(crate) fn ring_frames(cache: usize, frame_bytes: usize) -> usize {
    (cache / frame_bytes.max(1)).max(1)
}

/// Reads frames of a shared template in any order (made by [`SharedTemplate::reader`]).
///
/// Sequential reads decode one frame each. A read behind the ring (the ping-pong turning back)
/// restarts decoding at the latest keyframe at or before the start of a ring-sized stretch ending
/// at the frame, skips the unreferenced frames before the stretch and keeps the stretch.
pub struct TemplateReader {
    shared: Arc<SharedTemplate>,
    cache: usize,
    cursor: Option<Cursor>,
    to_bgr: ToBgr,
    decoded: u64,
    /// Set when a run that skipped frames gave a frame unlike its hash: skip no more.
    no_skip: bool,
}

/// A decoder positioned in the stream, and the ring of frames it kept last.
struct Cursor {
    decoder: ff::decoder::Video,
    /// The restart this run began at (index into the store's restarts).
    restart: usize,
    next_packet: usize,
    /// Frames before this display index are not kept (and, when `skipping`, unreferenced ones
    /// are not even decoded).
    keep_from: usize,
    skipping: bool,
    /// Display index of the next output, for a stream without timestamps (counted).
    out_next: usize,
    /// Display index of the next frame kept.
    next_display: usize,
    eof_sent: bool,
    /// `(display index, frame)`, contiguous and ascending.
    ring: VecDeque<(usize, ff::frame::Video)>,
    cap: usize,
}

impl Cursor {
    /// Whether this run's frames differ from the plain sequential decode's in how they were made,
    /// so that each is checked against its hash.
    fn verified(&self) -> bool {
        self.restart != 0 || self.skipping
    }
}

/// What one decode step gave.
enum Step {
    Kept,
    End,
    /// A frame out of display order (a restart that does not decode like the stream).
    Gap,
}

impl std::fmt::Debug for TemplateReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateReader").field("template", &self.shared).field("decoded", &self.decoded).finish()
    }
}

impl TemplateReader {
    pub(crate) fn new(shared: Arc<SharedTemplate>, cache: usize) -> Self {
        Self { shared, cache, cursor: None, to_bgr: ToBgr::default(), decoded: 0, no_skip: false }
    }

    /// The template read.
    pub fn template(&self) -> &Arc<SharedTemplate> {
        &self.shared
    }

    /// Frames decoded so far (a measure of the ring's work; skipped frames do not count).
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Copies frame `i` into `out` (reusing its allocation).
    pub fn get(&mut self, i: usize, out: &mut BgrFrame) -> Result<(), VideoError> {
        let shared = self.shared.clone();
        if i >= shared.len {
            return Err(VideoError::open(&shared.path, ReadFailure::OutOfRange { frame: i, frames: shared.len }));
        }
        match &shared.store {
            Store::Images(frames) => copy_stored(&shared, frames, i, out),
            Store::Video(v) => self.get_video(&shared, v, i, out),
        }
    }

    fn get_video(
        &mut self,
        t: &SharedTemplate,
        v: &VideoStore,
        i: usize,
        out: &mut BgrFrame,
    ) -> Result<(), VideoError> {
        loop {
            if let Some(cursor) = &self.cursor {
                let held = cursor.ring.front().and_then(|(d, _)| i.checked_sub(*d)).and_then(|k| cursor.ring.get(k));
                if let Some((_, frame)) = held {
                    self.to_bgr.convert(frame, out).map_err(|e| VideoError::open(&t.path, e))?;
                    if !cursor.verified() || xxh3_64(&out.data) == v.hashes[i] {
                        return Ok(());
                    }
                    self.distrust(t, v)?;
                    continue;
                }
            }
            // The stretch this read keeps: the ring's worth of frames ending at `i`.
            let cap = ring_frames(self.cache, v.frame_bytes).min(t.len);
            let lo = (i + 1).saturating_sub(cap);
            let r = v.restarts.iter().rposition(|r| r.display <= lo && !r.bad.load(Ordering::Relaxed)).unwrap_or(0);
            let reuse =
                self.cursor.as_ref().is_some_and(|c| c.next_display <= i && c.next_display >= v.restarts[r].display);
            if !reuse {
                let fresh = self.start(t, v, r, lo, cap)?;
                self.cursor = Some(fresh);
            }
            let cursor = self.cursor.as_mut().expect("set above");
            while cursor.next_display <= i {
                let step = match cursor.decode_one(t, v) {
                    Ok(step) => step,
                    // A run that restarted or skipped may fail where the plain decode did not
                    // (a keyframe that does not stand alone): distrusted below, not fatal.
                    Err(e) if cursor.verified() => {
                        tracing::debug!(error = %e, "a restarted or skipping decode failed");
                        Step::Gap
                    }
                    Err(e) => return Err(e),
                };
                match step {
                    Step::Kept => self.decoded += 1,
                    Step::Gap => break,
                    Step::End if cursor.verified() => break,
                    Step::End => {
                        let early = ReadFailure::EndedEarly { frame: cursor.next_display, frames: t.len };
                        return Err(VideoError::open(&t.path, early));
                    }
                }
            }
            if cursor.next_display <= i {
                self.distrust(t, v)?;
            }
        }
    }

    /// The current run gave a frame unlike the sequential decode's: stop doing what made it
    /// different (skipping, or restarting at its keyframe) and drop the run.
    fn distrust(&mut self, t: &SharedTemplate, v: &VideoStore) -> Result<(), VideoError> {
        let cursor = self.cursor.take().expect("a run to distrust");
        if cursor.skipping {
            tracing::warn!(path = %t.path.display(), "skipping unreferenced frames changed a frame; decoding them all");
            self.no_skip = true;
        } else if cursor.restart != 0 {
            tracing::warn!(path = %t.path.display(), keyframe = v.restarts[cursor.restart].display,
                "decoding from this keyframe does not give the stream's frames; restarting earlier");
            v.restarts[cursor.restart].bad.store(true, Ordering::Relaxed);
        } else {
            return Err(VideoError::open(&t.path, ReadFailure::NotDeterministic));
        }
        Ok(())
    }

    /// A fresh decoder at restart `r` keeping frames from `lo` on. The old ring's frames are
    /// dropped (their buffers go back to FFmpeg), so a restart never holds two rings' worth.
    fn start(
        &mut self,
        t: &SharedTemplate,
        v: &VideoStore,
        r: usize,
        lo: usize,
        cap: usize,
    ) -> Result<Cursor, VideoError> {
        let params = v.params.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let open = |e: ff::Error| VideoError::open(&t.path, at("decoder")(e));
        let decoder =
            ff::codec::context::Context::from_parameters(params).map_err(open)?.decoder().video().map_err(open)?;
        let mut ring = match self.cursor.take() {
            Some(old) => old.ring,
            None => VecDeque::with_capacity(cap),
        };
        ring.clear();
        let restart = &v.restarts[r];
        // Without timestamps a frame's place is known only by counting, from the start.
        let keep_from = if v.pts.is_some() { lo.max(restart.display) } else { restart.display };
        Ok(Cursor {
            decoder,
            restart: r,
            next_packet: restart.packet,
            keep_from,
            skipping: !self.no_skip && v.pts.is_some() && keep_from > restart.display,
            out_next: restart.display,
            next_display: keep_from,
            eof_sent: false,
            ring,
            cap,
        })
    }
}

/// A reader derefs to its template (length, size, rate).
impl std::ops::Deref for TemplateReader {
    type Target = SharedTemplate;
    fn deref(&self) -> &SharedTemplate {
        &self.shared
    }
}

impl Cursor {
    /// Decodes up to the next frame kept, into the ring.
    fn decode_one(&mut self, t: &SharedTemplate, v: &VideoStore) -> Result<Step, VideoError> {
        // The oldest frame's buffer is released by the decoder as it decodes into it.
        let mut frame = if self.ring.len() >= self.cap {
            self.ring.pop_front().expect("cap >= 1").1
        } else {
            ff::frame::Video::empty()
        };
        let pts = v.pts.as_deref();
        let display = loop {
            let (packets, next, keep_from, skipping) =
                (&v.packets, &mut self.next_packet, self.keep_from, self.skipping);
            let got = decode_next(&mut self.decoder, &mut frame, &mut self.eof_sent, |d| match packets.get(*next) {
                Some(p) => {
                    *next += 1;
                    if skipping {
                        // Only frames before the kept stretch may go undecoded.
                        let before =
                            pts.zip(p.pts()).and_then(|(t, x)| t.binary_search(&x).ok()).is_some_and(|d| d < keep_from);
                        d.skip_frame(if before { ff::Discard::NonReference } else { ff::Discard::Default });
                    }
                    d.send_packet(p).map(|()| true)
                }
                None => Ok(false),
            })
            .map_err(|e| corrupt(&t.path, self.next_display, e))?;
            if !got {
                return Ok(Step::End);
            }
            let display = match pts {
                Some(table) => match frame.timestamp().and_then(|ts| table.binary_search(&ts).ok()) {
                    Some(d) => d,
                    None => return Ok(Step::Gap),
                },
                None => {
                    self.out_next += 1;
                    self.out_next - 1
                }
            };
            // Before the kept stretch: an open GOP's leading pictures, or the way there.
            if display >= self.keep_from {
                break display;
            }
        };
        if display != self.next_display {
            return Ok(Step::Gap);
        }
        self.ring.push_back((display, frame));
        self.next_display += 1;
        Ok(Step::Kept)
    }
}
