//! fairgate's policy language.
//!
//! Owns the YAML a user writes ([`model`]), reading it with an exact `file:line:column` for
//! every error ([`yaml`], [`decode`], [`error`]), compiling it into the immutable form the
//! engine matches against ([`compiled`], [`matcher`], [`compile`]), and publishing new
//! versions safely ([`store`], [`watch`]).
//!
//! It must not touch HTTP, tower, sockets or runtime state (buckets, counters): those belong
//! to `fairgate-middleware`, which depends on this crate, never the other way round.

pub mod compile;
pub mod compiled;
pub mod decode;
pub mod error;
pub mod matcher;
pub mod model;
pub mod period;
pub mod request;
pub mod store;
pub mod summary;
pub mod units;
pub mod watch;
pub mod yaml;

pub use compiled::CompiledPolicy;
pub use error::{PolicyError, PolicyErrors};
pub use model::Policy;
pub use store::{PolicyStore, ReloadReport};
