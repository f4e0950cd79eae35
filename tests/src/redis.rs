//! Harness module: redis.
