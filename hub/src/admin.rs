//! Admin verbs that work on a hub's data directory directly (they also work while the hub runs:
//! SQLite in WAL mode arbitrates, and the running hub notices revocations within seconds).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shelfsync_hub_core::Partitions;
use shelfsync_node::backup::{self, BackupFile};
use shelfsync_node::bundle::Bundle;
use shelfsync_shared::StoreId;

use crate::api::{new_token, token_hash};
use crate::db::{HubDb, Target};
use crate::pki::Pki;
use crate::sqlite::{db_path, SqliteOptions};
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

/// Opens the data dir's database (wherever [`Target::for_data_dir`] says it is).
async fn open(data_dir: &Path) -> Result<Arc<HubDb>, AdminError> {
    let target = Target::for_data_dir(data_dir, None)?;
    let opened = HubDb::open(&target, SqliteOptions { readers: 1, ..Default::default() }, None).await?;
    Ok(Arc::new(opened.storage))
}

/// Creates the hub database (the embedded one in the data dir) and its private CA.
pub async fn init(data_dir: &Path) -> Result<String, AdminError> {
    init_with(data_dir, None, Partitions::ONE).await
}

/// Creates the data dir with its private CA, and the hub database: in PostgreSQL at
/// `database_url` (which the data dir then remembers, [`crate::db::URL_FILE`]), else the
/// embedded one.
pub async fn init_with(
    data_dir: &Path,
    database_url: Option<&str>,
    partitions: Partitions,
) -> Result<String, AdminError> {
    let target = Target::for_data_dir(data_dir, database_url)?;
    // Refused before anything is made.
    target.check_partitions(partitions)?;
    let had_dir = data_dir.exists();
    shelfsync_node::dbfile::create_private_dir(data_dir)
        .map_err(|e| StorageError::Backend(format!("{}: {e}", data_dir.display())))?;
    Pki::init(&pki_dir(data_dir)).map_err(|e| AdminError::Pki(e.to_string()))?;
    let writer = match HubDb::create(&target, partitions).await {
        Ok(w) => w,
        Err(e) => {
            // Nothing half-made stays behind: the CA just made (Pki::init refuses an existing
            // one) and the data dir if this made it.
            let _ = std::fs::remove_dir_all(pki_dir(data_dir));
            if !had_dir {
                let _ = std::fs::remove_dir(data_dir);
            }
            return Err(e.into());
        }
    };
    if let Target::Postgres(url) = &target {
        let file = data_dir.join(crate::db::URL_FILE);
        shelfsync_node::dbfile::create_private_file(&file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{url}\n").as_bytes()))
            .map_err(|e| StorageError::Backend(format!("{}: {e}", file.display())))?;
    }
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
    Ok(create_named_token(data_dir, role, None, None, None).await?.1)
}

/// Creates an API token; returns its record and its secret (the hub keeps only its hash).
/// `expires_in` is a lifetime like `30d`, `12h`, `90m`.
pub async fn create_named_token(
    data_dir: &Path,
    role: Role,
    name: Option<&str>,
    expires_in: Option<&str>,
    channel: Option<&str>,
) -> Result<(TokenInfo, String), AdminError> {
    let name = name.unwrap_or(crate::tokens::DEFAULT_NAME).to_owned();
    crate::tokens::check_name(&name).map_err(|m| AdminError::Usage(format!("--name: {m}")))?;
    let expires_in_secs = expires_in
        .map(crate::tokens::parse_expires_in)
        .transpose()
        .map_err(|m| AdminError::Usage(format!("--expires-in: {m}")))?;
    let channel =
        crate::tokens::check_channel(role, channel).map_err(|m| AdminError::Usage(format!("--channel: {m}")))?;
    let storage = open(data_dir).await?;
    if let Some(c) = channel.as_ref().filter(|c| !c.is_web()) {
        if !storage.channel_exists(c.clone()).await? {
            return Err(AdminError::Usage(format!(
                "--channel: no channel {c}; add it first (`shelfsync-hub channel add {c}`)"
            )));
        }
    }
    let token = new_token();
    let info = storage.add_token(NewToken { hash: token_hash(&token), name, role, expires_in_secs, channel }).await?;
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

/// Online backup of the hub's data dir into one file (safe while the hub runs): the database, the
/// CA and keys, the hub certificate.
pub async fn backup(data_dir: &Path, to: &Path) -> Result<(), AdminError> {
    backup_with_config(data_dir, to, None).await
}

/// [`backup`], with the config file the hub runs with, if one is given.
pub async fn backup_with_config(data_dir: &Path, to: &Path, config: Option<&Path>) -> Result<(), AdminError> {
    let pki = pki_dir(data_dir);
    let mut files = Vec::new();
    for name in crate::pki::PKI_FILES {
        let f = read_backup_file(&pki, name)?.ok_or_else(|| {
            AdminError::Pki(format!(
                "{} is missing; a backup without it cannot serve the stores",
                pki.join(name).display()
            ))
        })?;
        files.push(BackupFile { path: format!("pki/{name}"), ..f });
    }
    // The PKI must load: a backup is only worth making if it can be restored.
    Pki::load(&pki).map_err(|e| AdminError::Pki(e.to_string()))?;
    let config_path = match config {
        Some(c) => {
            let dir = c.parent().unwrap_or(Path::new("."));
            let name = c.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let f = read_backup_file(dir, &name)?
                .ok_or_else(|| AdminError::Usage(format!("--config {}: no such file", c.display())))?;
            files.push(BackupFile { path: RESTORED_CONFIG.into(), mode: 0o600, ..f });
            Some(c.display().to_string())
        }
        None => None,
    };
    let storage = open(data_dir).await?;
    storage.backup_with(to.to_owned(), files, data_dir.display().to_string(), config_path).await?;
    Ok(())
}

fn read_backup_file(dir: &Path, name: &str) -> Result<Option<BackupFile>, AdminError> {
    backup::read_file(dir, name).map_err(|e| AdminError::Usage(e.to_string()))
}

/// Where `restore` puts the config file a backup holds (inside the restored data dir).
pub const RESTORED_CONFIG: &str = "config/hub.toml";

/// What a restore brought back.
#[derive(Debug)]
pub struct Restored {
    /// The hub writer the backup was made under (the restored hub takes a new one when it starts).
    pub writer: String,
    /// When the backup was made (ms).
    pub created_at_ms: i64,
    /// The config file it held: where it was, and where it is now.
    pub config: Option<(String, PathBuf)>,
}

/// Restores a hub backup into `data_dir`, which must be absent or empty. The whole file is checked
/// first (format, `quick_check`, the PKI present and parsing); the data dir is written beside its
/// place and renamed into it. The restored database is marked as a restored copy, so the hub takes
/// a new incarnation when it opens it, and stores give back what the backup lacks.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Restored, AdminError> {
    let b = backup::open(from, "hub").map_err(|e| AdminError::Usage(e.to_string()))?;
    let texts = crate::pki::PKI_FILES.map(|name| b.text(&format!("pki/{name}")).map(str::to_owned));
    let [ca_pem, ca_key, hub_pem, hub_key] = texts;
    let usage = |e: backup::BackupError| AdminError::Usage(e.to_string());
    Pki::from_pems(&ca_pem.map_err(usage)?, &ca_key.map_err(usage)?, &hub_pem.map_err(usage)?, hub_key.map_err(usage)?)
        .map_err(|e| AdminError::Usage(b.invalid(format!("its PKI does not load ({e})")).to_string()))?;
    backup::check_target(data_dir).map_err(usage)?;
    backup::restore(&b, data_dir, |tmp| {
        // Certain, whoever made the file: the restored database starts a new hub life.
        let conn = rusqlite::Connection::open(db_path(tmp)).map_err(|e| e.to_string())?;
        shelfsync_node::db::meta_set(&conn, "restored_copy", "1").map_err(|e| e.to_string())
    })
    .map_err(usage)?;
    Ok(Restored {
        writer: b.manifest.writer.clone(),
        created_at_ms: b.manifest.created_at_ms,
        config: b.manifest.config_path.clone().map(|c| (c, data_dir.join(RESTORED_CONFIG))),
    })
}

/// What `status` shows of a data dir.
#[derive(Debug, serde::Serialize)]
pub struct DirStatus {
    /// The data dir.
    pub data_dir: String,
    /// Which database (`sqlite PATH` or `postgres URL` without password).
    pub database: String,
    /// On PostgreSQL: the hubs sharing the database and the lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterView>,
    /// The hub writer (incarnation) of this database's life.
    pub hub_writer: String,
    /// The database was restored and has not been opened by a hub since (it will take a new life).
    pub restored_copy: bool,
    /// Stores registered (revoked included).
    pub stores: usize,
    /// Of those, revoked.
    pub stores_revoked: usize,
    /// API tokens by status (`active`, `revoked`, `expired`).
    pub tokens: std::collections::BTreeMap<String, usize>,
    /// Bytes the database takes (SQLite: hub.db with its write-ahead log).
    pub database_bytes: u64,
    /// The newest journal sequence.
    pub journal_head: u64,
    /// Journal events held.
    pub journal_events: u64,
}

/// Reads a data dir's figures (works while the hub runs).
pub async fn dir_status(data_dir: &Path) -> Result<DirStatus, AdminError> {
    let storage = open(data_dir).await?;
    let stores = storage.stores().await?;
    let now = shelfsync_node::now_ms();
    let mut tokens = std::collections::BTreeMap::new();
    for t in storage.tokens().await? {
        *tokens.entry(t.view(now).status.as_str().to_owned()).or_insert(0) += 1;
    }
    let (restored_copy, cluster) = match storage.as_ref() {
        HubDb::Sqlite(s) => (s.restored_copy().await?, None),
        HubDb::Postgres(p) => (false, Some(p.cluster().await?)),
    };
    Ok(DirStatus {
        data_dir: data_dir.display().to_string(),
        database: Target::for_data_dir(data_dir, None)?.describe(),
        cluster,
        hub_writer: storage.hub_writer().to_string(),
        restored_copy,
        stores: stores.len(),
        stores_revoked: stores.iter().filter(|s| s.revoked_at_ms.is_some()).count(),
        tokens,
        database_bytes: storage.size_bytes().await?,
        journal_head: storage.journal_head(),
        journal_events: storage.journal_count(None).await?,
    })
}
