//! Identification: who is this request? The client IP behind trusted proxies, its
//! aggregate (IPv6 /64 by default), and the client key.
//!
//! # Client IP
//! Forwarding headers are believed only when the TCP peer is a trusted proxy. Then the
//! list (`X-Forwarded-For`, all its header lines in order as one list; or, when there is no
//! `X-Forwarded-For`, the `for=` parameters of `Forwarded`) is walked right to left, skipping
//! trusted hops; the first untrusted address is the client. An entry that does not parse
//! (garbage, `unknown`, an obfuscated `_hidden` identifier) stops the walk and the peer is
//! used: never an address to the left of it, which the client could have written. If every
//! entry is trusted, the client is the peer. At most the rightmost [`MAX_HOPS`] entries are
//! considered (beyond them the peer is used too). Ports, brackets and quotes are stripped and
//! `::ffff:a.b.c.d` is the IPv4 address `a.b.c.d`.
//!
//! Only one of the two headers is read, `X-Forwarded-For` first, because a proxy that
//! maintains one of them passes the other through unchanged from the client; reading both
//! would let a client inject hops. `X-Real-IP` is never read.
//!
//! # Client key
//! The configured extractors (header, query parameter, bearer token) are tried in order; the
//! first non-empty value is the key. Otherwise the key is the aggregated IP (`192.0.2.7`,
//! `10.1.2.0/24`, `2001:db8:1:2::/64`). A key longer than `max_key_length` bytes is replaced
//! by `h:` and a 128-bit keyed hash of it in hex, so it is still counted but cannot make the
//! state table store megabytes. Keys up to [`INLINE_KEY`] bytes live inline in a
//! [`ClientKey`] and need no allocation.

use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::ControlFlow;
use std::sync::Arc;

use fairgate_policies::compiled::HeaderSource;
use fairgate_policies::model::KeyExtractor;

/// Forwarding entries considered, counting from the right.
pub const MAX_HOPS: usize = 64;
/// Keys up to this many bytes are stored inline.
pub const INLINE_KEY: usize = 110;

/// Header access for identification: like [`HeaderSource`], plus every value of a
/// repeated header (several `X-Forwarded-For` lines form one list).
pub trait HeaderValues: HeaderSource {
    /// Calls `f` with each value of header `name` (lower case) in order, until it breaks.
    /// The default reports only the first value.
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str) -> ControlFlow<()>) {
        if let Some(v) = self.header(name) {
            let _ = f(v);
        }
    }
}

impl HeaderValues for () {}

/// Lets a `&dyn HeaderValues` be used where the policy crate wants a `&dyn HeaderSource`.
pub(crate) struct AsSource<'a>(pub(crate) &'a dyn HeaderValues);

impl HeaderSource for AsSource<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.header(name)
    }
}

// === ClientKey ===

/// A client key: inline up to [`INLINE_KEY`] bytes, shared otherwise. Cheap to clone.
#[derive(Clone)]
pub struct ClientKey(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE_KEY] },
    Shared(Arc<str>),
}

impl ClientKey {
    /// A key holding `s` (allocates only above [`INLINE_KEY`] bytes).
    pub fn new(s: &str) -> Self {
        if s.len() <= INLINE_KEY {
            let mut buf = [0u8; INLINE_KEY];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            ClientKey(Repr::Inline {
                len: s.len() as u8,
                buf,
            })
        } else {
            ClientKey(Repr::Shared(Arc::from(s)))
        }
    }

    /// The key text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // The buffer is only ever filled from a `&str` (or ASCII), cut at a boundary.
            Repr::Inline { len, buf } => std::str::from_utf8(&buf[..*len as usize]).unwrap_or(""),
            Repr::Shared(s) => s,
        }
    }

    /// Appends one ASCII byte (ignored when full or not ASCII).
    fn push_ascii(&mut self, b: u8) {
        if let Repr::Inline { len, buf } = &mut self.0 {
            let at = *len as usize;
            if at < INLINE_KEY && b.is_ascii() {
                buf[at] = b;
                *len += 1;
            }
        }
    }

    fn empty() -> Self {
        ClientKey(Repr::Inline {
            len: 0,
            buf: [0u8; INLINE_KEY],
        })
    }
}

