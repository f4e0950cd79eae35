//! Replays every file of the fuzz corpus (`fuzz/corpus/policy_parse/`) through the same checks
//! as the `policy_parse` fuzz target, so `cargo test` catches regressions on inputs the fuzzer
//! found, without needing cargo-fuzz or nightly. Nothing may panic; whatever is accepted must
//! round-trip through JSON and compile.

use std::fs;
use std::path::Path;

use fairgate_policies::compile::compile;
use fairgate_policies::decode::{parse_overrides, parse_policy, parse_policy_bytes};

fn check(data: &[u8], name: &str) -> bool {
    let accepted = match parse_policy_bytes(data, name) {
        Ok(policy) => {
            let json = serde_json::to_string(&policy).expect("a policy serialises");
            match parse_policy(&json, "fuzz.json") {
                Ok(back) => assert_eq!(back, policy, "{name}: round trip changed the policy"),
                Err(e) => panic!("{name}: an accepted policy does not read back:\n{e}\n{json}"),
            }
            if let Err(e) = compile(policy) {
                panic!("{name}: an accepted policy does not compile:\n{e}");
            }
            true
        }
        Err(e) => {
            assert!(!e.is_empty(), "{name}: rejected without an error");
            false
        }
    };
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_overrides(text, name);
    }
    accepted
}

#[test]
fn every_corpus_file_replays_without_panicking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/policy_parse");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let (mut accepted, mut rejected) = (0, 0);
    for f in &files {
        let data = fs::read(f).expect("read corpus file");
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if check(&data, &name) {
            accepted += 1;
        } else {
            rejected += 1;
        }
    }
    // The seed corpus holds both kinds; a corpus of only one kind means it was lost.
    assert!(
        accepted >= 5 && rejected >= 5,
        "accepted {accepted}, rejected {rejected}"
    );
}
