//! [`AdmissionLayer`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use fairgate_policies::{PolicyErrors, PolicyStore};
use tower::Layer;

use super::service::Admission;
use crate::engine::Engine;

/// Adds admission control to a service. Holds the shared engine: every service built from
/// this layer (one per connection in axum) shares its state.
#[derive(Clone)]
pub struct AdmissionLayer {
    engine: Arc<Engine>,
}

impl AdmissionLayer {
    /// A layer over an existing engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        AdmissionLayer { engine }
    }

    /// A layer over a policy store (and a new engine with the production clock).
    pub fn from_store(store: PolicyStore) -> Self {
        Self::new(Engine::new(store))
    }

    /// Loads, validates and compiles a policy file, and watches it: a valid change goes
    /// live within about a second; an invalid one is logged and the old policy stays.
    pub fn from_policy_file(path: impl AsRef<Path>) -> Result<Self, PolicyErrors> {
        let path = path.as_ref();
        let store = PolicyStore::from_file(path)?;
        let engine = Engine::new(store.clone());
        // The engine keeps the watcher alive: axum drops the layer once it has wrapped
        // the routes, but the services (and so the engine) live on.
        match fairgate_policies::watch::watch(store, fairgate_policies::watch::DEFAULT_DEBOUNCE) {
            Ok(handle) => engine.keep_alive(Box::new(handle)),
            Err(e) => tracing::warn!(
                error = %e,
                path = %path.display(),
                "policy file watch unavailable; reload through the store only"
            ),
        }
        Ok(AdmissionLayer { engine })
    }

    /// The engine (for metrics, the admin API, or deciding outside tower).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

impl fmt::Debug for AdmissionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionLayer")
            .field("engine", &self.engine)
            .finish()
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission::new(inner, Arc::clone(&self.engine))
    }
}
