//! Nightly-tier scenarios (redis): run by `scripts/nightly.sh`, not by `.ci/run`.
