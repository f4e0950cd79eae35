//! The shared cache (fleet mode): entries in Redis behind the local cache, and fleet-wide
//! coalescing of misses by lease.
//!
//! Within one process, one request per key asks Redis at a time: the others of the same key
//! wait for it (for its fetch, when it took the lease) and then ask together, so a burst
//! costs Redis one call per key and replica, not one per request.
//!
//! A local miss asks Redis once ([`Fleet::cache_fetch`]): a hit is served (with `Age`) and
//! kept locally for the rest of its TTL; a miss takes the key's lease unless another replica
//! holds it. The holder fetches (renewing the lease every third of it while the call lasts)
//! and settles: `stored` (the entry written, with `PX` = its TTL), `pass` (uncacheable or
//! not to be shared: everyone calls for itself, newcomers too for one lease) or `retry` (an
//! error, or the holder was dropped: the waiters ask again and one takes the lease). The
//! others wait for the outcome, published on the key's channel, at most until the lease
//! lapses (then they ask again: one takes over) and at most `max_wait` in all.
//!
//! Never shared, whatever `honour_cache_control` says (RFC 9111 §3, §3.5): responses with
//! `Cache-Control: private` or `no-store`, with `Set-Cookie`, with trailers, and responses
//! to requests carrying `Authorization` unless it is one of the `vary` headers. Entries are
//! bounded by `max_entry_bytes` (a larger body is never buffered, so never written) and by
//! their TTL in Redis. An entry Redis holds that does not decode (written by something
//! else) is not served: the request calls for itself.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{CacheConfig, Key};
use crate::backend::redis::{Fetch, Settle};
use crate::outbound::body::BufferedResponse;
use crate::outbound::fleet::{Done, OutboundFleet};
use crate::outbound::{ObserverHandle, OutboundEvent};

/// Longest key shared (method, URI and `vary` values): longer ones stay local.
const MAX_KEY: usize = 4096;

/// A layer's shared cache: the fleet and the cache's name there.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) fleet: OutboundFleet,
    pub(crate) name: String,
    /// Keys a request of this process is asking Redis for (or fetching): the others wait.
    pub(crate) local: Arc<Locals>,
}

/// The keys being asked for in this process, each with the channel its asker drops when done.
pub(crate) type Locals = Mutex<HashMap<String, watch::Receiver<()>>>;

/// The asker's hold on its key in [`Locals`]; dropping it wakes the others.
struct LocalHold {
    locals: Arc<Locals>,
    key: String,
    tx: watch::Sender<()>,
}

