//! A bare pingora reverse proxy: the smallest `ProxyHttp` that forwards every request to one
//! upstream over pooled keep-alive connections. It is the "pingora" contender of the load
//! harness (`benches/load/run.sh`) and does nothing else: no filters, no logging, no metrics.
//!
//! Usage: `pingora-bare-proxy LISTEN_ADDR UPSTREAM_ADDR THREADS RUN_DIR`
//! (`RUN_DIR` holds pingora's pid file and upgrade socket so that runs never collide).

use std::process::ExitCode;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// The proxy: every request goes to `upstream`, plain HTTP/1.1, keep-alive.
struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // `HttpPeer::new` with tls = false; the SNI is unused.
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: pingora-bare-proxy LISTEN_ADDR UPSTREAM_ADDR THREADS RUN_DIR");
        return ExitCode::from(2);
    }
    let Ok(threads) = args[3].parse::<usize>() else {
        eprintln!("threads must be a positive integer, got {:?}", args[3]);
        return ExitCode::from(2);
    };
    let conf = ServerConf {
        threads,
        // One runtime thread per worker and no stealing: the same CPU budget as the others.
        work_stealing: false,
        pid_file: format!("{}/pingora.pid", args[4]),
        upgrade_sock: format!("{}/pingora_upgrade.sock", args[4]),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            upstream: args[2].clone(),
        },
    );
    proxy.add_tcp(&args[1]);
    server.add_service(proxy);
    server.run_forever()
}
