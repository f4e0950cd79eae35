//! CIDR sets: [`IpSet`] (is this address in any of these networks?) and the crate-private
//! `CidrMap` (which of these networks contain this address?), both as sorted ranges searched
//! by binary search.
//!
//! Why sorted ranges and not a prefix trie: the `ipset` group of `benches/benches/policy.rs`
//! compares this layout with a binary trie over the same networks (IPv4 only, the trie's
//! best case: at most 32 levels). A binary search over sorted starts is a handful of
//! comparisons in one compact array, a trie walk up to 32 (IPv4) or 128 (IPv6) dependent
//! loads. Measured on the (loaded) 2-core dev VM, 64 lookups, over three runs: 0.37–0.6 µs
//! against 0.93–1.35 µs with 10 networks, 1.0–1.6 µs against 1.2–2.2 µs with 10,000. The
//! gap narrows as the array outgrows L1, but the ranges never lost, and they take far less
//! memory (two integers per merged range against a node per prefix bit).
//! Networks either nest or are disjoint, which is what lets [`CidrMap`] report every
//! containing network from one search plus a walk up the nesting chain.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are treated as the IPv4 address they carry,
//! on both sides: networks are folded when built and addresses when looked up.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::units::Cidr;

/// A set of IP networks (IPv4 and IPv6) with a fast [`contains`](IpSet::contains).
///
/// Built once per policy; lookups allocate nothing and take `O(log n)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: Ranges<u32>,
    v6: Ranges<u128>,
}

impl IpSet {
    /// Builds the set from parsed CIDRs.
    pub fn new(cidrs: impl IntoIterator<Item = Cidr>) -> IpSet {
        IpSet::from_nets(cidrs.into_iter().map(|c| c.0))
    }

    /// Builds the set from `ipnet` networks. Host bits are ignored (`10.0.0.1/8` is
    /// `10.0.0.0/8`).
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> IpSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match canonical_net(net) {
                Span::V4(lo, hi) => v4.push((lo, hi)),
                Span::V6(lo, hi) => v6.push((lo, hi)),
            }
        }
        IpSet {
            v4: Ranges::merged(v4),
            v6: Ranges::merged(v6),
        }
    }

    /// True when `ip` is inside one of the networks.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.v4.contains(u32::from(v4)),
            IpAddr::V6(v6) => self.v6.contains(u128::from(v6)),
        }
    }

    /// True when the set holds no network.
    pub fn is_empty(&self) -> bool {
        self.v4.starts.is_empty() && self.v6.starts.is_empty()
    }

    /// Number of disjoint address ranges the networks merged into.
    pub fn range_count(&self) -> usize {
        self.v4.starts.len() + self.v6.starts.len()
    }
}

/// An inclusive address range of one family.
enum Span {
    V4(u32, u32),
    V6(u128, u128),
}

/// Truncates host bits and folds IPv4-mapped IPv6 networks (prefix ≥ 96) to IPv4.
fn canonical_net(net: IpNet) -> Span {
    match net.trunc() {
        IpNet::V4(n) => Span::V4(u32::from(n.network()), u32::from(n.broadcast())),
        IpNet::V6(n) => {
            if let Some(v4) = n.network().to_ipv4_mapped() {
                if n.prefix_len() >= 96 {
                    let len = n.prefix_len() - 96;
                    let lo = u32::from(v4);
                    let hi = lo | host_mask_u32(len);
                    return Span::V4(lo, hi);
                }
            }
            Span::V6(u128::from(n.network()), u128::from(n.broadcast()))
        }
    }
}

fn host_mask_u32(prefix_len: u8) -> u32 {
    u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0)
}

/// Sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ranges<T> {
    starts: Box<[T]>,
    ends: Box<[T]>,
}

impl<T> Default for Ranges<T> {
    fn default() -> Self {
        Ranges {
            starts: Box::new([]),
            ends: Box::new([]),
        }
    }
}

