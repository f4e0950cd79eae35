//! [`PolicyStore`]: the published policy, swapped atomically on reload.
//!
//! Readers take one lock-free [`load`](PolicyStore::load) per request and keep that
//! snapshot for the whole request (in-flight requests finish under the policy they started
//! with). Reloads read, parse and compile off the request path, serialised by a mutex, and
//! publish with one `ArcSwap::store`; a failed reload leaves the current policy in place and
//! is recorded in [`ReloadStatus`] and logged (`warn`, one event per error).
//!
//! Versions: the first policy is version 1 and every reload that changes the content hash
//! publishes `version + 1`. A reload whose result hashes the same as the current policy
//! succeeds without publishing anything: the report says `unchanged` and the version
//! stays. Nothing about the running policy changed, so nothing downstream (bucket state,
//! the admin status' version) should look as if it had; the reload is still counted as a
//! success.
//!
//! The store logs every reload outcome (`info` on success, `warn` on failure) under the
//! target `fairgate_policies::store`; callers add metrics through
//! [`on_reload`](PolicyStore::on_reload) and need not log the same again.
//!
//! ```
//! use fairgate_policies::PolicyStore;
//!
//! let store = PolicyStore::from_yaml_str("version: 1\nrules: []\n", "policy.yaml").unwrap();
//! assert_eq!(store.version(), 1);
//!
//! let report = store
//!     .reload_from_str("version: 1\nrules: [{name: bots, when: {user_agent: bot}, action: deny}]\n", "policy.yaml")
//!     .unwrap();
//! assert_eq!((report.version, report.rules_added.as_slice()), (2, &["bots".to_string()][..]));
//!
//! // A bad policy never goes live.
//! assert!(store.reload_from_str("version: 2\n", "policy.yaml").is_err());
//! assert_eq!(store.load().version, 2);
//! assert!(!store.last_reload().last_ok());
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use arc_swap::{ArcSwap, Guard};

use crate::compile::compile_with_overrides;
use crate::compiled::{CompiledPolicy, PolicyHash};
use crate::error::PolicyErrors;
use crate::model::Policy;
use crate::yaml::Limits;

/// Policy and overrides files larger than this are refused (the decoder's limit).
pub const MAX_POLICY_BYTES: u64 = 4 << 20;

/// A cheap, cloneable handle to the current compiled policy.
#[derive(Clone)]
pub struct PolicyStore {
    inner: Arc<Inner>,
}

type Listener = Arc<dyn Fn(&ReloadOutcome) + Send + Sync>;

struct Inner {
    current: ArcSwap<CompiledPolicy>,
    /// The policy file, when loaded from one.
    path: Option<PathBuf>,
    /// Name used in errors.
    name: String,
    reload_lock: Mutex<()>,
    status: Mutex<ReloadStatus>,
    listeners: RwLock<Vec<Listener>>,
    /// Where the last file that loaded is copied (last-known-good), when asked for.
    snapshot: Option<PathBuf>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.inner.current.load();
        f.debug_struct("PolicyStore")
            .field("path", &self.inner.path)
            .field("version", &p.version)
            .field("hash", &p.hash)
            .finish()
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Version now active (unchanged reload: the current one).
    pub version: u64,
    /// Version active before.
    pub previous_version: u64,
    /// Hash now active.
    pub hash: PolicyHash,
    /// Hash active before.
    pub previous_hash: PolicyHash,
    /// The new policy hashed the same as the current one; nothing was published.
    pub unchanged: bool,
    /// Rules (by name) only in the new policy, in its order.
    pub rules_added: Vec<String>,
    /// Rules only in the old policy.
    pub rules_removed: Vec<String>,
    /// Rules in both whose mode, condition or action differ.
    pub rules_modified: Vec<String>,
    /// Plans only in the new policy.
    pub plans_added: Vec<String>,
    /// Plans only in the old policy.
    pub plans_removed: Vec<String>,
    /// Plans in both that differ.
    pub plans_modified: Vec<String>,
    /// Bandwidth ids only in the new policy, sorted.
    pub bandwidths_added: Vec<Arc<str>>,
    /// Bandwidth ids in both whose emission interval `T` or capacity `C` changed, sorted.
    /// Their state carries over rescaled (fill fraction kept).
    pub bandwidths_changed: Vec<Arc<str>>,
    /// Bandwidth ids only in the old policy, sorted; their state can be dropped.
    pub bandwidths_removed: Vec<Arc<str>>,
}

