//! The ledger of one decision: what it consumed (buckets, client slots, sketch counts), so
//! that a rejection gives it all back. Shared by the rules and the quota stage, which is
//! why it is neither's.

use std::sync::Arc;

use crate::clock::Nanos;
use crate::sketch::Sketch;
use crate::state::Store;

/// One consumption to give back on rollback.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Charge<'x> {
    /// A slot of `key`'s client entry: refund `amount` ns.
    Slot {
        id: &'x Arc<str>,
        key: &'x str,
        amount: Nanos,
    },
    /// A GCRA bucket: refund `amount` ns.
    Bucket {
        scope: &'x Arc<str>,
        key: &'x str,
        amount: Nanos,
    },
    /// A sketch count.
    Sketch {
        sketch: &'x Sketch,
        key: &'x str,
        cost: u64,
    },
}

/// Where a decision's [`Charges`] are written: a local of the deciding frame, so that the
/// ledger itself is three words and moving it (into `commit`, into a helper) copies nothing
/// large. Inline for the common case: recording allocates nothing unless more than
/// [`INLINE_CHARGES`] buckets are involved.
#[derive(Debug, Default)]
pub(crate) struct ChargeBuf<'x> {
    inline: [Option<Charge<'x>>; INLINE_CHARGES],
    n: usize,
    spill: Vec<Charge<'x>>,
}

/// What a decision consumed so far, as a guard: dropped without [`Charges::commit`], it
/// gives every charge back (newest first), so each way a decision can end in a rejection
/// refunds by returning, and only the admit paths say they keep what they took.
#[derive(Debug)]
pub(crate) struct Charges<'x, 's> {
    store: &'s Store,
    now: Nanos,
    buf: &'s mut ChargeBuf<'x>,
}

/// Charges recorded without allocating.
pub(crate) const INLINE_CHARGES: usize = 8;

impl<'x, 's> Charges<'x, 's> {
    /// An empty ledger of a decision at `now` against `store`, written into `buf` (empty).
    pub(crate) fn new(store: &'s Store, now: Nanos, buf: &'s mut ChargeBuf<'x>) -> Self {
        debug_assert!(buf.n == 0 && buf.spill.is_empty());
        Charges { store, now, buf }
    }

    pub(crate) fn push(&mut self, c: Charge<'x>) {
        let buf = &mut *self.buf;
        if buf.n < INLINE_CHARGES {
            buf.inline[buf.n] = Some(c);
            buf.n += 1;
        } else {
            buf.spill.push(c);
        }
    }

    /// Number of charges recorded.
    pub(crate) fn len(&self) -> usize {
        self.buf.n + self.buf.spill.len()
    }

    /// Gives every charge back now (where the answer needs what the ledger borrows).
    pub(crate) fn refund(mut self) {
        self.rollback_from(0);
    }

    /// Keeps every charge: the decision admitted.
    pub(crate) fn commit(self) {
        self.buf.n = 0;
        self.buf.spill.clear();
    }

    /// Gives back every charge from index `from` on, newest first, and forgets them (a
    /// quota's bandwidths are all-or-nothing within the decision).
    pub(crate) fn rollback_from(&mut self, from: usize) {
        let (store, now) = (self.store, self.now);
        while self.len() > from {
            let buf = &mut *self.buf;
            let c = if let Some(c) = buf.spill.pop() {
                c
            } else {
                buf.n -= 1;
                match buf.inline[buf.n].take() {
                    Some(c) => c,
                    None => continue,
                }
            };
            match c {
                Charge::Slot { id, key, amount } => {
                    store.with_client_slot(key, id, |b| b.refund(now, amount));
                }
                Charge::Bucket { scope, key, amount } => {
                    store.with_existing(scope, key, |e| e.refund(now, amount));
                }
                Charge::Sketch { sketch, key, cost } => sketch.uncount(now, key, cost),
            }
        }
    }
}

impl Drop for Charges<'_, '_> {
    /// Not committed: the decision did not admit; give everything back.
    #[inline]
    fn drop(&mut self) {
        // Checked here, inline: a committed ledger (every admit) costs no call.
        if self.buf.n != 0 || !self.buf.spill.is_empty() {
            self.rollback_from(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcra::{Params, Verdict};

    const T: Nanos = 1_000;

    /// A bucket of capacity 2·T with one request (cost T) taken through a ledger.
    fn take<'s>(
        store: &'s Store,
        scope: &Arc<str>,
        now: Nanos,
        ledger: &'s mut ChargeBuf<'static>,
    ) -> Charges<'static, 's> {
        let p = Params { t: T, c: 2 * T };
        let admitted = store
            .with_entry(scope, "k", now, p.c, |e| e.consume(now, p, 1))
            .expect("room");
        assert!(matches!(admitted, Verdict::Admit { .. }));
        let mut charges = Charges::new(store, now, ledger);
        let scope: &'static Arc<str> = Box::leak(Box::new(Arc::clone(scope)));
        charges.push(Charge::Bucket {
            scope,
            key: "k",
            amount: T,
        });
        charges
    }

    fn tat(store: &Store, scope: &str) -> Nanos {
        store.with_existing(scope, "k", |e| e.tat()).unwrap_or(0)
    }

    #[test]
    fn a_ledger_dropped_without_commit_gives_everything_back() {
        let store = Store::new(16);
        let scope: Arc<str> = Arc::from("rule:r");
        let now = 10 * T;
        drop(take(&store, &scope, now, &mut ChargeBuf::default()));
        assert!(tat(&store, &scope) <= now, "the bucket is full again");
    }

    #[test]
    fn a_committed_ledger_keeps_its_charges() {
        let store = Store::new(16);
        let scope: Arc<str> = Arc::from("rule:r");
        let now = 10 * T;
        take(&store, &scope, now, &mut ChargeBuf::default()).commit();
        assert_eq!(tat(&store, &scope), now + T, "one request's worth is kept");
    }
}
