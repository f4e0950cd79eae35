//! Policy reloads from every trigger but the file watcher — SIGHUP and `POST /reload`.
//!
//! A policy file is reloaded by the store itself (policy file plus its overrides file). An
//! inline policy is reloaded by re-reading the gateway config file and taking only its
//! `policy` section ([`PolicyStore::reload_with`]); other sections of the gateway config
//! need a restart. Either way the store records the outcome (`/status`, metrics) and logs
//! every error; a failed reload keeps the current policy.

use std::sync::Arc;

use fairgate_policies::{PolicyErrors, PolicyStore, ReloadReport};

use crate::config::PolicySource;

/// A reload of `store` from `source`, as the admin API and SIGHUP call it. Blocking (file
/// I/O and compilation).
pub fn reloader(
    store: PolicyStore,
    source: PolicySource,
) -> Arc<dyn Fn() -> Result<ReloadReport, PolicyErrors> + Send + Sync> {
    Arc::new(move || match &source {
        PolicySource::File(_) => store.reload(),
        PolicySource::Inline { config_file } => store.reload_with(|| {
            let file = config_file.display().to_string();
            let bytes = std::fs::read(config_file).map_err(|e| {
                PolicyErrors::unlocated(&file, format!("cannot read the file: {e}"))
            })?;
            let text = fairgate_policies::decode::source_from_bytes(
                &bytes,
                &file,
                &fairgate_policies::yaml::Limits::default(),
            )?;
            crate::config::decode::inline_policy(text, &file)
        }),
    })
}
