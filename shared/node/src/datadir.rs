//! Where an admin verb's data dir comes from, the same way for both binaries: `--data-dir D`, or
//! the `data_dir` of `--config F` (the file `serve`/`run` would use, with its environment
//! overrides and defaults); `--data-dir` wins, and neither is a clear error.

use std::path::{Path, PathBuf};

/// The two flags, flattened into every verb that works on a data dir.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DataDirArgs {
    /// The data dir to work on (wins over the config file's `data_dir`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A TOML config file whose `data_dir` names the data dir (see config/*.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// No data dir could be found.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Neither flag was given.
    #[error("no data dir: give --data-dir DIR, or --config FILE (its data_dir key names the data dir)")]
    Neither,
    /// The config file could not be loaded.
    #[error("--config {}: {message}", .path.display())]
    Config { path: PathBuf, message: String },
}

impl DataDirArgs {
    /// `--data-dir` if given, else the `data_dir` of the config file as `load` reads it.
    pub fn resolve<E: std::fmt::Display>(
        &self,
        load: impl FnOnce(&Path) -> Result<PathBuf, E>,
    ) -> Result<PathBuf, DataDirError> {
        if let Some(d) = &self.data_dir {
            return Ok(d.clone());
        }
        let path = self.config.as_deref().ok_or(DataDirError::Neither)?;
        load(path).map_err(|e| DataDirError::Config { path: path.to_owned(), message: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_wins_config_is_read_and_neither_is_refused() {
        let both = DataDirArgs { data_dir: Some("/a".into()), config: Some("/c.toml".into()) };
        assert_eq!(both.resolve(|_| Err::<PathBuf, _>("unread")).unwrap(), PathBuf::from("/a"));
        let cfg = DataDirArgs { data_dir: None, config: Some("/c.toml".into()) };
        assert_eq!(cfg.resolve(|p| Ok::<_, String>(p.with_extension("d"))).unwrap(), PathBuf::from("/c.d"));
        let bad = cfg.resolve(|_| Err::<PathBuf, _>("missing")).unwrap_err().to_string();
        assert!(bad.contains("/c.toml") && bad.contains("missing"), "{bad}");
        let none = DataDirArgs::default().resolve(|_| Err::<PathBuf, _>("unread")).unwrap_err().to_string();
        assert!(none.contains("--data-dir") && none.contains("--config"), "{none}");
    }
}
