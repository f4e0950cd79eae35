//! The operator's side of the gateway: its metrics registry, policy reloads from SIGHUP and
//! the admin API, certificate reloads, the process log, and `fairgate audit`.

pub mod access_log;
pub mod audit;
pub mod certs;
pub mod logging;
pub mod metrics;
pub mod reload;
