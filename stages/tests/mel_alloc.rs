//! The incremental mel allocates nothing per row in steady state (counting global allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use lipsync_stages::mel::{MelSpectrogram, N_MELS};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> usize {
    ALLOCS.with(Cell::get)
}

#[test]
fn steady_state_mel_rows_allocate_nothing() {
    let signal: Vec<f32> = (0..16_000 * 20).map(|i| ((i as f32) * 0.013).sin() * 0.3).collect();
    let mut mel = MelSpectrogram::new();
    let mut out: Vec<f32> = Vec::with_capacity(64 * N_MELS);
    // Warm up with the chunk sizes used below so every buffer reaches its working size.
    for chunk in signal[..16_000].chunks(320) {
        out.clear();
        mel.push(chunk, &mut out);
    }
    let before = allocs();
    let mut rows = 0;
    for chunk in signal[16_000..].chunks(320) {
        out.clear();
        rows += mel.push(chunk, &mut out);
    }
    let during = allocs() - before;
    assert!(rows > 1500, "{rows} rows");
    assert_eq!(during, 0, "{during} allocations for {rows} mel rows");
    // The allocator does count: a fresh spectrogram allocates.
    let before = allocs();
    let _fresh = MelSpectrogram::new();
    assert!(allocs() > before);
}
