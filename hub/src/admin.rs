//! Admin verbs that work on a hub's data directory directly (they also work while the hub runs:
//! SQLite in WAL mode arbitrates, and the running hub notices revocations within seconds).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shelfsync_node::bundle::Bundle;
use shelfsync_shared::StoreId;

use crate::api::{new_token, token_hash};
use crate::pki::Pki;
use crate::sqlite::{db_path, SqliteOptions, SqliteStorage};
use crate::storage::{CertRecord, Role, StorageError};
use crate::tokens::{NewToken, TokenInfo};
use shelfsync_shared::id::quote;

/// Admin failures.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Storage said no.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The PKI said no.
    #[error("pki: {0}")]
    Pki(String),
    /// Writing the bundle failed.
    #[error("bundle: {0}")]
    Bundle(String),
    /// The command line asked for something impossible.
    #[error("{0}")]
    Usage(String),
    /// The CSV is invalid (nothing was imported).
    #[error("{0}")]
    Csv(#[from] crate::catalog::CsvError),
}

fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

async fn open(data_dir: &Path) -> Result<Arc<SqliteStorage>, AdminError> {
    let path = db_path(data_dir);
    let s = tokio::task::spawn_blocking(move || {
        SqliteStorage::open(&path, SqliteOptions { readers: 1, ..Default::default() })
    })
    .await
    .map_err(|e| StorageError::Backend(e.to_string()))??;
    Ok(Arc::new(s))
}

/// Creates the hub database and its private CA.
pub async fn init(data_dir: &Path) -> Result<String, AdminError> {
    shelfsync_node::dbfile::create_private_dir(data_dir)
        .map_err(|e| StorageError::Backend(format!("{}: {e}", data_dir.display())))?;
    Pki::init(&pki_dir(data_dir)).map_err(|e| AdminError::Pki(e.to_string()))?;
    let path = db_path(data_dir);
    let writer = tokio::task::spawn_blocking(move || SqliteStorage::create(&path))
        .await
        .map_err(|e| StorageError::Backend(e.to_string()))??;
    Ok(writer.to_string())
}

/// Registers a store, issues its certificate and writes its credential bundle to `out`.
pub async fn add_store(data_dir: &Path, store: &StoreId, out: &Path, hub_addr: &str) -> Result<(), AdminError> {
    let pki = Pki::load(&pki_dir(data_dir)).map_err(|e| AdminError::Pki(e.to_string()))?;
    let storage = open(data_dir).await?;
    let cert = pki.issue_store(store).map_err(|e| AdminError::Pki(e.to_string()))?;
    storage
        .add_store(
            store.clone(),
            CertRecord {
                serial: cert.serial_hex.clone(),
                store: store.clone(),
                fingerprint: cert.fingerprint_sha256_hex.clone(),
                revoked_at_ms: None,
            },
        )
        .await?;
    Bundle::write(out, store, hub_addr, pki.ca_cert_pem(), &cert.cert_pem, &cert.key_pem)
        .map_err(|e| AdminError::Bundle(e.to_string()))?;
    Ok(())
}

/// Sets how many agents of a store may be connected at once.
pub async fn set_max_agents(data_dir: &Path, store: &StoreId, max: u32) -> Result<(), AdminError> {
    if !(1..=64).contains(&max) {
        return Err(StorageError::Invalid(format!("max agents must be 1 .. 64, got {max}")).into());
    }
    let storage = open(data_dir).await?;
    storage.set_max_agents(store.clone(), max).await?;
    Ok(())
}

/// Revokes every certificate of a store; returns how many.
pub async fn revoke_store(data_dir: &Path, store: &StoreId) -> Result<usize, AdminError> {
    let storage = open(data_dir).await?;
    Ok(storage.revoke_store(store.clone()).await?.len())
}

/// Creates an API token named `unnamed` that never expires; returns its secret.
pub async fn create_token(data_dir: &Path, role: Role) -> Result<String, AdminError> {
    Ok(create_named_token(data_dir, role, None, None).await?.1)
}

/// Creates an API token; returns its record and its secret (the hub keeps only its hash).
/// `expires_in` is a lifetime like `30d`, `12h`, `90m`.
pub async fn create_named_token(
    data_dir: &Path,
    role: Role,
    name: Option<&str>,
    expires_in: Option<&str>,
) -> Result<(TokenInfo, String), AdminError> {
    let name = name.unwrap_or(crate::tokens::DEFAULT_NAME).to_owned();
    crate::tokens::check_name(&name).map_err(|m| AdminError::Usage(format!("--name: {m}")))?;
    let expires_in_secs = expires_in
        .map(crate::tokens::parse_expires_in)
        .transpose()
        .map_err(|m| AdminError::Usage(format!("--expires-in: {m}")))?;
    let storage = open(data_dir).await?;
    let token = new_token();
    let info = storage.add_token(NewToken { hash: token_hash(&token), name, role, expires_in_secs }).await?;
    Ok((info, token))
}

/// Every API token, oldest first (never a secret).
pub async fn list_tokens(data_dir: &Path) -> Result<Vec<TokenInfo>, AdminError> {
    Ok(open(data_dir).await?.tokens().await?)
}

/// Revokes an API token by id; a running hub refuses it from its next request on.
pub async fn revoke_token(data_dir: &Path, id: &str) -> Result<TokenInfo, AdminError> {
    let id = uuid::Uuid::parse_str(id)
        .map_err(|_| AdminError::Usage(format!("{} is not a token id; `token list` shows them", quote(id))))?;
    open(data_dir).await?.revoke_token(id).await?.ok_or_else(|| AdminError::Usage(format!("no token {id}")))
}

/// Imports a catalog CSV into the hub's catalog document (all rows or none). A running hub picks
/// the new chunk up and pushes it to the stores.
pub async fn import_catalog(data_dir: &Path, text: &str) -> Result<usize, AdminError> {
    let rows = crate::catalog::parse_csv(text)?;
    let storage = open(data_dir).await?;
    let catalog = crate::catalog::HubCatalog::load(storage.as_ref()).await?;
    let n = rows.len();
    let edits = rows.into_iter().map(|(sku, item)| (sku, crate::catalog::Edit::Put(item))).collect();
    catalog.edit(storage.as_ref(), edits).await?;
    Ok(n)
}

/// Online backup of the hub database.
pub async fn backup(data_dir: &Path, to: &Path) -> Result<(), AdminError> {
    let storage = open(data_dir).await?;
    storage.backup(to.to_owned()).await?;
    Ok(())
}
