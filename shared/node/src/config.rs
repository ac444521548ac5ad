//! Configuration plumbing both binaries use: TOML over the type's defaults, then
//! `PREFIX` + `SECTION__KEY` environment overrides, validation helpers with errors that name the
//! key, and the settings both share ([`Synchronous`], [`RateLimit`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::ratelimit::RateLimit;

/// How hard SQLite works to make a commit survive power loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync the WAL on every commit: an acknowledged sale survives power loss.
    Full,
    /// fsync only at checkpoints: survives a process crash, may lose the last commits on power loss.
    Normal,
}

impl Synchronous {
    /// The PRAGMA value.
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// A configuration problem, naming the key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// An environment override could not be applied.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// A key has a value that cannot work.
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Checks the HTTP edge's timeouts and caps; `keys` names them in that order.
pub fn validate_edge(
    keys: [&'static str; 4],
    header_read_timeout_secs: u64,
    idle_timeout_secs: u64,
    max_connections: usize,
    max_connections_per_ip: usize,
) -> Result<(), ConfigError> {
    let bad = |key, message: &str| Err(ConfigError::Invalid { key, message: message.to_owned() });
    if header_read_timeout_secs == 0 || header_read_timeout_secs > 3600 {
        return bad(keys[0], "must be between 1 and 3600");
    }
    if idle_timeout_secs == 0 || idle_timeout_secs > 86_400 {
        return bad(keys[1], "must be between 1 and 86400");
    }
    if max_connections == 0 || max_connections > 1_000_000 {
        return bad(keys[2], "must be between 1 and 1000000");
    }
    if max_connections_per_ip > max_connections {
        return bad(keys[3], "must be at most the total cap (0 = no per-address cap)");
    }
    Ok(())
}

/// Loads a configuration: `path` (if given) over the type's defaults, then `prefix` environment
/// overrides. Shared by the agent and the hub.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: Option<&Path>, prefix: &str) -> Result<T, ConfigError> {
    let mut table = match path {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?
        }
        None => toml::Table::new(),
    };
    apply_env(&mut table, prefix, std::env::vars())?;
    let path = path.map(Path::to_owned).unwrap_or_else(|| PathBuf::from("<defaults>"));
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse { path, message: e.to_string() })
}

/// Keys present in `defaults` but absent from `file` (dotted paths), to check that an example
/// config file documents every key.
pub fn undocumented_keys(defaults: &toml::Value, file: &toml::Value) -> Vec<String> {
    fn walk(prefix: &str, d: &toml::Value, f: Option<&toml::Value>, out: &mut Vec<String>) {
        if let toml::Value::Table(dt) = d {
            for (k, v) in dt {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                let fv = f.and_then(|f| f.get(k));
                if fv.is_none() {
                    out.push(path);
                } else {
                    walk(&path, v, fv, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk("", defaults, Some(file), &mut out);
    out
}

/// Applies `PREFIX` + `SECTION__KEY` environment variables to a TOML table. Values parse as TOML
/// (so numbers and booleans keep their type) and fall back to strings.
pub fn apply_env(
    table: &mut toml::Table,
    prefix: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, raw) in vars {
        let Some(path) = var.strip_prefix(prefix) else { continue };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            return Err(ConfigError::Env { var, message: "empty key segment".into() });
        }
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw.clone()));
        let mut cursor = &mut *table;
        for key in &keys[..keys.len() - 1] {
            let entry = cursor.entry(key.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(ConfigError::Env { var, message: format!("{key} is not a section") }),
            };
        }
        cursor.insert(keys[keys.len() - 1].clone(), value);
    }
    Ok(())
}