impl Drop for LocalHold {
    fn drop(&mut self) {
        let mut map = self.locals.lock().unwrap_or_else(|e| e.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl Shared {
    /// The lookup of `key`, if the request may be answered from (and fill) the shared cache.
    pub(super) fn lookup_for(
        &self,
        key: &Key,
        config: &CacheConfig,
        request: &HeaderMap,
        observer: &ObserverHandle,
    ) -> Option<Lookup> {
        if request.contains_key(header::AUTHORIZATION)
            && !config.vary.contains(&header::AUTHORIZATION)
        {
            return None;
        }
        // `\u{1f}` and `\u{0}` cannot occur in a header value: the key is unambiguous.
        let mut k = format!("{}|{} {}", self.name, key.method, key.uri);
        for (name, value) in config.vary.iter().zip(&key.vary) {
            k.push('\u{1f}');
            k.push_str(name.as_str());
            if let Some(v) = value {
                k.push('=');
                match v.to_str() {
                    Ok(v) => k.push_str(v),
                    Err(_) => {
                        k.push('\u{0}');
                        for b in v.as_bytes() {
                            k.push_str(&format!("{b:02x}"));
                        }
                    }
                }
            }
        }
        (k.len() <= MAX_KEY).then(|| Lookup {
            fleet: self.fleet.clone(),
            key: k,
            observer: observer.clone(),
            locals: Arc::clone(&self.local),
        })
    }
}

/// One request's look into the shared cache.
pub(super) struct Lookup {
    fleet: OutboundFleet,
    key: String,
    observer: ObserverHandle,
    locals: Arc<Locals>,
}

/// A follower's wait for another replica's fetch, reported like an in-process follower's
/// ([`OutboundEvent::CoalesceWaitStarted`], then `CoalesceWaitEnded` when dropped).
struct Waiting(ObserverHandle);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.event(OutboundEvent::CoalesceWaitEnded);
    }
}

/// What the shared cache had for a request.
pub(super) enum Found {
    /// The response, its age and the TTL it has left.
    Hit(BufferedResponse, Duration, Duration),
    /// This request holds the key's lease: it fetches and settles.
    Lead(Lead),
    /// Call for yourself (Redis did not answer, the answer is not shared, or the wait was
    /// over).
    Own,
}

impl Lookup {
    /// Reads the entry, or takes the lease, or waits for its holder's outcome.
    pub(super) async fn run(self, config: &CacheConfig) -> Found {
        let inner = &self.fleet.inner;
        let deadline = Instant::now() + config.max_wait;
        let lease_ms = u64::try_from(config.lease.as_millis()).unwrap_or(u64::MAX);
        // Registered before the first ask: no outcome published after it is missed.
        let mut watch = inner.notifier.watch(inner.fleet.done_channel(&self.key));
        let owner = self.fleet.owner();
        let mut waiting = None;
        // One asker per key in this process; the others wait for it once, then ask together.
        let asking = {
            let mut map = self.locals.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&self.key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(());
                    map.insert(self.key.clone(), rx);
                    Ok(LocalHold {
                        locals: Arc::clone(&self.locals),
                        key: self.key.clone(),
                        tx,
                    })
                }
            }
        };
        let hold = match asking {
            Ok(hold) => Some(hold),
            Err(mut rx) => {
                self.observer.event(OutboundEvent::CoalesceWaitStarted);
                waiting = Some(Waiting(self.observer.clone()));
                let left = deadline.saturating_duration_since(Instant::now());
                // Ends when the asker is done (its hold dropped: `changed` fails).
                if tokio::time::timeout(left, rx.changed()).await.is_err() {
                    return Found::Own;
                }
                None
            }
        };
        loop {
            match inner.fleet.cache_fetch(&self.key, &owner, lease_ms).await {
                None | Some(Fetch::Pass) => return Found::Own,
                Some(Fetch::Lead) => {
                    return Found::Lead(Lead {
                        fleet: self.fleet.clone(),
                        key: self.key,
                        owner,
                        lease: config.lease,
                        settled: false,
                        _hold: hold,
                    })
                }
                Some(Fetch::Hit(bytes, pttl)) => {
                    if waiting.is_some() {
                        self.observer.event(OutboundEvent::Coalesced);
                    }
                    return match decode(&bytes) {
                        Some((r, ttl_ms, age_ms)) => {
                            let age = age_ms.saturating_add(ttl_ms.saturating_sub(pttl));
                            Found::Hit(r, Duration::from_millis(age), Duration::from_millis(pttl))
                        }
                        None => {
                            tracing::warn!(key = %self.key, "shared cache entry does not decode: not served");
                            Found::Own
                        }
                    };
                }
                Some(Fetch::Follow(pttl)) => {
                    if waiting.is_none() {
                        self.observer.event(OutboundEvent::CoalesceWaitStarted);
                        waiting = Some(Waiting(self.observer.clone()));
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Found::Own;
                    }
                    // Until the holder's outcome, or its lease lapses (+ 5 ms for Redis to
                    // expire it), whichever is first; never past the deadline.
                    let lapse = Duration::from_millis(pttl.max(1)) + Duration::from_millis(5);
                    match watch.next(lapse.min(deadline - now)).await {
                        Some(Done::Pass) => return Found::Own,
                        Some(Done::Stored | Done::Retry) | None => {}
                    }
                }
            }
        }
    }
}

/// The lease of a key this request holds: it fetches, then settles. Dropped unsettled (the
/// request was cancelled), it settles `retry` from a spawned task, so that the waiters need
/// not wait for the lease to lapse.
pub(super) struct Lead {
    fleet: OutboundFleet,
    key: String,
    owner: String,
    lease: Duration,
    settled: bool,
    /// Held until settled: this process's other requests of the key wait for the fetch.
    _hold: Option<LocalHold>,
}

impl Lead {
    /// Runs the upstream call `call`, renewing the lease every third of it meanwhile.
    pub(super) async fn fetch<T>(&self, call: impl Future<Output = T>) -> T {
        let lease_ms = u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX);
        let every = (self.lease / 3).max(Duration::from_millis(1));
        tokio::pin!(call);
        loop {
            tokio::select! {
                out = &mut call => return out,
                () = tokio::time::sleep(every) => {
                    self.fleet.inner.fleet.cache_renew(&self.key, &self.owner, lease_ms).await;
                }
            }
        }
    }

    /// Settles with the response: stored for `ttl` when it may be shared, else `pass`.
    pub(super) async fn settle_response(mut self, r: &BufferedResponse, ttl: Duration) {
        self.settled = true;
        let fleet = &self.fleet.inner.fleet;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let settle = if shareable(r) && ttl_ms > 0 {
            let age_ms = u64::try_from(super::upstream_age(&r.headers).as_millis()).unwrap_or(0);
            Some(encode(r, ttl_ms, age_ms))
        } else {
            None
        };
        let outcome = match &settle {
            Some(entry) => Settle::Stored(entry, ttl_ms),
            None => Settle::Pass(self.lease_ms()),
        };
        fleet.cache_settle(&self.key, &self.owner, outcome).await;
    }

    /// Settles `pass`: the answer is not shared.
    pub(super) async fn settle_pass(mut self) {
        self.settled = true;
        let ms = self.lease_ms();
        self.fleet
            .inner
            .fleet
            .cache_settle(&self.key, &self.owner, Settle::Pass(ms))
            .await;
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fleet = self.fleet.clone();
        let key = std::mem::take(&mut self.key);
        let owner = std::mem::take(&mut self.owner);
        rt.spawn(async move {
            fleet
                .inner
                .fleet
                .cache_settle(&key, &owner, Settle::Retry)
                .await;
        });
    }
}

