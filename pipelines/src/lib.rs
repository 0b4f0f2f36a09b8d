//! The lipsync runtime and its topologies.
//!
//! - [`runtime`]: stage threads (named, optionally pinned), bounded channels with
//!   backpressure, cancellation on the first error or panic, buffer pools.
//! - [`metrics`]: HDR histograms of service and queue-wait time per stage, end-to-end latency,
//!   reports.
//! - [`render`]: the offline topology behind `lipsync render`.
//! - [`session`]: the streaming topology behind `lipsync serve` (sessions and the shared,
//!   cross-session batching UNet service).

pub mod metrics;
pub mod render;
pub mod runtime;
pub mod session;
