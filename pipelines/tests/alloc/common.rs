//! What this binary's test modules share.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// A file under the repository's `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

/// Counts are per thread name and every graph names its threads alike: the tests of this
/// binary run one at a time, each holding this.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|p| p.into_inner())
}
