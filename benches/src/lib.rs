//! Shared helpers for fairgate benches (inputs, policies). Benches live in `benches/`.
