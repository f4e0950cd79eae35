//! Decisions into HTTP, in one place.
//!
//! | stage | status (policy default) | problem type |
//! |---|---|---|
//! | quota, concurrency, rule `limit` | 429 | `https://iana.org/assignments/http-problem-types#quota-exceeded` |
//! | shed (and a full state table) | 503 | `https://iana.org/assignments/http-problem-types#temporary-reduced-capacity` |
//! | backend (Redis unavailable, `on_failure: closed`) | 503 | the same |
//! | rule `deny` | 403 | `about:blank` |
//!
//! Every rejection has an `application/problem+json` body with `type`, `title`, `status`
//! and `detail`, plus `violated-policies` naming the exceeded bandwidth or the rule when
//! there is one (not for concurrency and shed rejections, which have no policy to name),
//! and `Retry-After` in whole seconds (not for `deny`: it is not retryable). When the
//! decision carries RateLimit numbers, the response also has the IETF fields
//! (draft-ietf-httpapi-ratelimit-headers-10/-11): `RateLimit-Policy` lists every bandwidth
//! of the client's quota (a rule's `limit` alone) as its sustained rate `q` per `w` seconds
//! and its burst, and `RateLimit` names the bandwidth closest to running out:
//!
//! ```text
//! RateLimit-Policy: "free-0";q=10;w=1;fairgate-burst=20, "free-1";q=100000;w=86400;fairgate-burst=100000
//! RateLimit: "free-0";r=0;t=2
//! ```
//!
//! # Cost
//!
//! A rejection should cost no more than an admit, so nothing here formats text per request
//! beyond the numbers. Everything that depends only on the policy is rendered once and
//! cached per thread, keyed by the identity (address) of the policy's `Arc<str>` names (and
//! bandwidth sets), so a policy generation's rules and bandwidths are rendered on their
//! first rejection and a reload that keeps a name's `Arc` keeps its entry. A rejection
//! looks up one template, per (stage, status, rule, bandwidth, RateLimit fields), which
//! holds:
//!
//! - the problem+json body around the `retry after Ns` part of its `detail`, and the whole
//!   body with the last retry value seen, so a repeated rejection (shed, deny, the same
//!   wait) clones a shared buffer instead of building one;
//! - the `RateLimit-Policy` value (the advertised set of bandwidths), and the bandwidth name
//!   as a structured-field string, so `RateLimit` is the name plus two integers (and the
//!   last value rendered is reused when the two integers repeat). Admitted responses
//!   (`ratelimit_headers: always`) use the same rendering, from a cache of their own.
//!
//! The headers are inserted one by one: cloning a pre-built `HeaderMap` instead measured
//! dearer under callgrind (its entries are cloned one by one too, and its exactly-sized
//! entry vector must grow when axum or the gateway add a header).
//!
//! A cache entry holds a clone of the names (and bandwidth sets) it is keyed by, so an
//! address cannot be reused by another name while the entry exists. Each cache holds at most [`CACHE_ENTRIES`]
//! entries per thread (replaced round-robin), so its memory is bounded whatever the policy.
//! Small `Retry-After` values are pre-rendered static header values.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};

use fairgate_policies::compiled::CompiledBandwidth;

use super::body::AdmissionBody;
use crate::decision::{RateLimitInfo, Rejection, Stage};
use crate::quota;

/// `RateLimit-Policy`.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `Fairgate-Borrowed: ?1` on a response admitted over the client's quota on the service's
/// spare capacity (burst sharing): it may be refused when others need that capacity.
pub static BORROWED: HeaderName = HeaderName::from_static("fairgate-borrowed");

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");
const QUOTA_TYPE: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";
const CAPACITY_TYPE: &str =
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity";
const RETRY_TEXT: &[u8] = b"; retry after ";
/// The burst of a `RateLimit-Policy` item: the draft reserves unprefixed parameters and
/// asks for a vendor prefix on the others (its own example is `acme-burst`).
const BURST_PARAM: &[u8] = b"fairgate-burst";

