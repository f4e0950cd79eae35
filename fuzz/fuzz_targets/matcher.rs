//! cargo-fuzz target `matcher`: see `fairgate_fuzz::matcher` (`fuzz/src/matcher.rs`) for what it checks.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fairgate_fuzz::matcher::check(data));
