//! The `Stats` reply: per-stage service times (every session's stages, by name), UNet
//! batchers, open sessions.

use std::sync::atomic::Ordering;

use lipsync_pipelines::metrics::Percentiles;
use lipsync_pipelines::runtime::lock;
use serde::{Deserialize, Serialize};

use crate::daemon::shared::Shared;

/// The `Stats` reply.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsReply {
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// Sessions open now.
    pub sessions_open: usize,
    /// Sessions opened since start.
    pub sessions_total: u64,
    /// Frames sent since start.
    pub frames_total: u64,
    /// Per-stage service time since start (ms).
    pub stages: Vec<(String, Percentiles)>,
    /// One entry per UNet model.
    pub unet: Vec<UnetInfo>,
    /// Open sessions.
    pub sessions: Vec<SessionInfo>,
    /// The daemon's settings (after the config file and flags).
    pub settings: serde_json::Value,
}

/// A UNet service in `Stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UnetInfo {
    /// Model path.
    pub model: String,
    /// Execution provider in use (`cpu`, `cuda` when it could be started, or `remote`).
    pub provider: String,
    /// Runs that failed (for a remote server: requests that failed after their retries).
    #[serde(default)]
    pub errors: u64,
    /// The model's precision: `fp32`, or `int8` for an avatar's quantized UNet.
    #[serde(default)]
    pub precision: String,
    /// Runs.
    pub batches: u64,
    /// Frames.
    pub frames: u64,
    /// Mean frames per run.
    pub mean_batch: f64,
    /// Runs per batch size: entry `k` counts runs of `k + 1` frames.
    pub batch_sizes: Vec<u64>,
    /// Run time per batch (ms).
    pub service_ms: Percentiles,
}

/// An open session in `Stats`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Id.
    pub id: u64,
    /// Avatar.
    pub avatar: String,
    /// Seconds open.
    pub seconds: f64,
    /// Frames sent.
    pub frames: u64,
    /// Frames per second since open.
    pub frames_per_second: f64,
    /// Time from open to the first frame (ms), when sent.
    pub first_frame_ms: Option<f64>,
    /// Frames prepared and not yet sent.
    pub in_flight: u64,
    /// Latency from the audio that made a frame final to the frame sent (ms).
    pub latency_ms: Percentiles,
}

/// The daemon's statistics now.
pub(crate) fn stats(sh: &Shared) -> StatsReply {
    let sessions = {
        let map = lock(&sh.sessions);
        let mut v: Vec<SessionInfo> = map
            .values()
            .map(|s| {
                let st = &s.stats;
                let secs = st.started.elapsed().as_secs_f64();
                let frames = st.frames.load(Ordering::Relaxed);
                let ff = st.first_frame_us.load(Ordering::Relaxed);
                SessionInfo {
                    id: s.id,
                    avatar: s.avatar.clone(),
                    seconds: secs,
                    frames,
                    frames_per_second: frames as f64 / secs.max(1e-9),
                    first_frame_ms: (ff > 0).then_some(ff as f64 / 1000.0),
                    in_flight: st.in_flight.load(Ordering::Relaxed),
                    latency_ms: st.latency(),
                }
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    };
    let unet = sh
        .registry
        .models
        .unets()
        .iter()
        .map(|(path, u)| {
            let st = u.stats();
            let batches = st.batches();
            let frames = st.frames();
            UnetInfo {
                model: path.display().to_string(),
                provider: u.provider().to_string(),
                errors: st.errors.load(Ordering::Relaxed),
                precision: u.backend().precision.to_string(),
                batches,
                frames,
                mean_batch: frames as f64 / (batches.max(1)) as f64,
                batch_sizes: st.sizes.iter().skip(1).map(|n| n.load(Ordering::Relaxed)).collect(),
                service_ms: Percentiles::of(&lock(&st.service)),
            }
        })
        .collect();
    StatsReply {
        uptime_seconds: sh.started.elapsed().as_secs_f64(),
        sessions_open: sh.active.load(Ordering::SeqCst),
        sessions_total: sh.sessions_total.load(Ordering::Relaxed),
        frames_total: sh.frames_total.load(Ordering::Relaxed),
        stages: sh.stages.summary(),
        unet,
        sessions,
        settings: sh.registry.settings.summary(),
    }
}

fn pct_row(name: &str, p: &Percentiles) -> String {
    format!("  {name:<22} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n", p.count, p.p50, p.p90, p.p99, p.max)
}

impl StatsReply {
    /// The `lipsync stats` table; `rate` is frames/s over the last interval, when known.
    pub fn table(&self, rate: Option<f64>) -> String {
        let s = self;
        let mut t = String::new();
        let fps = rate.unwrap_or(s.frames_total as f64 / s.uptime_seconds.max(1e-9));
        t += &format!(
            "uptime {:.1} s  sessions {} open / {} total  frames {}  {:.1} frames/s{}\n",
            s.uptime_seconds,
            s.sessions_open,
            s.sessions_total,
            s.frames_total,
            fps,
            if rate.is_some() { " (last interval)" } else { " (since start)" }
        );
        t += &format!(
            "  {:<22} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
            "stage (service, ms)", "count", "p50", "p90", "p99", "max"
        );
        for (name, p) in &s.stages {
            t += &pct_row(name, p);
        }
        for u in &s.unet {
            let errors = if u.errors > 0 { format!(", {} failed", u.errors) } else { String::new() };
            let name = format!("unet {} (batch {:.1}{errors})", u.provider, u.mean_batch);
            t += &pct_row(&name, &u.service_ms);
        }
        if !s.sessions.is_empty() {
            t += &format!(
                "  {:<22} {:>8} {:>9} {:>9} {:>9} {:>9}\n",
                "session (latency, ms)", "frames", "p50", "p90", "p99", "max"
            );
            for x in &s.sessions {
                let name = format!("#{} {} {:.0} f/s", x.id, x.avatar, x.frames_per_second);
                let mut p = x.latency_ms.clone();
                p.count = x.frames;
                t += &pct_row(&name, &p);
            }
        }
        t
    }
}
