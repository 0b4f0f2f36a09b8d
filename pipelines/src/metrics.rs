//! Metrics: per-stage service and queue-wait HDR histograms, end-to-end frame latency,
//! throughput, CPU time; summarised as a serialisable report, exportable as an HdrHistogram
//! interval log.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The monotonic clock every stage reads (quanta: TSC-based where available).
pub type Clock = quanta::Clock;

/// Highest value recorded (ns): 10 minutes.
const MAX_NS: u64 = 600_000_000_000;

/// An empty nanosecond histogram (1 ns .. 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

/// One stage's histograms, in nanoseconds.
#[derive(Debug, Clone)]
pub struct StageMetrics {
    /// Time spent working on each item.
    pub service: Histogram<u64>,
    /// Time spent waiting for each input item.
    pub wait: Histogram<u64>,
}

impl Default for StageMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl StageMetrics {
    /// Empty histograms.
    pub fn new() -> Self {
        Self { service: histogram(), wait: histogram() }
    }

    /// Records the service time of one item.
    pub fn record_service(&mut self, d: Duration) {
        self.service.saturating_record((d.as_nanos() as u64).max(1));
    }

    /// Records the queue-wait time of one item.
    pub fn record_wait(&mut self, d: Duration) {
        self.wait.saturating_record((d.as_nanos() as u64).max(1));
    }
}

/// End-to-end latency of frames (ns) and the run's frame count.
#[derive(Debug, Clone)]
pub struct LatencyRecorder {
    /// Per-frame latency from entering the pipeline to leaving the sink.
    pub e2e: Histogram<u64>,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self { e2e: histogram() }
    }
}

impl LatencyRecorder {
    /// Records one frame's latency.
    pub fn record(&mut self, d: Duration) {
        self.e2e.saturating_record((d.as_nanos() as u64).max(1));
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// Summarises a nanosecond histogram in milliseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |ns: u64| ns as f64 / 1e6;
        if h.is_empty() {
            return Self { count: 0, mean: 0.0, p50: 0.0, p90: 0.0, p99: 0.0, p999: 0.0, max: 0.0 };
        }
        Self {
            count: h.len(),
            mean: h.mean() / 1e6,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One stage in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// Stage name.
    pub name: String,
    /// Service time per item.
    pub service_ms: Percentiles,
    /// Queue-wait time per item.
    pub wait_ms: Percentiles,
    /// CPU time of the stage's thread (s).
    pub cpu_seconds: f64,
    /// Core the stage was pinned to.
    pub core: Option<usize>,
}

/// A run's latency report (`--report FILE.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// What ran (`render`, `serve`, ...).
    pub kind: String,
    /// Frames produced.
    pub frames: u64,
    /// Wall time (s).
    pub wall_seconds: f64,
    /// Frames per second over the whole run (start-up included).
    pub frames_per_second: f64,
    /// Frames per second from the first frame out to the last (steady state).
    pub steady_frames_per_second: f64,
    /// Time from start to the first frame out (s).
    pub first_frame_seconds: f64,
    /// End-to-end latency per frame.
    pub end_to_end_ms: Percentiles,
    /// Every stage, in pipeline order.
    pub stages: Vec<StageSummary>,
    /// Free-form settings of the run (batch, threads, pinning, ...).
    pub settings: serde_json::Value,
}

/// Writes the histograms as an HdrHistogram interval log (one tagged interval per stage
/// histogram and one for end-to-end latency), values in nanoseconds.
pub fn write_hlog(
    out: &mut impl std::io::Write,
    stages: &[(String, StageMetrics)],
    e2e: &Histogram<u64>,
    wall: Duration,
) -> std::io::Result<()> {
    use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
    use hdrhistogram::serialization::V2DeflateSerializer;
    let mut serializer = V2DeflateSerializer::new();
    let mut builder = IntervalLogWriterBuilder::new();
    builder.add_comment("lipsync latency histograms (ns); tags: <stage>.service, <stage>.wait, e2e");
    let mut log = builder.begin_log_with(out, &mut serializer)?;
    let io = |e: hdrhistogram::serialization::interval_log::IntervalLogWriterError<_>| {
        std::io::Error::other(format!("{e:?}"))
    };
    for (name, m) in stages {
        for (suffix, h) in [("service", &m.service), ("wait", &m.wait)] {
            let tag = format!("{name}.{suffix}");
            log.write_histogram(h, Duration::ZERO, wall, Tag::new(&tag)).map_err(io)?;
        }
    }
    log.write_histogram(e2e, Duration::ZERO, wall, Tag::new("e2e")).map_err(io)?;
    Ok(())
}

impl RunReport {
    /// The report as a readable table.
    pub fn table(&self) -> String {
        let r = self;
        let mut s = format!(
        "{} frames in {:.2} s: {:.2} frames/s ({:.2} steady, first frame after {:.2} s); end to end p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
        r.frames,
        r.wall_seconds,
        r.frames_per_second,
        r.steady_frames_per_second,
        r.first_frame_seconds,
        r.end_to_end_ms.p50,
        r.end_to_end_ms.p99,
        r.end_to_end_ms.max
    );
        s += &format!(
            "{:<13} {:>6} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>7}\n",
            "stage", "items", "svc p50", "p90", "p99", "p99.9", "max", "wait p50", "p99", "max", "cpu s"
        );
        for st in &r.stages {
            let (a, w) = (&st.service_ms, &st.wait_ms);
            s += &format!(
                "{:<13} {:>6} | {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} | {:>8.3} {:>8.3} {:>8.3} | {:>7.2}\n",
                st.name, a.count, a.p50, a.p90, a.p99, a.p999, a.max, w.p50, w.p99, w.max, st.cpu_seconds
            );
        }
        s += "(milliseconds; service = time working on an item, wait = time blocked on its input queue)\n";
        s
    }
}

/// The process's resident memory (Linux `/proc/self/status`), bytes; `None` elsewhere.
pub fn rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}
