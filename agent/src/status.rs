//! The sync client's live state, as `/v1/status` shows it.

use serde::Serialize;

/// Where the connection to the hub stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// No bundle, or sync disabled in the config: the agent runs standalone.
    Disabled,
    /// Trying to reach the hub (or waiting to retry).
    Connecting,
    /// `Welcome` received; changes flow both ways.
    Connected,
    /// The hub refuses this agent: another agent of the store is connected, or the store's
    /// certificate is refused (revoked, unknown, another hub's CA). It keeps retrying slowly
    /// (`sync.refused_retry_ms`) and keeps selling offline until head office resolves it.
    Refused,
}

/// Live sync state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// Where the connection stands.
    pub state: SyncState,
    /// The hub's address, if configured.
    pub hub_addr: Option<String>,
    /// The hub's writer, once connected.
    pub hub_writer: Option<String>,
    /// When the current connection was established (RFC 3339).
    pub connected_since: Option<String>,
    /// Why the last connection attempt failed or ended.
    pub last_error: Option<String>,
    /// Connection attempts since start.
    pub attempts: u64,
    /// The writer now, if it changed since start (a retirement).
    pub writer: Option<String>,
}

impl SyncStatus {
    /// Standalone.
    pub fn disabled() -> Self {
        SyncStatus {
            state: SyncState::Disabled,
            hub_addr: None,
            hub_writer: None,
            connected_since: None,
            last_error: None,
            attempts: 0,
            writer: None,
        }
    }
}
