//! API tokens: their records and SQL (created, listed, revoked, last used), expiry durations
//! (`30d`, `12h`, `90m`, `45s`) and the verdict on a presented token.
//!
//! A token's secret is shown once, when it is created; the hub keeps only its SHA-256. Every
//! request looks its token up in storage (one primary-key read on a reader thread), so a
//! revocation or expiry written by any process (the CLI writes the same SQLite file while the hub
//! runs) refuses the token's very next request. Last use is recorded at most once per
//! [`LAST_USED_RESOLUTION_MS`] per token, never once per request.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use shelfsync_shared::id::quote;
use shelfsync_shared::rfc3339;
use uuid::Uuid;

use shelfsync_hub_core::ChannelId;

use crate::storage::{Role, StorageError, StorageResult};

/// Schema change of the hub database: names, expiry, last use and a public id for every token.
/// Tokens created before it keep working, named `unnamed`, with an id minted here (a UUIDv7 from
/// the creation time and random bits).
pub const MIGRATION: &str = "
     ALTER TABLE tokens ADD COLUMN id TEXT;
     ALTER TABLE tokens ADD COLUMN name TEXT NOT NULL DEFAULT 'unnamed';
     ALTER TABLE tokens ADD COLUMN expires_at_ms INTEGER;
     ALTER TABLE tokens ADD COLUMN last_used_at_ms INTEGER;
     UPDATE tokens SET id = printf('%08x-%04x-7%03x-%04x-%012x',
        (created_at_ms >> 16) & 0xffffffff, created_at_ms & 0xffff, random() & 0xfff,
        0x8000 | (random() & 0x3fff), random() & 0xffffffffffff)
     WHERE id IS NULL;
     CREATE UNIQUE INDEX tokens_id ON tokens(id);";

/// Schema change of the hub database (both backends): the sales channel a token belongs to
/// (`hub/docs/channels.md`). Older tokens have none: a storefront token without one is `web`'s,
/// the channel every storefront was before channels.
pub const CHANNEL_MIGRATION: &str = "ALTER TABLE tokens ADD COLUMN channel TEXT;";

/// Longest token name, in bytes.
pub const NAME_MAX_LEN: usize = 64;
/// Name of tokens created without one (and of tokens older than names).
pub const DEFAULT_NAME: &str = "unnamed";
/// Last use is written at most this often per token.
pub const LAST_USED_RESOLUTION_MS: i64 = 60_000;
/// Longest `--expires-in`: ten years.
pub const EXPIRES_IN_MAX_SECS: u64 = 3650 * 86_400;

/// A token as the hub keeps it (never the secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Public id (for `token revoke` and `DELETE /v1/tokens/{id}`).
    pub id: Uuid,
    /// Free text to tell tokens apart.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Creation time (ms).
    pub created_at_ms: i64,
    /// Expiry (ms), if any.
    pub expires_at_ms: Option<i64>,
    /// Revocation time (ms), if revoked.
    pub revoked_at_ms: Option<i64>,
    /// Last request made with it (ms), at [`LAST_USED_RESOLUTION_MS`] resolution.
    pub last_used_at_ms: Option<i64>,
    /// The sales channel it was bound to, if any (see [`TokenInfo::channel`]).
    pub bound: Option<ChannelId>,
}

/// Whether a token may be used now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    /// Usable.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

impl TokenStatus {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Expired => "expired",
            TokenStatus::Revoked => "revoked",
        }
    }
}

impl TokenInfo {
    /// Revoked wins over expired.
    pub fn status(&self, now_ms: i64) -> TokenStatus {
        if self.revoked_at_ms.is_some() {
            TokenStatus::Revoked
        } else if self.expires_at_ms.is_some_and(|e| e <= now_ms) {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }

    /// The channel it acts for: a storefront token always has one (`web` unless bound to
    /// another), a viewer token when bound to one; an admin token is chain-wide (`None`).
    pub fn channel(&self) -> Option<ChannelId> {
        match self.role {
            Role::Storefront => Some(self.bound.clone().unwrap_or_else(ChannelId::web)),
            Role::Viewer => self.bound.clone(),
            Role::Admin => None,
        }
    }

    /// The public view (API and `token list --json`).
    pub fn view(&self, now_ms: i64) -> TokenView {
        TokenView {
            id: self.id,
            name: self.name.clone(),
            role: self.role,
            channel: self.channel(),
            status: self.status(now_ms),
            created_at: rfc3339(self.created_at_ms),
            last_used_at: self.last_used_at_ms.map(rfc3339),
            expires_at: self.expires_at_ms.map(rfc3339),
            revoked_at: self.revoked_at_ms.map(rfc3339),
        }
    }
}

/// A token as the API and `token list --json` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenView {
    /// Public id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The sales channel it acts for (`null`: chain-wide).
    pub channel: Option<ChannelId>,
    /// `active`, `expired` or `revoked`.
    pub status: TokenStatus,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, to the minute.
    pub last_used_at: Option<String>,
    /// RFC 3339.
    pub expires_at: Option<String>,
    /// RFC 3339.
    pub revoked_at: Option<String>,
}