impl std::ops::Deref for ClientKey {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for ClientKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ClientKey {}

impl PartialEq<str> for ClientKey {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ClientKey {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Writes into a `ClientKey`'s inline buffer (IP text always fits).
impl fmt::Write for ClientKey {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match &mut self.0 {
            Repr::Inline { len, buf } => {
                let at = *len as usize;
                let end = at + s.len();
                if end > INLINE_KEY {
                    return Err(fmt::Error);
                }
                buf[at..end].copy_from_slice(s.as_bytes());
                *len = end as u8;
                Ok(())
            }
            Repr::Shared(_) => Err(fmt::Error),
        }
    }
}

// === client IP ===

/// Folds `::ffff:a.b.c.d` to `a.b.c.d`.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// The client IP of a request from `peer`; see the module docs. `trusted` says whether an
/// address is a trusted proxy.
pub fn client_ip(
    peer: IpAddr,
    headers: &dyn HeaderValues,
    trusted: &dyn Fn(IpAddr) -> bool,
) -> IpAddr {
    let peer = canonical_ip(peer);
    if !trusted(peer) {
        return peer;
    }
    let mut lines = Lines::default();
    headers.for_each_value("x-forwarded-for", &mut |v| {
        lines.push(v);
        ControlFlow::Continue(())
    });
    let node: NodeFn = if lines.count > 0 {
        xff_node
    } else {
        headers.for_each_value("forwarded", &mut |v| {
            lines.push(v);
            ControlFlow::Continue(())
        });
        forwarded_node
    };
    lines.walk(node, peer, trusted)
}

/// Extracts the node text of one comma-separated item; `None` skips an empty item.
type NodeFn = fn(&str) -> Option<&str>;

/// Header lines kept for the walk (the rightmost ones). More lines than this are beyond
/// the hop cap in any realistic chain; the walk then ends at the peer, as at the cap.
const MAX_LINES: usize = 8;

/// The rightmost [`MAX_LINES`] header lines, borrowed; nothing is parsed up front.
struct Lines<'s> {
    ring: [&'s str; MAX_LINES],
    count: usize,
}

impl Default for Lines<'_> {
    fn default() -> Self {
        Lines {
            ring: [""; MAX_LINES],
            count: 0,
        }
    }
}

impl<'s> Lines<'s> {
    fn push(&mut self, v: &'s str) {
        self.ring[self.count % MAX_LINES] = v;
        self.count += 1;
    }

    /// Walks the entries right to left, parsing each only when reached.
    fn walk(&self, node: NodeFn, peer: IpAddr, trusted: &dyn Fn(IpAddr) -> bool) -> IpAddr {
        let mut seen = 0usize;
        for k in 0..self.count.min(MAX_LINES) {
            let line = self.ring[(self.count - 1 - k) % MAX_LINES];
            // `line.rsplit(',')` by hand: the generic pattern searcher costs more than
            // the rest of the walk for the usual one- or two-item line.
            let mut rest = Some(line);
            while let Some(cur) = rest {
                let item = match cur.as_bytes().iter().rposition(|&b| b == b',') {
                    Some(i) => {
                        rest = Some(&cur[..i]);
                        &cur[i + 1..]
                    }
                    None => {
                        rest = None;
                        cur
                    }
                };
                let Some(text) = node(item) else { continue };
                seen += 1;
                if seen > MAX_HOPS {
                    return peer;
                }
                match parse_node(text) {
                    None => return peer,
                    Some(ip) if trusted(ip) => continue,
                    Some(ip) => return ip,
                }
            }
        }
        peer
    }
}

/// An `X-Forwarded-For` item: the trimmed text; empty items are skipped.
fn xff_node(item: &str) -> Option<&str> {
    let item = trim(item);
    (!item.is_empty()).then_some(item)
}

/// `str::trim`, skipped when both ends are plainly not whitespace (printable ASCII).
fn trim(s: &str) -> &str {
    match (s.as_bytes().first(), s.as_bytes().last()) {
        (Some(a), Some(z)) if a.is_ascii_graphic() && z.is_ascii_graphic() => s,
        _ => s.trim(),
    }
}

/// A `Forwarded` element (`for=a;proto=http`): its `for=` value. An element without one
/// yields the empty string, which does not parse: the walk stops there.
fn forwarded_node(element: &str) -> Option<&str> {
    if element.trim().is_empty() {
        return None;
    }
    Some(
        element
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
            .map(|(_, v)| v.trim())
            .unwrap_or(""),
    )
}

/// Parses one node: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`, quoted or
/// not. IPv4-mapped IPv6 folds to IPv4.
pub fn parse_node(node: &str) -> Option<IpAddr> {
    // Fast path: a bare IPv4 address, the usual X-Forwarded-For entry.
    if let Some(v4) = parse_ipv4(node.as_bytes()) {
        return Some(IpAddr::V4(v4));
    }
    let trimmed = node.trim();
    if let Some(v4) = parse_ipv4(trimmed.as_bytes()) {
        return Some(IpAddr::V4(v4));
    }
    let mut s = trimmed;
    if let Some(inner) = s.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        s = inner.trim();
    }
    let ip = if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        if !(after.is_empty() || is_port(after.strip_prefix(':')?)) {
            return None;
        }
        IpAddr::V6(addr.parse::<Ipv6Addr>().ok()?)
    } else if let Some((addr, port)) = s.split_once(':').filter(|(_, p)| !p.contains(':')) {
        if !is_port(port) {
            return None;
        }
        IpAddr::V4(addr.parse::<Ipv4Addr>().ok()?)
    } else {
        s.parse::<IpAddr>().ok()?
    };
    Some(canonical_ip(ip))
}

