//! Upstream targets by name through the real binary, against a DNS server the test controls
//! ([`fairgate_tests::dns`]: a small UDP responder on 127.0.0.1), whose answers the test
//! changes, withholds (no answer: a timeout) or refuses (NXDOMAIN). The name's addresses are
//! loopback addresses (127.0.0.2, .3, .4) with one upstream on each, all on one port.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fairgate_tests::dns::Dns;
use fairgate_tests::{eventually, metric, run_fairgate, Client, Gateway, Upstream};

const WAIT: Duration = Duration::from_secs(15);
const NAME: &str = "api.test";

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// Upstreams on 127.0.0.2, .3 and .4, on one port.
async fn upstreams() -> (u16, [Upstream; 3]) {
    for _ in 0..50 {
        let first = Upstream::start_on(SocketAddr::from((ip(2), 0)))
            .await
            .expect("bind 127.0.0.2");
        let port = first.addr.port();
        let (Ok(b), Ok(c)) = (
            Upstream::start_on(SocketAddr::from((ip(3), port))).await,
            Upstream::start_on(SocketAddr::from((ip(4), port))).await,
        ) else {
            first.stop().await;
            continue;
        };
        return (port, [first, b, c]);
    }
    panic!("no port free on 127.0.0.2, .3 and .4");
}

fn config(dns: &Dns, port: u16) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0}}
routes: [{{upstream: u}}]
upstreams: {{u: {{targets: ['{NAME}:{port}'], balance: round_robin}}}}
resolver: {{nameservers: ['{}'], timeout: 300ms}}
log: {{decisions: off}}
",
        dns.addr
    )
}

/// (targets, resolve failures) of pool `u`.
async fn pool_metrics(gw: &Gateway) -> (f64, f64) {
    let text = Client::new().get(&gw.admin_url("/metrics")).await.text();
    (
        metric(&text, r#"fairgate_upstream_targets{upstream="u"}"#).unwrap_or(f64::NAN),
        metric(
            &text,
            r#"fairgate_upstream_resolve_failures_total{upstream="u"}"#,
        )
        .unwrap_or(f64::NAN),
    )
}

async fn send(c: &Client, gw: &Gateway, n: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        statuses.push(c.get(&gw.url("/")).await.status.as_u16());
    }
    statuses
}

