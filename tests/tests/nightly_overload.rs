//! Nightly-tier scenarios (overload): run by `scripts/nightly.sh`, not by `.ci/run`.
