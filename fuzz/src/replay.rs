//! Replaying a committed corpus: every file of `fuzz/corpus/<target>/` through a target's
//! check, for the `cargo test` replay tests (`middleware/tests/fuzz_corpus.rs`,
//! `gateway/tests/fuzz_corpus.rs` include this file with `#[path]`).

use std::fs;
use std::path::Path;

/// Runs `check` on every file of `fuzz/corpus/<target>` (sorted; a panic names the file);
/// returns how many there were. `manifest_dir` is the including crate's
/// `CARGO_MANIFEST_DIR`, one level below the workspace root.
pub fn replay(manifest_dir: &str, target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(manifest_dir).join("../fuzz/corpus").join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in &files {
        let data = fs::read(f).expect("read corpus file");
        let name = f.display().to_string();
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{name}: {msg}");
        }
    }
    files.len()
}