/// Dotted-quad IPv4 exactly as `Ipv4Addr::from_str` accepts it (four decimal octets of one
/// to three digits, no leading zeros, each ≤ 255), in one pass over the bytes: about a
/// fifth of the standard parser's instructions on this path.
fn parse_ipv4(b: &[u8]) -> Option<Ipv4Addr> {
    if b.len() < 7 || b.len() > 15 {
        return None;
    }
    // One pass, one branch per byte: the octet being read (`v`, `digits` of it so far)
    // and how many dots came before.
    let mut octets = [0u8; 4];
    let mut n = 0usize;
    let mut v: u32 = 0;
    let mut digits = 0u32;
    for &c in b {
        if c == b'.' {
            if digits == 0 || n == 3 || v > 255 {
                return None;
            }
            octets[n] = v as u8;
            n += 1;
            v = 0;
            digits = 0;
            continue;
        }
        let d = c.wrapping_sub(b'0');
        // Not a digit; a fourth digit; or a digit after a leading zero.
        if d > 9 || digits == 3 || (digits == 1 && v == 0) {
            return None;
        }
        v = v * 10 + u32::from(d);
        digits += 1;
    }
    if digits == 0 || n != 3 || v > 255 {
        return None;
    }
    octets[3] = v as u8;
    Some(Ipv4Addr::from(octets))
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

// === aggregation and keys ===

/// Masks `ip` to its aggregation prefix.
pub fn aggregate(ip: IpAddr, ipv4_prefix: u8, ipv6_prefix: u8) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let p = u32::from(ipv4_prefix.min(32));
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            IpAddr::V4(Ipv4Addr::from(bits & mask))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let p = u32::from(ipv6_prefix.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

/// The key text of an IP aggregated to its prefix: the bare address for a host prefix
/// (`/32`, `/128`), `address/prefix` otherwise. Allocation-free.
pub fn ip_key(ip: IpAddr, ipv4_prefix: u8, ipv6_prefix: u8) -> ClientKey {
    let net = aggregate(ip, ipv4_prefix, ipv6_prefix);
    let mut key = ClientKey::empty();
    let prefix = match net {
        IpAddr::V4(_) => ipv4_prefix.min(32),
        IpAddr::V6(_) => ipv6_prefix.min(128),
    };
    let host = if net.is_ipv4() { 32 } else { 128 };
    // IP text is at most 39 bytes plus `/128`: it always fits inline. IPv4 is written by
    // hand: `fmt` machinery was a visible share of a decision.
    let _ = match net {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    key.push_ascii(b'.');
                }
                push_decimal(&mut key, octet);
            }
            Ok(())
        }
        IpAddr::V6(_) => write!(key, "{net}"),
    };
    if prefix != host {
        key.push_ascii(b'/');
        push_decimal(&mut key, prefix);
    }
    key
}

