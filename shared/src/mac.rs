//! Authenticated hub entries. A store may only write its own writers' counter entries, yet it
//! holds the hub's entries for its counters (restocks, transfers) and must be able to give them
//! back to a hub that lost them (restored from an older backup). The hub therefore tags every
//! entry it authors with a MAC under a key only it knows; an entry a store returns is accepted
//! only with a valid tag, so a store can return what the hub wrote but never invent more.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::counter::PnEntry;
use crate::id::{Sku, StoreId, WriterId};

/// A tag: the first 16 bytes of HMAC-SHA256.
pub type EntryMac = [u8; 16];

/// The hub's secret for tagging its entries.
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// A key from 32 secret bytes (the host draws them from a CSPRNG once and keeps them).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MacKey(bytes)
    }

    /// The key's bytes, for storing it.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The tag of `writer`'s entry for (`store`, `sku`).
    pub fn tag(&self, store: &StoreId, sku: &Sku, writer: &WriterId, entry: PnEntry) -> EntryMac {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(b"shelfsync-entry-v1");
        for part in [store.as_str(), sku.as_str(), &writer.to_string()] {
            m.update(&(part.len() as u32).to_be_bytes());
            m.update(part.as_bytes());
        }
        m.update(&entry.p.to_be_bytes());
        m.update(&entry.n.to_be_bytes());
        let full = m.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// Whether `tag` is this key's tag of the entry (constant time).
    pub fn verify(&self, store: &StoreId, sku: &Sku, writer: &WriterId, entry: PnEntry, tag: &EntryMac) -> bool {
        let expected = self.tag(store, sku, writer, entry);
        expected.iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{Incarnation, NodeId};

    #[test]
    fn tags_bind_every_field() {
        let key = MacKey::from_bytes([7; 32]);
        let store: StoreId = "s1".parse().unwrap();
        let sku: Sku = "A".parse().unwrap();
        let hub = WriterId::new(NodeId::Hub, Incarnation::from_u64(1));
        let e = PnEntry { p: 15, n: 0 };
        let tag = key.tag(&store, &sku, &hub, e);
        assert!(key.verify(&store, &sku, &hub, e, &tag));
        assert!(!key.verify(&store, &sku, &hub, PnEntry { p: 16, n: 0 }, &tag), "a raised entry");
        assert!(!key.verify(&"s2".parse().unwrap(), &sku, &hub, e, &tag), "another store");
        assert!(!key.verify(&store, &"B".parse().unwrap(), &hub, e, &tag), "another SKU");
        let other = WriterId::new(NodeId::Hub, Incarnation::from_u64(2));
        assert!(!key.verify(&store, &sku, &other, e, &tag), "another writer");
        assert!(!MacKey::from_bytes([8; 32]).verify(&store, &sku, &hub, e, &tag), "another key");
    }
}
