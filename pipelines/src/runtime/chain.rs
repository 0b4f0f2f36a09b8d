//! Two stages on one thread: [`Chain`] runs a stage and feeds each of its outputs straight into
//! the next, so a graph can trade threads for hops (a daemon with many sessions on few cores).

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;

use super::{record, Out, Outlet, SharedHistogram, Stage, StageError};

/// Collects a stage's outputs for the stage after it (reused: no allocation in steady state).
struct Collect<T>(Mutex<Vec<T>>);

impl<T: Send> Outlet<T> for Collect<T> {
    fn put(&self, item: T, _cancel: &AtomicBool) -> Result<(), StageError> {
        super::lock(&self.0).push(item);
        Ok(())
    }
}

/// `first` then `then`, on one thread. Each part's service time is recorded under its own name
/// in the pipeline's shared statistics (a part that is itself a chain records its own parts).
pub struct Chain<A: Stage, B: Stage<In = A::Out>> {
    first: A,
    first_name: &'static str,
    then: B,
    then_name: Option<&'static str>,
    buf: Collect<A::Out>,
    drained: Vec<A::Out>,
    hists: Option<(SharedHistogram, Option<SharedHistogram>)>,
}

impl<A: Stage, B: Stage<In = A::Out>> Chain<A, B>
where
    A::Out: Send,
{
    /// `first` (named `first_name`) feeding `then` (named `then_name`, or `None` when `then`
    /// is itself a chain, whose parts record themselves).
    pub fn new(first_name: &'static str, first: A, then_name: Option<&'static str>, then: B) -> Self {
        Self {
            first,
            first_name,
            then,
            then_name,
            buf: Collect(Mutex::new(Vec::with_capacity(16))),
            drained: Vec::with_capacity(16),
            hists: None,
        }
    }

    fn feed(&mut self, out: &mut Out<'_, B::Out>) -> Result<(), StageError> {
        std::mem::swap(&mut *super::lock(&self.buf.0), &mut self.drained);
        let mut result = Ok(());
        for item in self.drained.drain(..) {
            if result.is_ok() {
                let (t, blocked) = (out.ctx.clock.now(), out.blocked);
                result = self.then.process(item, out);
                let took = out.ctx.clock.now().duration_since(t).saturating_sub(out.blocked - blocked);
                if let Some((_, Some(h))) = &self.hists {
                    record(h, took);
                }
            }
        }
        result
    }

    fn run_first(
        &mut self,
        out: &mut Out<'_, B::Out>,
        body: impl FnOnce(&mut A, &mut Out<'_, A::Out>) -> Result<(), StageError>,
    ) -> Result<(), StageError> {
        if self.hists.is_none() {
            if let Some(reg) = &out.ctx.registry {
                self.hists = Some((reg.histogram(self.first_name), self.then_name.map(|n| reg.histogram(n))));
            }
        }
        let t = out.ctx.clock.now();
        let mut inner = Out { ctx: &mut *out.ctx, outlet: &self.buf, blocked: Duration::ZERO };
        let r = body(&mut self.first, &mut inner);
        let blocked = inner.blocked;
        out.blocked += blocked;
        if let Some((h, _)) = &self.hists {
            record(h, out.ctx.clock.now().duration_since(t).saturating_sub(blocked));
        }
        let fed = self.feed(out);
        r.and(fed)
    }
}

impl<A: Stage, B: Stage<In = A::Out>> Stage for Chain<A, B>
where
    A::Out: Send,
{
    type In = A::In;
    type Out = B::Out;

    fn process(&mut self, item: A::In, out: &mut Out<'_, B::Out>) -> Result<(), StageError> {
        self.run_first(out, |a, o| a.process(item, o))
    }

    fn fused_first(&self) -> Option<&'static str> {
        Some(self.first_name)
    }

    fn finish(&mut self, out: &mut Out<'_, B::Out>) -> Result<(), StageError> {
        self.run_first(out, |a, o| a.finish(o))?;
        let (t, blocked) = (out.ctx.clock.now(), out.blocked);
        let r = self.then.finish(out);
        if let Some((_, Some(h))) = &self.hists {
            record(h, out.ctx.clock.now().duration_since(t).saturating_sub(out.blocked - blocked));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Clock;
    use crate::runtime::{PinPolicy, Pipeline, Placement, SharedStageStats};

    /// Sends each item twice.
    struct Twice;
    impl Stage for Twice {
        type In = u32;
        type Out = u32;
        fn process(&mut self, item: u32, out: &mut Out<'_, u32>) -> Result<(), StageError> {
            out.send(item)?;
            out.send(item)
        }
    }

    /// Adds one; sends 99 at the end.
    struct AddOne;
    impl Stage for AddOne {
        type In = u32;
        type Out = u32;
        fn process(&mut self, item: u32, out: &mut Out<'_, u32>) -> Result<(), StageError> {
            out.send(item + 1)
        }
        fn finish(&mut self, out: &mut Out<'_, u32>) -> Result<(), StageError> {
            out.send(99)
        }
    }

    #[test]
    fn a_chain_is_its_stages_in_order_on_one_thread_with_their_own_metrics() {
        let shared = Arc::new(SharedStageStats::default());
        let mut p = Pipeline::new(PinPolicy::None, Clock::new()).with_shared(shared.clone());
        let (tx, rx) = crossbeam_channel::bounded(2);
        let (otx, orx) = crossbeam_channel::bounded(64);
        p.source("src", tx, |out| (0..3).try_for_each(|i| out.send(i))).unwrap();
        let chain = Chain::new("twice", Twice, None, Chain::new("add", AddOne, Some("again"), AddOne));
        p.stage("twice+add+again", Placement::Worker, chain, rx, otx).unwrap();
        p.join().unwrap();
        let got: Vec<u32> = orx.try_iter().collect();
        assert_eq!(got, vec![2, 2, 3, 3, 4, 4, 100, 99]);
        let names: Vec<String> = shared.summary().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"twice".into()) && names.contains(&"add".into()) && names.contains(&"again".into()));
        assert!(!names.iter().any(|n| n.contains('+')), "a fused thread records its parts only: {names:?}");
        let again = shared.summary().into_iter().find(|(n, _)| n == "again").unwrap().1;
        assert_eq!(again.count, 8, "six items, the 99 of the finish, and its own finish");
    }
}
