use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn limits(max: u32) -> ConnLimits {
    let limits = Limits {
        max_connections_per_source: NonZeroU32::new(max).expect("non-zero"),
        ..Limits::default()
    };
    ConnLimits::new(&limits, ClientCounters::default())
}

// === SourceTable ===

#[test]
fn source_key_is_the_ipv4_address_or_the_ipv6_slash_64() {
    assert_eq!(source_key(ip("127.0.0.5")), ip("127.0.0.5"));
    assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
    assert_eq!(
        source_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
        source_key(ip("2001:db8:1:2::7"))
    );
    assert_ne!(
        source_key(ip("2001:db8:1:3::1")),
        source_key(ip("2001:db8:1:2::1"))
    );
    let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
    assert_eq!(source_key(mapped), ip("192.0.2.7"));
    assert_eq!(source_key(IpAddr::V6(Ipv6Addr::LOCALHOST)), ip("::"));
}

#[test]
fn the_cap_refuses_one_more_and_a_closed_slot_is_reusable() {
    let table = SourceTable::new(NonZeroU32::new(3).unwrap());
    let a = ip("127.0.0.5");
    let mut slots: Vec<_> = (0..3)
        .map(|_| table.try_open(a).expect("under the cap"))
        .collect();
    assert!(table.try_open(a).is_none(), "connection #4 of a cap of 3");
    assert_eq!(table.open(a), 3);
    // Another source is not affected.
    let other = table.try_open(ip("127.0.0.6")).expect("another source");
    slots.pop();
    assert_eq!(table.open(a), 2);
    slots.push(table.try_open(a).expect("a slot was freed"));
    assert!(table.try_open(a).is_none());
    drop(other);
    assert_eq!(table.sources(), 1);
}

#[test]
fn the_table_forgets_sources_without_connections() {
    let table = SourceTable::new(NonZeroU32::new(2).unwrap());
    let slots: Vec<_> = (0..1000u32)
        .map(|i| {
            let [_, b, c, d] = i.to_be_bytes();
            table
                .try_open(IpAddr::V4(Ipv4Addr::new(10, b, c, d)))
                .expect("one per source")
        })
        .collect();
    assert_eq!(table.sources(), 1000);
    // A refusal leaves no entry behind either.
    let full = ip("127.0.0.9");
    let _held: Vec<_> = (0..2).map(|_| table.try_open(full).unwrap()).collect();
    assert!(table.try_open(full).is_none());
    assert_eq!(table.sources(), 1001);
    drop(slots);
    assert_eq!(table.sources(), 1);
    drop(_held);
    assert_eq!(table.sources(), 0);
}

#[test]
fn ipv6_sources_share_a_slash_64() {
    let table = SourceTable::new(NonZeroU32::new(2).unwrap());
    let _a = table.try_open(ip("2001:db8::1")).unwrap();
    let _b = table.try_open(ip("2001:db8::2")).unwrap();
    assert!(table.try_open(ip("2001:db8::ffff")).is_none());
    assert!(table.try_open(ip("2001:db8:0:1::1")).is_some());
}

#[tokio::test(start_paused = true)]
async fn refusals_are_counted_and_share_one_table_across_clones() {
    let limits = limits(2);
    let clone = limits.clone();
    let peer: SocketAddr = "127.0.0.5:4000".parse().unwrap();
    let a = limits.admit(peer).expect("1");
    let _b = clone.admit(peer).expect("2");
    assert!(limits.admit(peer).is_none());
    assert!(clone.admit(peer).is_none());
    assert_eq!(limits.inner.counters.refused_per_source.get(), 2);
    drop(a);
    assert!(clone.admit(peer).is_some());
}

#[tokio::test(start_paused = true)]
async fn refusal_log_lets_one_line_a_second_through() {
    let log = LogEvery::new(Duration::from_secs(1));
    assert_eq!(log.ready(), Some(0));
    assert_eq!(log.ready(), None);
    assert_eq!(log.ready(), None);
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(log.ready(), None);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(log.ready(), Some(3), "three held back");
    assert_eq!(log.ready(), None);
}

// === ClientIo ===

