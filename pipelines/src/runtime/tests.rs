//! Unit tests of the runtime: stages, shared statistics, cancellation, panics, pinning.

use super::*;

/// Doubles each item and, at the end, sends the count.
struct Double(usize);

impl Stage for Double {
    type In = usize;
    type Out = usize;
    fn process(&mut self, item: usize, out: &mut Out<'_, usize>) -> Result<(), StageError> {
        self.0 += 1;
        out.send(item * 2)
    }
    fn finish(&mut self, out: &mut Out<'_, usize>) -> Result<(), StageError> {
        out.send(1000 + self.0)
    }
}

#[test]
fn a_stage_processes_every_item_then_finishes() {
    let mut p = Pipeline::new(PinPolicy::None, Clock::new());
    let (tx, rx) = crossbeam_channel::bounded(2);
    let (otx, orx) = crossbeam_channel::bounded(16);
    p.source("src", tx, |out| (0..5).try_for_each(|i| out.send(i))).unwrap();
    p.stage("double", Placement::Worker, Double(0), rx, otx).unwrap();
    let reports = p.join().unwrap();
    let got: Vec<usize> = orx.try_iter().collect();
    assert_eq!(got, vec![0, 2, 4, 6, 8, 1005]);
    let double = reports.iter().find(|r| r.name == "double").unwrap();
    assert_eq!(double.metrics.service.len(), 6, "five items and the finish are timed");
}

#[test]
fn shared_stats_collect_by_stage_name() {
    let shared = Arc::new(SharedStageStats::default());
    for _ in 0..2 {
        let mut p = Pipeline::new(PinPolicy::None, Clock::new()).with_shared(shared.clone());
        let (tx, rx) = crossbeam_channel::bounded(2);
        p.source("src", tx, |out| (0..3).try_for_each(|i| out.send(i))).unwrap();
        p.stage("double", Placement::Worker, Double(0), rx, Discard).unwrap();
        p.join().unwrap();
    }
    let summary = shared.summary();
    let double = summary.iter().find(|(n, _)| n == "double").unwrap();
    assert_eq!(double.1.count, 8, "two pipelines, three items and a finish each");
}

#[test]
fn a_cancel_from_outside_is_reported_as_cancelled() {
    let mut p = Pipeline::new(PinPolicy::None, Clock::new());
    let (tx, rx) = crossbeam_channel::bounded::<usize>(1);
    p.source("src", tx, |out| loop {
        out.send(1)?;
    })
    .unwrap();
    p.stage("double", Placement::Worker, Double(0), rx, Discard).unwrap();
    let cancel = p.cancel_flag();
    std::thread::sleep(Duration::from_millis(30));
    cancel.store(true, Ordering::SeqCst);
    let err = p.join().err().expect("cancelled");
    assert!(err.is_cancelled(), "{err}");
}

/// Counts its items; its finish sets a flag.
struct Finishes(Arc<AtomicBool>);

impl Stage for Finishes {
    type In = usize;
    type Out = ();
    fn process(&mut self, _: usize, _: &mut Out<'_, ()>) -> Result<(), StageError> {
        Ok(())
    }
    fn finish(&mut self, _: &mut Out<'_, ()>) -> Result<(), StageError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Panics at item 3.
struct Panics;

impl Stage for Panics {
    type In = usize;
    type Out = usize;
    fn process(&mut self, item: usize, out: &mut Out<'_, usize>) -> Result<(), StageError> {
        assert!(item != 3, "injected panic");
        out.send(item)
    }
}

/// A panicking stage's output is dropped only after the cancel: the stage after it never
/// mistakes the panic for the end of its input (and so never finishes, never commits).
#[test]
fn a_panic_is_never_a_normal_end_downstream() {
    for _ in 0..20 {
        let finished = Arc::new(AtomicBool::new(false));
        let mut p = Pipeline::new(PinPolicy::None, Clock::new());
        let (tx, rx) = crossbeam_channel::bounded(2);
        let (mtx, mrx) = crossbeam_channel::bounded(2);
        p.source("src", tx, |out| (0..10).try_for_each(|i| out.send(i))).unwrap();
        p.stage("panics", Placement::Worker, Panics, rx, mtx).unwrap();
        p.stage("last", Placement::Worker, Finishes(finished.clone()), mrx, Discard).unwrap();
        let err = p.join().err().expect("the run fails");
        assert!(matches!(err.kind, ErrorKind::Panicked(_)), "{err}");
        assert!(!finished.load(Ordering::SeqCst), "the stage after a panic did not finish");
    }
}

#[test]
fn pin_list_errors_name_the_bad_id() {
    assert_eq!(PinPolicy::parse("1,x", 1).unwrap_err(), PinParseError("x".into()));
}
