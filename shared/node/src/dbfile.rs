//! Database files on disk, for the agent (`agent.db`) and the hub (`hub.db`): before a database is
//! opened for writing it must exist, be non-empty, pass `PRAGMA quick_check` and carry a schema,
//! else start-up is refused with a message naming the file and how to recover. Data dirs are
//! private to the service user (0700) and so are database files, their WAL and SHM, backups and
//! keys (0600); older installs are tightened when they are opened.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

/// Why a database file cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// There is no file: the data dir was never initialised.
    #[error("no database at {}", .0.display())]
    Missing(PathBuf),
    /// The file is there but unusable; the message names it and says how to recover.
    #[error("{0}")]
    Unusable(String),
}

/// The `-wal` or `-shm` companion of a database file.
pub fn companion(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Checks an existing database file without writing to it: it must be a non-empty SQLite file
/// that passes `PRAGMA quick_check` and has a schema (`user_version` > 0). `recovery` is appended
/// to every refusal and says how to get a good database back.
pub fn check_existing(path: &Path, recovery: &str) -> Result<(), FileError> {
    let shown = path.display();
    let unusable = |what: String| FileError::Unusable(format!("{what}. Refusing to start. {recovery}"));
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(FileError::Missing(path.to_owned())),
        Err(e) => return Err(unusable(format!("cannot read {shown}: {e}"))),
    };
    if !meta.is_file() {
        return Err(unusable(format!("{shown} is not a regular file")));
    }
    let wal_len = std::fs::metadata(companion(path, "-wal")).map(|m| m.len()).unwrap_or(0);
    if meta.len() == 0 && wal_len == 0 {
        return Err(unusable(format!(
            "{shown} is empty (0 bytes), so it holds no database; if an `init` was interrupted, delete \
             the file and run `init` again"
        )));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| unusable(format!("{shown} cannot be opened as a database ({e})")))?;
    let damaged = |detail: String| unusable(format!("{shown} is damaged (SQLite quick_check: {detail})"));
    let report: Vec<String> = conn
        .prepare("PRAGMA quick_check(5)")
        .and_then(|mut st| st.query_map([], |r| r.get::<_, String>(0))?.collect())
        .map_err(|e| damaged(e.to_string()))?;
    if report != ["ok"] {
        return Err(damaged(report.join("; ")));
    }
    let version: u32 =
        conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| damaged(e.to_string()))?;
    if version == 0 {
        return Err(unusable(format!("{shown} is a SQLite file without a Shelfsync schema")));
    }
    Ok(())
}

#[cfg(unix)]
fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

/// Takes group and other permissions off `path` (file or directory), if it has any; a directory
/// with the sticky bit (a shared one like `/tmp`) is left alone. Returns whether it changed.
pub fn make_private(path: &Path) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Ok(false);
        }
        let mode = mode_of(&meta);
        if meta.is_dir() && mode & 0o1000 != 0 {
            tracing::warn!(path = %path.display(), "a shared directory (sticky bit) holds a database; not changing its permissions");
            return Ok(false);
        }
        if mode & 0o077 == 0 {
            return Ok(false);
        }
        let private = mode & !0o077;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))?;
        tracing::info!(path = %path.display(), was = format!("{mode:04o}"), now = format!("{private:04o}"), "made private");
        Ok(true)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(false)
    }
}

/// Creates a directory and its missing parents, each new one 0700; an existing one is made private.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(path)?;
    make_private(path)?;
    Ok(())
}

/// Creates a new, empty file readable only by its owner (0600); fails if it exists. SQLite gives
/// a database's `-wal` and `-shm` the database file's mode, so they are private too.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// Makes an existing install private: the database's directory, the database and its `-wal` and
/// `-shm`, and each of `dirs` with the files directly in it (credential bundles, the hub's PKI).
/// Failures are logged, not fatal: the service may not own everything it can read.
pub fn tighten_install(db: &Path, dirs: &[PathBuf]) {
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        paths.push(dir.to_owned());
    }
    paths.extend([db.to_owned(), companion(db, "-wal"), companion(db, "-shm")]);
    for d in dirs {
        paths.push(d.clone());
        if let Ok(entries) = std::fs::read_dir(d) {
            paths.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    for p in paths {
        match make_private(&p) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot make private"),
        }
    }
}
