//! Memory sizing: how much of a budget the template may take, given what the models and the
//! run's frame jobs hold (measured from the process's resident memory).

use lipsync_stages::template::SharedTemplate;

use crate::metrics::rss_bytes;

/// The memory budget `render` sizes its template cache to by default (400 MB).
pub const DEFAULT_MEMORY_BUDGET: usize = 400_000_000;

/// The smallest template cache [`auto_cache`] picks.
pub const MIN_TEMPLATE_CACHE: usize = 16 << 20;

/// What [`auto_cache`] leaves for what it cannot see yet: the audio encoder's working memory,
/// the template decoder's own frames, image encoders, allocator slack. Measured on the sample
/// (720p): without it renders peaked 12-20 MiB over the budget.
const CACHE_MARGIN: usize = 40 << 20;

/// [`CACHE_MARGIN`] for a render from a [`lipsync_stages::template::JpegTemplate`], which has no
/// decoder at work once it is open and no whole frames in its jobs: the audio encoder's working
/// memory, the JPEG encoders, the frame in flight while the template opens, allocator slack.
/// Measured on the sample (720p, full model): peaks came 16 MiB over the models, the JPEG
/// template and the frame jobs.
const JPEG_MARGIN: usize = 20 << 20;

/// What an H.264 output's encoder holds (libx264 at the settings of
/// `lipsync_stages::video_writer`, 720p: measured 22 MB).
pub const VIDEO_ENCODER_BYTES: usize = 24 << 20;

/// The template cache that keeps the process within `budget`: every decoded frame when they
/// fit in what is left after the memory in use now and `reserve` (what the run will add:
/// frame jobs, an encoder), else what is left, at least [`MIN_TEMPLATE_CACHE`]. Without a
/// resident-memory reading (not Linux), the default cache.
pub fn auto_cache(template: &SharedTemplate, budget: usize, reserve: usize) -> usize {
    match rss_bytes() {
        Some(rss) => fit_cache(template.len() * template.decoded_frame_bytes(), budget, rss + reserve),
        None => lipsync_stages::template::DEFAULT_CACHE,
    }
}

/// [`auto_cache`]'s rule: `whole` (every decoded frame) if it fits in `budget` less `used` and
/// the margin, else what is left, at least [`MIN_TEMPLATE_CACHE`].
pub fn fit_cache(whole: usize, budget: usize, used: usize) -> usize {
    budget.saturating_sub(used + CACHE_MARGIN).min(whole).max(MIN_TEMPLATE_CACHE)
}

/// The bytes a [`lipsync_stages::template::JpegTemplate`] may hold within `budget`, with the
/// memory in use now, `reserve` still to come and [`JPEG_MARGIN`] left; without a
/// resident-memory reading, the default template cache.
pub fn jpeg_template_limit(budget: usize, reserve: usize) -> usize {
    let rss = rss_bytes();
    let limit = match rss {
        Some(rss) => budget.saturating_sub(rss + reserve + JPEG_MARGIN),
        None => lipsync_stages::template::DEFAULT_CACHE,
    };
    tracing::debug!(rss, limit, "JPEG template limit");
    limit
}
