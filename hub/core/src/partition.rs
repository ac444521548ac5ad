//! The partition map: which partition decides for a SKU (DESIGN §10, `hub/docs/scale-out.md`).
//!
//! A chain's SKUs are split into a fixed number of partitions, chosen when the hub database is
//! created. Every hub must compute the same map, today and after an upgrade, so it is SipHash-1-3
//! with a fixed key over the SKU's bytes, modulo the count: not `std`'s `DefaultHasher`, whose
//! algorithm may change between Rust releases. Changing the count moves most SKUs and is an
//! offline migration.

use std::hash::Hasher;

use serde::{Deserialize, Serialize};
use shelfsync_shared::id::Sku;
use siphasher::sip::SipHasher13;

/// A partition's number, `0..count`.
pub type Partition = u16;

/// The fixed key of the map. Never change it: every stored row's partition depends on it.
const KEY: (u64, u64) = (0x7368_656c_6673_796e, 0x6320_7061_7274_6974);

/// How many partitions a chain's SKUs are split into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct Partitions(u16);

impl Partitions {
    /// The most partitions a database may have: far more than hubs a chain runs, few enough
    /// that every hub can list every lease in one status line each.
    pub const MAX: u16 = 256;
    /// One partition: the whole chain decided in one place (SQLite, and PostgreSQL by default).
    pub const ONE: Partitions = Partitions(1);

    /// `count` partitions, if `1 ..= MAX`.
    pub fn new(count: u16) -> Result<Partitions, String> {
        if (1..=Self::MAX).contains(&count) {
            Ok(Partitions(count))
        } else {
            Err(format!("a partition count must be between 1 and {}, not {count}", Self::MAX))
        }
    }

    /// How many.
    pub fn count(self) -> u16 {
        self.0
    }

    /// Every partition, in order.
    pub fn all(self) -> impl Iterator<Item = Partition> {
        0..self.0
    }

    /// The partition that decides for `sku`.
    pub fn of(self, sku: &Sku) -> Partition {
        if self.0 == 1 {
            return 0;
        }
        let mut h = SipHasher13::new_with_keys(KEY.0, KEY.1);
        h.write(sku.as_str().as_bytes());
        (h.finish() % u64::from(self.0)) as Partition
    }
}

impl TryFrom<u16> for Partitions {
    type Error = String;
    fn try_from(n: u16) -> Result<Self, String> {
        Partitions::new(n)
    }
}

impl From<Partitions> for u16 {
    fn from(p: Partitions) -> u16 {
        p.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku(s: &str) -> Sku {
        s.parse().unwrap()
    }

    #[test]
    fn the_map_never_changes_between_builds() {
        // Pinned: these are what every stored row's partition was computed with. A change here
        // would send SKUs to partitions that do not hold their rows.
        let p = Partitions::new(6).unwrap();
        let got: Vec<Partition> = ["A", "B", "SKU-1", "SKU-2", "4006381333931"].iter().map(|s| p.of(&sku(s))).collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [Partition; 5] = [3, 5, 1, 0, 1];

    #[test]
    fn one_partition_holds_everything() {
        for s in ["A", "zz", "SKU-99"] {
            assert_eq!(Partitions::ONE.of(&sku(s)), 0);
        }
    }

    #[test]
    fn skus_spread_evenly_over_the_partitions() {
        for count in [2u16, 3, 6, 16] {
            let p = Partitions::new(count).unwrap();
            let mut per = vec![0u32; count as usize];
            let n = 12_000u32;
            for i in 0..n {
                per[p.of(&sku(&format!("SKU-{i:05}"))) as usize] += 1;
            }
            let fair = n / u32::from(count);
            for (i, c) in per.iter().enumerate() {
                assert!(c.abs_diff(fair) * 10 < fair, "partition {i} of {count} got {c} SKUs, fair share {fair}");
            }
        }
    }

    #[test]
    fn counts_out_of_range_are_refused_with_the_range() {
        assert!(Partitions::new(0).unwrap_err().contains("between 1 and 256"));
        assert!(Partitions::new(257).is_err());
        assert_eq!(serde_json::from_str::<Partitions>("6").unwrap().count(), 6);
        assert!(serde_json::from_str::<Partitions>("0").is_err());
    }
}
