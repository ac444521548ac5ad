//! Backup files of a whole data dir, for `shelfsync-hub backup|restore` and
//! `shelfsync-agent backup|restore`.
//!
//! A backup is ONE SQLite file: SQLite's online backup of the live database (consistent while the
//! service runs; WAL arbitrates) plus two tables that hold everything else the data dir needs —
//! `shelfsync_backup_manifest` (format version, kind, the writer that made it, when, where from)
//! and `shelfsync_backup_files` (path relative to the data dir, mode, bytes: the hub's CA and
//! keys, a store's bundle, the config). Why a database and not an archive: one `PRAGMA
//! quick_check` covers every byte (keys included), a truncated or damaged file is refused before
//! anything is written, no new format or crate is needed, and the file is still a database the
//! binary opens (the recovery the README describes for `hub.db` keeps working).
//!
//! A restore checks the whole file first, then writes into a new directory beside the target and
//! renames it into place, so a data dir is either absent, or complete.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// The backup format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const MANIFEST_TABLE: &str = "shelfsync_backup_manifest";
const FILES_TABLE: &str = "shelfsync_backup_files";
/// Most bytes of one file kept beside the database (keys, certificates and configs are small).
const FILE_BYTES_MAX: u64 = 4 << 20;

/// Backup and restore failures; each names the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// File system.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The destination of a backup exists already.
    #[error("{0} already exists; choose a new file name")]
    Exists(PathBuf),
    /// The backup file is not usable (nothing was written).
    #[error("{path} is not a usable {kind} backup: {message}. Nothing was written")]
    Invalid { path: PathBuf, kind: String, message: String },
    /// The restore target holds something already (nothing was written).
    #[error("{path} is not empty ({what}); restore only into a new or empty directory. Nothing was written")]
    NotEmpty { path: PathBuf, what: String },
    /// SQLite failed.
    #[error("{path}: {message}")]
    Db { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_owned(), source }
}

fn db_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> BackupError + '_ {
    move |e| BackupError::Db { path: path.to_owned(), message: e.to_string() }
}

/// One file of the data dir besides the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupFile {
    /// Path relative to the data dir, `/`-separated (e.g. `pki/ca.key`).
    pub path: String,
    /// Unix permission bits it is restored with.
    pub mode: u32,
    /// Its content.
    pub bytes: Vec<u8>,
}

/// What a backup says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// `hub` or `agent`.
    pub kind: String,
    /// The writer (incarnation) the database ran as when the backup was made.
    pub writer: String,
    /// When the backup was made (ms since the epoch).
    pub created_at_ms: i64,
    /// The data dir it was made from.
    pub source_dir: String,
    /// The database's file name in the data dir (`hub.db`, `agent.db`).
    pub db_file: String,
    /// The config file included, as it was named when the backup was made.
    pub config_path: Option<String>,
}

/// A checked backup file: the manifest and the files, read in full.
#[derive(Clone, Debug)]
pub struct Backup {
    /// The file.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The files besides the database.
    pub files: Vec<BackupFile>,
}

impl Backup {
    /// The file at `path` (relative to the data dir), if the backup holds it.
    pub fn file(&self, path: &str) -> Option<&BackupFile> {
        self.files.iter().find(|f| f.path == path)
    }

    /// The file at `path` as UTF-8 text, or an error naming what is missing.
    pub fn text(&self, path: &str) -> Result<&str, BackupError> {
        let f = self.file(path).ok_or_else(|| self.invalid(format!("it holds no {path}")))?;
        std::str::from_utf8(&f.bytes).map_err(|_| self.invalid(format!("{path} is not text")))
    }

    /// An [`BackupError::Invalid`] about this backup.
    pub fn invalid(&self, message: String) -> BackupError {
        BackupError::Invalid { path: self.path.clone(), kind: self.manifest.kind.clone(), message }
    }
}

fn relative_ok(rel: &str) -> bool {
    !rel.is_empty() && Path::new(rel).components().all(|c| matches!(c, Component::Normal(_)))
}

