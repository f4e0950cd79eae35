//! The command line: `fairgate run --config FILE [--reuse-port]` (also
//! `fairgate --config FILE`),
//! `fairgate check [--gateway] FILE`, `fairgate audit DECISIONS --policy POLICY [--json]`
//! (see [`crate::control::audit`]), `fairgate schema`, `fairgate version`.
//!
//! Exit codes: 0 success; 1 invalid input (every error printed, one per line, as
//! `file:line:column: path: message`); 2 a runtime failure (cannot bind, cannot read a file).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config;

/// fairgate: admission control for HTTP services.
#[derive(Debug, Parser)]
#[command(
    name = "fairgate",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Gateway config file (same as `fairgate run --config FILE`).
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Share the listen addresses with the fairgate already listening there (same as
    /// `fairgate run --reuse-port`).
    #[arg(long, requires = "config")]
    pub reuse_port: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Run {
        /// Gateway config file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Share the listen addresses (data and admin) with the fairgate already listening
        /// there, for a zero-downtime upgrade: the kernel spreads new connections over both
        /// until the old one is stopped. Without it, an address in use is an error.
        #[arg(long)]
        reuse_port: bool,
    },
    /// Validate a policy file (or, with --gateway, a gateway config) and print a summary.
    Check {
        /// The file is a gateway config, not a policy.
        #[arg(long)]
        gateway: bool,
        /// The file to check.
        file: PathBuf,
    },
    /// Replay a complete decision log (`log: {audit: true}`) against an exact reference
    /// limiter built from the policy, and report its accuracy per client and overall.
    Audit {
        /// The decision log (JSON lines).
        decisions: PathBuf,
        /// The policy the gateway ran.
        #[arg(long, value_name = "POLICY")]
        policy: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Judging tolerance for the time between the engine's clock read and the log's.
        #[arg(long, value_name = "DURATION", default_value = "1ms", value_parser = parse_tolerance)]
        tolerance: std::time::Duration,
    },
    /// Print the policy JSON Schema.
    Schema,
    /// Print the version.
    Version,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match (cli.command, cli.config) {
        (Some(Command::Run { config, reuse_port }), _) => run(&config, reuse_port),
        (None, Some(config)) => run(&config, cli.reuse_port),
        (Some(Command::Check { gateway, file }), _) => check(&file, gateway),
        (
            Some(Command::Audit {
                decisions,
                policy,
                json,
                tolerance,
            }),
            _,
        ) => crate::control::audit::run(
            &decisions,
            &policy,
            json,
            crate::control::audit::AuditOptions {
                tolerance_ns: u64::try_from(tolerance.as_nanos()).unwrap_or(u64::MAX),
            },
        ),
        (Some(Command::Schema), _) => {
            let schema = fairgate_policies::model::json_schema();
            match serde_json::to_string_pretty(&schema) {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot print the schema: {e}");
                    ExitCode::from(2)
                }
            }
        }
        (Some(Command::Version), _) => {
            println!("fairgate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        (None, None) => {
            eprintln!("error: give a config file: `fairgate run --config gateway.yaml` (see `fairgate --help`)");
            ExitCode::from(2)
        }
    }
}

fn parse_tolerance(s: &str) -> Result<std::time::Duration, String> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    fairgate_policies::units::parse_duration(s).map_err(|e| e.to_string())
}

/// `fairgate check`: prints the summary (exit 0) or every error (exit 1).
pub fn check(file: &Path, gateway: bool) -> ExitCode {
    if gateway {
        return match config::load(file) {
            Ok(loaded) => {
                let c = &loaded.config;
                println!(
                    "{}: ok: {} listener(s), {} route(s), {} upstream(s)",
                    file.display(),
                    c.listen.len(),
                    c.routes.len(),
                    c.upstreams.len()
                );
                match (&c.policy, &loaded.inline_policy) {
                    (config::PolicySource::File(p), _) => {
                        println!("policy: {}", p.display());
                        check(p, false)
                    }
                    (_, Some(p)) => {
                        // Compiling catches what decoding cannot, as for a policy file.
                        match fairgate_policies::PolicyStore::from_policy(p.clone()) {
                            Ok(_) => {
                                print!("{}", fairgate_policies::summary::summary(p));
                                ExitCode::SUCCESS
                            }
                            Err(e) => {
                                let file = file.display().to_string();
                                eprintln!("{}", config::decode::locate_inline(e, &file));
                                ExitCode::from(1)
                            }
                        }
                    }
                    _ => ExitCode::SUCCESS,
                }
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        };
    }
    let name = file.display().to_string();
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{name}: cannot read the file: {e}");
            return ExitCode::from(1);
        }
    };
    match fairgate_policies::decode::parse_policy_bytes(&bytes, &name) {
        Ok(policy) => match fairgate_policies::PolicyStore::from_file(file) {
            // Compiling catches what decoding cannot (and reads the overrides file).
            Ok(_) => {
                print!("{}", fairgate_policies::summary::summary(&policy));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// `fairgate run`: loads the config, builds the runtime (a multi-thread one, or under
/// `thread_per_core` a current-thread control runtime), serves until SIGTERM/SIGINT. With
/// `reuse_port`, the listeners join the sockets already listening on their addresses.
pub fn run(path: &Path, reuse_port: bool) -> ExitCode {
    let loaded = match config::load(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    crate::control::logging::init(loaded.config.log.format, &loaded.config.log.level);
    let rt = match loaded.config.runtime {
        config::RuntimeModel::MultiThread => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.enable_all().thread_name("fairgate-worker");
            if let Some(n) = loaded.config.workers {
                rt.worker_threads(n);
            }
            rt.build()
        }
        // The control runtime (admin, reloads, health checks, builtin:echo) on this thread;
        // `app::start` starts the per-core threads that serve the listeners.
        config::RuntimeModel::ThreadPerCore => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = rt.block_on(async move {
        let options = crate::app::StartOptions {
            sharing: if reuse_port {
                crate::server::Sharing::Shared
            } else {
                crate::server::Sharing::Exclusive
            },
        };
        let running = match crate::app::start_with(loaded, options).await {
            Ok(r) => r,
            Err(crate::app::StartError::Policy(e)) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        eprintln!("{}", running.listening_line());
        tracing::info!(data = ?running.data_addrs, admin = ?running.admin_addr, "fairgate started");
        let signal = crate::server::terminate_signal().await;
        tracing::info!(
            signal,
            "shutting down: no new connections, draining in-flight requests"
        );
        running.shutdown().await;
        ExitCode::SUCCESS
    });
    // Upgraded tunnels and idle tasks must not hold the process open.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}
