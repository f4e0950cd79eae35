//! cargo-fuzz target `request_decide`: see `fairgate_fuzz::request_decide` (`fuzz/src/request_decide.rs`) for what it checks.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fairgate_fuzz::request_decide::check(data));
