//! Outbound protection towards upstream pools: coalescing, caching, outbound limits, retries.
