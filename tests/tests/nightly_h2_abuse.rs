//! P5 — HTTP/2 abuse, nightly form (SCENARIOS.md §2.5: 6 × 20 s): run by
//! `scripts/nightly.sh`, not by `.ci/run`.
//!
//! Each attack of the CI form (`h2_abuse.rs`, whose frame writer and reader this file reuses,
//! and whose short scenarios therefore run here too) is repeated on fresh connections for
//! 20 s while legitimate h2c requests run on their own connection. Pass: legitimate success
//! ≥ 99 %, ≤ 1 gateway CPU-second per attack connection, RSS rise < 64 MiB. The legitimate
//! load is the harness's h2c client, not `h2load` (not installed on the build machine; see
//! `docs/reliability/h2.md`).
#![cfg(feature = "nightly")]

#[path = "h2_abuse.rs"]
mod ci;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ci::{
    config, Block, Cost, Frames, Legit, Raw, Seen, CANCEL, END_STREAM, REFUSED_STREAM, SERIAL,
};
use fairgate_tests::{Gateway, Upstream};

const RUN: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy)]
enum Attack {
    RapidReset,
    Continuation,
    Settings,
    Ping,
    Streams,
    ZeroWindow,
}

/// One attack connection, run to its end (GOAWAY, close, or every frame answered).
/// Returns the connection when it must be kept open (zero-window stalls).
async fn attack(kind: Attack, addr: SocketAddr) -> Option<Raw> {
    let wait = Duration::from_secs(10);
    match kind {
        Attack::RapidReset => {
            let mut raw = Raw::open(addr, &[]).await;
            let mut f = Frames::default();
            for i in 0..10_000u32 {
                f = f.get(1 + 2 * i, "/rr").rst(1 + 2 * i, CANCEL);
            }
            let _ = raw.send(&f.0).await;
            assert!(raw.wait(wait, Seen::ended).await, "rapid reset: not ended");
            None
        }
        Attack::Continuation => {
            let mut raw = Raw::open(addr, &[]).await;
            let _ = raw
                .send(
                    &Frames::default()
                        .headers(1, END_STREAM, &Block::get("/c").0)
                        .0,
                )
                .await;
            let mut piece = Block::default();
            while piece.0.len() < 4000 {
                piece = piece.literal("x-flood", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
            }
            let mut batch = Frames::default();
            for _ in 0..64 {
                batch = batch.continuation(1, 0, &piece.0);
            }
            for _ in 0..256 {
                if raw.send(&batch.0).await.is_err() || raw.seen().ended() {
                    break;
                }
            }
            assert!(raw.wait(wait, Seen::ended).await, "continuation: not ended");
            None
        }
        Attack::Settings | Attack::Ping => {
            let mut raw = Raw::open(addr, &[]).await;
            let mut batch = Frames::default();
            for i in 0..1000u64 {
                batch = match kind {
                    Attack::Settings => batch.settings(&[(0x4, 65_535)]),
                    _ => batch.ping(i),
                };
            }
            let mut frames = 0;
            for _ in 0..100 {
                if raw.send(&batch.0).await.is_err() {
                    break;
                }
                frames += 1000;
            }
            let settings = matches!(kind, Attack::Settings);
            assert!(
                raw.wait(wait, |s| s.ended()
                    || if settings {
                        s.settings_acks >= frames
                    } else {
                        s.pings_acked >= frames
                    })
                .await,
                "{kind:?}: neither answered nor ended"
            );
            None
        }
        Attack::Streams => {
            let mut raw = Raw::open(addr, &[]).await;
            let mut f = Frames::default();
            for i in 0..1000u32 {
                f = f.get(1 + 2 * i, "/s?delay_ms=200");
            }
            raw.send(&f.0).await.expect("streams");
            assert!(
                raw.wait(wait, |s| s.ended()
                    || s.responses.len() + s.resets.len() >= 1000)
                    .await,
                "streams: not all answered"
            );
            assert!(raw.seen().resets_with(REFUSED_STREAM) >= 900);
            None
        }
        Attack::ZeroWindow => {
            let mut raw = Raw::open(addr, &[(0x4, 0)]).await;
            raw.send(&Frames::default().get(1, "/bytes/8388608").0)
                .await
                .expect("send");
            assert!(
                raw.wait(wait, |s| s.response(1).is_some()).await,
                "zero window: no head"
            );
            raw.pause_reading();
            Some(raw)
        }
    }
}

async fn scenario(kind: Attack) {
    let _serial = SERIAL.lock().await;
    let up = Upstream::start_counting().await;
    let gw = Gateway::start(&config(&up, ""));
    let legit = Legit::start(&gw);
    legit.warm(3).await;
    let cost = Cost::start(&gw);
    let started = Instant::now();
    let mut connections = 0usize;
    let mut stalled = Vec::new();
    while started.elapsed() < RUN {
        if let Some(raw) = attack(kind, gw.data).await {
            stalled.push(raw);
        }
        connections += 1;
        // Zero-window stalls stay open (no keep-alive configured): 90 of them, below the
        // gateway's `max_connections_per_source` (default 100, shared with the legitimate
        // client's connection), which closes any more at accept.
        if stalled.len() >= 90 {
            break;
        }
    }
    if !stalled.is_empty() {
        // The stalls are held for the rest of the run while RSS is sampled.
        tokio::time::sleep(RUN.saturating_sub(started.elapsed())).await;
    }
    let elapsed = started.elapsed();
    let (cpu, rise) = cost.finish(&format!("{kind:?} nightly"), connections as f64);
    drop(stalled);
    let (ok, sent) = legit.finish(&format!("{kind:?} nightly")).await;
    println!(
        "{kind:?}: {connections} attack connections in {elapsed:.1?}, gateway cpu {cpu:.2}s \
         ({:.4}s per connection), rss +{:.1} MiB, upstream saw {} requests, legit {ok}/{sent}",
        cpu / connections as f64,
        rise as f64 / (1 << 20) as f64,
        up.count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_rapid_reset_20s() {
    scenario(Attack::RapidReset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_continuation_flood_20s() {
    scenario(Attack::Continuation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_settings_flood_20s() {
    scenario(Attack::Settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_ping_flood_20s() {
    scenario(Attack::Ping).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_streams_over_max_20s() {
    scenario(Attack::Streams).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_zero_window_stalls_20s() {
    scenario(Attack::ZeroWindow).await;
}