/// A token to store.
#[derive(Clone, Debug)]
pub struct NewToken {
    /// SHA-256 of the secret.
    pub hash: Vec<u8>,
    /// Checked name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Lifetime in seconds from creation, if it expires.
    pub expires_in_secs: Option<u64>,
    /// The channel it is bound to (checked by [`check_channel`]).
    pub channel: Option<ChannelId>,
}

/// Checks a token's channel against its role: storefront and viewer tokens may be bound to one,
/// admin tokens are chain-wide.
pub fn check_channel(role: Role, channel: Option<&str>) -> Result<Option<ChannelId>, String> {
    let Some(c) = channel else { return Ok(None) };
    let id: ChannelId = c.parse()?;
    if role == Role::Admin {
        return Err(format!("admin tokens are chain-wide: a channel ({id}) is for storefront and viewer tokens"));
    }
    Ok(Some(id))
}

/// Checks a token name: 1 to [`NAME_MAX_LEN`] bytes, no control characters.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("name must not be empty".into());
    }
    if name.len() > NAME_MAX_LEN {
        return Err(format!("name is {} bytes long; the limit is {NAME_MAX_LEN}", name.len()));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("name {} contains control characters", quote(name)));
    }
    Ok(())
}

/// Parses a lifetime: a whole number and a unit, `s`, `m`, `h` or `d` (`30d`, `12h`, `90m`),
/// between 1 s and ten years.
pub fn parse_expires_in(s: &str) -> Result<u64, String> {
    let bad =
        || format!("expires_in {} must be a whole number followed by s, m, h or d (e.g. 30d, 12h, 90m)", quote(s));
    let t = s.trim();
    let unit = t.chars().last().ok_or_else(bad)?;
    let per: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let digits = &t[..t.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = n
        .checked_mul(per)
        .filter(|s| (1..=EXPIRES_IN_MAX_SECS).contains(s))
        .ok_or_else(|| format!("expires_in {} must be between 1s and {}d", quote(s), EXPIRES_IN_MAX_SECS / 86_400))?;
    Ok(secs)
}

/// The columns of a [`Row`].
pub(crate) const COLUMNS: &str =
    "id, name, role, created_at_ms, expires_at_ms, revoked_at_ms, last_used_at_ms, channel";

/// A `tokens` row ([`COLUMNS`]).
pub(crate) type Row = (String, String, String, i64, Option<i64>, Option<i64>, Option<i64>, Option<String>);

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?))
}

/// A row as a token.
pub(crate) fn info(
    (id, name, role, created_at_ms, expires_at_ms, revoked_at_ms, last_used_at_ms, channel): Row,
) -> StorageResult<TokenInfo> {
    let bound = channel
        .map(|c| c.parse::<ChannelId>())
        .transpose()
        .map_err(|e| StorageError::Corrupt(format!("token {id}'s channel: {e}")))?;
    Ok(TokenInfo {
        bound,
        id: Uuid::parse_str(&id).map_err(|e| StorageError::Corrupt(format!("token id {id}: {e}")))?,
        name,
        role: Role::parse(&role)
            .ok_or_else(|| StorageError::Corrupt(format!("token {id} has role {}", quote(&role))))?,
        created_at_ms,
        expires_at_ms,
        revoked_at_ms,
        last_used_at_ms,
    })
}

/// Stores a new token.
pub fn insert(conn: &Connection, t: &NewToken, now_ms: i64) -> StorageResult<TokenInfo> {
    let info = mint(t, now_ms);
    conn.execute(
        "INSERT INTO tokens (hash, id, name, role, created_at_ms, expires_at_ms, channel)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            t.hash,
            info.id.to_string(),
            t.name,
            t.role.as_str(),
            now_ms,
            info.expires_at_ms,
            t.channel.as_ref().map(ChannelId::as_str)
        ],
    )?;
    Ok(info)
}

/// The record of a token created at `now_ms` (a new id, its expiry), for either engine to store.
pub(crate) fn mint(t: &NewToken, now_ms: i64) -> TokenInfo {
    TokenInfo {
        id: Uuid::now_v7(),
        name: t.name.clone(),
        role: t.role,
        created_at_ms: now_ms,
        expires_at_ms: t.expires_in_secs.map(|s| now_ms.saturating_add(s as i64 * 1000)),
        revoked_at_ms: None,
        last_used_at_ms: None,
        bound: t.channel.clone(),
    }
}

/// The token with this hash (whatever its status).
pub fn by_hash(conn: &Connection, hash: &[u8]) -> StorageResult<Option<TokenInfo>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tokens WHERE hash = ?1"))?
        .query_row([hash], from_row)
        .optional()?
        .map(info)
        .transpose()
}