fn push_decimal(key: &mut ClientKey, n: u8) {
    if n >= 100 {
        key.push_ascii(b'0' + n / 100);
    }
    if n >= 10 {
        key.push_ascii(b'0' + (n / 10) % 10);
    }
    key.push_ascii(b'0' + n % 10);
}

/// The aggregated IP key, formatted only if something asks for it (the client key
/// fallback, or a `limit` rule keyed by IP): most requests with an API key never need it.
pub(crate) struct LazyIpKey {
    ip: IpAddr,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    cell: std::cell::OnceCell<ClientKey>,
}

impl LazyIpKey {
    pub(crate) fn new(ip: IpAddr, ipv4_prefix: u8, ipv6_prefix: u8) -> Self {
        LazyIpKey {
            ip,
            ipv4_prefix,
            ipv6_prefix,
            cell: std::cell::OnceCell::new(),
        }
    }

    pub(crate) fn get(&self) -> &ClientKey {
        self.cell
            .get_or_init(|| ip_key(self.ip, self.ipv4_prefix, self.ipv6_prefix))
    }
}

/// Where a key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// An extractor (header, query, bearer).
    Extractor,
    /// The aggregated IP.
    Ip,
}

/// Runs the extractors; falls back to `ip_key`. Long keys are hashed with `hasher`.
pub fn client_key(
    extractors: &[KeyExtractor],
    max_key_length: usize,
    headers: &dyn HeaderValues,
    query: Option<&str>,
    ip_key: &ClientKey,
    hasher: &ahash::RandomState,
) -> (ClientKey, KeySource) {
    match extract(extractors, headers, query) {
        Some(v) => (bounded_key(v, max_key_length, hasher), KeySource::Extractor),
        None => (ip_key.clone(), KeySource::Ip),
    }
}

/// The first non-empty value of the extractors, as sent (before any hashing).
pub fn extract<'h>(
    extractors: &[KeyExtractor],
    headers: &'h dyn HeaderValues,
    query: Option<&'h str>,
) -> Option<&'h str> {
    extractors.iter().find_map(|ex| {
        let value = match ex {
            KeyExtractor::Header(name) => headers.header(name).map(str::trim),
            KeyExtractor::Query(param) => query.and_then(|q| query_param(q, param)),
            KeyExtractor::Bearer => headers.header("authorization").and_then(bearer_token),
        };
        value.filter(|v| !v.is_empty())
    })
}

/// `v`, or `h:<32 hex>` when longer than `max` bytes.
pub fn bounded_key(v: &str, max: usize, hasher: &ahash::RandomState) -> ClientKey {
    if v.len() <= max {
        return ClientKey::new(v);
    }
    let mut a = hasher.build_hasher();
    a.write(v.as_bytes());
    let mut b = hasher.build_hasher();
    b.write_u8(0x5a);
    b.write(v.as_bytes());
    let mut key = ClientKey::empty();
    let _ = write!(key, "h:{:016x}{:016x}", a.finish(), b.finish());
    key
}

