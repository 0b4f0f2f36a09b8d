//! The render's default template cache fits the memory budget: the whole template when it fits,
//! what is left when it does not, never under the floor.

use std::path::PathBuf;
use std::sync::Arc;

use lipsync_pipelines::resources::{auto_cache, fit_cache, MIN_TEMPLATE_CACHE};
use lipsync_stages::template::SharedTemplate;

const MB: usize = 1 << 20;

#[test]
fn the_cache_fits_what_the_budget_leaves() {
    // 200 frames of 720p YUV 4:2:0 (1.3 MiB each): 264 MiB in all.
    let whole = 200 * 1280 * 720 * 3 / 2;
    // A small model leaves room for all of it.
    assert_eq!(fit_cache(whole, 400 * MB, 60 * MB), whole);
    // A large one leaves room for some (the margin comes off too).
    let some = fit_cache(whole, 400 * MB, 300 * MB);
    assert!(some > MIN_TEMPLATE_CACHE && some < 100 * MB - 30 * MB, "{}", some / MB);
    // More in use, less cache.
    assert!(fit_cache(whole, 400 * MB, 320 * MB) < some);
    // Nothing left: the floor.
    assert_eq!(fit_cache(whole, 400 * MB, 500 * MB), MIN_TEMPLATE_CACHE);
    // A tiny template is held whole, but the floor still stands.
    assert_eq!(fit_cache(MB, 400 * MB, 60 * MB), MIN_TEMPLATE_CACHE);
}

#[test]
fn auto_cache_reads_this_process() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/video/gop10.mp4");
    let t = Arc::new(SharedTemplate::open(&fixture, MB).unwrap());
    // A budget far above this process: the whole (small) template, so the floor.
    assert_eq!(auto_cache(&t, 1 << 40, 0), MIN_TEMPLATE_CACHE.max(t.len() * t.decoded_frame_bytes()));
    // A budget below what this process holds: the floor.
    assert_eq!(auto_cache(&t, 1, 0), MIN_TEMPLATE_CACHE);
}