/// A reload's result, as handed to [`PolicyStore::on_reload`] listeners.
#[derive(Debug, Clone)]
pub enum ReloadOutcome {
    /// The reload succeeded (possibly `unchanged`).
    Reloaded(Arc<ReloadReport>),
    /// The reload failed; the previous policy stays active.
    Failed(PolicyErrors),
}

/// The store's reload history, for the admin status page and metrics.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    /// Version active now.
    pub version: u64,
    /// Hash active now.
    pub hash: PolicyHash,
    /// When the active version was published (wall time, for display only).
    pub loaded_at: SystemTime,
    /// When the last reload was attempted; `None` before the first one.
    pub last_attempt_at: Option<SystemTime>,
    /// The errors of the last attempt when it failed; `None` when it succeeded or none
    /// was made.
    pub last_error: Option<PolicyErrors>,
    /// Successful reloads (unchanged ones included).
    pub succeeded: u64,
    /// Failed reloads.
    pub failed: u64,
}

impl ReloadStatus {
    /// True unless the last reload attempt failed.
    pub fn last_ok(&self) -> bool {
        self.last_error.is_none()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these values half-updated in a way that
    // matters (plain counters and an `Option`), so keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl PolicyStore ===

impl PolicyStore {
    /// Reads, parses and compiles a policy file, and the overrides file it names (relative
    /// to the policy file's directory; a missing overrides file means no overrides).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, PolicyErrors> {
        let path = path.as_ref().to_path_buf();
        let name = path.display().to_string();
        let compiled = load_file(&path)?;
        Ok(PolicyStore::with(compiled, Some(path), name))
    }

    /// [`from_file`](Self::from_file) with a last-known-good copy at `snapshot`: every time
    /// the policy file loads (now and on each reload) its bytes are written there
    /// atomically; when the file itself does not load at start but the snapshot does, the
    /// store starts from the snapshot — still watching and reloading `path` — and the file's
    /// errors are returned beside it (and recorded as the last reload error). A failure to
    /// write the snapshot is logged, never fatal.
    pub fn from_file_with_snapshot(
        path: impl AsRef<Path>,
        snapshot: impl AsRef<Path>,
    ) -> Result<(Self, Option<PolicyErrors>), PolicyErrors> {
        let path = path.as_ref().to_path_buf();
        let snapshot = snapshot.as_ref().to_path_buf();
        let name = path.display().to_string();
        match load_file_keeping_bytes(&path) {
            Ok((compiled, bytes)) => {
                write_snapshot(&snapshot, &bytes);
                let mut store = PolicyStore::with(compiled, Some(path), name);
                store.set_snapshot(snapshot);
                Ok((store, None))
            }
            Err(errors) => {
                let sname = snapshot.display().to_string();
                let Ok(Some(bytes)) = read_bytes(&snapshot, &sname) else {
                    return Err(errors);
                };
                let compiled = match compile_bytes(&path, &sname, &bytes) {
                    Ok(c) => c,
                    Err(snapshot_errors) => {
                        tracing::warn!(
                            target: "fairgate_policies::store",
                            snapshot = %sname,
                            "the last-known-good snapshot does not load either:\n{snapshot_errors}"
                        );
                        return Err(errors);
                    }
                };
                let mut store = PolicyStore::with(compiled, Some(path), name);
                store.set_snapshot(snapshot);
                {
                    let mut status = lock(&store.inner.status);
                    status.last_attempt_at = Some(SystemTime::now());
                    status.last_error = Some(errors.clone());
                    status.failed += 1;
                }
                Ok((store, Some(errors)))
            }
        }
    }

    fn set_snapshot(&mut self, snapshot: PathBuf) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.snapshot = Some(snapshot);
        }
    }

    /// The last-known-good snapshot file, when the store keeps one.
    pub fn snapshot_path(&self) -> Option<&Path> {
        self.inner.snapshot.as_deref()
    }

    /// Parses and compiles a policy from text; `file_name` names it in errors. An
    /// `overrides_file` in the text is not read (there is no directory to resolve it in).
    pub fn from_yaml_str(source: &str, file_name: &str) -> Result<Self, PolicyErrors> {
        let policy = parse_policy(source, file_name)?;
        let compiled = compile_with_overrides(policy, BTreeMap::new(), file_name)?;
        Ok(PolicyStore::with(compiled, None, file_name.to_owned()))
    }

    /// Compiles a policy built in code.
    pub fn from_policy(policy: Policy) -> Result<Self, PolicyErrors> {
        let compiled = compile_with_overrides(policy, BTreeMap::new(), "policy")?;
        Ok(PolicyStore::with(compiled, None, "policy".to_owned()))
    }

    /// [`from_policy`](Self::from_policy) for tests.
    ///
    /// # Panics
    ///
    /// When the policy does not compile.
    pub fn for_test(policy: Policy) -> Self {
        match PolicyStore::from_policy(policy) {
            Ok(s) => s,
            Err(e) => panic!("test policy does not compile:\n{e}"),
        }
    }

    fn with(mut compiled: CompiledPolicy, path: Option<PathBuf>, name: String) -> Self {
        compiled.version = 1;
        let status = ReloadStatus {
            version: 1,
            hash: compiled.hash,
            loaded_at: SystemTime::now(),
            last_attempt_at: None,
            last_error: None,
            succeeded: 0,
            failed: 0,
        };
        PolicyStore {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(compiled),
                path,
                name,
                reload_lock: Mutex::new(()),
                status: Mutex::new(status),
                listeners: RwLock::new(Vec::new()),
                snapshot: None,
            }),
        }
    }

    /// The current policy, lock-free. Take one per request and do not hold it across an
    /// `.await` for long (it pins that version in memory).
    #[inline]
    pub fn load(&self) -> Guard<Arc<CompiledPolicy>> {
        self.inner.current.load()
    }

    /// The current policy as an owned `Arc` (slower than [`load`](Self::load); for
    /// long-lived holders).
    pub fn load_full(&self) -> Arc<CompiledPolicy> {
        self.inner.current.load_full()
    }

    /// The current version (1 for the first policy).
    pub fn version(&self) -> u64 {
        self.inner.current.load().version
    }

    /// The policy file, when the store was loaded from one.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The overrides file the current policy names, resolved against the policy file's
    /// directory; `None` when there is no policy file or no `overrides_file`.
    pub fn overrides_path(&self) -> Option<PathBuf> {
        let path = self.inner.path.as_deref()?;
        let rel = self.inner.current.load().source.overrides_file.clone()?;
        Some(overrides_path(path, &rel))
    }

    /// The caps file the current policy names (`usage_endpoint.caps_file`), resolved against
    /// the policy file's directory; `None` when there is no policy file or no caps file.
    pub fn caps_path(&self) -> Option<PathBuf> {
        let path = self.inner.path.as_deref()?;
        let rel = self
            .inner
            .current
            .load()
            .source
            .usage_endpoint
            .as_ref()?
            .caps_file
            .clone()?;
        Some(overrides_path(path, &rel))
    }

    /// The growth file the current policy names (`state.growth_file`), resolved against the
    /// policy file's directory (an inline policy's: against the working directory).
    pub fn growth_path(&self) -> Option<PathBuf> {
        let rel = self.inner.current.load().source.state.growth_file.clone()?;
        Some(match self.inner.path.as_deref() {
            Some(path) => overrides_path(path, &rel),
            None => PathBuf::from(rel),
        })
    }

    /// The reload history.
    pub fn last_reload(&self) -> ReloadStatus {
        lock(&self.inner.status).clone()
    }

    /// Registers a listener called after every reload attempt, in order, on the reloading
    /// thread while further reloads wait. Keep it short; it must not reload this store.
    pub fn on_reload(&self, f: impl Fn(&ReloadOutcome) + Send + Sync + 'static) {
        self.inner
            .listeners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(f));
    }

    /// Re-reads the policy file (and its overrides file) and publishes it if it compiles.
    /// A store not loaded from a file has nothing to re-read: that is an error, not
    /// recorded as a failed reload.
    pub fn reload(&self) -> Result<ReloadReport, PolicyErrors> {
        let Some(path) = self.inner.path.clone() else {
            return Err(PolicyErrors::unlocated(
                self.inner.name.clone(),
                "this policy store was not loaded from a file, so there is nothing to re-read",
            ));
        };
        let snapshot = self.inner.snapshot.clone();
        self.publish(|| {
            let (compiled, bytes) = load_file_keeping_bytes(&path)?;
            if let Some(snapshot) = &snapshot {
                write_snapshot(snapshot, &bytes);
            }
            Ok(compiled)
        })
    }

    /// Parses and compiles `source` and publishes it if it compiles (no overrides file).
    pub fn reload_from_str(&self, source: &str, file: &str) -> Result<ReloadReport, PolicyErrors> {
        self.publish(|| {
            let policy = parse_policy(source, file)?;
            compile_with_overrides(policy, BTreeMap::new(), file)
        })
    }

    /// Compiles `policy` and publishes it if it compiles.
    pub fn swap_policy(&self, policy: Policy) -> Result<ReloadReport, PolicyErrors> {
        self.publish(|| compile_with_overrides(policy, BTreeMap::new(), &self.inner.name))
    }

    /// A reload from somewhere else than the policy file (e.g. a policy inline in another
    /// config file): `read` produces the policy, which is compiled and published if it
    /// compiles. Its failure, reading included, is recorded like any failed reload
    /// ([`last_reload`](Self::last_reload), listeners, the log).
    pub fn reload_with(
        &self,
        read: impl FnOnce() -> Result<Policy, PolicyErrors>,
    ) -> Result<ReloadReport, PolicyErrors> {
        self.publish(|| compile_with_overrides(read()?, BTreeMap::new(), &self.inner.name))
    }

    fn publish(
        &self,
        build: impl FnOnce() -> Result<CompiledPolicy, PolicyErrors>,
    ) -> Result<ReloadReport, PolicyErrors> {
        let _serial = lock(&self.inner.reload_lock);
        let result = build();
        let now = SystemTime::now();
        let old = self.inner.current.load_full();
        let outcome = match result {
            Err(errors) => {
                tracing::warn!(
                    target: "fairgate_policies::store",
                    errors = errors.len(),
                    version = old.version,
                    "policy reload failed; keeping the current policy"
                );
                for e in errors.iter() {
                    tracing::warn!(target: "fairgate_policies::store", "{e}");
                }
                let mut status = lock(&self.inner.status);
                status.last_attempt_at = Some(now);
                status.last_error = Some(errors.clone());
                status.failed += 1;
                drop(status);
                ReloadOutcome::Failed(errors)
            }
            Ok(mut new) => {
                let report = if new.hash == old.hash {
                    unchanged(&old)
                } else {
                    new.version = old.version + 1;
                    reuse_bandwidth_ids(&mut new, &old);
                    let report = diff(&old, &new);
                    self.inner.current.store(Arc::new(new));
                    report
                };
                tracing::info!(
                    target: "fairgate_policies::store",
                    version = report.version,
                    hash = %report.hash,
                    unchanged = report.unchanged,
                    rules_added = ?report.rules_added,
                    rules_removed = ?report.rules_removed,
                    rules_modified = ?report.rules_modified,
                    plans_changed = report.plans_added.len() + report.plans_removed.len() + report.plans_modified.len(),
                    "policy reloaded"
                );
                let mut status = lock(&self.inner.status);
                status.last_attempt_at = Some(now);
                status.last_error = None;
                status.succeeded += 1;
                if !report.unchanged {
                    status.version = report.version;
                    status.hash = report.hash;
                    status.loaded_at = now;
                }
                drop(status);
                ReloadOutcome::Reloaded(Arc::new(report))
            }
        };
        let listeners: Vec<Listener> = self
            .inner
            .listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for l in &listeners {
            l(&outcome);
        }
        match outcome {
            ReloadOutcome::Reloaded(r) => Ok(Arc::unwrap_or_clone(r)),
            ReloadOutcome::Failed(e) => Err(e),
        }
    }
}

