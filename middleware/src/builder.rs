//! [`EngineBuilder`]: the one way both forms build an engine and start everything its
//! policy asks for.
//!
//! The gateway and [`crate::AdmissionLayer::from_policy_file`] both call it, so an app that
//! embeds the layer gets what the gateway gets: the state backend the policy names (the
//! embedded one, or Redis — single server or Cluster, `exact` or `async`), the periodic
//! prune of state that carries no information, and the policy file watcher. What this
//! build cannot honour (a Redis policy without the `redis` feature, or outside a Tokio
//! runtime) is refused with a [`BuildError`], never quietly run as local state.
//!
//! Everything started is owned by the engine ([`Engine::keep_alive`]) and stops with it.

use std::fmt;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use fairgate_policies::model::Backend;
use fairgate_policies::watch::{self, DEFAULT_DEBOUNCE};
use fairgate_policies::{PolicyErrors, PolicyStore};

use crate::clock::Clock;
use crate::decision::Observer;
use crate::engine::Engine;

/// How often idle state that carries no information is dropped, by default.
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(5);

/// Why an engine could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The policy file does not load.
    #[error("{0}")]
    Policy(#[from] PolicyErrors),
    /// The policy says `state.backend: redis`, and this build has no Redis backend.
    #[error(
        "state.backend: redis needs fairgate-middleware's `redis` feature; without it every replica would hand out the whole quota"
    )]
    RedisFeatureMissing,
    /// The Redis backend runs background tasks, and no Tokio runtime is running.
    #[error(
        "state.backend: redis needs a Tokio runtime: build the engine (or the layer) inside one"
    )]
    NoRuntime,
    /// The Redis backend could not be set up (bad settings; an unreachable server is not an
    /// error: decisions follow `on_failure` until it is back).
    #[cfg(feature = "redis")]
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
}

/// Builds an [`Engine`] and starts what its policy needs.
///
/// ```no_run
/// # fn run() -> Result<(), fairgate_middleware::BuildError> {
/// let engine = fairgate_middleware::EngineBuilder::from_policy_file("policy.yaml")?.start()?;
/// let layer = fairgate_middleware::AdmissionLayer::new(engine);
/// # Ok(()) }
/// ```
#[must_use = "nothing runs until `start`"]
pub struct EngineBuilder {
    store: PolicyStore,
    file: Option<PathBuf>,
    clock: Option<Arc<dyn Clock>>,
    observer: Option<Arc<dyn Observer>>,
    watch: Option<Duration>,
    prune: Option<Duration>,
    backend: bool,
}

impl fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("file", &self.file)
            .field("watch", &self.watch)
            .field("prune", &self.prune)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// An engine over `store` (not watched: a store has no file of its own here; see
    /// [`EngineBuilder::watch_file`]). Pruning and the policy's state backend are on.
    pub fn new(store: PolicyStore) -> Self {
        EngineBuilder {
            store,
            file: None,
            clock: None,
            observer: None,
            watch: None,
            prune: Some(DEFAULT_PRUNE_INTERVAL),
            backend: true,
        }
    }

    /// Loads, validates and compiles a policy file; the file is watched (a valid change goes
    /// live within about a second, an invalid one is logged and the old policy stays).
    pub fn from_policy_file(path: impl Into<PathBuf>) -> Result<Self, BuildError> {
        let path = path.into();
        let store = PolicyStore::from_file(&path)?;
        Ok(Self::new(store).watch_file(path, DEFAULT_DEBOUNCE))
    }

    /// Watches `path` (the store's policy file) with `debounce`.
    pub fn watch_file(mut self, path: impl Into<PathBuf>, debounce: Duration) -> Self {
        self.file = Some(path.into());
        self.watch = Some(debounce);
        self
    }

    /// Does not watch the policy file (the caller reloads the store itself).
    pub fn no_watch(mut self) -> Self {
        self.watch = None;
        self
    }

    /// The clock the engine reads (default: the monotonic clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Receives every decision and completion (metrics, a decision log).
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// How often idle state that carries no information is dropped; `None` never (the
    /// caller calls [`Engine::prune`] itself). Default [`DEFAULT_PRUNE_INTERVAL`].
    pub fn prune_interval(mut self, every: Option<Duration>) -> Self {
        self.prune = every;
        self
    }

    /// Keeps state local whatever `state.backend` says (tests and tools that replay a
    /// policy offline). Default: start the backend the policy names.
    pub fn local_state_only(mut self) -> Self {
        self.backend = false;
        self
    }

    /// Builds the engine and starts the state backend, the pruner and the watcher.
    pub fn start(self) -> Result<Arc<Engine>, BuildError> {
        let engine = match self.clock {
            Some(c) => Engine::with_clock(self.store.clone(), c),
            None => Engine::new(self.store.clone()),
        };
        if let Some(obs) = self.observer {
            engine.set_observer(obs);
        }
        if self.backend {
            start_backend(&engine)?;
        }
        if let Some(every) = self.prune {
            engine.keep_alive(Box::new(Pruner::start(Arc::downgrade(&engine), every)));
        }
        if let (Some(debounce), Some(path)) = (self.watch, self.file) {
            // A file system without change notification still serves; reloads then come
            // through the store (the gateway's SIGHUP and admin API).
            match watch::watch(self.store, debounce) {
                Ok(handle) => engine.keep_alive(Box::new(handle)),
                Err(error) => tracing::warn!(
                    %error,
                    path = %path.display(),
                    "cannot watch the policy file; reload through the store only"
                ),
            }
        }
        Ok(engine)
    }
}

/// Starts the backend the policy names.
fn start_backend(engine: &Arc<Engine>) -> Result<(), BuildError> {
    let policy = engine.store().load_full();
    if policy.state.backend != Backend::Redis {
        return Ok(());
    }
    #[cfg(feature = "redis")]
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BuildError::NoRuntime);
        }
        if let Some(handle) = crate::fleet::start(engine)? {
            engine.keep_alive(Box::new(handle));
        }
        Ok(())
    }
    #[cfg(not(feature = "redis"))]
    {
        Err(BuildError::RedisFeatureMissing)
    }
}

/// A thread that prunes the engine every period; it stops when dropped (at once) or when
/// the engine is gone.
struct Pruner {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pruner {
    fn start(engine: Weak<Engine>, every: Duration) -> Pruner {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fairgate-prune".into())
            .spawn(move || loop {
                match rx.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => match engine.upgrade() {
                        Some(e) => {
                            e.prune();
                        }
                        None => return,
                    },
                    // Stopped, or the handle is gone.
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            })
            .ok();
        Pruner {
            stop: Some(tx),
            thread,
        }
    }
}

impl Drop for Pruner {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // The engine's last reference may be dropped on the pruner thread itself
            // (it upgraded, then the app let go): never join oneself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}
