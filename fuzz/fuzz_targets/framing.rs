//! cargo-fuzz target `framing`: see `fairgate_fuzz::framing` (`fuzz/src/framing.rs`) for what it checks.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fairgate_fuzz::framing::check(data));
