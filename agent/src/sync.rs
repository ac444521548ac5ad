//! The agent's sync client: connects to the hub over QUIC and moves bytes between the streams
//! and a [`shelfsync_shared::sync::AgentSession`].

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::db::Db;
use crate::server::StartError;
use crate::status::SyncStatus;

/// Starts the sync client if this agent has a bundle and sync is enabled.
pub fn spawn(
    config: &AgentConfig,
    _db: Db,
    _status: watch::Sender<SyncStatus>,
) -> Result<Option<JoinHandle<()>>, StartError> {
    if !config.sync.enabled || !config.bundle_dir().exists() {
        return Ok(None);
    }
    Err(StartError::Other(format!(
        "{} holds a hub bundle but this build of the agent cannot sync yet",
        config.bundle_dir().display()
    )))
}
