//! Reason codes of adjustments: a fixed, documented set a shrink report can group by, plus an
//! optional free-text note. Stored and synced as one reason string, `code` or `code: note`, so
//! the journal's wire format is unchanged; [`Reason::parse_stored`] reads it back (a reason
//! written before codes existed reads as `other` with the old text as its note).

use serde::{Deserialize, Serialize};

use crate::qty::REASON_MAX_LEN;

/// Why units were added or removed outside sales, returns, counts, restocks and transfers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// Broken or unsellable goods (removes units).
    Damaged,
    /// Stolen (removes units).
    Theft,
    /// Past its date (removes units).
    Expired,
    /// Missing, cause unknown (removes units).
    Lost,
    /// Used by the store itself: display, testers, staff (removes units).
    InternalUse,
    /// Sent back to the supplier (removes units).
    ReturnedToVendor,
    /// Shipped by another store but never received (removes units; written by a partial receipt).
    TransitLoss,
    /// Units turned up (adds units).
    Found,
    /// A booking error put right (either sign).
    Correction,
    /// Anything else; the note says what (either sign).
    Other,
}

/// Which way a reason may move stock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Only removes units.
    Remove,
    /// Only adds units.
    Add,
    /// Either.
    Either,
}

impl ReasonCode {
    /// Every code, in the order documented.
    pub const ALL: [ReasonCode; 10] = [
        ReasonCode::Damaged,
        ReasonCode::Theft,
        ReasonCode::Expired,
        ReasonCode::Lost,
        ReasonCode::InternalUse,
        ReasonCode::ReturnedToVendor,
        ReasonCode::TransitLoss,
        ReasonCode::Found,
        ReasonCode::Correction,
        ReasonCode::Other,
    ];

    /// The snake_case name used in JSON, SQL and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Damaged => "damaged",
            ReasonCode::Theft => "theft",
            ReasonCode::Expired => "expired",
            ReasonCode::Lost => "lost",
            ReasonCode::InternalUse => "internal_use",
            ReasonCode::ReturnedToVendor => "returned_to_vendor",
            ReasonCode::TransitLoss => "transit_loss",
            ReasonCode::Found => "found",
            ReasonCode::Correction => "correction",
            ReasonCode::Other => "other",
        }
    }

    /// Parses the snake_case name.
    pub fn parse(s: &str) -> Option<Self> {
        ReasonCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Which way it may move stock.
    pub fn direction(self) -> Direction {
        match self {
            ReasonCode::Found => Direction::Add,
            ReasonCode::Correction | ReasonCode::Other => Direction::Either,
            _ => Direction::Remove,
        }
    }

    /// The documented list, for error messages: `damaged, theft, …`.
    pub fn list() -> String {
        ReasonCode::ALL.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// A reason code and an optional note.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// The code.
    pub code: ReasonCode,
    /// Free text, at most [`REASON_MAX_LEN`] bytes with the code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Why a reason was refused; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReasonError {
    /// Not one of the codes.
    #[error("reason must be one of {list}; got {got:?} (put free text in note)", list = ReasonCode::list())]
    UnknownCode {
        /// What was sent (cut to 64 characters).
        got: String,
    },
    /// The sign of the delta does not fit the code.
    #[error("reason {code} only {way} units; delta {delta} goes the other way")]
    WrongSign {
        /// The code.
        code: &'static str,
        /// "removes" or "adds".
        way: &'static str,
        /// The delta sent.
        delta: i64,
    },
    /// `other` needs a note.
    #[error("reason other needs a note saying what happened")]
    NoteRequired,
    /// Too long once stored.
    #[error("note is {0} bytes long; the limit is {max}", max = REASON_MAX_LEN - 24)]
    NoteTooLong(usize),
}

impl Reason {
    /// Builds a reason from a request's `reason` and `note`, checked against the delta's sign.
    pub fn new(code: &str, note: Option<String>, delta: i64) -> Result<Reason, ReasonError> {
        let code =
            ReasonCode::parse(code).ok_or_else(|| ReasonError::UnknownCode { got: code.chars().take(64).collect() })?;
        let note = note.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
        if let Some(n) = &note {
            if n.len() > REASON_MAX_LEN - 24 {
                return Err(ReasonError::NoteTooLong(n.len()));
            }
        }
        if code == ReasonCode::Other && note.is_none() {
            return Err(ReasonError::NoteRequired);
        }
        match (code.direction(), delta.signum()) {
            (Direction::Remove, 1) => {
                return Err(ReasonError::WrongSign { code: code.as_str(), way: "removes", delta })
            }
            (Direction::Add, -1) => return Err(ReasonError::WrongSign { code: code.as_str(), way: "adds", delta }),
            _ => {}
        }
        Ok(Reason { code, note })
    }

    /// The stored form: `code` or `code: note`.
    pub fn to_stored(&self) -> String {
        match &self.note {
            Some(n) => format!("{}: {n}", self.code.as_str()),
            None => self.code.as_str().to_owned(),
        }
    }

    /// Reads the stored form back; text from before reason codes reads as `other`.
    pub fn parse_stored(s: &str) -> Reason {
        let (head, note) = match s.split_once(": ") {
            Some((h, n)) => (h, Some(n.to_owned())),
            None => (s, None),
        };
        match ReasonCode::parse(head) {
            Some(code) => Reason { code, note },
            None => Reason { code: ReasonCode::Other, note: Some(s.to_owned()) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_check_their_sign() {
        for c in ReasonCode::ALL {
            assert_eq!(ReasonCode::parse(c.as_str()), Some(c));
        }
        let r = Reason::new("damaged", Some(" dropped a pallet ".into()), -3).unwrap();
        assert_eq!(r.to_stored(), "damaged: dropped a pallet");
        assert_eq!(Reason::parse_stored(&r.to_stored()), r);
        let bare = Reason::new("found", None, 2).unwrap();
        assert_eq!(Reason::parse_stored(&bare.to_stored()), bare);
        assert_eq!(
            Reason::parse_stored("shelf fell over"),
            Reason { code: ReasonCode::Other, note: Some("shelf fell over".into()) }
        );
        assert!(matches!(Reason::new("theft", None, 1), Err(ReasonError::WrongSign { .. })));
        assert!(matches!(Reason::new("found", None, -1), Err(ReasonError::WrongSign { .. })));
        assert!(Reason::new("correction", None, -1).is_ok() && Reason::new("correction", None, 1).is_ok());
        assert_eq!(Reason::new("other", Some("  ".into()), 1), Err(ReasonError::NoteRequired));
        let e = Reason::new("broken", None, -1).unwrap_err().to_string();
        assert!(e.contains("damaged, theft") && e.contains("\"broken\""), "{e}");
        assert!(matches!(Reason::new("lost", Some("x".repeat(180)), -1), Err(ReasonError::NoteTooLong(180))));
    }
}
