//! Fuzzes the policy reader: arbitrary bytes through `parse_policy_bytes` must never panic,
//! and whatever it accepts must round-trip through its JSON form and compile.
//! `policies/tests/fuzz_corpus.rs` replays the corpus with the same checks.

#![no_main]

use fairgate_policies::compile::compile;
use fairgate_policies::decode::{parse_overrides, parse_policy, parse_policy_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(policy) = parse_policy_bytes(data, "fuzz.yaml") {
        let json = serde_json::to_string(&policy).expect("a policy serialises");
        match parse_policy(&json, "fuzz.json") {
            Ok(back) => assert_eq!(back, policy, "round trip changed the policy"),
            Err(e) => panic!("an accepted policy does not read back:\n{e}\n{json}"),
        }
        if let Err(e) = compile(policy) {
            panic!("an accepted policy does not compile:\n{e}");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_overrides(text, "fuzz-overrides.yaml");
    }
});
