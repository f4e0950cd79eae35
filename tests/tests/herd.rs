//! Herds (issue 17, item 5): 200 clients sharing one API key are rejected together and each
//! retries once, obeying its `Retry-After`. Told the same second (`retry_stagger: off`), they
//! come back together and most are rejected again; staggered (the default), each is told
//! when its turn comes at the bucket's refill rate, and their retries find room.
//!
//! The clients wait their `Retry-After` in real time: that is the behaviour under test, not
//! synchronisation. The figures are in RELIABILITY.md ("Herds").

use std::time::Duration;

use fairgate_tests::{Client, Gateway, Upstream};

const CLIENTS: usize = 200;

fn config(upstream: &Upstream, stagger: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
policy:
  version: 1
  identify: {{client_key: [{{header: x-api-key}}]}}
  plans: {{team: {{bandwidths: ['20/s burst 20']}}}}
  default_plan: team
  responses: {{retry_stagger: {stagger}}}
",
        upstream.addr
    )
}

/// (rejected at first, of those rejected again on their one obeyed retry, the largest
/// `Retry-After` told).
async fn herd(stagger: &str) -> (usize, usize, u64) {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up, stagger));
    let url = gw.url("/x");
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            // One connection per client, as separate processes would have.
            let (c, url) = (Client::new(), url.clone());
            tokio::spawn(async move {
                let first = c.get_with(&url, &[("x-api-key", "team")]).await;
                if first.status == 200 {
                    return None;
                }
                assert_eq!(first.status, 429);
                let secs: u64 = first.headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                tokio::time::sleep(Duration::from_secs(secs)).await;
                let retry = c.get_with(&url, &[("x-api-key", "team")]).await;
                Some((retry.status.as_u16(), secs))
            })
        })
        .collect();
    let mut rejected = 0;
    let mut again = 0;
    let mut longest = 0;
    for t in tasks {
        if let Some((status, secs)) = t.await.unwrap() {
            rejected += 1;
            again += usize::from(status == 429);
            longest = longest.max(secs);
        }
    }
    (rejected, again, longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staggered_retries_find_room_where_a_herd_would_not() {
    let (rejected, again, longest) = herd("off").await;
    println!(
        "retry_stagger off: {again} of {rejected} retries rejected again, Retry-After ≤ {longest}s"
    );
    assert!(rejected >= 150, "the herd was rejected: {rejected}");
    assert_eq!(longest, 1, "everyone was told the same second");
    assert!(
        again * 2 > rejected,
        "told the same second, most come back to a full bucket: {again} of {rejected}"
    );

    let (rejected, again, longest) = herd("60s").await;
    println!(
        "retry_stagger 60s: {again} of {rejected} retries rejected again, Retry-After ≤ {longest}s"
    );
    assert!(rejected >= 150, "the herd was rejected: {rejected}");
    // 20 a second: the last of ~180 is told about 9 s.
    assert!(
        (8..=11).contains(&longest),
        "spread at the refill rate: {longest}"
    );
    assert!(
        again * 10 <= rejected,
        "staggered, at most a tenth come back to a full bucket: {again} of {rejected}"
    );
}
