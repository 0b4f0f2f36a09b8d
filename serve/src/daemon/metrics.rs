//! The daemon's metrics in the Prometheus / OpenMetrics text format (`GET /metrics` on the
//! `--http` listener). Names follow Prometheus conventions: `lipsync_` prefix, base units
//! (seconds, bytes), `_total` on counters. The daemon keeps HDR histograms; a scrape turns
//! each into a Prometheus histogram with the fixed buckets below.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hdrhistogram::Histogram;
use lipsync_pipelines::runtime::lock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::daemon::shared::Shared;

/// Bucket bounds of the latency histograms, seconds.
const SECONDS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48];

/// The daemon's state, read at each scrape.
#[derive(Debug)]
struct DaemonCollector(Arc<Shared>);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// A histogram as Prometheus takes it: sum, count, non-cumulative (upper bound, count) buckets.
type Buckets = (f64, u64, Vec<(f64, u64)>);

/// One labelled series of a histogram family.
type Series<'a> = (Vec<(&'a str, String)>, Buckets);

/// Non-cumulative bucket counts, sum and count of a nanosecond histogram, in seconds.
fn buckets(h: &Histogram<u64>) -> Buckets {
    let mut out = Vec::with_capacity(SECONDS.len() + 1);
    let mut below = 0;
    for b in SECONDS {
        let upto = h.count_between(0, (b * 1e9) as u64);
        out.push((b, upto - below));
        below = upto;
    }
    // The encoder writes `+Inf` for `f64::MAX`.
    out.push((f64::MAX, h.len() - below));
    (h.mean() * h.len() as f64 / 1e9, h.len(), out)
}

fn histogram_of(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[Series<'_>],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Histogram)?;
    for (labels, (sum, count, b)) in series {
        m.encode_family(labels)?.encode_histogram::<NoLabelSet>(*sum, *count, b, None)?;
    }
    Ok(())
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let sh = &self.0;
        stages(&mut enc, sh)?;
        sessions(&mut enc, sh)?;
        unets(&mut enc, sh)?;
        avatars(&mut enc, sh)
    }
}

/// Per-stage service and queue-wait times, frame latency, first-frame latency.
fn stages(enc: &mut DescriptorEncoder<'_>, sh: &Shared) -> Result<(), std::fmt::Error> {
    let secs = Unit::Seconds;
    let stages = sh.stages.all();
    let service: Vec<_> = stages.iter().map(|(n, s, _)| (vec![("stage", n.clone())], buckets(&lock(s)))).collect();
    histogram_of(enc, "lipsync_stage_service", "Time a stage spends on one item", Some(&secs), &service)?;
    let waits: Vec<_> = stages.iter().map(|(n, _, w)| (vec![("stage", n.clone())], buckets(&lock(w)))).collect();
    histogram_of(enc, "lipsync_stage_queue_wait", "Time a stage waits for its next item", Some(&secs), &waits)?;
    let latency = [(vec![], buckets(&lock(&sh.stages.frame_latency)))];
    let what = "From the arrival of the audio that makes a frame final to the frame sent";
    histogram_of(enc, "lipsync_frame_latency", what, Some(&secs), &latency)?;
    let first = [(vec![], buckets(&lock(&sh.stages.first_frame)))];
    histogram_of(enc, "lipsync_first_frame", "From a session's open to its first frame", Some(&secs), &first)
}

/// Sessions and frames, and the HTTP side's connections, relays and refusals.
fn sessions(enc: &mut DescriptorEncoder<'_>, sh: &Shared) -> Result<(), std::fmt::Error> {
    gauge(enc, "lipsync_sessions_active", "Sessions open now", None, sh.active.load(Ordering::SeqCst) as i64)?;
    counter(enc, "lipsync_sessions", "Sessions opened", sh.sessions_total.load(Ordering::Relaxed))?;
    counter(enc, "lipsync_sessions_failed", "Sessions that failed", sh.sessions_failed.load(Ordering::Relaxed))?;
    counter(enc, "lipsync_frames", "Frames sent", sh.frames_total.load(Ordering::Relaxed))?;
    counter(enc, "lipsync_idle_frames", "Idle frames sent", sh.idle_frames_total.load(Ordering::Relaxed))?;
    let open = |n: &std::sync::atomic::AtomicUsize| n.load(Ordering::Relaxed) as i64;
    gauge(enc, "lipsync_http_connections", "HTTP connections open now", None, open(&sh.http.connections))?;
    gauge(enc, "lipsync_http_websockets", "WebSocket relays open now", None, open(&sh.http.websockets))?;
    let what = "HTTP requests and connections refused, by reason";
    let mut m = enc.encode_descriptor("lipsync_http_refused", what, None, MetricType::Counter)?;
    for why in crate::daemon::http_stats::Refused::ALL {
        ConstCounter::new(sh.http.refused(why)).encode(m.encode_family(&[("reason", why.label())])?)?;
    }
    Ok(())
}

