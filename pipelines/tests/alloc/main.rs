//! lipsync-pipelines' allocation tests: a counting global allocator tallies allocations per
//! thread name, so these run in a binary of their own (other tests' stage threads would share
//! the names), one test at a time.

mod alloc_counter;
mod common;

mod render_alloc;
mod session_alloc;
