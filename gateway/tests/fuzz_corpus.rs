//! Replays the committed corpora of the `request_decide` and `framing` fuzz targets
//! (`fuzz/corpus/<target>/`) through the very same checks the targets run (the files in
//! `fuzz/src/` are included here with `#[path]`), so `cargo test` keeps every input the
//! fuzzer found passing without cargo-fuzz or nightly. The `identify` and `matcher`
//! corpora replay in `middleware/tests/fuzz_corpus.rs`, `policy_parse` in
//! `policies/tests/fuzz_corpus.rs`.

use std::fs;
use std::path::Path;

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/input.rs"]
mod input;

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/request_decide.rs"]
mod request_decide;

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/framing.rs"]
mod framing;

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/replay.rs"]
mod replay_corpus;

/// Runs `check` on every file of `fuzz/corpus/<target>`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    replay_corpus::replay(env!("CARGO_MANIFEST_DIR"), target, check)
}

#[test]
fn the_request_decide_corpus_replays() {
    // The seeds alone are 37 files; fewer means the corpus was lost.
    let n = replay("request_decide", request_decide::check);
    assert!(n >= 30, "{n} files");
}

#[test]
fn the_framing_corpus_replays() {
    let n = replay("framing", framing::check);
    assert!(n >= 30, "{n} files");
}

#[test]
fn the_framing_seeds_are_judged_as_documented() {
    use fairgate_gateway::server::framing::{Scanner, Verdicts};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/framing");
    let refused = |name: &str| {
        let data = fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let v = Verdicts::new();
        let mut s = Scanner::new(64 * 1024, v.clone());
        s.feed(&data);
        v.next_request_is_ambiguous()
    };
    for seed in [
        "get",
        "pipelined",
        "cl-body-then-get",
        "chunked",
        "absolute-match",
    ] {
        assert!(!refused(seed), "{seed} is refused");
    }
    for seed in [
        "cl-te",
        "te-cl",
        "te-chunked-chunked",
        "te-two-lines",
        "te-xchunked",
        "te-tab",
        "te-gzip",
        "te-http10",
        "cl-dup-equal",
        "cl-dup-differ",
        "bare-lf",
        "two-hosts",
        "absolute-mismatch",
    ] {
        assert!(refused(seed), "{seed} is let through");
    }
}
