//! `lipsync serve`: the daemon (crate `lipsync-serve`), stopped by SIGTERM/SIGINT.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use lipsync_serve::ServeOptions;

use crate::Cli;

/// `lipsync serve` flags (each overrides the same key of `--config`).
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    options: ServeOptions,
}

/// Runs the daemon until SIGTERM/SIGINT, then drains it (a second SIGINT cuts the drain short).
pub fn run(cli: &Cli, args: &ServeArgs) -> Result<()> {
    let settings = args.options.clone().resolve()?;
    let rt = cli.runtime()?;
    let stop = Arc::new(AtomicBool::new(false));
    // A second SIGINT during the drain exits at once (the socket is already gone by then).
    signal_hook::flag::register_conditional_shutdown(signal_hook::consts::SIGINT, 130, stop.clone())
        .context("installing signal handlers")?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    lipsync_serve::run(settings, rt, stop)?;
    Ok(())
}
