//! A counting global allocator for the allocation tests: allocations (and reallocations) are
//! tallied per thread, by thread name.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const SLOTS: usize = 512;
static COUNTS: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
static NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    let _ = BUSY.try_with(|busy| {
        if busy.get() {
            return;
        }
        busy.set(true);
        let _ = SLOT.try_with(|slot| {
            if slot.get() == usize::MAX {
                let name = std::thread::current().name().unwrap_or("").to_string();
                let mut names = NAMES.lock().unwrap();
                names.push(name);
                slot.set((names.len() - 1).min(SLOTS - 1));
            }
            COUNTS[slot.get()].fetch_add(1, Ordering::Relaxed);
        });
        busy.set(false);
    });
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Threads seen so far (the slot of the next new thread).
pub fn slots() -> usize {
    NAMES.lock().unwrap().len()
}

/// Allocations per thread name, over the threads first seen at or after `first_slot`.
pub fn by_name_since(first_slot: usize) -> HashMap<String, u64> {
    let names = NAMES.lock().unwrap().clone();
    let mut out = HashMap::new();
    for (slot, name) in names.iter().enumerate().skip(first_slot) {
        *out.entry(name.clone()).or_insert(0) += COUNTS[slot.min(SLOTS - 1)].load(Ordering::Relaxed);
    }
    out
}

/// Allocations of the calling thread so far.
pub fn this_thread() -> u64 {
    count_self();
    SLOT.with(|slot| COUNTS[slot.get()].load(Ordering::Relaxed))
}

/// Makes sure the calling thread has a slot (its first allocation would make one too); the
/// allocations this makes are not counted.
fn count_self() {
    BUSY.with(|busy| {
        let was = busy.replace(true);
        SLOT.with(|slot| {
            if slot.get() == usize::MAX {
                let name = std::thread::current().name().unwrap_or("").to_string();
                let mut names = NAMES.lock().unwrap();
                names.push(name);
                slot.set((names.len() - 1).min(SLOTS - 1));
            }
        });
        busy.set(was);
    });
}
