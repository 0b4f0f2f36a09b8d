//! `lipsync bench serve`'s measurement: rounds of concurrent sessions streamed through a
//! running daemon, with first-frame latency, frame latency (and its drift), frames/s and the
//! UNet's mean batch.

use std::path::Path;
use std::time::Instant;

use lipsync_pipelines::metrics::{histogram, Percentiles};
use serde::Serialize;

use crate::client::{stream, ClientError, Connection, StreamOutcome, StreamSpec};
use crate::daemon::stats::StatsReply;

/// One round of concurrent sessions.
#[derive(Debug, Serialize)]
pub struct Round {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Frames received in all.
    pub frames: usize,
    /// Wall time of the round.
    pub wall_seconds: f64,
    /// Frames received per second.
    pub frames_per_second: f64,
    /// Frames per second real time needs.
    pub real_time_fps_demand: f64,
    /// Whether the round ran in real time (paced rounds only).
    pub keeps_up: bool,
    /// First-frame latency, mean over sessions (ms).
    pub first_frame_ms_mean: f64,
    /// First-frame latency, worst session (ms).
    pub first_frame_ms_max: f64,
    /// Frame latency over all frames (ms).
    pub latency_ms: Percentiles,
    /// Median latency of the first quarter of each session (ms).
    pub latency_p50_first_quarter_ms: f64,
    /// Median latency of the last quarter of each session (ms).
    pub latency_p50_last_quarter_ms: f64,
    /// Mean UNet batch during the round.
    pub mean_unet_batch: f64,
}

/// Runs one round: `n` sessions streaming `spec` at once (`keeps_up` is only meaningful when
/// `spec.realtime` paces the audio).
pub fn round(socket: &Path, n: usize, spec: &StreamSpec) -> Result<Round, ClientError> {
    let fps = 25.0;
    let before = Connection::connect(socket)?.stats()?;
    let t = Instant::now();
    let outcomes: Vec<Result<StreamOutcome, ClientError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n).map(|_| scope.spawn(|| stream(socket, spec, |_, _| Ok(())))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(ClientError::Frames("a client thread panicked".into()))))
            .collect()
    });
    let wall = t.elapsed().as_secs_f64();
    let outcomes = outcomes.into_iter().collect::<Result<Vec<_>, _>>()?;
    let after = Connection::connect(socket)?.stats()?;
    let batch = {
        let b =
            |s: &StatsReply| s.unet.iter().map(|u| (u.batches, u.frames)).fold((0, 0), |a, x| (a.0 + x.0, a.1 + x.1));
        let (b0, f0) = b(&before);
        let (b1, f1) = b(&after);
        (f1 - f0) as f64 / ((b1 - b0).max(1)) as f64
    };
    let mut hist = histogram();
    for o in &outcomes {
        for r in &o.records {
            hist.saturating_record(((r.latency_ms * 1e6) as u64).max(1));
        }
    }
    let frames: usize = outcomes.iter().map(|o| o.frames).sum();
    let ff: Vec<f64> = outcomes.iter().map(|o| o.first_frame_ms).collect();
    Ok(Round {
        sessions: n,
        frames,
        wall_seconds: wall,
        frames_per_second: frames as f64 / wall,
        real_time_fps_demand: n as f64 * fps,
        keeps_up: spec.realtime && wall <= outcomes[0].audio_seconds * 1.05 + 1.0,
        first_frame_ms_mean: ff.iter().sum::<f64>() / ff.len() as f64,
        first_frame_ms_max: ff.iter().copied().fold(0.0, f64::max),
        latency_ms: Percentiles::of(&hist),
        latency_p50_first_quarter_ms: quarter_p50(&outcomes, false),
        latency_p50_last_quarter_ms: quarter_p50(&outcomes, true),
        mean_unet_batch: batch,
    })
}

fn quarter_p50(outcomes: &[StreamOutcome], last: bool) -> f64 {
    let mut v: Vec<f64> = outcomes
        .iter()
        .flat_map(|o| {
            let q = (o.records.len() / 4).max(1);
            let part = if last {
                &o.records[o.records.len().saturating_sub(q)..]
            } else {
                &o.records[..q.min(o.records.len())]
            };
            part.iter().map(|r| r.latency_ms)
        })
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The rounds as a table.
pub fn table(rounds: &[Round]) -> String {
    let mut t = format!(
        "{:>8} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>7} {:>6}\n",
        "sessions",
        "frames",
        "fps",
        "first ms",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p50 1st 1/4",
        "p50 4th 1/4",
        "batch",
        "keeps"
    );
    for r in rounds {
        t += &format!(
            "{:>8} {:>7} {:>8.1} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>7.2} {:>6}\n",
            r.sessions,
            r.frames,
            r.frames_per_second,
            r.first_frame_ms_mean,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.latency_ms.max,
            r.latency_p50_first_quarter_ms,
            r.latency_p50_last_quarter_ms,
            r.mean_unet_batch,
            if r.keeps_up { "yes" } else { "no" }
        );
    }
    t
}