// === loading ===

fn parse_policy(source: &str, file: &str) -> Result<Policy, PolicyErrors> {
    crate::decode::parse_policy(source, file)
}

fn overrides_path(policy_path: &Path, rel: &str) -> PathBuf {
    policy_path
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join(rel)
}

/// Reads, parses and compiles a policy file and its overrides file (checked against the
/// policy: plans must exist, bursts must admit the costliest operation).
fn load_file(path: &Path) -> Result<CompiledPolicy, PolicyErrors> {
    load_file_keeping_bytes(path).map(|(compiled, _)| compiled)
}

/// [`load_file`], also returning the bytes that compiled (for the snapshot).
fn load_file_keeping_bytes(path: &Path) -> Result<(CompiledPolicy, Vec<u8>), PolicyErrors> {
    let name = path.display().to_string();
    let bytes = read_bytes(path, &name)?
        .ok_or_else(|| PolicyErrors::unlocated(name.clone(), "file not found"))?;
    let compiled = compile_bytes(path, &name, &bytes)?;
    Ok((compiled, bytes))
}

/// Writes `bytes` to `snapshot` atomically (a temporary file renamed over it); logs a
/// failure instead of failing the load.
fn write_snapshot(snapshot: &Path, bytes: &[u8]) {
    let mut tmp = snapshot.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, snapshot));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(
            target: "fairgate_policies::store",
            snapshot = %snapshot.display(),
            error = %e,
            "cannot write the last-known-good policy snapshot"
        );
    }
}

