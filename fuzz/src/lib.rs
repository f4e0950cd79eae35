//! The checks of fairgate's fuzz targets, one module per target. Each `check(data)` panics
//! on a broken invariant. The targets in `fuzz_targets/` call them; the corpus replay tests
//! (`middleware/tests/fuzz_corpus.rs`, `gateway/tests/fuzz_corpus.rs`) include the same
//! files with `#[path]`, so `cargo test` runs the very same checks without cargo-fuzz.

pub mod framing;
pub mod identify;
pub mod input;
pub mod matcher;
pub mod replay;
pub mod request_decide;