/// Reads `rel` under `dir` for a backup, with its mode. `None` if it does not exist.
pub fn read_file(dir: &Path, rel: &str) -> Result<Option<BackupFile>, BackupError> {
    let path = dir.join(rel);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    if !meta.is_file() || meta.len() > FILE_BYTES_MAX {
        return Err(io(&path)(std::io::Error::other("not a regular file of at most 4 MiB")));
    }
    #[cfg(unix)]
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o777
    };
    #[cfg(not(unix))]
    let mode = 0o600;
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    Ok(Some(BackupFile { path: rel.to_owned(), mode, bytes }))
}

/// Writes a backup of the database `conn` is open on (any connection of it; the online backup
/// API takes a consistent snapshot while others write) to the new file `to` (0600; refused if it
/// exists), with `manifest` and `files`. `mark` runs on the copy inside the transaction that adds
/// them (it flags the copy as restored). A failure leaves no file behind.
pub fn write(
    conn: &Connection,
    to: &Path,
    manifest: &Manifest,
    files: &[BackupFile],
    mark: impl FnOnce(&Connection) -> Result<(), String>,
) -> Result<(), BackupError> {
    crate::dbfile::create_private_file(to).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => BackupError::Exists(to.to_owned()),
        _ => io(to)(e),
    })?;
    let done = (|| {
        conn.backup(rusqlite::MAIN_DB, to, None).map_err(db_err(to))?;
        let mut copy = Connection::open(to).map_err(db_err(to))?;
        // One self-contained file: no write-ahead log beside it.
        copy.pragma_update_and_check(None, "journal_mode", "DELETE", |_| Ok(())).map_err(db_err(to))?;
        let tx = copy.transaction().map_err(db_err(to))?;
        mark(&tx).map_err(|message| BackupError::Db { path: to.to_owned(), message })?;
        tx.execute_batch(&format!(
            "CREATE TABLE {MANIFEST_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
             CREATE TABLE {FILES_TABLE} (path TEXT PRIMARY KEY, mode INTEGER NOT NULL, bytes BLOB NOT NULL) WITHOUT ROWID;"
        ))
        .map_err(db_err(to))?;
        let put = |k: &str, v: &str| {
            tx.execute(&format!("INSERT INTO {MANIFEST_TABLE} (key, value) VALUES (?1, ?2)"), params![k, v])
                .map(|_| ())
                .map_err(db_err(to))
        };
        put("format_version", &manifest.format_version.to_string())?;
        put("kind", &manifest.kind)?;
        put("writer", &manifest.writer)?;
        put("created_at_ms", &manifest.created_at_ms.to_string())?;
        put("source_dir", &manifest.source_dir)?;
        put("db_file", &manifest.db_file)?;
        if let Some(c) = &manifest.config_path {
            put("config_path", c)?;
        }
        for f in files {
            tx.execute(
                &format!("INSERT INTO {FILES_TABLE} (path, mode, bytes) VALUES (?1, ?2, ?3)"),
                params![f.path, f.mode, f.bytes],
            )
            .map_err(db_err(to))?;
        }
        tx.commit().map_err(db_err(to))?;
        drop(copy);
        std::fs::File::open(to).and_then(|f| f.sync_all()).map_err(io(to))
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(to);
        let _ = std::fs::remove_file(crate::dbfile::companion(to, "-journal"));
    }
    done
}

