//! Fixed quotas (issue 17, item 2): a plan or an override marked `fixed` is a cost control,
//! never admitted past on spare capacity, while other clients of the same service borrow.

use fairgate_tests::{Client, Gateway, Upstream};

fn config(upstream: &Upstream) -> String {
    format!(
        "listen: 127.0.0.1:0
routes: [{{upstream: u}}]
upstreams:
  u: {{targets: ['{}']}}
policy:
  version: 1
  identify: {{client_key: [{{header: x-api-key}}]}}
  plans:
    free: {{bandwidths: ['1/min burst 1']}}
    metered: {{bandwidths: ['1/min burst 1'], fixed: true}}
  default_plan: free
  clients:
    capped: {{fixed: true}}
    billed: {{plan: metered}}
  shedding: {{limit: 100}}
  burst_sharing: {{enabled: true}}
",
        upstream.addr
    )
}

async fn twice(c: &Client, gw: &Gateway, key: &str) -> (u16, u16) {
    let url = gw.url("/x");
    let headers = [("x-api-key", key)];
    let a = c.get_with(&url, &headers).await.status.as_u16();
    let b = c.get_with(&url, &headers).await.status.as_u16();
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_quotas_are_never_borrowed_past() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&config(&up));
    let c = Client::new();
    // The service is idle: a `free` client over its quota borrows ...
    assert_eq!(twice(&c, &gw, "someone").await, (200, 200));
    // ... a client on the fixed plan does not, nor one whose override says `fixed`.
    assert_eq!(twice(&c, &gw, "billed").await, (200, 429));
    assert_eq!(twice(&c, &gw, "capped").await, (200, 429));
    assert_eq!(up.count(), 4);
}
