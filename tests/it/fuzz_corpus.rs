//! The fuzzers' committed seed corpus (from real sessions and inputs) and any inputs they once
//! found to fail (`fuzz/regressions/`) replayed through the fuzz entry points: none panics.
//! The coverage-guided runs themselves are `scripts/fuzz.sh` (AFL++).

use std::time::{Duration, Instant};

use crate::common::root;
use lipsync_serve::fuzzing;

#[test]
fn every_corpus_input_is_handled() {
    let mut n = 0;
    for (dir, target) in [
        ("protocol", fuzzing::protocol as fn(&[u8])),
        ("audio", fuzzing::audio as fn(&[u8])),
        ("avatar", fuzzing::avatar as fn(&[u8])),
        ("session", fuzzing::session as fn(&[u8])),
    ] {
        for base in ["fuzz/corpus", "fuzz/regressions"] {
            let Ok(entries) = std::fs::read_dir(root().join(base).join(dir)) else { continue };
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let t = Instant::now();
                target(&data);
                assert!(t.elapsed() < Duration::from_secs(10), "{} took {:?}", path.display(), t.elapsed());
                // Every prefix too: truncated input is the commonest hostile input.
                for cut in [1, 9, data.len() / 2, data.len().saturating_sub(1)] {
                    target(&data[..cut.min(data.len())]);
                }
                n += 1;
            }
        }
    }
    assert!(n >= 14, "the committed corpus is there ({n} inputs)");
}
