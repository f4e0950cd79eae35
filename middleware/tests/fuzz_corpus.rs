//! Replays the committed corpora of the `identify` and `matcher` fuzz targets
//! (`fuzz/corpus/<target>/`) through the very same checks the targets run (the files in
//! `fuzz/src/` are included here with `#[path]`), so `cargo test` keeps every input the
//! fuzzer found passing without cargo-fuzz or nightly. The `request_decide` and `framing`
//! corpora replay in `gateway/tests/fuzz_corpus.rs` (they need `httparse` and the gateway).

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/input.rs"]
mod input;

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/identify.rs"]
mod identify;

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/matcher.rs"]
mod matcher;

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/replay.rs"]
mod replay_corpus;

/// Runs `check` on every file of `fuzz/corpus/<target>`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    replay_corpus::replay(env!("CARGO_MANIFEST_DIR"), target, check)
}

#[test]
fn the_identify_corpus_replays() {
    let n = replay("identify", identify::check);
    // The seeds alone are 33 files; fewer means the corpus was lost.
    assert!(n >= 30, "{n} files");
}

#[test]
fn the_matcher_corpus_replays() {
    let n = replay("matcher", matcher::check);
    assert!(n >= 25, "{n} files");
}