/// Each UNet's run times, batch sizes and errors, by model file and provider.
fn unets(enc: &mut DescriptorEncoder<'_>, sh: &Shared) -> Result<(), std::fmt::Error> {
    // Label values are written as they are: keep quotes, backslashes and line breaks out.
    let clean = |p: &std::path::Path| p.display().to_string().replace(['"', '\\', '\n', '\r'], "_");
    let unets = sh.registry.models.unets().into_iter().map(|(p, u)| (clean(&p), u)).collect::<Vec<_>>();
    let label = |model: &str, provider: String| vec![("model", model.to_string()), ("provider", provider)];
    let runs: Vec<_> =
        unets.iter().map(|(m, u)| (label(m, u.provider().to_string()), buckets(&lock(&u.stats().service)))).collect();
    let what = "Time of one UNet run (for a remote backend: one request, retries included)";
    histogram_of(enc, "lipsync_unet_request", what, Some(&Unit::Seconds), &runs)?;
    let sizes: Vec<_> = unets
        .iter()
        .map(|(m, u)| {
            let counts: Vec<u64> = u.stats().sizes.iter().map(|n| n.load(Ordering::Relaxed)).collect();
            let (count, sum) = counts.iter().enumerate().fold((0, 0), |(c, s), (k, n)| (c + n, s + k as u64 * n));
            let mut b: Vec<(f64, u64)> = counts.iter().enumerate().skip(1).map(|(k, n)| (k as f64, *n)).collect();
            b.push((f64::MAX, 0));
            (label(m, u.provider().to_string()), (sum as f64, count, b))
        })
        .collect();
    histogram_of(enc, "lipsync_unet_batch_frames", "Frames per UNet run", None, &sizes)?;
    let mut m = enc.encode_descriptor("lipsync_unet_errors", "UNet runs that failed", None, MetricType::Counter)?;
    for (model, u) in &unets {
        let labels = label(model, u.provider().to_string());
        ConstCounter::new(u.stats().errors.load(Ordering::Relaxed)).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The avatar cache: avatars loaded, each one's memory, the bound; the daemon's uptime.
fn avatars(enc: &mut DescriptorEncoder<'_>, sh: &Shared) -> Result<(), std::fmt::Error> {
    let avatars = sh.registry.list();
    let loaded = avatars.iter().filter(|a| a.loaded).count();
    gauge(enc, "lipsync_avatars_loaded", "Avatars in the cache", None, loaded as i64)?;
    let bytes = Unit::Bytes;
    let what = "An avatar's memory: template, sessions and models";
    let mut m = enc.encode_descriptor("lipsync_avatar_memory", what, Some(&bytes), MetricType::Gauge)?;
    for a in avatars.iter().filter(|a| a.loaded) {
        ConstGauge::new(a.memory_bytes as i64).encode(m.encode_family(&[("avatar", a.name.as_str())])?)?;
    }
    let limit = sh.registry.settings.cache_bytes as i64;
    gauge(enc, "lipsync_avatar_cache_limit", "Memory bound of the avatar cache", Some(&bytes), limit)?;
    let up = sh.started.elapsed().as_secs() as i64;
    gauge(enc, "lipsync_uptime", "Seconds since the daemon started", Some(&Unit::Seconds), up)
}

/// The metrics text (OpenMetrics, which Prometheus scrapes) of the daemon now.
pub(crate) fn render(shared: &Arc<Shared>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector(shared.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The content type of [`render`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