/// Parses and compiles policy `bytes` named `name`, with the overrides file it names
/// resolved against `path`'s directory.
fn compile_bytes(path: &Path, name: &str, bytes: &[u8]) -> Result<CompiledPolicy, PolicyErrors> {
    let name = name.to_owned();
    let policy = crate::decode::parse_policy_bytes(bytes, &name)?;
    let overrides = match &policy.overrides_file {
        None => BTreeMap::new(),
        Some(rel) => {
            let opath = overrides_path(path, rel);
            let oname = opath.display().to_string();
            match read_bytes(&opath, &oname)? {
                None => BTreeMap::new(),
                Some(bytes) => {
                    let text =
                        crate::decode::source_from_bytes(&bytes, &oname, &Limits::default())?;
                    crate::decode::parse_overrides_for(text, &oname, &policy)?
                }
            }
        }
    };
    let caps = match policy
        .usage_endpoint
        .as_ref()
        .and_then(|u| u.caps_file.as_deref())
    {
        None => BTreeMap::new(),
        Some(rel) => {
            let cpath = overrides_path(path, rel);
            let cname = cpath.display().to_string();
            match read_bytes(&cpath, &cname)? {
                None => BTreeMap::new(),
                Some(bytes) => {
                    let text =
                        crate::decode::source_from_bytes(&bytes, &cname, &Limits::default())?;
                    crate::decode::parse_caps(text, &cname)?
                }
            }
        }
    };
    let mut compiled = compile_with_overrides(policy, overrides, &name)?;
    compiled.caps = Arc::new(caps);
    Ok(compiled)
}

