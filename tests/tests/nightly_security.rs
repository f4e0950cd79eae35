//! Nightly-tier scenarios (security): run by `scripts/nightly.sh`, not by `.ci/run`.