/// Entries per cache and thread (rejection templates; RateLimit fields of admitted responses).
const CACHE_ENTRIES: usize = 32;

/// The largest `Retry-After` value kept as static text.
const RETRY_STATIC_MAX: usize = 300;
/// Bytes of "0", "1", … "300" written back to back.
const RETRY_STATIC_LEN: usize = 10 + 90 * 2 + (RETRY_STATIC_MAX - 99) * 3;

/// "0", "1", … "300" back to back, and where each starts (the last start is the end).
// Fewer than 1,000 bytes: every offset fits in a u16.
const fn retry_static() -> ([u8; RETRY_STATIC_LEN], [u16; RETRY_STATIC_MAX + 2]) {
    let mut text = [0u8; RETRY_STATIC_LEN];
    let mut starts = [0u16; RETRY_STATIC_MAX + 2];
    let (mut n, mut at) = (0, 0);
    while n <= RETRY_STATIC_MAX {
        starts[n] = at as u16;
        let len = if n >= 100 {
            3
        } else if n >= 10 {
            2
        } else {
            1
        };
        let (mut i, mut m) = (len, n);
        while i > 0 {
            i -= 1;
            text[at + i] = b'0' + (m % 10) as u8;
            m /= 10;
        }
        at += len;
        n += 1;
    }
    starts[RETRY_STATIC_MAX + 1] = at as u16;
    (text, starts)
}

static RETRY_STATIC: ([u8; RETRY_STATIC_LEN], [u16; RETRY_STATIC_MAX + 2]) = retry_static();

/// `Retry-After` values 0..=300 rendered once, as static text: cloning and dropping them
/// touches no reference count.
fn retry_after_value(secs: u64) -> HeaderValue {
    static TABLE: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let (text, starts) = &RETRY_STATIC;
        starts
            .windows(2)
            .zip(0u64..)
            .map(|(w, n)| {
                std::str::from_utf8(&text[usize::from(w[0])..usize::from(w[1])])
                    .map_or_else(|_| HeaderValue::from(n), HeaderValue::from_static)
            })
            .collect()
    });
    usize::try_from(secs)
        .ok()
        .and_then(|i| table.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(secs))
}

// === numbers ===

/// Decimal digits of `n`.
fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Appends `n` in decimal (what `write!(out, "{n}")` does, without `core::fmt`).
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

// === escaping ===

/// A structured-field string: quoted, `"` and `\` escaped, non-printable ASCII dropped.
fn sf_string(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push(b'\\');
                out.push(c as u8);
            }
            ' '..='~' => out.push(c as u8),
            _ => {}
        }
    }
    out.push(b'"');
    out
}

/// Appends `s` as a JSON string literal.
fn json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    json_escaped(out, s);
    out.push(b'"');
}

/// Appends `s` escaped for the inside of a JSON string literal.
fn json_escaped(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            // UTF-8 continuation and lead bytes are never below 0x20: bytes are enough.
            0..=0x1f => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
            _ => out.push(b),
        }
    }
}

// === caches ===

