//! lipsync-pipelines' integration tests, one binary with a module per behaviour: the render's
//! memory sizing, the runtime, sessions against renders. (The allocation tests have a binary of
//! their own: they count allocations with a global allocator, by thread name, which other
//! tests' threads would pollute.)

mod common;

mod render_memory;
mod runtime;
mod session;