/// The raw value of `param` in a query string (no percent-decoding: keys are compared
/// as sent).
pub fn query_param<'q>(query: &'q str, param: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == param).then_some(v)
    })
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
pub fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_ipv4_parser_agrees_with_std() {
        let cases = [
            "1.2.3.4",
            "255.255.255.255",
            "0.0.0.0",
            "192.0.2.44",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3.04",
            "1.2.3",
            "1.2.3.4.5",
            "1..3.4",
            ".1.2.3",
            "1.2.3.",
            "1234.1.1.1",
            "1.2.3.4 ",
            " 1.2.3.4",
            "1.2.3.4:80",
            "a.b.c.d",
            "1.2.3.-4",
            "+1.2.3.4",
            "0.0.0.00",
            "999.999.999.999",
            "10.0.0.255",
            "",
            "::1",
        ];
        for c in cases {
            assert_eq!(
                parse_ipv4(c.as_bytes()),
                c.parse::<Ipv4Addr>().ok(),
                "{c:?}"
            );
        }
        // Every short string over the characters that matter.
        let alphabet = b"0129.5";
        let mut buf = Vec::new();
        for len in 0..=8usize {
            let total = alphabet.len().pow(len as u32);
            for mut k in 0..total {
                buf.clear();
                for _ in 0..len {
                    buf.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                let text = std::str::from_utf8(&buf).unwrap_or("");
                assert_eq!(parse_ipv4(&buf), text.parse::<Ipv4Addr>().ok(), "{text:?}");
            }
        }
    }

    struct H(Vec<(&'static str, &'static str)>);

    impl HeaderSource for H {
        fn header(&self, name: &str) -> Option<&str> {
            self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
        }
    }

    impl HeaderValues for H {
        fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str) -> ControlFlow<()>) {
            for (n, v) in &self.0 {
                if *n == name && f(v).is_break() {
                    return;
                }
            }
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted_127_0_0_2(ip: IpAddr) -> bool {
        ip == IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
    }

    fn resolve(peer: &str, headers: Vec<(&'static str, &'static str)>) -> IpAddr {
        client_ip(ip(peer), &H(headers), &trusted_127_0_0_2)
    }

    #[test]
    fn forwarding_table_s1() {
        type Case = (
            &'static str,
            &'static str,
            Vec<(&'static str, &'static str)>,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "untrusted peer with XFF is keyed by the peer",
                "127.0.0.3",
                vec![("x-forwarded-for", "192.0.2.1")],
                "127.0.0.3",
            ),
            (
                "trusted peer: rightmost untrusted wins",
                "127.0.0.2",
                vec![("x-forwarded-for", "198.51.100.9, 192.0.2.7")],
                "192.0.2.7",
            ),
            (
                "two XFF headers are one list",
                "127.0.0.2",
                vec![
                    ("x-forwarded-for", "198.51.100.9"),
                    ("x-forwarded-for", "192.0.2.7, 127.0.0.2"),
                ],
                "192.0.2.7",
            ),
            (
                "trusted hops are skipped",
                "127.0.0.2",
                vec![("x-forwarded-for", "192.0.2.7, 127.0.0.2, 127.0.0.2")],
                "192.0.2.7",
            ),
            (
                "unparseable rightmost falls back to the peer, never leftward",
                "127.0.0.2",
                vec![("x-forwarded-for", "192.0.2.7, garbage")],
                "127.0.0.2",
            ),
            (
                "unparseable after a trusted hop falls back too",
                "127.0.0.2",
                vec![("x-forwarded-for", "192.0.2.7, nope, 127.0.0.2")],
                "127.0.0.2",
            ),
            (
                "all trusted: the peer",
                "127.0.0.2",
                vec![("x-forwarded-for", "127.0.0.2, 127.0.0.2")],
                "127.0.0.2",
            ),
            (
                "mapped IPv4 is IPv4",
                "127.0.0.2",
                vec![("x-forwarded-for", "::ffff:192.0.2.7")],
                "192.0.2.7",
            ),
            (
                "mapped peer is the same peer",
                "::ffff:127.0.0.2",
                vec![("x-forwarded-for", "192.0.2.8")],
                "192.0.2.8",
            ),
            (
                "ports are stripped",
                "127.0.0.2",
                vec![("x-forwarded-for", "192.0.2.7:4711")],
                "192.0.2.7",
            ),
            (
                "brackets and ports are stripped",
                "127.0.0.2",
                vec![("x-forwarded-for", "[2001:db8::1]:443")],
                "2001:db8::1",
            ),
            (
                "Forwarded for= like XFF",
                "127.0.0.2",
                vec![(
                    "forwarded",
                    "for=198.51.100.9, for=\"[2001:db8::7]:80\";proto=https",
                )],
                "2001:db8::7",
            ),
            (
                "Forwarded unknown stops the walk",
                "127.0.0.2",
                vec![("forwarded", "for=192.0.2.1, for=unknown")],
                "127.0.0.2",
            ),
            (
                "XFF wins over Forwarded",
                "127.0.0.2",
                vec![
                    ("forwarded", "for=198.51.100.1"),
                    ("x-forwarded-for", "192.0.2.7"),
                ],
                "192.0.2.7",
            ),
            (
                "X-Real-IP is ignored",
                "127.0.0.3",
                vec![("x-real-ip", "192.0.2.7")],
                "127.0.0.3",
            ),
            (
                "X-Real-IP is ignored from a trusted peer too",
                "127.0.0.2",
                vec![("x-real-ip", "192.0.2.7")],
                "127.0.0.2",
            ),
        ];
        for (name, peer, headers, want) in cases {
            assert_eq!(resolve(peer, headers), ip(want), "{name}");
        }
    }

    #[test]
    fn long_lists_are_capped() {
        let mut v = String::from("192.0.2.1");
        for _ in 0..10_000 {
            v.push_str(", 127.0.0.2");
        }
        let leaked: &'static str = Box::leak(v.into_boxed_str());
        // The client is beyond the 64 rightmost entries: the peer is used.
        assert_eq!(
            resolve("127.0.0.2", vec![("x-forwarded-for", leaked)]),
            ip("127.0.0.2")
        );
        let short: &'static str = "192.0.2.1, 127.0.0.2";
        assert_eq!(
            resolve("127.0.0.2", vec![("x-forwarded-for", short)]),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn aggregation_and_ip_keys() {
        assert_eq!(ip_key(ip("192.0.2.7"), 32, 64).as_str(), "192.0.2.7");
        assert_eq!(ip_key(ip("192.0.2.7"), 24, 64).as_str(), "192.0.2.0/24");
        assert_eq!(
            ip_key(ip("2001:db8:1:2:aaaa::1"), 32, 64).as_str(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            ip_key(ip("2001:db8:1:2:ffff::9"), 32, 64),
            ip_key(ip("2001:db8:1:2::1"), 32, 64)
        );
        assert_ne!(
            ip_key(ip("2001:db8:1:3::1"), 32, 64),
            ip_key(ip("2001:db8:1:2::1"), 32, 64)
        );
        assert_eq!(ip_key(ip("2001:db8::1"), 32, 128).as_str(), "2001:db8::1");
        assert_eq!(ip_key(ip("::ffff:192.0.2.7"), 32, 64).as_str(), "192.0.2.7");
    }

    #[test]
    fn extractors_in_order_then_ip() {
        let hasher = ahash::RandomState::new();
        let ipk = ClientKey::new("192.0.2.7");
        let ex = vec![
            KeyExtractor::Header("x-api-key".into()),
            KeyExtractor::Query("key".into()),
            KeyExtractor::Bearer,
        ];
        let h = H(vec![("authorization", "Bearer tok-1")]);
        assert_eq!(
            client_key(&ex, 256, &h, Some("a=1&key=q-1"), &ipk, &hasher).0,
            "q-1"
        );
        assert_eq!(client_key(&ex, 256, &h, None, &ipk, &hasher).0, "tok-1");
        let h = H(vec![
            ("x-api-key", "k-1"),
            ("authorization", "Bearer tok-1"),
        ]);
        assert_eq!(client_key(&ex, 256, &h, None, &ipk, &hasher).0, "k-1");
        let h = H(vec![("x-api-key", "")]);
        let (k, src) = client_key(&ex, 256, &h, Some("key="), &ipk, &hasher);
        assert_eq!((k.as_str(), src), ("192.0.2.7", KeySource::Ip));
    }

    #[test]
    fn long_keys_are_hashed_stably() {
        let hasher = ahash::RandomState::new();
        let long = "x".repeat(70_000);
        let a = bounded_key(&long, 256, &hasher);
        let b = bounded_key(&long, 256, &hasher);
        assert_eq!(a, b);
        assert!(a.starts_with("h:") && a.len() == 34);
        assert_ne!(a, bounded_key(&"y".repeat(70_000), 256, &hasher));
        let mid = "m".repeat(200);
        assert_eq!(
            bounded_key(&mid, 256, &hasher).as_str(),
            mid,
            "shared, not hashed"
        );
    }
}