fn same(a: &Option<Arc<str>>, b: &Option<Arc<str>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// A rejection rendered for one (stage, status, rule, bandwidth, RateLimit fields): its
/// problem+json body around the retry part, and its RateLimit fields.
struct Template {
    stage: Stage,
    status: u16,
    rule: Option<Arc<str>>,
    bandwidth: Option<Arc<str>>,
    /// The RateLimit fields, when the rejection carries them.
    policy: Option<PolicyTemplate>,
    /// Up to where `; retry after Ns` goes in `detail`.
    head: Box<[u8]>,
    /// From the end of `detail` on.
    tail: Box<[u8]>,
    /// The whole body for the last retry value rendered (`None`: no retry part), and its
    /// `Retry-After` value.
    last: Option<(Option<u64>, Bytes, Option<HeaderValue>)>,
}

impl Template {
    fn new(r: &Rejection, status: StatusCode) -> Template {
        let (problem_type, title) = match r.stage {
            Stage::Shed | Stage::Backend => (CAPACITY_TYPE, "temporary reduced capacity"),
            Stage::Rule if r.bandwidth.is_none() => ("about:blank", "request denied"),
            _ => (QUOTA_TYPE, "quota exceeded"),
        };
        let mut head = Vec::with_capacity(192);
        head.extend_from_slice(b"{\"type\":");
        json_string(&mut head, problem_type);
        head.extend_from_slice(b",\"title\":");
        json_string(&mut head, title);
        head.extend_from_slice(b",\"status\":");
        push_u64(&mut head, u64::from(status.as_u16()));
        head.extend_from_slice(b",\"detail\":\"");
        match r.stage {
            Stage::Rule => {
                head.extend_from_slice(b"rule ");
                json_escaped(&mut head, r.rule.as_deref().unwrap_or("?"));
                head.extend_from_slice(if r.bandwidth.is_some() {
                    b" rate limit exceeded"
                } else {
                    b" denied the request"
                });
            }
            Stage::Quota => {
                head.extend_from_slice(b"quota ");
                json_escaped(&mut head, r.bandwidth.as_deref().unwrap_or("?"));
                head.extend_from_slice(b" exceeded");
            }
            Stage::Concurrency => {
                head.extend_from_slice(b"too many requests in flight for this client")
            }
            Stage::Shed => head.extend_from_slice(b"the service is shedding load"),
            Stage::Backend => {
                head.extend_from_slice(b"the state backend holding this quota is unavailable")
            }
        }
        let mut tail = Vec::with_capacity(64);
        tail.push(b'"');
        // Only a named policy can be violated: concurrency and shed rejections have none,
        // and an empty list would claim that nothing was.
        if let Some(name) = r.bandwidth.as_deref().or(r.rule.as_deref()) {
            tail.extend_from_slice(b",\"violated-policies\":[");
            json_string(&mut tail, name);
            tail.push(b']');
        }
        tail.push(b'}');
        Template {
            stage: r.stage,
            status: status.as_u16(),
            rule: r.rule.clone(),
            bandwidth: r.bandwidth.clone(),
            policy: r.ratelimit.as_ref().map(PolicyTemplate::new),
            head: head.into_boxed_slice(),
            tail: tail.into_boxed_slice(),
            last: None,
        }
    }

    fn is_for(&self, r: &Rejection, status: StatusCode) -> bool {
        self.stage == r.stage
            && self.status == status.as_u16()
            && same(&self.rule, &r.rule)
            && same(&self.bandwidth, &r.bandwidth)
            && match (&self.policy, &r.ratelimit) {
                (None, None) => true,
                (Some(p), Some(info)) => p.is_for(info),
                _ => false,
            }
    }

    /// The body with `retry` seconds in its detail, and the `Retry-After` value: the cached
    /// ones when `retry` is the last value rendered, else one exactly-sized buffer each.
    fn body(&mut self, retry: Option<u64>) -> (Bytes, Option<HeaderValue>) {
        if let Some((secs, bytes, value)) = &self.last {
            if *secs == retry {
                return (bytes.clone(), value.clone());
            }
        }
        let extra = retry.map_or(0, |s| RETRY_TEXT.len() + digits(s) + 1);
        let mut out = Vec::with_capacity(self.head.len() + extra + self.tail.len());
        out.extend_from_slice(&self.head);
        if let Some(s) = retry {
            out.extend_from_slice(RETRY_TEXT);
            push_u64(&mut out, s);
            out.push(b's');
        }
        out.extend_from_slice(&self.tail);
        // Exactly sized: `Bytes::from` takes the buffer over without a second allocation.
        let bytes = Bytes::from(out);
        let value = retry.map(|s| retry_after_value(s.max(1)));
        self.last = Some((retry, bytes.clone(), value.clone()));
        (bytes, value)
    }

    /// The rejection's body, with its headers written into `headers` (empty: `append`
    /// adds each name once, as `insert` would, without returning a replaced value).
    fn render(&mut self, r: &Rejection, headers: &mut HeaderMap) -> Bytes {
        let (body, retry_value) = self.body(r.retry_after.map(|d| d.as_secs()));
        headers.append(CONTENT_TYPE, PROBLEM_JSON);
        if let Some(v) = retry_value {
            headers.append(RETRY_AFTER, v);
        }
        if let (Some(p), Some(info)) = (&mut self.policy, &r.ratelimit) {
            if let Some(v) = p.policy_value.clone() {
                headers.append(&RATELIMIT_POLICY, v);
            }
            if let Some(v) = p.limit_value(info.remaining, info.reset_secs) {
                headers.append(&RATELIMIT, v);
            }
        }
        body
    }
}

/// The largest integer a structured field carries (RFC 9651: at most 15 digits).
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// Appends `;key=n`, `n` capped to what a structured-field integer holds.
fn push_param(out: &mut Vec<u8>, key: &[u8], n: u64) {
    out.push(b';');
    out.extend_from_slice(key);
    out.push(b'=');
    push_u64(out, n.min(SF_INTEGER_MAX));
}

/// Appends one `RateLimit-Policy` item: `"name";q=Q;w=W;fairgate-burst=B`.
fn push_policy_item(out: &mut Vec<u8>, sf_name: &[u8], quota: u64, window: u64, burst: u64) {
    out.extend_from_slice(sf_name);
    push_param(out, b"q", quota);
    push_param(out, b"w", window);
    push_param(out, BURST_PARAM, burst);
}

/// The RateLimit fields of one bandwidth rendered: its name as a structured-field string
/// and the `RateLimit-Policy` value of the bandwidths advertised with it.
struct PolicyTemplate {
    name: Arc<str>,
    quota: u64,
    window_secs: u64,
    burst: u64,
    /// The advertised set (a clone: its address cannot be reused while the entry lives).
    bandwidths: Option<Arc<[CompiledBandwidth]>>,
    sf_name: Box<[u8]>,
    policy_value: Option<HeaderValue>,
    /// The last `RateLimit` value rendered, with its (remaining, reset) numbers: clients
    /// rejected over the same bandwidth often repeat them.
    last_limit: Option<(u64, u64, Option<HeaderValue>)>,
}

impl PolicyTemplate {
    fn new(info: &RateLimitInfo) -> PolicyTemplate {
        let sf_name = sf_string(&info.bandwidth);
        let mut v = Vec::with_capacity(64);
        match &info.bandwidths {
            Some(all) => {
                for (i, bw) in all.iter().enumerate() {
                    if i > 0 {
                        v.extend_from_slice(b", ");
                    }
                    let (q, w) = quota::quota_window(bw.rate);
                    push_policy_item(&mut v, &sf_string(&bw.name), q, w, bw.burst);
                }
            }
            None => push_policy_item(&mut v, &sf_name, info.quota, info.window_secs, info.burst),
        }
        PolicyTemplate {
            name: Arc::clone(&info.bandwidth),
            quota: info.quota,
            window_secs: info.window_secs,
            burst: info.burst,
            bandwidths: info.bandwidths.clone(),
            sf_name: sf_name.into_boxed_slice(),
            policy_value: HeaderValue::from_maybe_shared(Bytes::from(v)).ok(),
            last_limit: None,
        }
    }

    fn is_for(&self, info: &RateLimitInfo) -> bool {
        Arc::ptr_eq(&self.name, &info.bandwidth)
            && self.quota == info.quota
            && self.window_secs == info.window_secs
            && self.burst == info.burst
            && match (&self.bandwidths, &info.bandwidths) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// Inserts `RateLimit-Policy` and `RateLimit` for `info` (which [`Self::is_for`]).
    fn insert(&mut self, headers: &mut HeaderMap, info: &RateLimitInfo) {
        if let Some(v) = self.policy_value.clone() {
            headers.insert(RATELIMIT_POLICY.clone(), v);
        }
        if let Some(v) = self.limit_value(info.remaining, info.reset_secs) {
            headers.insert(RATELIMIT.clone(), v);
        }
    }

    /// `RateLimit`: `"name";r=R;t=T` (the last one again when the numbers repeat).
    fn limit_value(&mut self, remaining: u64, reset_secs: u64) -> Option<HeaderValue> {
        if let Some((r, t, value)) = &self.last_limit {
            if (*r, *t) == (remaining, reset_secs) {
                return value.clone();
            }
        }
        let value = self.render_limit(remaining, reset_secs);
        self.last_limit = Some((remaining, reset_secs, value.clone()));
        value
    }

    fn render_limit(&self, remaining: u64, reset_secs: u64) -> Option<HeaderValue> {
        let mut v =
            Vec::with_capacity(self.sf_name.len() + 6 + digits(remaining) + digits(reset_secs));
        v.extend_from_slice(&self.sf_name);
        push_param(&mut v, b"r", remaining);
        push_param(&mut v, b"t", reset_secs);
        HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
    }
}

/// A small bounded cache: linear search, round-robin replacement.
struct Cache<T> {
    entries: Vec<T>,
    next: usize,
}

impl<T> Cache<T> {
    const fn new() -> Cache<T> {
        Cache {
            entries: Vec::new(),
            next: 0,
        }
    }

    /// The entry `is_for` accepts, made by `make` when there is none.
    fn get(&mut self, is_for: impl Fn(&T) -> bool, make: impl FnOnce() -> T) -> &mut T {
        let i = match self.entries.iter().position(is_for) {
            Some(i) => i,
            None if self.entries.len() < CACHE_ENTRIES => {
                self.entries.push(make());
                self.entries.len() - 1
            }
            None => {
                let i = self.next % CACHE_ENTRIES;
                self.next = self.next.wrapping_add(1);
                self.entries[i] = make();
                i
            }
        };
        &mut self.entries[i]
    }
}

thread_local! {
    static TEMPLATES: RefCell<Cache<Template>> = const { RefCell::new(Cache::new()) };
    static POLICIES: RefCell<Cache<PolicyTemplate>> = const { RefCell::new(Cache::new()) };
}

/// Runs `f` with this thread's cache, or with a fresh one (uncached) when the cache is
/// unavailable (thread shutting down).
fn with_cache<T: 'static, R>(
    key: &'static std::thread::LocalKey<RefCell<Cache<T>>>,
    mut f: impl FnMut(&mut Cache<T>) -> R,
) -> R {
    let cached = key
        .try_with(|c| c.try_borrow_mut().ok().map(|mut c| f(&mut c)))
        .ok()
        .flatten();
    match cached {
        Some(r) => r,
        None => f(&mut Cache::new()),
    }
}

/// Writes the RateLimit fields of `info` into `headers` (used for admitted responses
/// when `ratelimit_headers: always`).
pub fn admitted_headers(headers: &mut HeaderMap, info: &RateLimitInfo) {
    with_cache(&POLICIES, |cache| {
        cache
            .get(|t| t.is_for(info), || PolicyTemplate::new(info))
            .insert(headers, info)
    });
}

/// The HTTP response for a rejection.
pub fn rejection_response<B>(r: &Rejection) -> Response<AdmissionBody<B>> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    // Headers go straight into the response's map (replacing a whole map measured dearer:
    // the empty one must be dropped).
    let mut response = Response::new(AdmissionBody::full(Bytes::new()));
    *response.status_mut() = status;
    let body = with_cache(&TEMPLATES, |cache| {
        cache
            .get(|t| t.is_for(r, status), || Template::new(r, status))
            .render(r, response.headers_mut())
    });
    *response.body_mut() = AdmissionBody::rejection(body, r.stage);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identify::ClientKey;
    use http_body::Body as _;
    use std::sync::Arc;
    use std::time::Duration;

    fn rejection(stage: Stage, status: u16) -> Rejection {
        Rejection {
            status,
            stage,
            rule: Some(Arc::from("bad-bots")),
            plan: Some(Arc::from("free")),
            bandwidth: (stage == Stage::Quota).then(|| Arc::from("free-0")),
            client_key: ClientKey::new("k"),
            retry_after: (stage != Stage::Rule).then_some(Duration::from_secs(3)),
            ratelimit: (stage == Stage::Quota).then(|| RateLimitInfo {
                bandwidth: Arc::from("free-0"),
                quota: 10,
                window_secs: 1,
                burst: 20,
                remaining: 0,
                reset_secs: 1,
                bandwidths: None,
            }),
            delay: None,
            delay_guard: None,
            shadow_hits: 0,
        }
    }

    fn body_of(r: Response<AdmissionBody<String>>) -> String {
        let mut body = r.into_body();
        let mut out = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        while let std::task::Poll::Ready(Some(Ok(f))) =
            std::pin::Pin::new(&mut body).poll_frame(&mut cx)
        {
            if let Some(d) = f.data_ref() {
                out.extend_from_slice(d);
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn quota_rejection_has_all_the_fields() {
        let r = rejection_response::<String>(&rejection(Stage::Quota, 429));
        assert_eq!(r.status(), 429);
        let h = r.headers();
        assert_eq!(h["retry-after"], "3");
        assert_eq!(h["content-type"], "application/problem+json");
        assert_eq!(
            h["ratelimit-policy"],
            "\"free-0\";q=10;w=1;fairgate-burst=20"
        );
        assert_eq!(h["ratelimit"], "\"free-0\";r=0;t=1");
        let body = body_of(r);
        assert_eq!(
            body,
            "{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",\
             \"title\":\"quota exceeded\",\"status\":429,\
             \"detail\":\"quota free-0 exceeded; retry after 3s\",\
             \"violated-policies\":[\"free-0\"]}"
        );
    }

    #[test]
    fn shed_and_deny() {
        let r = rejection_response::<String>(&rejection(Stage::Shed, 503));
        assert_eq!(r.status(), 503);
        assert!(r.headers().get("ratelimit").is_none());
        assert!(body_of(r).contains("temporary-reduced-capacity"));
        let r = rejection_response::<String>(&rejection(Stage::Rule, 403));
        assert_eq!(r.status(), 403);
        assert!(r.headers().get("retry-after").is_none());
        assert!(body_of(r).contains("\"violated-policies\":[\"bad-bots\"]"));
    }

    #[test]
    fn names_are_escaped() {
        let mut s = Vec::new();
        json_string(&mut s, "a\"b\\c\n\u{1f}é");
        assert_eq!(s, "\"a\\\"b\\\\c\\u000a\\u001fé\"".as_bytes());
        assert_eq!(sf_string("x\"y\u{7f}é"), b"\"x\\\"y\"");
    }

    #[test]
    fn numbers_render_like_fmt() {
        for n in [0u64, 1, 9, 10, 99, 100, 4320, 86_399, u64::MAX] {
            let mut v = Vec::new();
            push_u64(&mut v, n);
            assert_eq!(v, n.to_string().as_bytes());
            assert_eq!(digits(n), n.to_string().len());
        }
    }

    #[test]
    fn static_retry_values_render_like_fmt() {
        for n in 0..=(RETRY_STATIC_MAX as u64 + 2) {
            assert_eq!(retry_after_value(n), n.to_string().as_str());
        }
        assert_eq!(retry_after_value(86_400), "86400");
    }

    #[test]
    fn cached_bodies_follow_the_retry_value() {
        let mut r = rejection(Stage::Quota, 429);
        let first = body_of(rejection_response::<String>(&r));
        // Same rejection again: the cached body, byte for byte.
        assert_eq!(body_of(rejection_response::<String>(&r)), first);
        r.retry_after = Some(Duration::from_secs(4321));
        let other = rejection_response::<String>(&r);
        assert_eq!(other.headers()["retry-after"], "4321");
        let other = body_of(other);
        assert!(other.contains("\"quota free-0 exceeded; retry after 4321s\""));
        assert_eq!(other.replace("4321s", "3s"), first);
    }

    #[test]
    fn names_with_the_same_text_but_another_identity_render_their_own_values() {
        let mut r = rejection(Stage::Quota, 429);
        let _ = rejection_response::<String>(&r);
        // A new generation with the same name but different numbers.
        r.bandwidth = Some(Arc::from("free-0"));
        r.ratelimit = Some(RateLimitInfo {
            bandwidth: Arc::from("free-0"),
            quota: 20,
            window_secs: 60,
            burst: 5,
            remaining: 7,
            reset_secs: 12,
            bandwidths: None,
        });
        let resp = rejection_response::<String>(&r);
        assert_eq!(
            resp.headers()["ratelimit-policy"],
            "\"free-0\";q=20;w=60;fairgate-burst=5"
        );
        assert_eq!(resp.headers()["ratelimit"], "\"free-0\";r=7;t=12");
        // The same name `Arc` with changed numbers (a reload that kept the id) too.
        if let Some(info) = &mut r.ratelimit {
            info.quota = 30;
        }
        let resp = rejection_response::<String>(&r);
        assert_eq!(
            resp.headers()["ratelimit-policy"],
            "\"free-0\";q=30;w=60;fairgate-burst=5"
        );
    }

    fn bandwidth(name: &str, rate: &str, burst: u64) -> CompiledBandwidth {
        CompiledBandwidth::new(
            Arc::from(name),
            Arc::from(name),
            rate.parse().unwrap(),
            burst,
        )
        .unwrap()
    }

    #[test]
    fn the_policy_lists_every_bandwidth_of_the_set() {
        let all: Arc<[CompiledBandwidth]> = Arc::from(vec![
            bandwidth("free-0", "10/s", 20),
            bandwidth("free-1", "100000/day", 100_000),
            bandwidth("odd", "5/250ms", 7),
            bandwidth("huge", "2000000000000000/200000day", 1),
        ]);
        let info = RateLimitInfo {
            bandwidth: Arc::clone(&all[1].name),
            quota: 100_000,
            window_secs: 86_400,
            burst: 100_000,
            remaining: 99_999,
            reset_secs: 1,
            bandwidths: Some(Arc::clone(&all)),
        };
        let mut h = HeaderMap::new();
        admitted_headers(&mut h, &info);
        assert_eq!(
            h["ratelimit-policy"],
            "\"free-0\";q=10;w=1;fairgate-burst=20, \
             \"free-1\";q=100000;w=86400;fairgate-burst=100000, \
             \"odd\";q=20;w=1;fairgate-burst=7, \
             \"huge\";q=999999999999999;w=17280000000;fairgate-burst=1"
        );
        assert_eq!(h["ratelimit"], "\"free-1\";r=99999;t=1");
        // Another set with the same names renders its own value.
        let other: Arc<[CompiledBandwidth]> = Arc::from(vec![bandwidth("free-0", "10/s", 20)]);
        let info = RateLimitInfo {
            bandwidths: Some(other),
            ..info
        };
        admitted_headers(&mut h, &info);
        assert_eq!(
            h["ratelimit-policy"],
            "\"free-0\";q=10;w=1;fairgate-burst=20"
        );
    }

    #[test]
    fn concurrency_and_shed_name_no_violated_policy() {
        for (stage, status) in [(Stage::Concurrency, 429), (Stage::Shed, 503)] {
            let mut r = rejection(stage, status);
            r.rule = None;
            let body = body_of(rejection_response::<String>(&r));
            assert!(!body.contains("violated-policies"), "{body}");
            assert!(body.ends_with("s\"}"), "{body}");
        }
    }

    #[test]
    fn more_names_than_the_cache_holds_still_render_correctly() {
        for i in 0..(3 * CACHE_ENTRIES) {
            let name: Arc<str> = Arc::from(format!("rule-{i}"));
            let mut r = rejection(Stage::Rule, 403);
            r.rule = Some(Arc::clone(&name));
            let body = body_of(rejection_response::<String>(&r));
            assert!(
                body.contains(&format!("\"detail\":\"rule rule-{i} denied the request\"")),
                "{body}"
            );
            assert!(body.contains(&format!("[\"rule-{i}\"]")), "{body}");
        }
    }

    /// What the template's cloned map must equal: every header inserted in turn.
    fn inserted_headers(r: &Rejection) -> Vec<(String, String)> {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, PROBLEM_JSON);
        if let Some(d) = r.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(d.as_secs().max(1)));
        }
        if let Some(info) = &r.ratelimit {
            PolicyTemplate::new(info).insert(&mut h, info);
        }
        pairs(&h)
    }

    fn pairs(h: &HeaderMap) -> Vec<(String, String)> {
        h.iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn template_headers_follow_each_rejection_in_order() {
        let mut r = rejection(Stage::Quota, 429);
        for (retry, remaining, reset) in [(3, 0, 1), (3, 0, 1), (4321, 0, 1), (7, 2, 9), (7, 2, 9)]
        {
            r.retry_after = Some(Duration::from_secs(retry));
            if let Some(info) = &mut r.ratelimit {
                (info.remaining, info.reset_secs) = (remaining, reset);
            }
            let resp = rejection_response::<String>(&r);
            assert_eq!(pairs(resp.headers()), inserted_headers(&r));
            assert_eq!(
                pairs(resp.headers())
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
                [
                    "content-type",
                    "retry-after",
                    "ratelimit-policy",
                    "ratelimit"
                ]
            );
            assert_eq!(
                resp.headers()["ratelimit"],
                format!("\"free-0\";r={remaining};t={reset}")
            );
        }
        for (stage, status) in [
            (Stage::Shed, 503),
            (Stage::Rule, 403),
            (Stage::Concurrency, 429),
        ] {
            let r = rejection(stage, status);
            let resp = rejection_response::<String>(&r);
            assert_eq!(pairs(resp.headers()), inserted_headers(&r), "{stage:?}");
        }
    }

    #[test]
    fn admitted_headers_render_the_numbers() {
        let mut h = HeaderMap::new();
        let info = RateLimitInfo {
            bandwidth: Arc::from("pro \"1\""),
            quota: 100,
            window_secs: 60,
            burst: 50,
            remaining: 50,
            reset_secs: 30,
            bandwidths: None,
        };
        admitted_headers(&mut h, &info);
        assert_eq!(
            h["ratelimit-policy"],
            "\"pro \\\"1\\\"\";q=100;w=60;fairgate-burst=50"
        );
        assert_eq!(h["ratelimit"], "\"pro \\\"1\\\"\";r=50;t=30");
        // Repeated numbers (the cached value), then new ones.
        admitted_headers(&mut h, &info);
        assert_eq!(h["ratelimit"], "\"pro \\\"1\\\"\";r=50;t=30");
        let info = RateLimitInfo {
            remaining: 49,
            reset_secs: 31,
            ..info
        };
        admitted_headers(&mut h, &info);
        assert_eq!(h["ratelimit"], "\"pro \\\"1\\\"\";r=49;t=31");
        assert_eq!(h.get_all("ratelimit").iter().count(), 1);
    }
}
