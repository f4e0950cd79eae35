//! The runtime model of the data plane (`runtime:` in `gateway.yaml`).
//!
//! - `multi_thread`: one multi-thread tokio runtime with `workers` threads runs everything;
//!   each listen address is one socket, and connection tasks are work-stolen between threads.
//! - `thread_per_core` (the default): `workers` OS threads (`fairgate-core-N`), each running a
//!   current-thread tokio runtime with its own `SO_REUSEPORT` socket per listen address, all
//!   bound to the same address. The kernel spreads new connections over the sockets, and a
//!   connection lives and dies on the thread that accepted it: no work stealing, no
//!   cross-thread wake-ups on the request path. The caller's runtime (the "control" runtime:
//!   a current-thread runtime on the main thread when started by the CLI) keeps the admin API,
//!   reloads, SIGHUP, health checks, pruning and the `builtin:echo` upstream.
//!
//! Every thread shares the one engine, policy store, route table and metrics (all `Arc`s
//! with atomics inside). Upstream connection pools are the exception: hyper-util's client
//! drives each pooled connection on a task of the runtime that opened it, so sharing one pool
//! between threads would turn every reuse into a cross-thread hand-off. Each per-core thread
//! therefore uses its own client of each upstream pool: [`Workers::start`] builds each
//! thread's service stack for that thread (`make_service(i)`), over a proxy that knows its
//! core (`Proxy::for_core`); everywhere else the pools' shared client is used.
//!
//! `thread_per_core` is the default because it was measured to use less CPU per request
//! (`gateway/scripts/runtime-bench.sh`; numbers in `docs/gateway.md`). Its cost: the kernel
//! places connections, not load, so a few busy long-lived connections (one HTTP/2 client
//! multiplexing everything) can keep one thread busy while another idles, where
//! `multi_thread` would steal the work.
//!
//! Shutdown: the stop signal reaches every thread's accept loops; each drains its own
//! connections and then shuts its runtime down. When the grace period ends first, the
//! threads are told to stop at once and their runtimes drop what is left.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tower::Service;

use crate::body::BoxError;
use crate::server::conn_limits::ConnLimits;
use crate::server::{self, RequestBody};
use crate::tls::Tls;

/// How long a per-core runtime may take to drop its remaining tasks once told to stop.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(100);

/// The number of per-core threads `thread_per_core` starts when `workers` is not set: the
/// number of cores this process may run on (1 when that cannot be known).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// One listen address as every per-core thread binds it: the address (port 0 already
/// resolved) and its TLS acceptor, if any.
#[derive(Debug, Clone)]
pub struct ListenSpec {
    /// The address; a port 0 must be resolved first, or each thread would get its own port.
    pub addr: SocketAddr,
    /// TLS termination.
    pub tls: Option<Tls>,
}

/// The running per-core threads of a `thread_per_core` gateway.
#[derive(Debug)]
pub struct Workers {
    /// Closed (every sender dropped) once every thread has finished.
    done: mpsc::Receiver<()>,
    /// Turns true when the threads must stop at once (grace period over, or dropped).
    force: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

// === impl Workers ===

impl Workers {
    /// Starts `n` per-core threads. Each builds a current-thread runtime, binds its own socket
    /// for every listener in `specs` (with `SO_REUSEPORT`), and serves its own service,
    /// `make_service(i)` for thread `i`, on them until `stop` turns true. `bound` are
    /// already-bound sockets for thread 0 (the ones that resolved port 0), in the order of
    /// `specs`. Every thread shares `limits` (one
    /// per-source connection table for the whole gateway).
    ///
    /// Returns once every socket is bound and every runtime built, or the first error.
    pub fn start<S, B>(
        n: usize,
        specs: &[ListenSpec],
        bound: Vec<std::net::TcpListener>,
        make_service: impl Fn(usize) -> S,
        builder: Arc<auto::Builder<TokioExecutor>>,
        limits: &ConnLimits,
        stop: &watch::Receiver<bool>,
    ) -> io::Result<Workers>
    where
        S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (done_tx, done) = mpsc::channel::<()>(1);
        let (force, _) = watch::channel(false);
        let mut bound = Some(bound);
        // Build and bind everything before starting any thread, so a failure leaves nothing
        // running.
        let mut prepared = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let sockets = match bound.take() {
                Some(b) if i == 0 => b,
                _ => specs
                    .iter()
                    .map(|s| server::bind_another(s.addr))
                    .collect::<io::Result<Vec<_>>>()?,
            };
            let listeners = {
                let _entered = rt.enter();
                sockets
                    .into_iter()
                    .map(TcpListener::from_std)
                    .collect::<io::Result<Vec<_>>>()?
            };
            prepared.push((rt, listeners));
        }
        let mut workers = Workers {
            done,
            force,
            threads: Vec::with_capacity(n),
        };
        for (i, (rt, listeners)) in prepared.into_iter().enumerate() {
            let service = make_service(i);
            let builder = builder.clone();
            let limits = limits.clone();
            let stop = stop.clone();
            let mut force = workers.force.subscribe();
            let done_tx = done_tx.clone();
            let specs = specs.to_vec();
            let thread = std::thread::Builder::new()
                .name(format!("fairgate-core-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let mut servers = JoinSet::new();
                        for (listener, spec) in listeners.into_iter().zip(specs) {
                            servers.spawn(server::serve(
                                listener,
                                service.clone(),
                                builder.clone(),
                                spec.tls,
                                limits.clone(),
                                stop.clone(),
                            ));
                        }
                        tokio::select! {
                            _ = async { while servers.join_next().await.is_some() {} } => {}
                            _ = force.wait_for(|f| *f) => {}
                        }
                    });
                    // Connections still open after a forced stop are dropped here.
                    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
                    drop(done_tx);
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// How many per-core threads run.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// True when no thread runs.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Waits up to `grace` for every thread to drain (the caller has sent the stop signal);
    /// then stops the rest at once. Returns whether all drained within `grace`.
    pub async fn drain(mut self, grace: Duration) -> bool {
        let drained =
            tokio::time::timeout(grace, async { while self.done.recv().await.is_some() {} })
                .await
                .is_ok();
        if !drained {
            let _ = self.force.send(true);
            // Each runtime takes at most RUNTIME_SHUTDOWN to drop its tasks.
            let _ = tokio::time::timeout(RUNTIME_SHUTDOWN * 10, async {
                while self.done.recv().await.is_some() {}
            })
            .await;
        }
        let threads = std::mem::take(&mut self.threads);
        // The threads have finished (or are returning): joining does not block for long.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        drained
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropped without `drain` (a failed start, a test): stop the threads now.
        let _ = self.force.send(true);
    }
}
