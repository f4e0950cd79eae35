//! Harness module: proc.
