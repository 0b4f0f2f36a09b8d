//! The daemon: bind, accept and drain ([`listener`]), one thread per connection running its
//! state machine (`connection`, with its transitions in `steps`), the avatars and the models
//! they share ([`registry`]), the `Stats` reply ([`stats`]) and the HTTP side (`http`: the
//! browser page, its WebSocket relay and `/metrics`; Host, Origin and token checked,
//! connections capped and timed; `fds` sizes its cap so that the Unix socket always has
//! descriptors; docs/security.md).

mod connection;
mod deadline;
mod error;
pub(crate) mod fds;
mod http;
mod http_stats;
pub mod listener;
mod metrics;
mod open;
pub mod registry;
mod shared;
pub mod stats;
mod steps;
mod writer;

pub use error::ServeError;
pub use listener::{run, Daemon};
