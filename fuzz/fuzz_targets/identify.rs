//! cargo-fuzz target `identify`: see `fairgate_fuzz::identify` (`fuzz/src/identify.rs`) for what it checks.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fairgate_fuzz::identify::check(data));
