//! [`AdmissionLayer`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use fairgate_policies::PolicyStore;
use tower::Layer;

use super::service::Admission;
use crate::builder::{BuildError, EngineBuilder};
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

    /// A layer over a policy store: a new engine with the production clock, started by
    /// [`EngineBuilder`] like the gateway's (the policy's state backend, pruning); the store
    /// is not watched (reload it yourself). A policy this build cannot honour is an error.
    pub fn from_store(store: PolicyStore) -> Result<Self, BuildError> {
        Ok(Self::new(EngineBuilder::new(store).start()?))
    }

    /// Loads, validates and compiles a policy file, and starts what it asks for exactly as
    /// the gateway does ([`EngineBuilder`]): the state backend (Redis included, with the
    /// `redis` feature), pruning, and a watcher: a valid change goes live within about a
    /// second; an invalid one is logged and the old policy stays.
    pub fn from_policy_file(path: impl AsRef<Path>) -> Result<Self, BuildError> {
        Ok(Self::new(
            EngineBuilder::from_policy_file(path.as_ref())?.start()?,
        ))
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