fn counts(ups: &[Upstream; 3]) -> [usize; 3] {
    [ups[0].count(), ups[1].count(), ups[2].count()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_is_a_target_and_a_changed_answer_moves_the_traffic() {
    let dns = Dns::start().await;
    let (port, ups) = upstreams().await;
    dns.set(NAME, &[ip(2), ip(3)]);
    let gw = Gateway::start(&config(&dns, port));
    let c = Client::new();

    // Both addresses are targets (round robin: alternately).
    assert_eq!(send(&c, &gw, 10).await, [200; 10]);
    assert_eq!(counts(&ups), [5, 5, 0]);
    assert_eq!(pool_metrics(&gw).await, (2.0, 0.0));

    // 127.0.0.3 is replaced by 127.0.0.4: within the TTL (1 s) the new target gets traffic…
    dns.set(NAME, &[ip(2), ip(4)]);
    let moved = eventually(WAIT, || async {
        send(&c, &gw, 1).await == [200] && ups[2].count() > 0
    })
    .await;
    assert!(moved, "the new address never got traffic:\n{}", gw.stderr());
    // …and the old one none.
    let before = counts(&ups);
    assert_eq!(send(&c, &gw, 10).await, [200; 10]);
    let after = counts(&ups);
    assert_eq!(
        after[1], before[1],
        "the removed address still gets traffic"
    );
    assert_eq!(
        (after[0] - before[0], after[2] - before[2]),
        (5, 5),
        "{before:?} → {after:?}"
    );
    assert_eq!(pool_metrics(&gw).await, (2.0, 0.0));
    assert!(
        gw.stderr().contains("upstream targets changed"),
        "{}",
        gw.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_stops_resolving_keeps_its_last_targets() {
    let dns = Dns::start().await;
    let (port, ups) = upstreams().await;
    dns.set(NAME, &[ip(2)]);
    let gw = Gateway::start(&config(&dns, port));
    let c = Client::new();
    assert_eq!(send(&c, &gw, 3).await, [200; 3]);

    // No answer at all (timeouts): the last addresses stay, logged once, counted each time.
    dns.set_answering(false);
    let reported = eventually(WAIT, || async { pool_metrics(&gw).await.1 >= 2.0 }).await;
    assert!(reported, "{}", gw.stderr());
    let log = gw.stderr();
    assert_eq!(
        log.matches("upstream name does not resolve; keeping its last addresses")
            .count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("name=api.test") && log.contains("kept=1"),
        "{log}"
    );
    assert_eq!(send(&c, &gw, 3).await, [200; 3]);
    assert_eq!(pool_metrics(&gw).await.0, 1.0);

    // NXDOMAIN: the same.
    dns.remove(NAME);
    dns.set_answering(true);
    let failures = pool_metrics(&gw).await.1;
    let counted = eventually(WAIT, || async {
        pool_metrics(&gw).await.1 >= failures + 2.0
    })
    .await;
    assert!(counted, "{}", gw.stderr());
    assert_eq!(send(&c, &gw, 3).await, [200; 3]);
    assert_eq!(counts(&ups), [9, 0, 0]);

    // It resolves again, to another address: logged, and the traffic follows.
    dns.set(NAME, &[ip(3)]);
    let back = eventually(WAIT, || async {
        gw.stderr().contains("upstream name resolves again")
            && send(&c, &gw, 1).await == [200]
            && ups[1].count() > 0
    })
    .await;
    assert!(back, "{}", gw.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_unresolvable_at_start_serves_502_until_it_resolves() {
    let dns = Dns::start().await;
    let (port, ups) = upstreams().await;
    // Not in the zone: NXDOMAIN. The gateway still starts.
    let gw = Gateway::start(&config(&dns, port));
    let c = Client::new();
    let r = c.get(&gw.url("/")).await;
    assert_eq!(r.status, 502);
    assert!(
        r.text().contains("no upstream target available"),
        "{}",
        r.text()
    );
    assert_eq!(pool_metrics(&gw).await.0, 0.0);
    assert!(pool_metrics(&gw).await.1 >= 1.0);
    assert!(
        gw.stderr()
            .contains("upstream name does not resolve; keeping its last addresses"),
        "{}",
        gw.stderr()
    );

    dns.set(NAME, &[ip(4)]);
    let served = eventually(WAIT, || async { send(&c, &gw, 1).await == [200] }).await;
    assert!(served, "{}", gw.stderr());
    assert_eq!(counts(&ups), [0, 0, 1]);
    assert_eq!(pool_metrics(&gw).await.0, 1.0);
}

#[test]
fn bad_target_names_are_config_errors_with_positions() {
    let dir = Gateway::tempdir();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:0\nroutes: [{upstream: u}]\nupstreams:\n  u: {targets: [api.test, 'bad_name:80', 'api.test:99999']}\n",
    )
    .unwrap();
    let (code, _, err) = run_fairgate(&["check", "--gateway", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    for line in [
        "gateway.yaml:4:17: upstreams.u.targets[0]: `api.test` has no port: write it as `api.test:PORT`",
        "gateway.yaml:4:27: upstreams.u.targets[1]: `bad_name:80`: `bad_name` is not a host name: only letters, digits, hyphens and dots may be used",
        "gateway.yaml:4:42: upstreams.u.targets[2]: `api.test:99999`: `99999` is not a port (1-65535)",
    ] {
        assert!(err.contains(line), "{line}\n{err}");
    }
    let (code, out, err) = run_fairgate(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(!err.contains("fairgate listening"), "{err}");
}

/// Health checks probe the targets of the current set: a new address from a changed
/// answer is probed, a removed one no longer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_follow_the_current_targets() {
    let dns = Dns::start().await;
    let (port, ups) = upstreams().await;
    dns.set(NAME, &[ip(2), ip(3)]);
    let config = config(&dns, port).replace(
        "balance: round_robin}",
        "balance: round_robin, health_check: {interval: 100ms, path: /hc, timeout: 1s}}",
    );
    assert!(config.contains("path: /hc"), "{config}");
    let gw = Gateway::start(&config);
    let probes = |up: &Upstream| up.requests().iter().filter(|r| r.uri == "/hc").count();

    let probed = eventually(WAIT, || async { probes(&ups[1]) > 0 }).await;
    assert!(probed, "127.0.0.3 was never probed:\n{}", gw.stderr());
    dns.set(NAME, &[ip(2), ip(4)]);
    let probed = eventually(WAIT, || async { probes(&ups[2]) > 0 }).await;
    assert!(probed, "the new address was never probed:\n{}", gw.stderr());
    // The round that probed 127.0.0.4 first already had the new set, and rounds run one
    // after the other: 127.0.0.3 is probed no more.
    let removed = probes(&ups[1]);
    let seen = probes(&ups[2]);
    let more = eventually(WAIT, || async { probes(&ups[2]) >= seen + 3 }).await;
    assert!(more, "{}", gw.stderr());
    assert_eq!(probes(&ups[1]), removed, "a removed target is still probed");
}
