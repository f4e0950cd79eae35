//! The caller's side: tower layers for HTTP clients (coalesce, cache, outbound limits, retry).