/// Opens and checks a backup file of `kind` without writing anything: it must be a SQLite file
/// that passes a full `PRAGMA quick_check`, carry a schema, and hold a manifest of this format
/// version and kind with well-formed file entries.
pub fn open(path: &Path, kind: &str) -> Result<Backup, BackupError> {
    let invalid = |message: String| BackupError::Invalid { path: path.to_owned(), kind: kind.to_owned(), message };
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(invalid("the file is empty (0 bytes)".into()));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| invalid(format!("cannot be opened as a database ({e})")))?;
    let report: Vec<String> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut st| st.query_map([], |r| r.get::<_, String>(0))?.collect())
        .map_err(|e| invalid(format!("damaged or truncated (SQLite quick_check: {e})")))?;
    if report != ["ok"] {
        return Err(invalid(format!("damaged or truncated (SQLite quick_check: {})", report.join("; "))));
    }
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| invalid(format!("unreadable schema ({e})")))?;
    if version == 0 {
        return Err(invalid("a SQLite file without a Shelfsync schema".into()));
    }
    let has_manifest: bool = conn
        .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", [MANIFEST_TABLE], |_| Ok(()))
        .optional()
        .map_err(|e| invalid(e.to_string()))?
        .is_some();
    if !has_manifest {
        return Err(invalid(
            "it is a bare database with no manifest (a backup made before backups held the whole data dir); \
             it can still be put in place of the database file by hand, see the README"
                .into(),
        ));
    }
    let get = |k: &str| -> Result<Option<String>, BackupError> {
        conn.query_row(&format!("SELECT value FROM {MANIFEST_TABLE} WHERE key = ?1"), [k], |r| r.get(0))
            .optional()
            .map_err(|e| invalid(e.to_string()))
    };
    let need = |k: &str| get(k)?.ok_or_else(|| invalid(format!("the manifest has no {k}")));
    let format_version: u32 =
        need("format_version")?.parse().map_err(|_| invalid("the manifest's format_version is not a number".into()))?;
    if format_version != FORMAT_VERSION {
        return Err(invalid(format!(
            "backup format version {format_version}; this binary reads version {FORMAT_VERSION}"
        )));
    }
    let found_kind = need("kind")?;
    if found_kind != kind {
        return Err(invalid(format!("it is a backup of a {found_kind}, not of a {kind}")));
    }
    let manifest = Manifest {
        format_version,
        kind: found_kind,
        writer: need("writer")?,
        created_at_ms: need("created_at_ms")?
            .parse()
            .map_err(|_| invalid("the manifest's created_at_ms is not a number".into()))?,
        source_dir: need("source_dir")?,
        db_file: need("db_file")?,
        config_path: get("config_path")?,
    };
    if !relative_ok(&manifest.db_file) || manifest.db_file.contains('/') {
        return Err(invalid(format!("db_file {:?} is not a file name", manifest.db_file)));
    }
    let files = conn
        .prepare(&format!("SELECT path, mode, bytes FROM {FILES_TABLE} ORDER BY path"))
        .and_then(|mut st| {
            st.query_map([], |r| Ok(BackupFile { path: r.get(0)?, mode: r.get(1)?, bytes: r.get(2)? }))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| invalid(format!("its file table is unreadable ({e})")))?;
    for f in &files {
        if !relative_ok(&f.path) || f.path == manifest.db_file {
            return Err(invalid(format!("file entry {:?} is not a path inside a data dir", f.path)));
        }
    }
    Ok(Backup { path: path.to_owned(), manifest, files })
}

/// Checks that `data_dir` may receive a restore: absent, or an empty directory.
pub fn check_target(data_dir: &Path) -> Result<(), BackupError> {
    match std::fs::symlink_metadata(data_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(data_dir)(e)),
        Ok(m) if !m.is_dir() => {
            Err(BackupError::NotEmpty { path: data_dir.to_owned(), what: "it is a file, not a directory".into() })
        }
        Ok(_) => {
            let mut names: Vec<String> = std::fs::read_dir(data_dir)
                .map_err(io(data_dir))?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if names.is_empty() {
                return Ok(());
            }
            names.sort();
            let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
            let more = if names.len() > 5 { format!(" and {} more", names.len() - 5) } else { String::new() };
            Err(BackupError::NotEmpty { path: data_dir.to_owned(), what: format!("it holds {shown}{more}") })
        }
    }
}

fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BackupError> {
    if let Some(dir) = path.parent() {
        crate::dbfile::create_private_dir(dir).map_err(io(dir))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Never looser than it was, and never readable by others: keys stay 0600.
        opts.mode(mode & 0o700);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Restores a checked backup into `data_dir` (absent or empty): the database and every file are
/// written into a new directory beside it, `finish` runs on that directory (the binary's last
/// changes to the restored database), and only then is it renamed to `data_dir`. On any failure
/// the new directory is removed and `data_dir` is as it was.
pub fn restore(
    backup: &Backup,
    data_dir: &Path,
    finish: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), BackupError> {
    check_target(data_dir)?;
    let name = data_dir
        .file_name()
        .ok_or_else(|| io(data_dir)(std::io::Error::other("a data dir needs a name")))?
        .to_string_lossy()
        .into_owned();
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(".{name}.restore-{}", uuid::Uuid::new_v4().simple()));
    crate::dbfile::create_private_dir(&tmp).map_err(io(&tmp))?;
    let done = (|| {
        let db = tmp.join(&backup.manifest.db_file);
        crate::dbfile::create_private_file(&db).map_err(io(&db))?;
        let src = Connection::open_with_flags(&backup.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(db_err(&backup.path))?;
        src.backup(rusqlite::MAIN_DB, &db, None).map_err(db_err(&db))?;
        drop(src);
        {
            let copy = Connection::open(&db).map_err(db_err(&db))?;
            // The keys held beside the database leave no trace in its free pages.
            copy.execute_batch(&format!(
                "PRAGMA secure_delete = ON; DROP TABLE {FILES_TABLE}; DROP TABLE {MANIFEST_TABLE};"
            ))
            .map_err(db_err(&db))?;
        }
        for f in &backup.files {
            write_private(&tmp.join(&f.path), &f.bytes, f.mode)?;
        }
        finish(&tmp).map_err(|message| BackupError::Db { path: db.clone(), message })?;
        std::fs::File::open(&db).and_then(|f| f.sync_all()).map_err(io(&db))?;
        sync_dir(&tmp);
        // An empty directory is replaced by the rename; a non-empty one (a race) is refused by it.
        std::fs::rename(&tmp, data_dir).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => BackupError::NotEmpty {
                path: data_dir.to_owned(),
                what: "something was written into it meanwhile".into(),
            },
            _ => io(data_dir)(e),
        })?;
        sync_dir(&parent);
        Ok(())
    })();
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> PathBuf {
        let db = dir.join("src.db");
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch("PRAGMA user_version = 3; CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);").unwrap();
        let to = dir.join("b.backup");
        let m = Manifest {
            format_version: FORMAT_VERSION,
            kind: "hub".into(),
            writer: "hub@0000000000000001".into(),
            created_at_ms: 1,
            source_dir: dir.display().to_string(),
            db_file: "hub.db".into(),
            config_path: None,
        };
        let files = vec![BackupFile { path: "pki/ca.key".into(), mode: 0o600, bytes: b"secret".to_vec() }];
        write(&conn, &to, &m, &files, |c| {
            c.execute("INSERT INTO meta VALUES ('restored_copy', '1')", []).map(|_| ()).map_err(|e| e.to_string())
        })
        .unwrap();
        to
    }

    #[test]
    fn round_trip_into_a_new_dir_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let to = sample(dir.path());
        assert!(matches!(
            write(&Connection::open_in_memory().unwrap(), &to, &open(&to, "hub").unwrap().manifest, &[], |_| Ok(())),
            Err(BackupError::Exists(_))
        ));
        let b = open(&to, "hub").unwrap();
        assert_eq!(b.text("pki/ca.key").unwrap(), "secret");
        assert!(matches!(open(&to, "agent"), Err(BackupError::Invalid { .. })));

        let target = dir.path().join("restored");
        restore(&b, &target, |_| Ok(())).unwrap();
        assert_eq!(std::fs::read(target.join("pki/ca.key")).unwrap(), b"secret");
        let conn = Connection::open(target.join("hub.db")).unwrap();
        let tables: i64 = conn
            .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'shelfsync_backup_%'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0, "the backup's own tables are gone from the restored database");

        // Not again into the same (now full) dir, and a failing finish leaves nothing.
        let err = restore(&b, &target, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("is not empty") && err.contains("hub.db"), "{err}");
        let other = dir.path().join("other");
        assert!(restore(&b, &other, |_| Err("no".into())).is_err());
        assert!(!other.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".restore-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_truncated_backup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let to = sample(dir.path());
        let bytes = std::fs::read(&to).unwrap();
        let cut = dir.path().join("cut.backup");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = open(&cut, "hub").unwrap_err().to_string();
        assert!(err.contains("cut.backup") && err.contains("Nothing was written"), "{err}");
        std::fs::write(&cut, b"").unwrap();
        assert!(open(&cut, "hub").unwrap_err().to_string().contains("empty"));
    }
}
