//! Policy reloads from every trigger — the file watcher, SIGHUP and `POST /reload` — with
//! their outcome recorded in metrics and shown by the admin `/status`.
//!
//! A policy file is reloaded by the store itself (policy file plus its overrides file). An
//! inline policy is reloaded by re-reading the gateway config file and taking only its
//! `policy` section; other sections of the gateway config need a restart.
//! A failed reload keeps the current policy; every error is logged by the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use fairgate_policies::store::{ReloadOutcome, ReloadStatus};
use fairgate_policies::{PolicyErrors, PolicyStore, ReloadReport};

use crate::config::PolicySource;
use crate::metrics::Metrics;

/// A reload that failed before the store saw it (inline policies: the gateway file did not
/// parse), kept so `/status` shows it.
#[derive(Debug, Clone)]
struct EarlyFailure {
    at: SystemTime,
    errors: PolicyErrors,
}

/// Reloads the policy and records the outcome.
#[derive(Debug)]
pub struct Reloader {
    store: PolicyStore,
    source: PolicySource,
    metrics: Arc<Metrics>,
    early_failure: Arc<ArcSwapOption<EarlyFailure>>,
    /// Reloads that failed before the store saw them: the store's `failed` does not count
    /// them, the metric and `/status` do.
    early_failures: AtomicU64,
}

/// The last reload's result, for `/status`.
#[derive(Debug, Clone)]
pub struct LastReload {
    /// True unless the last attempt failed.
    pub ok: bool,
    /// When the last attempt was made (`None`: no reload yet).
    pub at: Option<SystemTime>,
    /// Its errors, one `file:line:col: path: message` per entry.
    pub errors: Vec<String>,
    /// The store's counters (`failed` also counting reloads that failed before the store
    /// saw them) and active version.
    pub status: ReloadStatus,
}

// === impl Reloader ===

impl Reloader {
    /// Wires metrics to every reload of `store` (whatever triggers it).
    pub fn new(store: PolicyStore, source: PolicySource, metrics: Arc<Metrics>) -> Arc<Reloader> {
        let early_failure: Arc<ArcSwapOption<EarlyFailure>> = Arc::new(ArcSwapOption::empty());
        {
            let metrics = metrics.clone();
            let early = early_failure.clone();
            store.on_reload(move |outcome| {
                early.store(None);
                match outcome {
                    ReloadOutcome::Reloaded(r) => metrics.reload(true, r.version),
                    ReloadOutcome::Failed(_) => metrics.reload(false, 0),
                }
            });
        }
        metrics.set_policy_version(store.version());
        Arc::new(Reloader {
            store,
            source,
            metrics,
            early_failure,
            early_failures: AtomicU64::new(0),
        })
    }

    /// The store.
    pub fn store(&self) -> &PolicyStore {
        &self.store
    }

    /// Reloads now. Blocking (file I/O and compilation): call from `spawn_blocking`.
    pub fn reload(&self) -> Result<ReloadReport, PolicyErrors> {
        match &self.source {
            PolicySource::File(_) => self.store.reload(),
            PolicySource::Inline { config_file } => {
                let file = config_file.display().to_string();
                let parsed = std::fs::read(config_file)
                    .map_err(|e| {
                        PolicyErrors::unlocated(&file, format!("cannot read the file: {e}"))
                    })
                    .and_then(|bytes| {
                        let text = fairgate_policies::decode::source_from_bytes(
                            &bytes,
                            &file,
                            &fairgate_policies::yaml::Limits::default(),
                        )?;
                        crate::config::decode::inline_policy(text, &file)
                    });
                match parsed {
                    Ok(policy) => self.store.swap_policy(policy),
                    Err(errors) => {
                        tracing::warn!(
                            errors = errors.len(),
                            "policy reload failed; keeping the current policy"
                        );
                        for e in errors.iter() {
                            tracing::warn!("{e}");
                        }
                        self.metrics.reload(false, 0);
                        self.early_failures.fetch_add(1, Ordering::Relaxed);
                        self.early_failure.store(Some(Arc::new(EarlyFailure {
                            at: SystemTime::now(),
                            errors: errors.clone(),
                        })));
                        Err(errors)
                    }
                }
            }
        }
    }

    /// Reloads on a blocking thread.
    pub async fn reload_async(self: &Arc<Self>) -> Result<ReloadReport, PolicyErrors> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.reload()).await {
            Ok(r) => r,
            Err(_) => Err(PolicyErrors::unlocated("policy", "the reload task failed")),
        }
    }

    /// The last reload's result.
    pub fn last(&self) -> LastReload {
        let mut status = self.store.last_reload();
        status.failed += self.early_failures.load(Ordering::Relaxed);
        if let Some(early) = self.early_failure.load_full() {
            return LastReload {
                ok: false,
                at: Some(early.at),
                errors: early.errors.iter().map(ToString::to_string).collect(),
                status,
            };
        }
        LastReload {
            ok: status.last_ok(),
            at: status.last_attempt_at,
            errors: status
                .last_error
                .as_ref()
                .map(|e| e.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            status,
        }
    }
}