impl<T: Copy + Ord + Addr> Ranges<T> {
    fn merged(mut spans: Vec<(T, T)>) -> Self {
        spans.sort_unstable();
        let mut starts = Vec::with_capacity(spans.len());
        let mut ends: Vec<T> = Vec::with_capacity(spans.len());
        for (lo, hi) in spans {
            if let Some(last) = ends.last_mut() {
                // Overlapping or adjacent: extend the previous range.
                if lo <= last.saturating_inc() {
                    if hi > *last {
                        *last = hi;
                    }
                    continue;
                }
            }
            starts.push(lo);
            ends.push(hi);
        }
        Ranges {
            starts: starts.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
        }
    }

    #[inline]
    fn contains(&self, ip: T) -> bool {
        let i = self.starts.partition_point(|s| *s <= ip);
        i > 0 && ip <= self.ends[i - 1]
    }
}

/// The integer forms of addresses.
pub(crate) trait Addr: Copy + Ord {
    /// `self + 1`, saturating.
    fn saturating_inc(self) -> Self;
}

impl Addr for u32 {
    fn saturating_inc(self) -> Self {
        self.saturating_add(1)
    }
}

impl Addr for u128 {
    fn saturating_inc(self) -> Self {
        self.saturating_add(1)
    }
}

// === CidrMap ===

const NONE: u32 = u32::MAX;

/// Networks mapped to ids (leaf ids of a rule set): reports every id whose networks contain
/// an address.
#[derive(Debug, Default)]
pub(crate) struct CidrMap {
    v4: Table<u32>,
    v6: Table<u128>,
}

/// Distinct networks of one family sorted by (start ascending, end descending), so a network
/// comes after every network that contains it.
#[derive(Debug)]
struct Table<T> {
    starts: Box<[T]>,
    ends: Box<[T]>,
    /// Index of the innermost network strictly containing this one, or `NONE`.
    parent: Box<[u32]>,
    /// `ids[id_offsets[i]..id_offsets[i + 1]]` are the ids of network `i`.
    id_offsets: Box<[u32]>,
    ids: Box<[u32]>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            starts: Box::new([]),
            ends: Box::new([]),
            parent: Box::new([]),
            id_offsets: Box::new([0]),
            ids: Box::new([]),
        }
    }
}

impl CidrMap {
    /// Builds the map from `(network, id)` pairs. The same network may carry several ids.
    pub(crate) fn new(entries: impl IntoIterator<Item = (IpNet, u32)>) -> CidrMap {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, id) in entries {
            match canonical_net(net) {
                Span::V4(lo, hi) => v4.push((lo, hi, id)),
                Span::V6(lo, hi) => v6.push((lo, hi, id)),
            }
        }
        CidrMap {
            v4: Table::new(v4),
            v6: Table::new(v6),
        }
    }

    /// Calls `hit` with the id of every network containing `ip` (an id may repeat when it
    /// was given for nested networks).
    #[inline]
    pub(crate) fn for_each_containing(&self, ip: IpAddr, hit: impl FnMut(u32)) {
        match ip.to_canonical() {
            IpAddr::V4(v4) => self.v4.for_each_containing(u32::from(v4), hit),
            IpAddr::V6(v6) => self.v6.for_each_containing(u128::from(v6), hit),
        }
    }
}

impl<T: Copy + Ord> Table<T> {
    fn new(mut entries: Vec<(T, T, u32)>) -> Self {
        // Start ascending, end descending: containers first, then the same network's ids together.
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let mut starts: Vec<T> = Vec::new();
        let mut ends: Vec<T> = Vec::new();
        let mut parent = Vec::new();
        let mut id_offsets = vec![0u32];
        let mut ids = Vec::new();
        // Stack of indices of the networks enclosing the current position.
        let mut stack: Vec<u32> = Vec::new();
        for (lo, hi, id) in entries {
            let n = starts.len();
            let same = n > 0 && starts[n - 1] == lo && ends[n - 1] == hi;
            if !same {
                // Networks nest or are disjoint: pop those that end before this one starts.
                while let Some(&top) = stack.last() {
                    if ends[top as usize] < lo {
                        stack.pop();
                    } else {
                        break;
                    }
                }
                parent.push(stack.last().copied().unwrap_or(NONE));
                let idx = u32::try_from(n).unwrap_or(NONE);
                stack.push(idx);
                starts.push(lo);
                ends.push(hi);
                id_offsets.push(id_offsets[n]);
            }
            if ids.last() != Some(&id) || !same {
                ids.push(id);
                if let Some(last) = id_offsets.last_mut() {
                    *last += 1;
                }
            }
        }
        Table {
            starts: starts.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
            parent: parent.into_boxed_slice(),
            id_offsets: id_offsets.into_boxed_slice(),
            ids: ids.into_boxed_slice(),
        }
    }

