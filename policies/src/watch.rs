//! Reloading the policy when its file changes.
//!
//! [`watch`] starts a plain thread (no async runtime needed) that watches, with the
//! `notify` crate, the **directory** of the policy file and of its overrides file
//! (non-recursively). Watching the directory rather than the file is what makes the usual
//! ways of replacing a file work:
//!
//! - in-place writes, including truncate-then-write in several chunks;
//! - editors and tools that write a temporary file and rename it over the original;
//! - Kubernetes ConfigMap volumes, where the file is a symlink through `..data`, and an
//!   update swaps the `..data` symlink: when the policy (or overrides) path is a symlink,
//!   any change in its directory counts;
//! - delete, then recreate: while the file is missing the last-known-good policy stays
//!   active and one warning is logged; the recreated file is loaded.
//!
//! Events are debounced on the trailing edge: the reload runs once no relevant event has
//! arrived for the debounce window ([`DEFAULT_DEBOUNCE`], 250 ms), so a burst of writes
//! gives one reload of the final content. A half-written file that fails to parse leaves the
//! current policy in place (the store logs every error); the next write reloads again.
//! Dropping the [`WatchHandle`] stops the watcher and joins its thread.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::store::PolicyStore;

/// The debounce window used by the gateway unless configured otherwise.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(250);

/// Why the watcher could not start. Lower case, no full stop.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The store was built from a string or a `Policy`, not a file.
    #[error("the policy store was not loaded from a file, so there is nothing to watch")]
    NoFile,
    /// The policy file's directory cannot be watched.
    #[error("cannot watch `{}`: {source}", path.display())]
    Notify {
        /// The directory.
        path: PathBuf,
        /// The `notify` error.
        #[source]
        source: notify::Error,
    },
    /// The watcher thread could not be spawned.
    #[error("cannot start the watcher thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Keeps the watcher running; dropping it stops the watcher and joins its thread.
#[derive(Debug)]
pub struct WatchHandle {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    status: Arc<Mutex<WatchStatus>>,
}

/// What the watcher has done so far (for status pages and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStatus {
    /// Relevant file-system events seen.
    pub events: u64,
    /// Reloads the watcher asked the store for (failed ones included).
    pub reloads: u64,
    /// The policy file is missing right now (the last-known-good policy stays active).
    pub file_missing: bool,
}

impl WatchHandle {
    /// What the watcher has done so far.
    pub fn status(&self) -> WatchStatus {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
enum Msg {
    Event(notify::Result<notify::Event>),
    Stop,
}

/// Starts watching the store's policy file (and its overrides file) and reloading the store
/// after changes settle for `debounce`.
pub fn watch(store: PolicyStore, debounce: Duration) -> Result<WatchHandle, WatchError> {
    let path = store.path().ok_or(WatchError::NoFile)?;
    let path = std::path::absolute(path)?;
    let (tx, rx) = mpsc::channel();
    let events = tx.clone();
    let watcher = notify::recommended_watcher(move |res| {
        let _ = events.send(Msg::Event(res));
    })
    .map_err(|source| WatchError::Notify {
        path: path.clone(),
        source,
    })?;
    let status = Arc::new(Mutex::new(WatchStatus::default()));
    let mut worker = Worker {
        status: status.clone(),
        store,
        policy: path,
        debounce,
        rx,
        watcher,
        watched: BTreeSet::new(),
        targets: Vec::new(),
        missing: false,
    };
    // The policy file's own directory must be watchable; the overrides one is best effort.
    let dir = worker
        .policy
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    worker
        .watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Notify {
            path: dir.clone(),
            source,
        })?;
    worker.watched.insert(dir);
    worker.refresh_targets();
    let thread = std::thread::Builder::new()
        .name("fairgate-policy-watch".into())
        .spawn(move || worker.run())?;
    Ok(WatchHandle {
        tx,
        thread: Some(thread),
        status,
    })
}

/// A file whose changes trigger a reload.
#[derive(Debug)]
struct Target {
    dir: PathBuf,
    name: OsString,
    /// The path is a symlink: any change in `dir` may change what it points to.
    symlink: bool,
}

impl Target {
    fn new(path: &Path) -> Option<Target> {
        Some(Target {
            dir: path.parent()?.to_path_buf(),
            name: path.file_name()?.to_os_string(),
            symlink: std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()),
        })
    }
}

