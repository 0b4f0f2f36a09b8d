//! The process's one allocator setting, for every front end (`lipsync` and an in-process
//! daemon alike).
//!
//! glibc's malloc raises its mmap threshold as large blocks are freed, after which later large
//! blocks (ONNX Runtime's model-load buffers; a session's frame jobs and tensors, 0.3 to 2.5
//! MiB each, freed when it closes) stay in its heaps: resident memory would follow the peak of
//! what was ever allocated (about 90 MB more for the full UNet; a daemon's memory would follow
//! its busiest moment, not the sessions open now). A fixed threshold hands them back to the
//! OS. Steady-state hot paths allocate nothing, so this costs no syscalls per frame.

/// Blocks this large or larger are mapped and unmapped on their own.
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] (elsewhere: nothing). Idempotent; call
/// it early, before large buffers are allocated.
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator tunable; glibc takes the arena lock for it.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}
