//! Harness module: load.