/// Every token, oldest first.
pub fn list(conn: &Connection) -> StorageResult<Vec<TokenInfo>> {
    conn.prepare(&format!("SELECT {COLUMNS} FROM tokens ORDER BY created_at_ms, id"))?
        .query_map([], from_row)?
        .map(|r| info(r?))
        .collect()
}

/// Revokes a token (a second revocation keeps the first time). `None` if there is no such token.
pub fn revoke(conn: &Connection, id: Uuid, now_ms: i64) -> StorageResult<Option<TokenInfo>> {
    conn.execute(
        "UPDATE tokens SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1",
        params![id.to_string(), now_ms],
    )?;
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"))?
        .query_row([id.to_string()], from_row)
        .optional()?
        .map(info)
        .transpose()
}

/// Records a use (never moves the time backwards).
pub fn touch(conn: &Connection, id: Uuid, at_ms: i64) -> StorageResult<()> {
    conn.prepare_cached("UPDATE tokens SET last_used_at_ms = MAX(COALESCE(last_used_at_ms, 0), ?2) WHERE id = ?1")?
        .execute(params![id.to_string(), at_ms])?;
    Ok(())
}

/// What a presented token is worth now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Usable.
    Valid(TokenInfo),
    /// No such token.
    Unknown,
    /// Revoked.
    Revoked(TokenInfo),
    /// Past its expiry.
    Expired(TokenInfo),
}

impl Verdict {
    /// Judges a looked-up token at `now_ms`.
    pub fn of(found: Option<TokenInfo>, now_ms: i64) -> Verdict {
        match found {
            None => Verdict::Unknown,
            Some(t) => match t.status(now_ms) {
                TokenStatus::Active => Verdict::Valid(t),
                TokenStatus::Expired => Verdict::Expired(t),
                TokenStatus::Revoked => Verdict::Revoked(t),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_durations() {
        assert_eq!(parse_expires_in("30d"), Ok(30 * 86_400));
        assert_eq!(parse_expires_in("12h"), Ok(12 * 3600));
        assert_eq!(parse_expires_in("90m"), Ok(5400));
        assert_eq!(parse_expires_in("45s"), Ok(45));
        for bad in ["", "d", "30", "-1d", "1.5h", "30 d", "3w", "0s", "3651d", "99999999999999999999d", "+1d"] {
            let e = parse_expires_in(bad).unwrap_err();
            assert!(e.contains("expires_in"), "{bad}: {e}");
        }
    }

    #[test]
    fn names() {
        assert!(check_name("pos-feed (store 12)").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("  ").is_err());
        assert!(check_name(&"n".repeat(65)).unwrap_err().contains("limit is 64"));
        assert!(check_name("a\u{7}b").unwrap_err().contains("control"));
    }

    /// A hub database from before token names, with a token in it, migrates: the token keeps
    /// working, is named `unnamed` and gets a UUIDv7 id.
    #[test]
    fn tokens_created_before_the_migration_keep_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let mine = crate::sqlite::MIGRATIONS.iter().position(|m| *m == MIGRATION).expect("migration listed");
        {
            let mut conn = Connection::open(&path).unwrap();
            shelfsync_node::db::migrate(&mut conn, &crate::sqlite::MIGRATIONS[..mine]).unwrap();
            conn.execute(
                "INSERT INTO tokens (hash, role, created_at_ms) VALUES (?1, 'viewer', 1700000000000)",
                [vec![7u8; 32]],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO tokens (hash, role, created_at_ms, revoked_at_ms) VALUES (?1, 'admin', 1700000000001, 5)",
                [vec![8u8; 32]],
            )
            .unwrap();
            shelfsync_node::db::meta_set(&conn, "writer", "hub@0123456789abcdef").unwrap();
        }
        let mut conn = Connection::open(&path).unwrap();
        shelfsync_node::db::migrate(&mut conn, crate::sqlite::MIGRATIONS).unwrap();
        let old = by_hash(&conn, &[7u8; 32]).unwrap().expect("still there");
        assert_eq!(
            (old.name.as_str(), old.role, old.revoked_at_ms, old.expires_at_ms),
            ("unnamed", Role::Viewer, None, None)
        );
        assert_eq!(old.id.get_version_num(), 7);
        assert_eq!(old.id.get_timestamp().unwrap().to_unix().0, 1_700_000_000, "id carries the creation time");
        assert_eq!(Verdict::of(Some(old.clone()), 1_800_000_000_000), Verdict::Valid(old));
        let revoked = by_hash(&conn, &[8u8; 32]).unwrap().unwrap();
        assert_eq!(revoked.status(0), TokenStatus::Revoked);
        let all = list(&conn).unwrap();
        assert_eq!(all.len(), 2);
        assert_ne!(all[0].id, all[1].id);
    }
}
