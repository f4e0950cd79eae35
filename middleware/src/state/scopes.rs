//! The names entries refer to: the append-only scope table (an entry names its scope by
//! index), the pinned bandwidth ids (a client slot names its id by address) and the scopes
//! the current policy still has.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use ahash::RandomState;

use super::CLIENT_SCOPE;
use crate::clock::Nanos;

/// Every bandwidth id the store has seen, by the address of its text: (id, hash of the
/// text). Never shrinks, so a pinned address is never reused for another id. It grows with
/// the number of *distinct* ids, not with reloads: `PolicyStore` hands a reloaded policy the
/// previous generation's `Arc<str>` for every id text it keeps.
pub(super) type Pinned = hashbrown::HashMap<usize, (Arc<str>, u64), RandomState>;

/// Index of a scope in the store's scope table; [`CLIENT_ID`] is [`CLIENT_SCOPE`].
pub(super) type ScopeId = u32;

/// The scope id of [`CLIENT_SCOPE`].
pub(super) const CLIENT_ID: ScopeId = 0;

pub(super) fn id_addr(id: &Arc<str>) -> usize {
    id.as_ptr() as usize
}

// === Scope table ===

/// Scope texts per chunk of the scope table.
const SCOPE_CHUNK: usize = 1024;
/// Chunks of the scope table: at most 1,048,576 distinct scopes per store.
const SCOPE_CHUNKS: usize = 1024;

/// [`SCOPE_CHUNK`] scope texts, each set once.
type ScopeChunk = Box<[OnceLock<Arc<str>>]>;

/// Every scope the store has held an entry of, by [`ScopeId`]: append-only, so an id is
/// never reused and a reader needs no lock (two acquire loads). Chunks are allocated as
/// they fill. Like the pinned ids, it grows with the number of *distinct* scope texts.
pub(super) struct Scopes {
    chunks: Box<[OnceLock<ScopeChunk>]>,
    /// Scope text → id, for interning (a new entry) only.
    ids: RwLock<hashbrown::HashMap<Arc<str>, ScopeId, RandomState>>,
}

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.ids.read().map_or(0, |ids| ids.len());
        f.debug_struct("Scopes").field("len", &n).finish()
    }
}

impl Scopes {
    pub(super) fn new(client: &Arc<str>) -> Self {
        let scopes = Scopes {
            chunks: (0..SCOPE_CHUNKS).map(|_| OnceLock::new()).collect(),
            ids: RwLock::new(hashbrown::HashMap::with_hasher(RandomState::new())),
        };
        let interned = scopes.intern(client);
        debug_assert_eq!(interned, Some(CLIENT_ID));
        scopes
    }

    /// The text of scope `id`.
    pub(super) fn get(&self, id: ScopeId) -> Option<&Arc<str>> {
        let id = id as usize;
        self.chunks.get(id / SCOPE_CHUNK)?.get()?[id % SCOPE_CHUNK].get()
    }

    /// True when scope `id` is `scope`.
    pub(super) fn is(&self, id: ScopeId, scope: &str) -> bool {
        self.get(id).is_some_and(|s| **s == *scope)
    }

    /// The id of `scope`, interning it first if new; `None` when the table is full.
    pub(super) fn intern(&self, scope: &Arc<str>) -> Option<ScopeId> {
        if let Some(&id) = self
            .ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&**scope)
        {
            return Some(id);
        }
        let mut ids = self.ids.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = ids.get(&**scope) {
            return Some(id);
        }
        let next = ids.len();
        let chunk = self.chunks.get(next / SCOPE_CHUNK)?.get_or_init(|| {
            (0..SCOPE_CHUNK)
                .map(|_| OnceLock::new())
                .collect::<ScopeChunk>()
        });
        let id = ScopeId::try_from(next).ok()?;
        // Written only here, under the write lock, at a fresh index.
        let _ = chunk[next % SCOPE_CHUNK].set(Arc::clone(scope));
        ids.insert(Arc::clone(scope), id);
        Some(id)
    }
}

// === Shape table ===

/// Index of a bucket's *shape* in the shape table: the bandwidth id the bucket holds (by
/// the address of the id's text, 0 for none) and the capacity its TAT was computed with. A
/// bucket names both with this one `u32` instead of a pointer and a `u64` (see *Memory* in
/// the module docs of [`crate::state`]).
pub(super) type ShapeId = u32;

/// The shape (0, 0): a free client slot.
pub(super) const FREE: ShapeId = 0;

/// Shapes per chunk of the shape table.
const SHAPE_CHUNK: usize = 1024;
/// Chunks of the shape table: at most 1,048,576 distinct shapes per process.
const SHAPE_CHUNKS: usize = 1024;

/// Shapes kept in the static itself (no pointer to follow on the hot path): the first
/// chunk.
const SHAPES_INLINE: usize = SHAPE_CHUNK;

/// One shape. Written once, before its id is handed out; a reader has the id from an
/// acquire load of a bucket's shape (or from the interning map's lock), so relaxed loads
/// see the written pair.
#[derive(Debug, Default)]
struct Shape {
    addr: AtomicUsize,
    c: AtomicU64,
}

