//! Harness module: raw.