fn client_io(
    server: tokio::io::DuplexStream,
    counter: &Counter,
) -> ClientIo<tokio::io::DuplexStream> {
    ClientIo::new(
        server,
        Duration::from_secs(5),
        Duration::from_secs(10),
        counter.clone(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_write_nobody_reads_fails_at_the_write_timeout() {
    let (_client, server) = tokio::io::duplex(64);
    let counter = Counter::default();
    let mut io = client_io(server, &counter);
    let start = Instant::now();
    let err = io.write_all(&[7u8; 1000]).await.expect_err("stalled");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(counter.get(), 1);
    // Dead for good, counted once.
    assert!(io.write_all(b"x").await.is_err());
    assert!(io.flush().await.is_err());
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn any_write_progress_disarms_the_write_deadline() {
    let (mut client, server) = tokio::io::duplex(64);
    let counter = Counter::default();
    let mut io = client_io(server, &counter);
    // A slow reader: 64 bytes every 6 s, never 10 s without progress.
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut buf = [0u8; 64];
        while got < 320 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            got += client.read(&mut buf).await.expect("read");
        }
        got
    });
    let start = Instant::now();
    io.write_all(&[1u8; 320]).await.expect("never stalled 10 s");
    assert!(start.elapsed() >= Duration::from_secs(24));
    assert_eq!(reader.await.unwrap(), 320);
    assert_eq!(counter.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_fails_its_first_read_at_the_header_timeout() {
    let (_client, server) = tokio::io::duplex(64);
    let counter = Counter::default();
    let mut io = client_io(server, &counter);
    let start = Instant::now();
    let err = io.read_u8().await.expect_err("nothing sent");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(counter.get(), 0, "not a slow reader");
}

#[tokio::test(start_paused = true)]
async fn half_an_http2_preface_fails_at_the_header_timeout() {
    let (mut client, server) = tokio::io::duplex(64);
    let counter = Counter::default();
    let mut io = client_io(server, &counter);
    client.write_all(b"PRI * HTTP/2").await.unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(io.read(&mut buf).await.unwrap(), 12);
    let start = Instant::now();
    let err = io.read(&mut buf).await.expect_err("the rest never comes");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn once_the_protocol_is_chosen_reads_wait_as_long_as_it_takes() {
    for first in [&b"G"[..], &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]] {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = client_io(server, &Counter::default());
        client.write_all(first).await.unwrap();
        let mut buf = vec![0u8; first.len()];
        io.read_exact(&mut buf).await.unwrap();
        // hyper's own timers take over from here: no deadline of ours.
        let idle = tokio::time::timeout(Duration::from_secs(60), io.read_u8()).await;
        assert!(idle.is_err(), "still waiting after 60 s");
        client.write_all(b"x").await.unwrap();
        assert_eq!(io.read_u8().await.unwrap(), b'x');
        io.write_all(b"ok")
            .await
            .expect("the write deadline never armed");
    }
}

// === MinRate ===

/// A request body fed by a channel.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Sends `chunks` chunks of `size` bytes, one every `every` (the first after `every`).
fn trickle(size: usize, every: Duration, chunks: usize) -> ChanBody {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for _ in 0..chunks {
            tokio::time::sleep(every).await;
            if tx.send(Bytes::from(vec![b'x'; size])).await.is_err() {
                return;
            }
        }
    });
    ChanBody(rx)
}

fn rate(bytes: u64, per_s: u64) -> BodyMinRate {
    BodyMinRate {
        bytes,
        per: Duration::from_secs(per_s),
    }
}

#[tokio::test(start_paused = true)]
async fn a_trickling_body_fails_when_its_window_closes_short() {
    let counter = Counter::default();
    // 10 B/s against 100 B per 5 s.
    let body = MinRate::new(
        trickle(10, Duration::from_secs(1), 1000),
        rate(100, 5),
        counter.clone(),
    );
    tokio::pin!(body);
    let start = Instant::now();
    let mut received = 0;
    let err = loop {
        match body.as_mut().frame().await {
            Some(Ok(f)) => received += f.into_data().map_or(0, |d| d.len()),
            Some(Err(e)) => break e,
            None => panic!("a failed body must not end as complete"),
        }
    };
    assert!(is_slow_body(&*err), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert!(received < 100, "{received}");
    assert_eq!(counter.get(), 1);
    // It keeps failing; it never ends as if complete.
    assert!(matches!(body.as_mut().frame().await, Some(Err(_))));
    assert!(!body.is_end_stream());
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_starts_fails_after_one_window() {
    let counter = Counter::default();
    let (_tx, rx) = mpsc::channel::<Bytes>(1);
    let body = MinRate::new(ChanBody(rx), rate(1, 3), counter.clone());
    let start = Instant::now();
    let err = body.collect().await.expect_err("no byte in 3 s");
    assert!(is_slow_body(&*err));
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(counter.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_body_at_the_minimum_rate_passes() {
    let counter = Counter::default();
    // 30 B/s against 100 B per 5 s, 20 s long; each window is met after 4 s.
    let body = MinRate::new(
        trickle(30, Duration::from_secs(1), 20),
        rate(100, 5),
        counter.clone(),
    );
    let collected = body.collect().await.expect("fast enough").to_bytes();
    assert_eq!(collected.len(), 600);
    assert_eq!(counter.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn time_the_gateway_does_not_wait_is_not_counted() {
    let counter = Counter::default();
    // All 50 bytes are there at once; the reader only comes back after 60 s.
    let (tx, rx) = mpsc::channel(8);
    tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
    let body = MinRate::new(ChanBody(rx), rate(100, 5), counter.clone());
    tokio::pin!(body);
    assert_eq!(
        body.as_mut()
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len(),
        10
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
    drop(tx);
    assert!(body.as_mut().frame().await.unwrap().is_ok());
    assert!(body.as_mut().frame().await.is_none());
    assert_eq!(counter.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_unlimited_body_waits_as_long_as_it_takes() {
    let body = MinRate::unlimited(trickle(1, Duration::from_secs(100), 3));
    let start = Instant::now();
    let collected = body.collect().await.expect("no minimum").to_bytes();
    assert_eq!(collected.len(), 3);
    assert_eq!(start.elapsed(), Duration::from_secs(300));
}

#[test]
fn slow_body_is_found_in_an_error_chain() {
    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] SlowBody);
    let e = Wrapper(SlowBody {
        bytes: 1,
        per: Duration::from_secs(1),
    });
    assert!(is_slow_body(&e));
    let other = io::Error::other("x");
    assert!(!is_slow_body(&other));
}
