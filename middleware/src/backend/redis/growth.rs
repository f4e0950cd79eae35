//! Adaptive growth for the fleet: each gateway reports its clients' admitted cost every
//! second ([`GROWTH_REPORT_EVERY`]); one script per client adds it to the client's count of
//! the current window on Redis time and takes a step when the window before it reached the
//! threshold, so the fleet's traffic (not one gateway's share) decides, once. The client's
//! steps live in its growth hash (`<prefix>:{<client>}:growth`, no expiry once it grew), so
//! they survive every gateway's restart; a gateway learns them from the reply to its next
//! report.

use std::time::Duration;

use super::conn::{exchange_budget, key_scoped};
use super::Fleet;
use crate::backend::GrowthReport;

/// How often a gateway reports its clients' admitted cost.
pub(crate) const GROWTH_REPORT_EVERY: Duration = Duration::from_secs(1);

impl Fleet {
    pub(super) fn growth_key(&self, client: &str) -> String {
        format!("{}:{{{client}}}:growth", self.prefix)
    }

    /// Reports `reports` (one script per client, concurrently, under the exchange budget).
    pub(super) async fn report_growth(
        &self,
        reports: &[GrowthReport],
    ) -> Vec<Option<(u32, Option<f64>)>> {
        let mut out = vec![None; reports.len()];
        if reports.is_empty() || !self.breaker.allow() {
            return out;
        }
        let calls = reports.iter().map(|r| {
            let g = &r.growth;
            let mut inv = self.growth.prepare_invoke();
            inv.key(self.growth_key(&r.client))
                .arg(r.cost)
                .arg((g.window_ns / 1_000_000).max(1))
                .arg(g.threshold)
                .arg(r.t_max)
                .arg(g.max_steps)
                .arg(g.rise_steps)
                .arg((g.within_ns / 1_000_000).max(1))
                .arg(u8::from(r.shed));
            let mut conn = self.conn.clone();
            async move { inv.invoke_async::<(i64, i64)>(&mut conn).await }
        });
        let all = futures_util::future::join_all(calls);
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let budget = exchange_budget(self.timeout);
        let Ok(results) = tokio::time::timeout(budget, all).await else {
            self.failed(&format!("no answer within {budget:?}"), 1);
            return out;
        };
        let mut failed = None;
        for ((slot, r), res) in out.iter_mut().zip(reports).zip(results) {
            match res {
                Ok((steps, stepped)) => {
                    *slot = Some((
                        u32::try_from(steps.max(0)).unwrap_or(u32::MAX),
                        (stepped >= 0).then(|| stepped as f64 / 1e6),
                    ));
                }
                Err(e) if key_scoped(&e) => self.key_failed(&r.client, &e),
                Err(e) => failed = Some(e.to_string()),
            }
        }
        match failed {
            Some(e) => self.failed(&e, 1),
            None => self.succeeded(),
        }
        out
    }

    /// Deletes `client`'s growth hash; answers the steps it had.
    pub(super) async fn reset_growth(&self, client: &str) -> Option<u32> {
        let mut conn = self.conn.clone();
        let mut inv = self.growth.prepare_invoke();
        inv.key(self.growth_key(client)).arg("reset");
        let (steps, _) = self
            .call(Some(client), inv.invoke_async::<(i64, i64)>(&mut conn))
            .await?;
        Some(u32::try_from(steps.max(0)).unwrap_or(u32::MAX))
    }
}
