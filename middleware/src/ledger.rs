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

/// What a decision consumed so far, as a guard: dropped without [`Charges::commit`], it
/// gives every charge back (newest first), so each way a decision can end in a rejection
/// refunds by returning, and only the admit paths say they keep what they took. Inline for
/// the common case: recording allocates nothing unless more than [`INLINE_CHARGES`] buckets
/// are involved.
#[derive(Debug)]
pub(crate) struct Charges<'x, 's> {
    store: &'s Store,
    now: Nanos,
    inline: [Option<Charge<'x>>; INLINE_CHARGES],
    n: usize,
    spill: Vec<Charge<'x>>,
}

/// Charges recorded without allocating.
pub(crate) const INLINE_CHARGES: usize = 8;

impl<'x, 's> Charges<'x, 's> {
    /// An empty ledger of a decision at `now` against `store`.
    pub(crate) fn new(store: &'s Store, now: Nanos) -> Self {
        Charges {
            store,
            now,
            inline: [None; INLINE_CHARGES],
            n: 0,
            spill: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, c: Charge<'x>) {
        if self.n < INLINE_CHARGES {
            self.inline[self.n] = Some(c);
            self.n += 1;
        } else {
            self.spill.push(c);
        }
    }

    /// Number of charges recorded.
    pub(crate) fn len(&self) -> usize {
        self.n + self.spill.len()
    }

    /// Gives every charge back now (where the answer needs what the ledger borrows).
    pub(crate) fn refund(mut self) {
        self.rollback_from(0);
    }

    /// Keeps every charge: the decision admitted.
    pub(crate) fn commit(mut self) {
        self.n = 0;
        self.spill.clear();
    }

    /// Gives back every charge from index `from` on, newest first, and forgets them (a
    /// quota's bandwidths are all-or-nothing within the decision).
    pub(crate) fn rollback_from(&mut self, from: usize) {
        let (store, now) = (self.store, self.now);
        while self.len() > from {
            let c = if let Some(c) = self.spill.pop() {
                c
            } else {
                self.n -= 1;
                match self.inline[self.n].take() {
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
    fn drop(&mut self) {
        self.rollback_from(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcra::{Params, Verdict};

    const T: Nanos = 1_000;

    /// A bucket of capacity 2·T with one request (cost T) taken through a ledger.
    fn take<'s>(store: &'s Store, scope: &Arc<str>, now: Nanos) -> Charges<'static, 's> {
        let p = Params { t: T, c: 2 * T };
        let admitted = store
            .with_entry(scope, "k", now, p.c, |e| e.consume(now, p, 1))
            .expect("room");
        assert!(matches!(admitted, Verdict::Admit { .. }));
        let mut charges = Charges::new(store, now);
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
        drop(take(&store, &scope, now));
        assert!(tat(&store, &scope) <= now, "the bucket is full again");
    }

    #[test]
    fn a_committed_ledger_keeps_its_charges() {
        let store = Store::new(16);
        let scope: Arc<str> = Arc::from("rule:r");
        let now = 10 * T;
        take(&store, &scope, now).commit();
        assert_eq!(tat(&store, &scope), now + T, "one request's worth is kept");
    }
}
