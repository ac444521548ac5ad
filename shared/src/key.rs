//! Idempotency keys as integrators send them: any 1..128 printable ASCII characters (a POS
//! receipt number, an order number, a UUID). Inside Shelfsync every request, journal event and
//! reservation is identified by a UUID; a key that is itself a UUID *is* that UUID (so every key
//! ever sent as a UUID keeps meaning the same request), any other key maps to a name-based UUID
//! (version 8, the first 16 bytes of SHA-256 over a fixed prefix and the key). The map is a pure
//! function, so the agent, the hub and anyone reading the journal derive the same id.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Longest idempotency key, in characters (Square's and Shopify's limit is of this order).
pub const KEY_MAX_LEN: usize = 128;

/// A validated idempotency key and the UUID it stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    key: String,
    id: Uuid,
}

/// Why a key was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Empty.
    #[error("must not be empty")]
    Empty,
    /// Longer than [`KEY_MAX_LEN`].
    #[error("is {0} characters long; the limit is {KEY_MAX_LEN}")]
    TooLong(usize),
    /// A character outside printable ASCII (0x20..=0x7E).
    #[error("has a character that is not printable ASCII at position {0}")]
    NotPrintable(usize),
}

impl IdempotencyKey {
    /// Validates `key`: 1..=128 characters, each printable ASCII (space to `~`).
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if let Some(at) = key.bytes().position(|b| !(0x20..=0x7e).contains(&b)) {
            return Err(KeyError::NotPrintable(at + 1));
        }
        if key.len() > KEY_MAX_LEN {
            return Err(KeyError::TooLong(key.len()));
        }
        Ok(match Uuid::try_parse(key) {
            // The canonical spelling, so `ABC…` and `abc…` are one key as they always were.
            Ok(id) => IdempotencyKey { key: id.to_string(), id },
            Err(_) => IdempotencyKey { key: key.to_owned(), id: derive(key.as_bytes()) },
        })
    }

    /// The key of a UUID.
    pub fn from_uuid(id: Uuid) -> Self {
        IdempotencyKey { key: id.to_string(), id }
    }

    /// The key as the caller sent it (a UUID in its canonical lower-case form).
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The UUID this key stands for.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The key of item `index` of a batch sent under this key: its own UUID, derived from the
    /// batch's id, so a batch's items are as idempotent as the batch.
    pub fn item(&self, index: usize) -> Uuid {
        let mut bytes = Vec::with_capacity(24);
        bytes.extend_from_slice(b"item:");
        bytes.extend_from_slice(self.id.as_bytes());
        bytes.extend_from_slice(&(index as u32).to_be_bytes());
        derive(&bytes)
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

fn derive(name: &[u8]) -> Uuid {
    let mut h = Sha256::new();
    h.update(b"shelfsync idempotency key\0");
    h.update(name);
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_stay_themselves_and_other_keys_map_to_a_stable_v8() {
        let u = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let k = IdempotencyKey::parse(&u.to_string().to_uppercase()).unwrap();
        assert_eq!((k.id(), k.as_str()), (u, u.to_string().as_str()));

        let r = IdempotencyKey::parse("R-0042/till 3").unwrap();
        assert_eq!(r.as_str(), "R-0042/till 3");
        assert_eq!(r.id().get_version_num(), 8);
        assert_eq!(r.id(), IdempotencyKey::parse("R-0042/till 3").unwrap().id());
        assert_ne!(r.id(), IdempotencyKey::parse("R-0042/till 4").unwrap().id());
        assert_ne!(r.item(0), r.item(1));
        assert_eq!(r.item(7), IdempotencyKey::parse("R-0042/till 3").unwrap().item(7));

        assert_eq!(IdempotencyKey::parse(""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(&"x".repeat(129)), Err(KeyError::TooLong(129)));
        assert!(IdempotencyKey::parse(&"x".repeat(128)).is_ok());
        assert_eq!(IdempotencyKey::parse("a\tb"), Err(KeyError::NotPrintable(2)));
        assert_eq!(IdempotencyKey::parse("café"), Err(KeyError::NotPrintable(4)));
    }
}
