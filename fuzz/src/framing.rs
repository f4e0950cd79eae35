//! Target `framing` (SCENARIOS.md P6 (5)): a differential over the gateway's request
//! framing check (`fairgate_gateway::server::framing::Scanner`), on raw connection bytes.
//!
//! - **Strict parse of what it accepts.** When strict `httparse` (default config, the
//!   parser hyper uses) parses the first head and the scanner lets it through, an
//!   independent reading of that head must find exactly one framing: at most one
//!   `Content-Length` of plain digits, at most one `Transfer-Encoding`, exactly `chunked`
//!   and not on HTTP/1.0, not both, no bare LF, at most one `Host`.
//! - **Reads do not matter.** The verdicts on the first heads (and the first ambiguity)
//!   are the same whether the bytes arrive at once, split in two at an input-chosen point,
//!   or one byte at a time.

use fairgate_gateway::server::framing::{Scanner, Verdicts};

const MAX_HEAD: usize = 64 * 1024;
const HEADS: usize = 4;

/// Feeds `chunks` to a fresh scanner; returns the verdicts of the first heads and the first
/// ambiguity (as text).
fn scan<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<bool>, String) {
    let verdicts = Verdicts::new();
    let mut scanner = Scanner::new(MAX_HEAD, verdicts.clone());
    for c in chunks {
        scanner.feed(c);
    }
    let v = (0..HEADS)
        .map(|_| verdicts.next_request_is_ambiguous())
        .collect();
    (v, format!("{:?}", scanner.first_ambiguity()))
}

/// Plain digits, no sign, no leading zero, at most 19 of them.
fn plain_length(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 19
        && v.iter().all(u8::is_ascii_digit)
        && (v == b"0" || v[0] != b'0')
}

/// Why a head strict `httparse` parsed has an ambiguous framing, if it has.
fn ambiguity(head: &[u8], req: &httparse::Request<'_, '_>) -> Option<&'static str> {
    if head
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
    {
        return Some("bare LF");
    }
    let named = |n: &'static str| -> Vec<&[u8]> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(n))
            .map(|h| h.value)
            .collect()
    };
    let lengths = named("content-length");
    let encodings = named("transfer-encoding");
    if lengths.len() > 1 {
        return Some("several Content-Length");
    }
    if lengths.iter().any(|v| !plain_length(v)) {
        return Some("a Content-Length that is not plain digits");
    }
    if encodings.len() > 1 {
        return Some("several Transfer-Encoding");
    }
    if encodings
        .iter()
        .any(|v| !v.eq_ignore_ascii_case(b"chunked"))
    {
        return Some("a Transfer-Encoding other than chunked");
    }
    if !encodings.is_empty() && req.version == Some(0) {
        return Some("Transfer-Encoding on HTTP/1.0");
    }
    if !encodings.is_empty() && !lengths.is_empty() {
        return Some("Content-Length and Transfer-Encoding");
    }
    if named("host").len() > 1 {
        return Some("several Host");
    }
    None
}

/// Runs one input; panics on a broken invariant.
pub fn check(data: &[u8]) {
    let whole = scan([data]);
    let at = data
        .first()
        .map_or(0, |&b| usize::from(b).wrapping_mul(7919) % (data.len() + 1));
    let (a, b) = data.split_at(at);
    let split = scan([a, b]);
    assert_eq!(whole, split, "split at {at} changed the verdicts");
    if data.len() <= 4096 {
        let bytewise = scan(data.chunks(1));
        assert_eq!(whole, bytewise, "byte-at-a-time reads changed the verdicts");
    }

    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut slots);
    if let Ok(httparse::Status::Complete(len)) = req.parse(data) {
        let accepted = !whole.0[0];
        if accepted {
            if let Some(why) = ambiguity(&data[..len], &req) {
                panic!(
                    "the scanner let through a head with {why}: {:?}",
                    String::from_utf8_lossy(&data[..len])
                );
            }
        }
    }
}
