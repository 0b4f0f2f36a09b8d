//! The runtime: backpressure bound, cancellation on error and on panic, no thread left behind.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;
use lipsync_pipelines::metrics::Clock;
use lipsync_pipelines::runtime::{ErrorKind, PinPolicy, Pipeline, PipelineError, Placement, StageError};

/// A source, `mids` pass-through stages and a slow sink, every channel of capacity `cap`.
/// Returns the most items alive at once.
fn run_chain(mids: usize, cap: usize, items: usize) -> i64 {
    let alive = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let mut p = Pipeline::new(PinPolicy::None, Clock::new());
    let (tx, mut rx) = bounded::<usize>(cap);
    {
        let (alive, peak) = (alive.clone(), peak.clone());
        p.spawn("source", Placement::Worker, move |ctx| {
            for i in 0..items {
                let now = alive.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                ctx.send(&tx, i)?;
            }
            Ok(())
        })
        .unwrap();
    }
    for m in 0..mids {
        let (tx2, rx2) = bounded::<usize>(cap);
        let input = std::mem::replace(&mut rx, rx2);
        p.spawn(&format!("mid{m}"), Placement::Worker, move |ctx| {
            while let Some(i) = ctx.recv(&input)? {
                ctx.send(&tx2, i)?;
            }
            Ok(())
        })
        .unwrap();
    }
    {
        let alive = alive.clone();
        p.spawn("sink", Placement::Worker, move |ctx| {
            let mut expect = 0;
            while let Some(i) = ctx.recv(&rx)? {
                assert_eq!(i, expect, "order preserved");
                expect += 1;
                std::thread::sleep(Duration::from_millis(2));
                alive.fetch_sub(1, Ordering::SeqCst);
            }
            assert_eq!(expect, items);
            Ok(())
        })
        .unwrap();
    }
    let reports = p.join().unwrap();
    assert_eq!(reports.len(), mids + 2);
    assert_eq!(alive.load(Ordering::SeqCst), 0);
    peak.load(Ordering::SeqCst)
}

#[test]
fn items_in_flight_never_exceed_capacities_plus_one_per_stage() {
    for (mids, cap) in [(0, 1), (2, 3), (4, 2)] {
        let stages = mids as i64 + 2;
        let channels = mids as i64 + 1;
        let bound = channels * cap as i64 + stages;
        let peak = run_chain(mids, cap, 150);
        assert!(peak <= bound, "mids {mids} cap {cap}: {peak} in flight, bound {bound}");
        // With a slow sink the chain fills up: the bound is reached, so it is exact.
        assert!(peak >= bound - 1, "mids {mids} cap {cap}: only {peak} in flight, bound {bound}");
    }
}

fn failing_pipeline(
    fail_at: usize,
    panic: bool,
) -> (Result<Vec<lipsync_pipelines::runtime::StageReport>, PipelineError>, Arc<()>) {
    let token = Arc::new(());
    let mut p = Pipeline::new(PinPolicy::None, Clock::new());
    let (tx, rx) = bounded::<usize>(2);
    let (tx2, rx2) = bounded::<usize>(2);
    {
        let token = token.clone();
        // An endless source: only cancellation can stop it while the channel is full.
        p.spawn("source", Placement::Worker, move |ctx| {
            let _hold = token;
            let mut i = 0;
            loop {
                ctx.send(&tx, i)?;
                i += 1;
            }
        })
        .unwrap();
    }
    {
        let token = token.clone();
        p.spawn("work", Placement::Worker, move |ctx| {
            let _hold = token;
            while let Some(i) = ctx.recv(&rx)? {
                if i == fail_at {
                    if panic {
                        panic!("injected panic at {i}");
                    }
                    return Err(StageError::at(i, "injected failure"));
                }
                ctx.send(&tx2, i)?;
            }
            Ok(())
        })
        .unwrap();
    }
    {
        let token = token.clone();
        p.spawn("sink", Placement::Worker, move |ctx| {
            let _hold = token;
            while ctx.recv(&rx2)?.is_some() {}
            Ok(())
        })
        .unwrap();
    }
    (p.join(), token)
}

fn within(limit: Duration, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = bounded(1);
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(limit).expect("the pipeline hung");
}

#[test]
fn first_failure_cancels_everything_and_names_stage_and_frame() {
    within(Duration::from_secs(20), || {
        let (result, token) = failing_pipeline(17, false);
        let err = result.err().expect("the run fails");
        assert_eq!(err.stage, "work");
        assert_eq!(err.item, Some(17));
        assert_eq!(err.to_string(), "stage `work` failed at frame 17: injected failure");
        assert_eq!(Arc::strong_count(&token), 1, "every stage thread finished and dropped its state");
    });
}

#[test]
fn a_panic_is_caught_and_cancels_everything() {
    within(Duration::from_secs(20), || {
        let (result, token) = failing_pipeline(5, true);
        let err = result.err().expect("the run fails");
        assert_eq!(err.stage, "work");
        assert!(matches!(&err.kind, ErrorKind::Panicked(m) if m.contains("injected panic at 5")), "{err}");
        assert!(err.to_string().starts_with("stage `work` panicked: injected panic at 5"), "{err}");
        assert_eq!(Arc::strong_count(&token), 1, "no thread left");
    });
}

#[test]
fn pin_policy_parses() {
    assert_eq!(PinPolicy::parse("none", 2).unwrap(), PinPolicy::None);
    assert_eq!(PinPolicy::parse("auto", 3).unwrap(), PinPolicy::Auto { reserved: 3 });
    assert_eq!(PinPolicy::parse("0,2, 3", 1).unwrap(), PinPolicy::List(vec![0, 2, 3]));
    assert!(PinPolicy::parse("x", 1).unwrap_err().to_string().contains("bad core id"));
}
