//! Validated identifiers: stores, SKUs, nodes, writer incarnations.
//!
//! Every identifier that crosses a wire or enters a database is parsed here once, so the rest of
//! the system never sees an unchecked string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest store id, in bytes (`[a-z0-9][a-z0-9-]{0,62}`).
pub const STORE_ID_MAX_LEN: usize = 63;
/// Longest SKU, in bytes.
pub const SKU_MAX_LEN: usize = 64;
/// The node name of the hub. No store may take it.
pub const HUB_NODE: &str = "hub";

/// Why an identifier was refused. The message names the offending value and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // each variant is documented by its #[error] text
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} {} is {len} bytes long; the limit is {max}", quote(value))]
    TooLong { what: &'static str, value: String, len: usize, max: usize },
    #[error("{what} {} has {} at position {pos}; allowed: {allowed}", quote(value), quote(&found.to_string()))]
    BadChar { what: &'static str, value: String, found: char, pos: usize, allowed: &'static str },
    #[error("store id {} is reserved for the hub", quote(.0))]
    Reserved(String),
    #[error("writer id {} must look like <node>@<16 hex digits>", quote(.0))]
    BadWriter(String),
}

/// Quotes a value for a message meant for people and API clients: `"like this"`, with `"`, `\`
/// and control characters escaped as JSON escapes them (never Rust's `{:?}` notation).
pub fn quote(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn check(
    what: &'static str,
    value: &str,
    max: usize,
    allowed: &'static str,
    first_ok: impl Fn(char) -> bool,
    rest_ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > max {
        let shown: String = value.chars().take(80).collect();
        return Err(IdError::TooLong { what, value: shown, len: value.len(), max });
    }
    for (pos, c) in value.chars().enumerate() {
        let ok = if pos == 0 { first_ok(c) } else { rest_ok(c) };
        if !ok {
            return Err(IdError::BadChar { what, value: value.to_owned(), found: c, pos, allowed });
        }
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(v: String) -> Result<Self, IdError> {
                Self::validate(&v)?;
                Ok(Self(v))
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(v: &str) -> Result<Self, IdError> {
                Self::try_from(v.to_owned())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// A store's id, e.g. `store-012`: `[a-z0-9][a-z0-9-]{0,62}`, never `hub`.
    StoreId
);

impl StoreId {
    fn validate(v: &str) -> Result<(), IdError> {
        let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        check("store id", v, STORE_ID_MAX_LEN, "a-z 0-9, then also '-'", lower, |c| lower(c) || c == '-')?;
        if v == HUB_NODE {
            return Err(IdError::Reserved(v.to_owned()));
        }
        Ok(())
    }
}

string_id!(
    /// A stock keeping unit, e.g. `HSS-001`: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a
    /// letter or digit. Case matters. No `/`, so it is always one URL path segment.
    Sku
);

impl Sku {
    fn validate(v: &str) -> Result<(), IdError> {
        check(
            "sku",
            v,
            SKU_MAX_LEN,
            "A-Z a-z 0-9, then also '.', '_', '-'",
            |c| c.is_ascii_alphanumeric(),
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
        )
    }
}

/// A node of the system: the hub or one store.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeId {
    /// Headquarters.
    Hub,
    /// One store's agent.
    Store(StoreId),
}

impl NodeId {
    /// The store this node is, if it is one.
    pub fn store(&self) -> Option<&StoreId> {
        match self {
            NodeId::Hub => None,
            NodeId::Store(s) => Some(s),
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeId::Hub => f.write_str(HUB_NODE),
            NodeId::Store(s) => f.write_str(s.as_str()),
        }
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(v: &str) -> Result<Self, IdError> {
        if v == HUB_NODE {
            Ok(NodeId::Hub)
        } else {
            Ok(NodeId::Store(v.parse()?))
        }
    }
}

/// One life of a node's database: random, minted when the database file is created or restored.
///
/// The caller supplies the randomness (this crate never does I/O).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Incarnation(u64);

impl Incarnation {
    /// Wraps random bits. Zero is allowed but callers should feed real randomness.
    pub const fn from_u64(v: u64) -> Self {
        Incarnation(v)
    }
    /// The raw bits.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// `<node>@<incarnation>`: the only party allowed to raise its own counter entries.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WriterId {
    node: NodeId,
    incarnation: Incarnation,
}

impl WriterId {
    /// A writer for `node` in its `incarnation`.
    pub fn new(node: NodeId, incarnation: Incarnation) -> Self {
        WriterId { node, incarnation }
    }
    /// The node this writer belongs to.
    pub fn node(&self) -> &NodeId {
        &self.node
    }
    /// Which life of the node's database.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }
    /// Whether this writer is one of `store`'s own (any incarnation).
    pub fn is_store(&self, store: &StoreId) -> bool {
        self.node.store() == Some(store)
    }
    /// Whether this writer is a hub writer.
    pub fn is_hub(&self) -> bool {
        self.node == NodeId::Hub
    }
}

impl fmt::Display for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.node, self.incarnation)
    }
}

impl fmt::Debug for WriterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for WriterId {
    type Err = IdError;
    fn from_str(v: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadWriter(v.chars().take(100).collect());
        let (node, inc) = v.rsplit_once('@').ok_or_else(bad)?;
        if inc.len() != 16 || !inc.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad());
        }
        let incarnation = u64::from_str_radix(inc, 16).map_err(|_| bad())?;
        Ok(WriterId { node: node.parse()?, incarnation: Incarnation(incarnation) })
    }
}

