//! Deterministic ids. The decider mints allocation and conflict ids in the UUID v7 layout: the
//! decision's millisecond as the timestamp (so ids sort roughly by time, as `Uuid::now_v7` did),
//! and 74 bits taken from SHA-256 of (seed, counter). The counter is state and is persisted, so a
//! decider rebuilt from its records continues the sequence, and the same seed, commands and times
//! always mint the same ids.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The `counter`-th id of the decider seeded with `seed`, minted at `now_ms`.
pub fn mint(seed: u128, counter: u64, now_ms: i64) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"shelfsync-hub-core id\0");
    h.update(seed.to_be_bytes());
    h.update(counter.to_be_bytes());
    let digest = h.finalize();
    let mut rand = [0u8; 10];
    rand.copy_from_slice(&digest[..10]);
    // Times before the epoch cannot be encoded; they only happen in tests.
    let ms = u64::try_from(now_ms).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(ms, &rand).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_layout_and_deterministic() {
        let a = mint(7, 1, 1_700_000_000_000);
        assert_eq!(a.get_version_num(), 7);
        assert_eq!(a, mint(7, 1, 1_700_000_000_000));
        assert_ne!(a, mint(7, 2, 1_700_000_000_000));
        assert_ne!(a, mint(8, 1, 1_700_000_000_000));
        let (secs, _) = a.get_timestamp().expect("v7 has a timestamp").to_unix();
        assert_eq!(secs, 1_700_000_000);
    }
}
