//! Certificate reloads: the TLS listeners' certificate and key files are watched (and SIGHUP
//! reloads them too), and each listener's certificates are swapped for new handshakes when
//! they all load ([`Tls::reload`]); connections already established keep theirs.
//!
//! A reload that fails keeps the listener's current certificates and is reported as a bad
//! policy is: a `warn` line "certificate reload failed; keeping the current certificates"
//! with the listener, then one line with the reason (`certs[1]: `b.pem` expired at …`),
//! `fairgate_certificate_reloads_total{listener, result="error"}` goes up and
//! `fairgate_certificate_last_reload_success{listener}` becomes 0.
//!
//! The watcher follows the policy watcher's rules: the files' directories are watched (not
//! the files), so the rename-over that cert-manager, certbot and editors do is seen, and a
//! file that is a symlink (a Kubernetes Secret's `..data` swap) makes any change in its
//! directory count; events are debounced for [`DEBOUNCE`], so that a certificate and its key
//! replaced one after the other are read together.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::metrics::{CertificateMetrics, Metrics};
use crate::tls::Tls;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};

/// How long the watcher waits after the last change before it reloads (the policy
/// watcher's debounce).
pub const DEBOUNCE: Duration = fairgate_policies::watch::DEFAULT_DEBOUNCE;

/// One TLS listener: its bound address, its certificates and its counters.
#[derive(Debug)]
struct Listener {
    addr: SocketAddr,
    tls: Tls,
    metrics: CertificateMetrics,
}

/// The TLS listeners whose certificates reload. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CertReload {
    listeners: Arc<[Listener]>,
}

/// A file that matters: its directory and name, and whether it is a symlink (then every
/// change in the directory counts).
#[derive(Debug)]
struct Target {
    listener: usize,
    dir: PathBuf,
    name: std::ffi::OsString,
    symlink: bool,
}

impl CertReload {
    /// The reloads of `listeners` (bound address, TLS), with their series in `metrics`.
    pub fn new(listeners: Vec<(SocketAddr, Tls)>, metrics: &Metrics) -> CertReload {
        let listeners = listeners
            .into_iter()
            .map(|(addr, tls)| Listener {
                metrics: metrics.certificates(&addr.to_string()),
                addr,
                tls,
            })
            .collect();
        CertReload { listeners }
    }

    /// Reloads every listener's certificates (SIGHUP). Blocking (file I/O).
    pub fn reload_all(&self) {
        for i in 0..self.listeners.len() {
            self.reload(i);
        }
    }

    /// Reloads listener `i`, logs and counts the outcome.
    fn reload(&self, i: usize) {
        let l = &self.listeners[i];
        match l.tls.reload() {
            Ok(n) => {
                l.metrics.ok.inc();
                l.metrics.last_success.set(1);
                tracing::info!(listener = %l.addr, certificates = n, "certificates reloaded");
            }
            Err(e) => {
                l.metrics.error.inc();
                l.metrics.last_success.set(0);
                tracing::warn!(
                    listener = %l.addr,
                    "certificate reload failed; keeping the current certificates"
                );
                tracing::warn!(listener = %l.addr, "{e}");
            }
        }
    }

    /// Starts watching every certificate and key file on a thread of its own, for the
    /// life of the process.
    pub fn watch(&self) -> std::io::Result<()> {
        let targets = self.targets();
        let (tx, rx) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })
        .map_err(std::io::Error::other)?;
        let dirs: BTreeSet<&PathBuf> = targets.iter().map(|t| &t.dir).collect();
        for dir in dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| {
                    std::io::Error::other(format!(
                        "cannot watch the certificates' directory {}: {e}",
                        dir.display()
                    ))
                })?;
        }
        let this = self.clone();
        std::thread::Builder::new()
            .name("fairgate-certs".into())
            .spawn(move || {
                // Owned by the thread: dropping it would stop the events.
                let _watcher = watcher;
                this.run(&targets, &rx);
            })?;
        Ok(())
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for (listener, l) in self.listeners.iter().enumerate() {
            for f in l.tls.files() {
                for path in [&f.cert, &f.key] {
                    let Ok(abs) = std::path::absolute(path) else {
                        continue;
                    };
                    let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
                        continue;
                    };
                    let symlink =
                        std::fs::symlink_metadata(&abs).is_ok_and(|m| m.file_type().is_symlink());
                    targets.push(Target {
                        listener,
                        dir: dir.to_owned(),
                        name: name.to_owned(),
                        symlink,
                    });
                }
            }
        }
        targets
    }

    fn run(&self, targets: &[Target], rx: &mpsc::Receiver<notify::Result<notify::Event>>) {
        let mut pending = vec![false; self.listeners.len()];
        let mut deadline: Option<Instant> = None;
        loop {
            let msg = match deadline {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            };
            match msg {
                Err(RecvTimeoutError::Disconnected) => return,
                Ok(Ok(event)) => {
                    let mut any = false;
                    for t in targets.iter().filter(|t| relevant(t, &event)) {
                        pending[t.listener] = true;
                        any = true;
                    }
                    if any {
                        deadline = Some(Instant::now() + DEBOUNCE);
                    }
                }
                Ok(Err(e)) => {
                    // Lost events (e.g. a queue overflow): reload everything to be sure.
                    tracing::warn!("certificate watcher error: {e}");
                    pending.fill(true);
                    deadline = Some(Instant::now() + DEBOUNCE);
                }
                Err(RecvTimeoutError::Timeout) => {
                    deadline = None;
                    for (i, p) in pending.iter_mut().enumerate() {
                        if std::mem::take(p) {
                            self.reload(i);
                        }
                    }
                }
            }
        }
    }
}

fn relevant(t: &Target, event: &notify::Event) -> bool {
    match event.kind {
        // Our own reads open the files; only a write that finished matters.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    event.paths.iter().any(|p| {
        p.parent() == Some(t.dir.as_path()) && (t.symlink || p.file_name() == Some(&t.name))
    })
}
