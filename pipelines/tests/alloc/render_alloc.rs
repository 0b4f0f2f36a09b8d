//! The image hot path allocates nothing per frame in steady state: a counting global allocator
//! tallies allocations per stage thread; rendering more frames adds no allocation to the
//! frames (template fetch), prep, composite, encode (JPEG) and sink stages.

use std::collections::HashMap;

use crate::alloc_counter;
use crate::common::{fixture, one_at_a_time};
use lipsync_pipelines::render::{render, ImageFormat, Output, RenderConfig};
use lipsync_stages::io::avatar::Avatar;
use lipsync_stages::onnx::OrtRuntime;
use lipsync_stages::unet::{Batch, BatchSetting};

/// Renders `frames` frames and returns allocations per stage thread name.
fn allocations(rt: &OrtRuntime, frames: usize) -> HashMap<String, u64> {
    let first_slot = alloc_counter::slots();
    let dir = tempfile::tempdir().unwrap();
    let cfg = RenderConfig {
        batch: BatchSetting::Fixed(Batch::new(2).unwrap()),
        capacity: 2,
        jpeg_quality: 90,
        max_frames: Some(frames),
        template_cache: Some(1 << 30),
        ..RenderConfig::new(
            Avatar::open(&fixture("golden/avatar")).unwrap(),
            fixture("golden/speech_2s.wav"),
            Output::Dir { path: dir.path().join("out"), format: ImageFormat::Jpeg },
        )
    };
    let outcome = render(rt, cfg).unwrap();
    assert_eq!(outcome.frames, frames);
    alloc_counter::by_name_since(first_slot)
}

#[test]
fn image_hot_path_allocates_nothing_per_frame() {
    let _one = one_at_a_time();
    let rt = OrtRuntime::load(None).expect("ONNX Runtime (run scripts/setup.sh)");
    // Both runs cover the whole 5-frame template (ping-pong period 8) and cycle through every
    // pooled job, so buffers reach their working size in both; the longer run adds 24 frames.
    // Channel wake-ups may register a waiter now and then (timing-dependent, a handful per run),
    // so the bound is "far less than one allocation per frame": a per-frame allocation would add
    // at least 24.
    let (short_n, long_n) = (24, 48);
    let short = allocations(&rt, short_n);
    let long = allocations(&rt, long_n);
    for stage in ["ls-frames", "ls-prep", "ls-composite", "ls-encode", "ls-sink"] {
        let a = *short.get(stage).unwrap_or_else(|| panic!("stage {stage} ran: {short:?}"));
        let b = long[stage];
        let extra = b.saturating_sub(a);
        assert!(
            extra * 6 < (long_n - short_n) as u64,
            "stage {stage}: {a} allocations for {short_n} frames, {b} for {long_n}"
        );
    }
    // The counter does count: the UNet stage (ONNX Runtime's API) allocates per batch.
    assert!(long["ls-unet"] > short["ls-unet"], "{short:?} vs {long:?}");
}
