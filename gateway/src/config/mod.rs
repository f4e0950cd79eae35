//! The gateway config file (`gateway.yaml`): its model ([`model`]) and its decoder
//! ([`decode`]), which reports every error of the file at once with its exact position.

pub mod decode;
pub mod model;

pub use decode::{load, parse, LoadedConfig};
pub use model::*;
