//! lipsync-serve's integration tests, one binary with a module per behaviour: the in-process
//! daemon against renders, live sessions, metrics and the HTTP settings.

mod common;

mod daemon;
mod live;
mod metrics;
