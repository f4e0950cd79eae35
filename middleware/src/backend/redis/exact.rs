//! `exact` mode: the request's one all-or-nothing remote check (rule buckets, quota
//! bandwidths, concurrency lease).

use fairgate_policies::compiled::CompiledBandwidth;

use super::lease::LEASE_TTL_MS;
use super::Fleet;
use crate::backend::{RuleBucket, Verdict};

impl Fleet {
    /// Exact mode: one script over every rule bucket (cost 1 each) and bandwidth (cost
    /// `cost`), plus a concurrency lease of id `lease` when `concurrency` is set. The
    /// verdict's index counts the rule buckets first. [`Verdict::Unavailable`] on failure or
    /// timeout.
    pub(crate) async fn exact(
        &self,
        client: &str,
        rules: &[RuleBucket],
        bandwidths: &[CompiledBandwidth],
        cost: u64,
        concurrency: Option<(u32, u64)>,
    ) -> Verdict {
        let now = self.clock.now();
        let mut inv = self.exact.prepare_invoke();
        for r in rules {
            inv.key(self.key(&r.key, "t", &r.bandwidth));
        }
        for bw in bandwidths {
            inv.key(self.bandwidth_key(client, bw, now));
        }
        inv.key(self.leases_key(client));
        inv.arg(rules.len() + bandwidths.len());
        for r in rules {
            inv.arg(r.bandwidth.t_ns).arg(r.bandwidth.c_ns).arg(1u64);
        }
        for bw in bandwidths {
            // A calendar period: T < 0 (see `t_arg`), C its quota.
            let c = if bw.period.is_some() {
                bw.burst
            } else {
                bw.c_ns
            };
            inv.arg(self.t_arg(bw, now)).arg(c).arg(cost);
        }
        let (limit, lease) = concurrency.unwrap_or((0, 0));
        inv.arg(limit)
            .arg(self.lease_member(lease))
            .arg(LEASE_TTL_MS);
        let mut conn = self.conn.clone();
        let Some(reply): Option<Vec<i64>> =
            self.call(Some(client), inv.invoke_async(&mut conn)).await
        else {
            return Verdict::Unavailable;
        };
        let us =
            |v: Option<&i64>| v.map_or(0, |&v| u64::try_from(v).unwrap_or(0).saturating_mul(1000));
        match reply.first() {
            Some(1) => Verdict::Admit,
            Some(2) => Verdict::Busy,
            Some(0) => {
                let index = reply
                    .get(1)
                    .and_then(|&i| usize::try_from(i).ok())
                    .unwrap_or(1)
                    .saturating_sub(1);
                let period = index
                    .checked_sub(rules.len())
                    .and_then(|i| bandwidths.get(i))
                    .filter(|bw| bw.period.is_some());
                // A period answers its count: its TAT is the period's end plus the count.
                let tat_ahead = match period {
                    Some(bw) => {
                        let end = crate::bucket::bucket_now(bw, now, self.wall.offset());
                        let count = reply.get(3).map_or(0, |&v| u64::try_from(v).unwrap_or(0));
                        end.saturating_sub(now).saturating_add(count)
                    }
                    None => us(reply.get(3)),
                };
                Verdict::Reject {
                    index,
                    wait: us(reply.get(2)).max(1),
                    tat_ahead,
                }
            }
            _ => Verdict::Unavailable,
        }
    }
}
