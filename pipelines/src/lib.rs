//! The lipsync runtime and its one stage graph.
//!
//! - [`runtime`]: the [`Stage`](runtime::Stage) trait and the threads that run stages (named,
//!   optionally pinned), bounded channels with backpressure, cancellation on the first error
//!   or panic, buffer pools.
//! - [`graph`]: the one graph (audio -> frames -> prep -> UNet batcher -> composite -> encode
//!   -> sink), built the same way for a render and for a session, and its stages, one file each.
//! - [`resources`]: what a graph needs for an avatar (models, template), opened once under
//!   given limits, by a render and by the daemon's registry alike.
//! - [`live`]: a live session's clock, interrupts and pacing.
//! - [`job`]: the items travelling through the graph, and its per-run counters.
//! - [`render`]: file source -> graph -> file sink ([`file_sink`]).
//! - [`session`]: socket source -> graph -> socket sink, for `lipsync serve`.
//! - [`metrics`]: HDR histograms, reports.

pub mod allocator;
pub mod file_sink;
pub mod graph;
pub mod job;
pub mod live;
pub mod metrics;
pub mod render;
pub mod resources;
pub mod runtime;
pub mod session;
