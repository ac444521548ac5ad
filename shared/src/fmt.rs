//! Pure helpers the agent, the hub and the decider format and fingerprint with, so that the
//! three agree to the byte: times shown as RFC 3339 and the idempotency fingerprints stored with
//! every request.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::journal::UnixMs;

/// Milliseconds since the epoch as RFC 3339 (the number itself when out of range).
pub fn rfc3339(ms: UnixMs) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_else(|_| ms.to_string())
}

/// SHA-256 of the JSON of a request body: equal bodies, equal fingerprints. The bytes are what
/// agents and hubs have always stored, so stored fingerprints stay valid.
pub fn fingerprint_of(body: &impl Serialize) -> Vec<u8> {
    Sha256::digest(serde_json::to_vec(body).expect("request bodies serialise")).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_fingerprints_are_stable() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_250), "2023-11-14T22:13:20.25Z");
        assert_eq!(rfc3339(i64::MAX), i64::MAX.to_string());
        let want = Sha256::digest(br#"[1,"a"]"#).to_vec();
        assert_eq!(fingerprint_of(&(1, "a")), want);
    }
}