impl TryFrom<String> for WriterId {
    type Error = IdError;
    fn try_from(v: String) -> Result<Self, IdError> {
        v.parse()
    }
}

impl From<WriterId> for String {
    fn from(v: WriterId) -> String {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_quote_like_json_not_like_rust_debug() {
        assert_eq!(quote("a\"b\\c\u{7}\n"), r#""a\"b\\c\u0007\n""#);
        let e = "a/\u{1}".parse::<Sku>().unwrap_err().to_string();
        assert_eq!(e, r#"sku "a/\u0001" has "/" at position 1; allowed: A-Z a-z 0-9, then also '.', '_', '-'"#);
    }

    #[test]
    fn store_ids() {
        assert!("store-012".parse::<StoreId>().is_ok());
        assert!("0".parse::<StoreId>().is_ok());
        assert_eq!("".parse::<StoreId>(), Err(IdError::Empty { what: "store id" }));
        assert!(matches!("-a".parse::<StoreId>(), Err(IdError::BadChar { pos: 0, .. })));
        assert!(matches!("Store".parse::<StoreId>(), Err(IdError::BadChar { found: 'S', .. })));
        assert!(matches!("hub".parse::<StoreId>(), Err(IdError::Reserved(_))));
        let long = "a".repeat(64);
        let err = long.parse::<StoreId>().unwrap_err();
        assert!(err.to_string().contains("64 bytes long; the limit is 63"), "{err}");
        assert!("a".repeat(63).parse::<StoreId>().is_ok());
    }

    #[test]
    fn skus() {
        assert!("HSS-001".parse::<Sku>().is_ok());
        assert!("a.b_c-D".parse::<Sku>().is_ok());
        assert!("a/b".parse::<Sku>().unwrap_err().to_string().contains(r#""/""#));
        assert!(".a".parse::<Sku>().is_err());
        assert!("é".parse::<Sku>().is_err());
        assert!("x".repeat(65).parse::<Sku>().is_err());
        assert!("x".repeat(64).parse::<Sku>().is_ok());
    }

    #[test]
    fn writer_ids_round_trip() {
        let w = WriterId::new(NodeId::Store("store-1".parse().unwrap()), Incarnation::from_u64(0xabc));
        assert_eq!(w.to_string(), "store-1@0000000000000abc");
        assert_eq!(w.to_string().parse::<WriterId>().unwrap(), w);
        let h: WriterId = "hub@00000000000000ff".parse().unwrap();
        assert!(h.is_hub());
        assert!(!h.is_store(&"store-1".parse().unwrap()));
        assert!(w.is_store(&"store-1".parse().unwrap()));
        for bad in ["store-1", "store-1@12", "store-1@000000000000abcZ", "@0000000000000abc", "Bad@0000000000000abc"] {
            assert!(bad.parse::<WriterId>().is_err(), "{bad}");
        }
        let json = serde_json_like(&w);
        assert_eq!(json, "store-1@0000000000000abc");
    }

    fn serde_json_like(w: &WriterId) -> String {
        String::from(w.clone())
    }
}