/// [`SHAPE_CHUNK`] shapes.
type ShapeChunk = Box<[Shape; SHAPE_CHUNK]>;

/// Shape → id, for interning (a new bucket or a new capacity) only. Its keys are pairs of
/// numbers the policy chose, not client input: fixed seeds will do.
type ShapeIds = hashbrown::HashMap<(usize, Nanos), ShapeId, RandomState>;

/// Every (id address, capacity) pair a bucket has held, by [`ShapeId`]: append-only, so a
/// reader needs no lock (one acquire load and two relaxed ones), like the scope table. One
/// table for the process, shared by every store: a shape is a pair of numbers, and which id
/// text an address stands for is still each store's own (its pinned ids). It grows with the
/// number of distinct pairs: a new id, or a reload that changes a bandwidth's capacity,
/// adds one (24 bytes, plus a chunk of 16 KiB per 1,024 shapes).
pub(super) struct Shapes {
    /// Shapes `0..SHAPES_INLINE` (zeroed memory, touched only as shapes are added).
    first: [Shape; SHAPES_INLINE],
    /// The other shapes, by chunk (chunk 0 is `first`, unused here).
    chunks: [OnceLock<ShapeChunk>; SHAPE_CHUNKS],
    /// Every shape but [`FREE`], which is not interned.
    ids: RwLock<ShapeIds>,
}

static SHAPES: Shapes = Shapes {
    first: [const {
        Shape {
            addr: AtomicUsize::new(0),
            c: AtomicU64::new(0),
        }
    }; SHAPES_INLINE],
    chunks: [const { OnceLock::new() }; SHAPE_CHUNKS],
    ids: RwLock::new(ShapeIds::with_hasher(RandomState::with_seeds(1, 2, 3, 4))),
};

/// The process's shape table.
#[inline]
pub(super) fn shapes() -> &'static Shapes {
    &SHAPES
}

impl Shapes {
    /// The (id address, capacity) of shape `id`; (0, 0) for [`FREE`] (and for an unknown
    /// id, which cannot happen: ids come from [`Shapes::intern`]).
    #[inline]
    pub(super) fn get(&self, id: ShapeId) -> (usize, Nanos) {
        let id = id as usize;
        let s = match self.first.get(id) {
            Some(s) => s,
            None => match self.chunks.get(id / SHAPE_CHUNK).and_then(OnceLock::get) {
                Some(chunk) => &chunk[id % SHAPE_CHUNK],
                None => return (0, 0),
            },
        };
        (s.addr.load(Ordering::Relaxed), s.c.load(Ordering::Relaxed))
    }

    /// The place of shape `id`, allocating its chunk if needed; `None` beyond the table.
    fn place(&self, id: usize) -> Option<&Shape> {
        if let Some(s) = self.first.get(id) {
            return Some(s);
        }
        let chunk = self.chunks.get(id / SHAPE_CHUNK)?.get_or_init(|| {
            let chunk: Box<[Shape]> = (0..SHAPE_CHUNK).map(|_| Shape::default()).collect();
            chunk
                .try_into()
                .unwrap_or_else(|_| unreachable!("SHAPE_CHUNK shapes"))
        });
        Some(&chunk[id % SHAPE_CHUNK])
    }

    /// The id of shape (`addr`, `c`), interning it first if new; `None` when the table is
    /// full.
    pub(super) fn intern(&self, addr: usize, c: Nanos) -> Option<ShapeId> {
        let shape = (addr, c);
        if shape == (0, 0) {
            return Some(FREE);
        }
        if let Some(&id) = self
            .ids
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shape)
        {
            return Some(id);
        }
        let mut ids = self.ids.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = ids.get(&shape) {
            return Some(id);
        }
        // Index 0 is `FREE`.
        let next = ids.len() + 1;
        let s = self.place(next)?;
        let id = ShapeId::try_from(next).ok()?;
        // Written only here, under the write lock, at a fresh index, before the id leaves.
        s.addr.store(addr, Ordering::Relaxed);
        s.c.store(c, Ordering::Relaxed);
        ids.insert(shape, id);
        Some(id)
    }
}

/// Which scopes the current policy still has; entries of other scopes are dropped by
/// sweeps.
#[derive(Debug, Default)]
pub struct LiveScopes {
    scopes: hashbrown::HashSet<Arc<str>, RandomState>,
    /// `false` before the engine has seen a policy: then every scope is live.
    pub(super) known: bool,
}

impl LiveScopes {
    /// The scopes of one policy generation.
    pub fn new(scopes: impl IntoIterator<Item = Arc<str>>) -> Self {
        let mut set = hashbrown::HashSet::with_hasher(RandomState::new());
        set.extend(scopes);
        LiveScopes {
            scopes: set,
            known: true,
        }
    }

    pub(super) fn contains(&self, scope: &str) -> bool {
        !self.known || scope == CLIENT_SCOPE || self.scopes.contains(scope)
    }
}
