//! Live sessions (docs/protocol.md, "Live sessions"): the session's clock, idle
//! frames, interruption and pacing, shared by the session's source, its stages and its sink.
//!
//! Frame `i` of a live session is presented at `i / fps` after the session started (the
//! audio clock). The source ticks once per frame period; a tick asks the audio stage for the
//! idle frames due by then, unless an utterance owns the frame sequence. The sink sends frame
//! `i` at `start + delay + i / fps`, so frames leave at the avatar's frame rate whatever the
//! mix of idle and speech frames, and never drift from the clock. An interrupt starts a new
//! generation: frames of older generations are dropped wherever they are (the UNet batcher
//! does not run them), and idle frames resume right after the last frame sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::metrics::Clock;
use crate::runtime::lock;

/// Settings of a live session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveConfig {
    /// Frames per second (the avatar's).
    pub fps: f64,
    /// How long after its slot on the clock a frame is sent (room for the image work of a
    /// speech frame: prep, the UNet batch, paste-back and encode).
    pub delay: Duration,
}

/// The shared state of one live session.
#[derive(Debug)]
pub struct Live {
    cfg: LiveConfig,
    clock: Clock,
    start: quanta::Instant,
    generation: AtomicU64,
    sent: Mutex<Sent>,
}

#[derive(Debug, Default)]
struct Sent {
    generation: u64,
    last: Option<usize>,
}

impl Live {
    /// A session whose clock starts now.
    pub fn new(cfg: LiveConfig, clock: Clock) -> Self {
        let start = clock.now();
        Self { cfg, clock, start, generation: AtomicU64::new(0), sent: Mutex::new(Sent::default()) }
    }

    /// The settings.
    pub fn config(&self) -> &LiveConfig {
        &self.cfg
    }

    /// The current generation (bumped by each interrupt).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether work of generation `g` is still wanted.
    pub fn is_current(&self, g: u64) -> bool {
        self.generation() == g
    }

    /// Starts a new generation: returns it and the index the next frame takes (right after
    /// the last frame sent). No frame of an older generation is sent after this returns.
    pub fn interrupt(&self) -> (u64, usize) {
        let mut s = lock(&self.sent);
        s.generation += 1;
        self.generation.store(s.generation, Ordering::SeqCst);
        (s.generation, s.last.map_or(0, |l| l + 1))
    }

    /// Claims the right to send frame `index` of generation `g`: false if an interrupt has made
    /// it stale.
    pub fn claim(&self, g: u64, index: usize) -> bool {
        let mut s = lock(&self.sent);
        if s.generation != g {
            return false;
        }
        s.last = Some(index);
        true
    }

    /// The last frame sent.
    pub fn last_sent(&self) -> Option<usize> {
        lock(&self.sent).last
    }

    /// When slot `i` begins on the session's clock.
    pub fn slot_time(&self, i: usize) -> quanta::Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.cfg.fps)
    }

    /// When frame `i` is sent.
    pub fn send_time(&self, i: usize) -> quanta::Instant {
        self.slot_time(i) + self.cfg.delay
    }

    /// The slot the clock is in now.
    pub fn current_slot(&self) -> usize {
        let t = self.clock.now().duration_since(self.start).as_secs_f64();
        (t * self.cfg.fps).floor() as usize
    }

    /// The clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Live {
        Live::new(LiveConfig { fps: 25.0, delay: Duration::from_millis(100) }, Clock::new())
    }

    #[test]
    fn interrupt_resumes_after_the_last_frame_sent_and_makes_older_frames_stale() {
        let l = live();
        assert_eq!(l.interrupt(), (1, 0), "nothing sent yet: resume at 0");
        assert!(l.claim(1, 0) && l.claim(1, 1));
        assert!(!l.claim(0, 2), "a frame of an older generation is not sent");
        let (g, resume) = l.interrupt();
        assert_eq!((g, resume), (2, 2));
        assert!(!l.claim(1, 2) && !l.is_current(1) && l.is_current(2));
        assert_eq!(l.last_sent(), Some(1));
    }

    #[test]
    fn slots_follow_the_frame_rate() {
        let l = live();
        let d = l.slot_time(25).duration_since(l.slot_time(0));
        assert_eq!(d, Duration::from_secs(1));
        assert_eq!(l.send_time(3).duration_since(l.slot_time(3)), Duration::from_millis(100));
        assert!(l.current_slot() < 2);
    }
}