/// May this response be stored in a cache shared by the fleet?
fn shareable(r: &BufferedResponse) -> bool {
    if r.trailers.is_some() || r.headers.contains_key(header::SET_COOKIE) {
        return false;
    }
    !r.headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',').any(|d| {
                let name = d.split_once('=').map_or(d, |(n, _)| n).trim();
                name.eq_ignore_ascii_case("private") || name.eq_ignore_ascii_case("no-store")
            })
        })
    })
}

const MAGIC: &[u8; 4] = b"FGC1";

fn version_code(v: Version) -> u8 {
    match v {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

/// An entry: magic, TTL ms, age ms, status, version, headers (count, then length-prefixed
/// names and values), body.
fn encode(r: &BufferedResponse, ttl_ms: u64, age_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.weight() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&ttl_ms.to_be_bytes());
    out.extend_from_slice(&age_ms.to_be_bytes());
    out.extend_from_slice(&r.status.as_u16().to_be_bytes());
    out.push(version_code(r.version));
    let headers: Vec<_> = r
        .headers
        .iter()
        .filter(|(n, _)| *n != header::AGE)
        .collect();
    out.extend_from_slice(&u32::try_from(headers.len()).unwrap_or(0).to_be_bytes());
    for (name, value) in headers {
        let (n, v) = (name.as_str().as_bytes(), value.as_bytes());
        out.extend_from_slice(&u32::try_from(n.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(n);
        out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(v);
    }
    out.extend_from_slice(&r.body);
    out
}

/// Reads an entry back: the response, its TTL and its age when stored (ms). `None` for
/// anything malformed (never panics: Redis may hold anything).
fn decode(b: &[u8]) -> Option<(BufferedResponse, u64, u64)> {
    let mut r = Reader(b);
    if r.take(4)? != MAGIC {
        return None;
    }
    let ttl_ms = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let age_ms = u64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let status = StatusCode::from_u16(u16::from_be_bytes(r.take(2)?.try_into().ok()?)).ok()?;
    let version = match r.take(1)?[0] {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => return None,
    };
    let count = r.u32()?;
    let mut headers = HeaderMap::new();
    for _ in 0..count {
        let n = r.u32()?;
        let name = HeaderName::from_bytes(r.take(n)?).ok()?;
        let n = r.u32()?;
        let value = HeaderValue::from_bytes(r.take(n)?).ok()?;
        headers.append(name, value);
    }
    let body = Bytes::copy_from_slice(r.0);
    Some((
        BufferedResponse {
            status,
            version,
            headers,
            body,
            trailers: None,
        },
        ttl_ms,
        age_ms,
    ))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<usize> {
        usize::try_from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response() -> BufferedResponse {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.insert(header::AGE, HeaderValue::from_static("7"));
        BufferedResponse {
            status: StatusCode::NOT_FOUND,
            version: Version::HTTP_11,
            headers,
            body: Bytes::from_static(b"{\"limit\":100}"),
            trailers: None,
        }
    }

    #[test]
    fn an_entry_reads_back_without_its_age_header() {
        let r = response();
        let (back, ttl, age) = decode(&encode(&r, 30_000, 7_000)).expect("decodes");
        assert_eq!((ttl, age), (30_000, 7_000));
        assert_eq!(back.status, r.status);
        assert_eq!(back.body, r.body);
        assert_eq!(back.headers.get_all("x-multi").iter().count(), 2);
        assert!(back.headers.get(header::AGE).is_none());
    }

    #[test]
    fn anything_malformed_is_refused_never_a_panic() {
        let good = encode(&response(), 1, 0);
        for cut in 0..good.len() - response().body.len() {
            assert!(decode(&good[..cut]).is_none(), "cut at {cut}");
        }
        assert!(decode(b"").is_none());
        assert!(decode(b"FGC2aaaaaaaaaaaaaaaaaaaaaaaa").is_none());
        let mut huge = good[..23].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&huge).is_none());
        let mut bad_status = good;
        bad_status[20..22].copy_from_slice(&1u16.to_be_bytes());
        assert!(decode(&bad_status).is_none());
    }

    #[test]
    fn private_no_store_cookies_and_trailers_are_not_shared() {
        let with = |name: HeaderName, v: &'static str| {
            let mut r = response();
            r.headers.insert(name, HeaderValue::from_static(v));
            r
        };
        assert!(shareable(&response()));
        assert!(shareable(&with(
            header::CACHE_CONTROL,
            "public, max-age=60"
        )));
        assert!(!shareable(&with(
            header::CACHE_CONTROL,
            "max-age=60, PRIVATE"
        )));
        assert!(!shareable(&with(header::CACHE_CONTROL, "no-store")));
        assert!(!shareable(&with(header::CACHE_CONTROL, "private=\"x-a\"")));
        assert!(!shareable(&with(header::SET_COOKIE, "a=b")));
        let mut t = response();
        t.trailers = Some(HeaderMap::new());
        assert!(!shareable(&t));
    }
}