/// Reads at most [`MAX_POLICY_BYTES`] + 1 bytes of a file (the decoder reports the size);
/// `Ok(None)` when it does not exist.
fn read_bytes(path: &Path, name: &str) -> Result<Option<Vec<u8>>, PolicyErrors> {
    let err = |m: String| PolicyErrors::unlocated(name.to_owned(), m);
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(format!("cannot open the file: {}", io_message(&e)))),
    };
    let mut bytes = Vec::new();
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read the file: {}", io_message(&e))))?;
    Ok(Some(bytes))
}

/// An I/O error as a lower-case message.
fn io_message(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        PermissionDenied => "permission denied".to_owned(),
        IsADirectory => "it is a directory".to_owned(),
        _ => {
            let s = e.to_string();
            let mut c = s.chars();
            match c.next() {
                Some(first) => first.to_lowercase().chain(c).collect(),
                None => s,
            }
        }
    }
}

// === diff ===

fn unchanged(current: &CompiledPolicy) -> ReloadReport {
    ReloadReport {
        version: current.version,
        previous_version: current.version,
        hash: current.hash,
        previous_hash: current.hash,
        unchanged: true,
        rules_added: Vec::new(),
        rules_removed: Vec::new(),
        rules_modified: Vec::new(),
        plans_added: Vec::new(),
        plans_removed: Vec::new(),
        plans_modified: Vec::new(),
        bandwidths_added: Vec::new(),
        bandwidths_changed: Vec::new(),
        bandwidths_removed: Vec::new(),
    }
}