    #[inline]
    fn for_each_containing(&self, ip: T, mut hit: impl FnMut(u32)) {
        let i = self.starts.partition_point(|s| *s <= ip);
        if i == 0 {
            return;
        }
        // The last network starting at or before `ip` is the innermost candidate; if it ends
        // before `ip`, the innermost network containing `ip` is one of its ancestors.
        let mut c = (i - 1) as u32;
        while c != NONE && self.ends[c as usize] < ip {
            c = self.parent[c as usize];
        }
        while c != NONE {
            let (from, to) = (self.id_offsets[c as usize], self.id_offsets[c as usize + 1]);
            for &id in &self.ids[from as usize..to as usize] {
                hit(id);
            }
            c = self.parent[c as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse::<Cidr>().unwrap().0
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipset_contains_v4_v6_and_mapped() {
        let set =
            IpSet::from_nets(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "10.1.0.0/16"].map(net));
        assert!(set.contains(ip("10.255.255.255")));
        assert!(set.contains(ip("10.0.0.0")));
        assert!(!set.contains(ip("11.0.0.0")));
        assert!(!set.contains(ip("9.255.255.255")));
        assert!(set.contains(ip("192.0.2.7")));
        assert!(!set.contains(ip("192.0.2.8")));
        assert!(set.contains(ip("::ffff:192.0.2.7")));
        assert!(set.contains(ip("2001:db8:ffff::1")));
        assert!(!set.contains(ip("2001:db9::")));
        // Nested and adjacent ranges merge.
        assert_eq!(set.range_count(), 3);
        assert!(!set.is_empty());
        assert!(!IpSet::default().contains(ip("10.0.0.1")));
    }

    #[test]
    fn ipset_edges_of_the_address_space() {
        let set = IpSet::from_nets(["0.0.0.0/0", "::/0"].map(net));
        assert!(set.contains(ip("255.255.255.255")));
        assert!(set.contains(ip("0.0.0.0")));
        assert!(set.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        let set = IpSet::from_nets(["255.255.255.255/32", "::ffff:10.0.0.0/104"].map(net));
        assert!(set.contains(ip("255.255.255.255")));
        assert!(set.contains(ip("10.9.9.9")));
        assert!(!set.contains(ip("11.0.0.0")));
    }

    #[test]
    fn cidr_map_reports_every_containing_network() {
        let map = CidrMap::new([
            (net("0.0.0.0/0"), 0),
            (net("10.0.0.0/8"), 1),
            (net("10.1.0.0/16"), 2),
            (net("10.1.0.0/16"), 3),
            (net("10.2.0.0/16"), 4),
            (net("10.1.2.0/24"), 5),
            (net("2001:db8::/32"), 6),
        ]);
        let hits = |s: &str| {
            let mut v = Vec::new();
            map.for_each_containing(ip(s), |id| v.push(id));
            v.sort();
            v
        };
        assert_eq!(hits("10.1.2.3"), vec![0, 1, 2, 3, 5]);
        assert_eq!(hits("10.1.3.3"), vec![0, 1, 2, 3]);
        assert_eq!(hits("10.3.0.0"), vec![0, 1]);
        assert_eq!(hits("10.2.255.255"), vec![0, 1, 4]);
        assert_eq!(hits("11.0.0.0"), vec![0]);
        assert_eq!(hits("2001:db8::1"), vec![6]);
        assert_eq!(hits("2001:db9::1"), Vec::<u32>::new());
        assert_eq!(hits("::ffff:10.1.2.3"), vec![0, 1, 2, 3, 5]);
    }
}
