//! Shelfsync's shared core: everything the agent and the hub must agree on, with no I/O and no
//! clock. CRDTs ([`counter`]), identities ([`id`]), quantity rules ([`qty`]), the journal
//! ([`journal`]), wire messages and codec ([`wire`]), the sans-IO sync sessions ([`sync`]) and the
//! time format and request fingerprint every side shares ([`fmt`]).
#![warn(missing_docs)]

pub mod counter;
pub mod fmt;
pub mod id;
pub mod journal;
pub mod key;
pub mod lineage;
pub mod mac;
pub mod qty;
pub mod reason;
pub mod rights;
pub mod sync;
pub mod wire;

pub use counter::{CounterError, CounterMap, PnCounter, PnEntry, StateDigest};
pub use fmt::{fingerprint_of, rfc3339};
pub use id::{IdError, Incarnation, NodeId, Sku, StoreId, WriterId};
pub use journal::{EventFlag, EventKind, JournalEvent, UnixMs};
pub use key::{IdempotencyKey, KeyError, KEY_MAX_LEN};
pub use qty::{QtyError, StockFigures};
pub use reason::{Reason, ReasonCode, ReasonError};
pub use rights::{EscrowPolicy, EscrowRule, Rights, RightsError, RightsKind};
