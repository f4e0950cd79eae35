//! Nightly-tier scenarios (faults): run by `scripts/nightly.sh`, not by `.ci/run`.