fn diff(old: &CompiledPolicy, new: &CompiledPolicy) -> ReloadReport {
    let mut report = unchanged(old);
    report.unchanged = false;
    report.version = new.version;
    report.hash = new.hash;

    let old_rules: HashMap<&str, _> = old
        .source
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r))
        .collect();
    let new_names: HashSet<&str> = new.source.rules.iter().map(|r| r.name.as_str()).collect();
    for r in &new.source.rules {
        match old_rules.get(r.name.as_str()) {
            None => report.rules_added.push(r.name.clone()),
            Some(o) if *o != r => report.rules_modified.push(r.name.clone()),
            Some(_) => {}
        }
    }
    for r in &old.source.rules {
        if !new_names.contains(r.name.as_str()) {
            report.rules_removed.push(r.name.clone());
        }
    }

    for (name, plan) in &new.source.plans {
        match old.source.plans.get(name) {
            None => report.plans_added.push(name.clone()),
            Some(o) if o != plan => report.plans_modified.push(name.clone()),
            Some(_) => {}
        }
    }
    for name in old.source.plans.keys() {
        if !new.source.plans.contains_key(name) {
            report.plans_removed.push(name.clone());
        }
    }

    let old_bw: HashMap<&str, (u64, u64)> = old
        .bandwidths()
        .map(|b| (&*b.id, (b.t_ns, b.c_ns)))
        .collect();
    let mut seen = HashSet::new();
    for b in new.bandwidths() {
        seen.insert(&*b.id);
        match old_bw.get(&*b.id) {
            None => report.bandwidths_added.push(b.id.clone()),
            Some(&tc) if tc != (b.t_ns, b.c_ns) => report.bandwidths_changed.push(b.id.clone()),
            Some(_) => {}
        }
    }
    for b in old.bandwidths() {
        if !seen.contains(&*b.id) {
            report.bandwidths_removed.push(b.id.clone());
        }
    }
    for v in [
        &mut report.bandwidths_added,
        &mut report.bandwidths_changed,
        &mut report.bandwidths_removed,
    ] {
        v.sort();
        v.dedup();
    }
    report
}

/// Makes every bandwidth id of `new` whose text the `old` policy also has point at the old
/// policy's `Arc<str>`, so an id keeps one allocation across generations. Runtime state may key
/// buckets by the id's address (the engine does); without this, every reload would bring a new
/// allocation per id and such a table would grow with each reload.
fn reuse_bandwidth_ids(new: &mut CompiledPolicy, old: &CompiledPolicy) {
    let known: std::collections::HashMap<&str, &Arc<str>> =
        old.bandwidths().map(|b| (&*b.id, &b.id)).collect();
    let mut relink = |bw: &mut crate::compiled::CompiledBandwidth| {
        if let Some(id) = known.get(&*bw.id) {
            bw.id = Arc::clone(id);
        }
    };
    // Freshly compiled: every Arc below is unique, so get_mut succeeds; if one were shared,
    // skipping it only costs the optimisation, never correctness.
    if let Some(plans) = Arc::get_mut(&mut new.plans) {
        for plan in plans.iter_mut() {
            if let Some(bws) = Arc::get_mut(&mut plan.bandwidths) {
                bws.iter_mut().for_each(&mut relink);
            }
        }
    }
    for quota in new.clients.values_mut() {
        if let Some(bws) = quota.bandwidths.as_mut().and_then(Arc::get_mut) {
            bws.iter_mut().for_each(&mut relink);
        }
    }
    if let Some(rules) = Arc::get_mut(&mut new.rules) {
        for rule in rules.iter_mut() {
            if let crate::compiled::CompiledAction::Limit { bandwidth, .. } = &mut rule.action {
                relink(bandwidth);
            }
        }
    }
}
