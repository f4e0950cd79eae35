//! Bounded-load consistent hashing (issue 19, item 6), with the real binary: a hot client
//! stays on its target while the target has room and spills to the next targets on the ring
//! when it does not (`hash_balance_factor`); without a bound, all of it lands on one target.
//!
//! The upstreams answer nothing (black holes) until the test has seen every request arrive,
//! so all of them are in flight at once, whatever the machine's speed.

use std::time::Duration;

use fairgate_tests::{Client, Gateway, Upstream};

async fn spread(factor: Option<&str>) -> (Vec<usize>, Option<f64>) {
    let ups = vec![
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    ];
    for u in &ups {
        u.set_black_hole(true);
    }
    let targets: Vec<String> = ups.iter().map(|u| format!("'{}'", u.addr)).collect();
    let bound = factor.map_or(String::new(), |f| format!(", hash_balance_factor: {f}"));
    let gw = Gateway::start(&format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: [{}], balance: consistent_hash, hash_key: {{header: x-user}}, request_timeout: 30s{bound}}}
",
        targets.join(", ")
    ));
    let url = gw.url("/x");
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let req = http::Request::get(&url)
                    .header("x-user", "hot")
                    .body(fairgate_tests::empty())
                    .expect("request");
                let _ = Client::new().try_send(req).await;
            })
        })
        .collect();
    let all_in = fairgate_tests::eventually(Duration::from_secs(20), || async {
        ups.iter().map(Upstream::count).sum::<usize>() == 30
    })
    .await;
    let counts: Vec<usize> = ups.iter().map(Upstream::count).collect();
    assert!(all_in, "every request reaches an upstream: {counts:?}");
    let metrics = Client::new().get(&gw.admin_url("/metrics")).await.text();
    let moves = fairgate_tests::metric(
        &metrics,
        "fairgate_upstream_hash_moves_total{upstream=\"u\"}",
    );
    for c in calls {
        c.abort();
    }
    (counts, moves)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_client_spills_to_the_next_targets_only_with_a_load_bound() {
    let (counts, moves) = spread(None).await;
    let mut sorted = counts.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 0, 30], "unbounded: one target takes it all");
    assert_eq!(moves, Some(0.0));

    let (counts, moves) = spread(Some("125%")).await;
    // With k requests in flight the k-th may go where fewer than ⌈1.25 × k / 3⌉ are: the
    // 30th sees a bound of 13, so no target holds more than 13.
    assert!(counts.iter().all(|&c| c <= 13), "{counts:?}");
    let home = *counts.iter().max().unwrap();
    assert_eq!(home, 13, "its own target keeps what fits: {counts:?}");
    assert_eq!(moves, Some((30 - home) as f64), "{counts:?}");
}
