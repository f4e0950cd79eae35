//! `/proc/<pid>` sampling for memory, descriptor and CPU bounds (Linux).
//!
//! [`sample`] reads one [`ProcSample`]: RSS and its high-water mark from
//! `/proc/<pid>/status`, the open descriptor count from `/proc/<pid>/fd`, user + system
//! CPU seconds from `/proc/<pid>/stat`, and the thread count. [`Sampler`] takes one every
//! interval (1 s in the scenarios) on a background thread until stopped, and returns the
//! series with each sample's offset from the start. [`unacked_bytes`] reads a TCP
//! connection's send queue from `/proc/net/tcp{,6}`, so a test can wait until the peer has
//! acknowledged what was written (e.g. before resetting the connection) instead of sleeping.
//!
//! Elsewhere than Linux every reading is `None`, so tests that need it should say so.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// Resident set size, bytes (`VmRSS`).
    pub rss: u64,
    /// Peak resident set size, bytes (`VmHWM`).
    pub hwm: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Threads.
    pub threads: u64,
}

/// Bytes in a MiB, for reports.
pub const MIB: u64 = 1024 * 1024;

/// Reads `pid`'s memory, descriptors, CPU and threads; `None` when the process is gone or
/// `/proc` is unavailable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    let rss = kib("VmRSS:")? * 1024;
    let hwm = kib("VmHWM:").map_or(rss, |k| k * 1024);
    let threads = kib("Threads:").unwrap_or(0);
    let fds = fd_count(pid).unwrap_or(0);
    let cpu_seconds = cpu_seconds(pid).unwrap_or(0.0);
    Some(ProcSample {
        rss,
        hwm,
        fds,
        cpu_seconds,
        threads,
    })
}

/// `pid`'s resident set size in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    sample(pid).map(|s| s.rss)
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// User + system CPU seconds of `pid`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks() as f64)
}

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 when that cannot run).
pub fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// A sample and when it was taken, from the sampler's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timed {
    /// Offset from [`Sampler::start`].
    pub at: Duration,
    /// The reading.
    pub sample: ProcSample,
}

/// Samples one process at a fixed interval on a background thread.
#[derive(Debug)]
pub struct Sampler {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    series: Arc<Mutex<Vec<Timed>>>,
}

impl Sampler {
    /// Starts sampling `pid` now and then every `interval`, until [`Sampler::stop`] or the
    /// process is gone.
    pub fn start(pid: u32, interval: Duration) -> Sampler {
        let (tx, rx) = mpsc::channel::<()>();
        let series = Arc::new(Mutex::new(Vec::new()));
        let out = series.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            loop {
                let Some(sample) = self::sample(pid) else {
                    return;
                };
                out.lock().unwrap().push(Timed {
                    at: started.elapsed(),
                    sample,
                });
                // The stop signal (or the sender dropping) ends the wait early.
                match rx.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        });
        Sampler {
            stop: Some(tx),
            thread: Some(thread),
            series,
        }
    }

    /// The series so far.
    pub fn series(&self) -> Vec<Timed> {
        self.series.lock().unwrap().clone()
    }

    /// Stops sampling and returns the whole series.
    pub fn stop(mut self) -> Vec<Timed> {
        self.halt();
        self.series()
    }

    fn halt(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The highest RSS of a series (0 when empty).
pub fn max_rss(series: &[Timed]) -> u64 {
    series.iter().map(|t| t.sample.rss).max().unwrap_or(0)
}

/// Least-squares slope of RSS over time in the samples at or after `from`, bytes per second
/// (0 with fewer than two samples).
pub fn rss_slope(series: &[Timed], from: Duration) -> f64 {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .filter(|t| t.at >= from)
        .map(|t| (t.at.as_secs_f64(), t.sample.rss as f64))
        .collect();
    if pts.len() < 2 {
        return 0.0;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// Bytes written on the TCP connection `local` → `peer` that the peer has not acknowledged
/// yet (sent or not: `/proc/net/tcp`'s `tx_queue`); `None` when no such connection is listed.
pub fn unacked_bytes(local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    let (table, want_local, want_peer) = match (local, peer) {
        (SocketAddr::V4(l), SocketAddr::V4(p)) => ("/proc/net/tcp", hex_v4(l), hex_v4(p)),
        (SocketAddr::V6(l), SocketAddr::V6(p)) => ("/proc/net/tcp6", hex_v6(l), hex_v6(p)),
        _ => return None,
    };
    let text = std::fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace().skip(1);
        let (l, p, _state, queues) = (cols.next()?, cols.next()?, cols.next()?, cols.next()?);
        if !l.eq_ignore_ascii_case(&want_local) || !p.eq_ignore_ascii_case(&want_peer) {
            return None;
        }
        u64::from_str_radix(queues.split(':').next()?, 16).ok()
    })
}

/// Waits (polling, real time) until everything written on `local` → `peer` has been
/// acknowledged by the peer, at most `timeout`; returns whether it was.
pub async fn wait_acked(local: SocketAddr, peer: SocketAddr, timeout: Duration) -> bool {
    crate::eventually(timeout, || async { unacked_bytes(local, peer) == Some(0) }).await
}

/// `/proc/net/tcp`'s form of an IPv4 socket address: the address as a native-endian `u32`
/// in hex, a colon, the port in hex.
fn hex_v4(a: std::net::SocketAddrV4) -> String {
    format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(a.ip().octets()),
        a.port()
    )
}

/// `/proc/net/tcp6`'s form: the address as four native-endian `u32` words in hex.
fn hex_v6(a: std::net::SocketAddrV6) -> String {
    let o = a.ip().octets();
    let words: String = o
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    format!("{words}:{:04X}", a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let me = std::process::id();
        let s = sample(me).expect("/proc of this process");
        assert!(s.rss > 0 && s.hwm >= s.rss, "{s:?}");
        assert!(s.fds >= 3, "{s:?}");
        assert!(s.threads >= 1, "{s:?}");
        assert!(s.cpu_seconds >= 0.0);
        assert!(sample(u32::MAX).is_none());
    }

    #[test]
    fn sampler_takes_a_first_sample_at_once_and_stops() {
        let s = Sampler::start(std::process::id(), Duration::from_secs(3600));
        let ok = (0..500).any(|_| {
            if s.series().is_empty() {
                std::thread::sleep(Duration::from_millis(10));
                false
            } else {
                true
            }
        });
        assert!(ok, "no first sample");
        let series = s.stop();
        assert_eq!(series.len(), 1);
        assert!(max_rss(&series) > 0);
    }

    #[test]
    fn slope_is_least_squares() {
        let mk = |at: u64, rss: u64| Timed {
            at: Duration::from_secs(at),
            sample: ProcSample {
                rss,
                hwm: rss,
                fds: 0,
                cpu_seconds: 0.0,
                threads: 1,
            },
        };
        let series = [mk(0, 100), mk(1, 200), mk(2, 300), mk(3, 400)];
        assert!((rss_slope(&series, Duration::ZERO) - 100.0).abs() < 1e-9);
        assert!((rss_slope(&series, Duration::from_secs(3)) - 0.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn a_loopback_connection_is_found_and_its_writes_are_acknowledged() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_server, _) = listener.accept().await.unwrap();
        let (local, peer) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        client.write_all(&[7u8; 1000]).await.unwrap();
        assert!(wait_acked(local, peer, crate::DEADLINE).await);
        assert_eq!(unacked_bytes(local, peer), Some(0));
        // Not a connection of ours: not listed.
        assert_eq!(unacked_bytes(peer, peer), None);
    }
}
