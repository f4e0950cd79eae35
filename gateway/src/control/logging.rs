//! The process log (`tracing` to stderr, pretty or JSON). The decision log is separate:
//! see `fairgate_middleware::observe::DecisionLog`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level`.
/// Calling it twice is harmless (the second call does nothing).
///
/// The pretty format is coloured only when stderr is a terminal: redirected to a file, a
/// pipe or journald, the log is plain text without ANSI escapes.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
