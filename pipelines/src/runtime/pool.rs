//! Pools of reusable buffers that bound the memory in flight.

use crossbeam_channel::{Receiver, Sender};

use super::{StageCtx, StageError};

/// A fixed set of reusable buffers: take one (blocking while all are in use), give it back
/// when done. Memory in flight is bounded by the pool size.
pub struct Pool<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), rx: self.rx.clone() }
    }
}

impl<T> Pool<T> {
    /// A pool of `n` items made by `make`.
    pub fn new(n: usize, mut make: impl FnMut() -> T) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(n);
        for _ in 0..n {
            tx.send(make()).expect("pool has room for its items");
        }
        Self { tx, rx }
    }

    /// Takes an item, waiting (queue-wait) while all are in use.
    pub fn take(&self, ctx: &mut StageCtx) -> Result<T, StageError> {
        ctx.recv(&self.rx)?.ok_or(StageError::Cancelled)
    }

    /// Gives an item back.
    pub fn give(&self, item: T) {
        let _ = self.tx.try_send(item);
    }
}
