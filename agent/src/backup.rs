//! `shelfsync-agent backup` and `restore`: the whole data dir (the database and the credential
//! bundle) in one file ([`shelfsync_node::backup`]), and back into a new data dir with a new
//! writer incarnation taken at once ([`crate::lineage::retire_restored`]), so nothing the
//! restored store records can collide with what the original did after the backup.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use shelfsync_node::backup::{self, BackupError, BackupFile, Manifest};
use shelfsync_node::bundle::{Bundle, BundleError};
use shelfsync_node::config::Synchronous;
use shelfsync_node::dbfile;
use shelfsync_shared::WriterId;

use crate::db::{self, DbError};

/// Backup and restore failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backup file or the target said no.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The database said no.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The database file of a data dir.
fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("agent.db")
}

/// Backs up `data_dir` (safe while the agent runs: SQLite's online backup from a read-only
/// connection) into the new file `to` (0600): the database, marked as a restored copy, and the
/// bundle if the store has one. Returns the writer the database runs as. Blocking.
pub fn backup(data_dir: &Path, to: &Path) -> Result<WriterId, Error> {
    let path = db_path(data_dir);
    dbfile::check_existing(&path, "Nothing was backed up").map_err(|e| match e {
        dbfile::FileError::Missing(p) => DbError::NotInitialized(p),
        dbfile::FileError::Unusable(m) => DbError::Corrupt(m),
    })?;
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(DbError::from)?;
    let identity = db::load_identity(&conn)?;
    let bundle_dir = data_dir.join("bundle");
    let mut files = Vec::new();
    if bundle_dir.exists() {
        // Only a bundle that loads is worth keeping.
        Bundle::load(&bundle_dir).map_err(|e| DbError::Corrupt(e.to_string()))?;
        for name in Bundle::FILES {
            let f = backup::read_file(&bundle_dir, name)?
                .ok_or_else(|| DbError::Corrupt(format!("{} is missing", bundle_dir.join(name).display())))?;
            files.push(BackupFile { path: format!("bundle/{name}"), ..f });
        }
    }
    let manifest = Manifest {
        format_version: backup::FORMAT_VERSION,
        kind: "agent".into(),
        writer: identity.writer.to_string(),
        created_at_ms: shelfsync_node::now_ms(),
        source_dir: data_dir.display().to_string(),
        db_file: "agent.db".into(),
        config_path: None,
    };
    backup::write(&conn, to, &manifest, &files, |copy| {
        db::meta_set(copy, "restored_copy", "1").map_err(|e| e.to_string())
    })?;
    Ok(identity.writer)
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// The writer the backup was made under (retired).
    pub old: WriterId,
    /// The writer the restored database records under from now on.
    pub new: WriterId,
    /// When the backup was made (ms).
    pub created_at_ms: i64,
    /// Whether it brought a bundle (the store syncs with a hub).
    pub bundle: bool,
}

/// Restores an agent backup into `data_dir` (absent or empty). The whole file is checked first
/// (format, `quick_check`, the bundle complete and loading); the database then takes a new writer
/// incarnation inside the new directory, before it is renamed into place. Blocking.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Restored, Error> {
    let b = backup::open(from, "agent")?;
    let bundle = b.files.iter().any(|f| f.path.starts_with("bundle/"));
    if bundle {
        let shown = Path::new("bundle");
        Bundle::parse(shown, |name| {
            b.text(&format!("bundle/{name}"))
                .map(str::to_owned)
                .map_err(|e| BundleError::Invalid { path: shown.join(name), message: e.to_string() })
        })
        .map_err(|e| b.invalid(format!("its bundle does not load ({e})")))?;
    }
    backup::check_target(data_dir)?;
    let now = shelfsync_node::now_ms();
    let mut minted = None;
    backup::restore(&b, data_dir, |tmp| {
        let r = (|| -> Result<(WriterId, WriterId), DbError> {
            let mut conn = db::open_conn(&db_path(tmp), OpenFlags::SQLITE_OPEN_READ_WRITE, Synchronous::Full)?;
            db::migrate(&mut conn, db::MIGRATIONS)?;
            let tx = conn.transaction()?;
            let identity = db::load_identity(&tx)?;
            let (_, new) = crate::lineage::retire_restored(&tx, &identity.writer, now)?;
            // The new writer is the restore's answer; nothing is left to detect at start.
            tx.execute("DELETE FROM meta WHERE key = 'restored_copy'", [])?;
            tx.commit()?;
            Ok((identity.writer, new))
        })();
        minted = Some(r.map_err(|e| e.to_string())?);
        Ok(())
    })?;
    let (old, new) = minted.expect("finish ran");
    Ok(Restored { old, new, created_at_ms: b.manifest.created_at_ms, bundle })
}