struct Worker {
    status: Arc<Mutex<WatchStatus>>,
    store: PolicyStore,
    /// Absolute path of the policy file.
    policy: PathBuf,
    debounce: Duration,
    rx: mpsc::Receiver<Msg>,
    watcher: RecommendedWatcher,
    watched: BTreeSet<PathBuf>,
    targets: Vec<Target>,
    /// The policy file was found missing (warned once).
    missing: bool,
}

impl Worker {
    fn run(mut self) {
        tracing::info!(
            target: "fairgate_policies::watch",
            file = %self.policy.display(),
            debounce_ms = self.debounce.as_millis() as u64,
            "watching the policy file"
        );
        let mut deadline: Option<Instant> = None;
        loop {
            let msg = match deadline {
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(d) => self
                    .rx
                    .recv_timeout(d.saturating_duration_since(Instant::now())),
            };
            match msg {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Msg::Event(Ok(event))) => {
                    if self.relevant(&event) {
                        self.update(|s| s.events += 1);
                        deadline = Some(Instant::now() + self.debounce);
                    }
                }
                Ok(Msg::Event(Err(e))) => {
                    // Lost events (e.g. a queue overflow): reload to be sure.
                    tracing::warn!(target: "fairgate_policies::watch", "file watcher error: {e}");
                    deadline = Some(Instant::now() + self.debounce);
                }
                Err(RecvTimeoutError::Timeout) => {
                    deadline = None;
                    self.reload();
                }
            }
        }
        tracing::debug!(target: "fairgate_policies::watch", "policy watcher stopped");
    }

    fn update(&self, f: impl FnOnce(&mut WatchStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn relevant(&self, event: &notify::Event) -> bool {
        match event.kind {
            // Our own reads open the file; only a write that finished matters.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return false,
            _ => {}
        }
        event.paths.iter().any(|p| {
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                return false;
            };
            self.targets
                .iter()
                .any(|t| t.dir == dir && (t.symlink || t.name == name))
        })
    }

    fn reload(&mut self) {
        // `metadata` follows symlinks: a dangling ConfigMap link counts as missing too.
        if std::fs::metadata(&self.policy).is_err() {
            if !self.missing {
                self.missing = true;
                self.update(|s| s.file_missing = true);
                tracing::warn!(
                    target: "fairgate_policies::watch",
                    file = %self.policy.display(),
                    version = self.store.version(),
                    "policy file is gone; keeping the last-known-good policy until it is back"
                );
            }
            self.refresh_targets();
            return;
        }
        if self.missing {
            self.missing = false;
            self.update(|s| s.file_missing = false);
            tracing::info!(
                target: "fairgate_policies::watch",
                file = %self.policy.display(),
                "policy file is back; reloading"
            );
        }
        // The store logs the outcome.
        let _ = self.store.reload();
        self.update(|s| s.reloads += 1);
        self.refresh_targets();
    }

    /// Recomputes which files matter (the overrides file may have changed, a path may have
    /// become a symlink) and which directories to watch.
    fn refresh_targets(&mut self) {
        let mut targets: Vec<Target> = Target::new(&self.policy).into_iter().collect();
        if let Some(o) = self.store.overrides_path() {
            if let Ok(o) = std::path::absolute(o) {
                targets.extend(Target::new(&o));
            }
        }
        let dirs: BTreeSet<PathBuf> = targets.iter().map(|t| t.dir.clone()).collect();
        for d in dirs.difference(&self.watched.clone()) {
            match self.watcher.watch(d, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(d.clone());
                }
                Err(e) => tracing::warn!(
                    target: "fairgate_policies::watch",
                    dir = %d.display(),
                    "cannot watch the overrides file's directory: {e}"
                ),
            }
        }
        for d in self.watched.difference(&dirs).cloned().collect::<Vec<_>>() {
            let _ = self.watcher.unwatch(&d);
            self.watched.remove(&d);
        }
        self.targets = targets;
    }
}
