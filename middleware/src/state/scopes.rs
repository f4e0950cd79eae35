//! The names entries refer to: the append-only scope table (an entry names its scope by
//! index), the pinned bandwidth ids (a client slot names its id by address) and the scopes
//! the current policy still has.

use std::sync::{Arc, LazyLock, OnceLock, RwLock};

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

/// [`SHAPE_CHUNK`] shapes, each set once.
type ShapeChunk = Box<[OnceLock<(usize, Nanos)>]>;

/// Every (id address, capacity) pair a bucket has held, by [`ShapeId`]: append-only, so a
/// reader needs no lock (two acquire loads), like the scope table. One table for the
/// process, shared by every store: a shape is a pair of numbers, and which id text an
/// address stands for is still each store's own (its pinned ids). It grows with the number
/// of distinct pairs: a new id, or a reload that changes a bandwidth's capacity, adds one.
pub(super) struct Shapes {
    chunks: Box<[OnceLock<ShapeChunk>]>,
    /// Shape → id, for interning (a new bucket or a new capacity) only.
    ids: RwLock<hashbrown::HashMap<(usize, Nanos), ShapeId, RandomState>>,
}

static SHAPES: LazyLock<Shapes> = LazyLock::new(Shapes::new);

/// The process's shape table.
pub(super) fn shapes() -> &'static Shapes {
    &SHAPES
}

impl Shapes {
    fn new() -> Self {
        let shapes = Shapes {
            chunks: (0..SHAPE_CHUNKS).map(|_| OnceLock::new()).collect(),
            ids: RwLock::new(hashbrown::HashMap::with_hasher(RandomState::new())),
        };
        let free = shapes.intern(0, 0);
        debug_assert_eq!(free, Some(FREE));
        shapes
    }

    /// The (id address, capacity) of shape `id` ((0, 0) if unknown, which cannot happen:
    /// ids come from [`Shapes::intern`]).
    pub(super) fn get(&self, id: ShapeId) -> (usize, Nanos) {
        let id = id as usize;
        self.chunks
            .get(id / SHAPE_CHUNK)
            .and_then(OnceLock::get)
            .and_then(|chunk| chunk[id % SHAPE_CHUNK].get())
            .copied()
            .unwrap_or((0, 0))
    }

    /// The id of shape (`addr`, `c`), interning it first if new; `None` when the table is
    /// full.
    pub(super) fn intern(&self, addr: usize, c: Nanos) -> Option<ShapeId> {
        let shape = (addr, c);
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
        let next = ids.len();
        let chunk = self.chunks.get(next / SHAPE_CHUNK)?.get_or_init(|| {
            (0..SHAPE_CHUNK)
                .map(|_| OnceLock::new())
                .collect::<ShapeChunk>()
        });
        let id = ShapeId::try_from(next).ok()?;
        // Written only here, under the write lock, at a fresh index.
        let _ = chunk[next % SHAPE_CHUNK].set(shape);
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
