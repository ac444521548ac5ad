//! Agent configuration: a serde struct where every key has a default, loaded from TOML, then
//! overridden by `SHELFSYNC_AGENT__SECTION__KEY` environment variables and command-line flags,
//! then validated with errors that name the key. Every key is documented in `config/agent.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use shelfsync_node::config::{load_toml, validate_edge};
pub use shelfsync_node::config::{ConfigError, RateLimit, Synchronous};

/// The whole agent configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where the database and credential bundle live.
    pub data_dir: PathBuf,
    /// Local HTTP API.
    pub api: ApiConfig,
    /// SQLite.
    pub storage: StorageConfig,
    /// Sync with the hub.
    pub sync: SyncSection,
    /// Logging.
    pub log: LogConfig,
}

/// `[api]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Listen address of the POS API.
    pub listen: SocketAddr,
    /// Bearer token required on `/v1/*` when non-empty.
    pub token: String,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Host names besides the listen address and loopback that `Host`/`Origin` may name.
    pub allowed_hosts: Vec<String>,
    /// Seconds a client has to send a request's headers (also the keep-alive idle limit).
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may move no byte while no request is being handled.
    pub idle_timeout_secs: u64,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections open at once from one client address; 0 = no per-address cap.
    pub max_connections_per_ip: usize,
    /// Request rate limits.
    pub rate_limit: AgentRateLimits,
}

/// `[api.rate_limit]`: per bearer token (when the agent has one and the request carries it),
/// else per client address. A POS never comes near these; a runaway loop does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentRateLimits {
    /// Enforce the limits.
    pub enabled: bool,
    /// Sales, returns, adjustments, counts, fulfilments, overrides (POST/PUT/PATCH/DELETE).
    pub writes: RateLimit,
    /// Stock, holds, status, catalog, metrics, health (GET).
    pub reads: RateLimit,
}

impl Default for AgentRateLimits {
    fn default() -> Self {
        AgentRateLimits { enabled: true, writes: RateLimit::new(200, 1000), reads: RateLimit::new(500, 1000) }
    }
}

impl AgentRateLimits {
    /// Every class at `per_sec` with bursts of `per_sec` (for load tests and benchmarks).
    pub fn raised(per_sec: u32) -> Self {
        let l = RateLimit::new(per_sec, per_sec);
        AgentRateLimits { enabled: true, writes: l, reads: l }
    }
}

/// `[storage]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `full` or `normal`.
    pub synchronous: Synchronous,
    /// Most requests committed together in one transaction.
    pub group_commit_max: usize,
}

/// `[sync]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    /// Sync with the hub at all (needs a bundle in `<data_dir>/bundle`).
    pub enabled: bool,
    /// Override of the bundle's hub address (`host:port`); empty = use the bundle's.
    pub hub_addr: String,
    /// First reconnect delay.
    pub backoff_ms_min: u64,
    /// Longest reconnect delay after a transient failure (hub unreachable, connection lost).
    /// Kept short (1 s) so a store is back within about a second of its link healing, however
    /// long the outage was (see `sync::backoff`).
    pub backoff_ms_max: u64,
    /// Delay before trying again after a permanent refusal (certificate refused or revoked,
    /// another agent of the store connected): someone has to act first.
    pub refused_retry_ms: u64,
    /// How long a change waits for company before it is shipped.
    pub coalesce_ms: u64,
    /// Anti-entropy digest period.
    pub digest_interval_secs: u64,
}

/// `[log]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `shelfsync_agent=debug`. `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` (default) or `json`, one object per line.
    pub format: shelfsync_node::cli::LogFormat,
}

const fn default_listen() -> SocketAddr {
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7070)
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            data_dir: PathBuf::from("/var/lib/shelfsync-agent"),
            api: ApiConfig::default(),
            storage: StorageConfig::default(),
            sync: SyncSection::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_listen(),
            token: String::new(),
            max_body_bytes: 64 * 1024,
            allowed_hosts: Vec::new(),
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 512,
            max_connections_per_ip: 256,
            rate_limit: AgentRateLimits::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { synchronous: Synchronous::Full, group_commit_max: 256 }
    }
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection {
            enabled: true,
            hub_addr: String::new(),
            backoff_ms_min: 200,
            backoff_ms_max: 1_000,
            refused_retry_ms: 60_000,
            coalesce_ms: 0,
            digest_interval_secs: 30,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { filter: "info".into(), format: shelfsync_node::cli::LogFormat::Text }
    }
}

/// Prefix of environment overrides: `SHELFSYNC_AGENT__API__LISTEN=127.0.0.1:7171`.
pub const ENV_PREFIX: &str = "SHELFSYNC_AGENT__";

impl AgentConfig {
    /// Loads `path` (if given) over the defaults, then applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        load_toml(path, ENV_PREFIX)
    }

    /// Rejects combinations that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| Err(ConfigError::Invalid { key, message: message.to_owned() });
        if self.api.max_body_bytes < 1024 || self.api.max_body_bytes > 16 << 20 {
            return bad("api.max_body_bytes", "must be between 1024 and 16777216");
        }
        if self.storage.group_commit_max == 0 || self.storage.group_commit_max > 10_000 {
            return bad("storage.group_commit_max", "must be between 1 and 10000");
        }
        if self.sync.backoff_ms_min == 0 || self.sync.backoff_ms_min > self.sync.backoff_ms_max {
            return bad("sync.backoff_ms_min", "must be at least 1 and at most sync.backoff_ms_max");
        }
        if self.sync.backoff_ms_max > 600_000 {
            return bad("sync.backoff_ms_max", "must be at most 600000 (10 minutes)");
        }
        if self.sync.refused_retry_ms == 0 || self.sync.refused_retry_ms > 3_600_000 {
            return bad("sync.refused_retry_ms", "must be between 1 and 3600000 (an hour)");
        }
        if self.sync.coalesce_ms > 1000 {
            return bad("sync.coalesce_ms", "must be at most 1000");
        }
        if self.sync.digest_interval_secs == 0 {
            return bad("sync.digest_interval_secs", "must be at least 1");
        }
        if !self.api.listen.ip().is_loopback() && self.api.token.is_empty() {
            return bad("api.token", "must be set when api.listen is not a loopback address");
        }
        if let Some(problem) = token_problem(&self.api.token, !self.api.listen.ip().is_loopback()) {
            return Err(ConfigError::Invalid { key: "api.token", message: problem });
        }
        for h in &self.api.allowed_hosts {
            let ok = !h.is_empty()
                && h.len() <= 253
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !ok {
                return bad(
                    "api.allowed_hosts",
                    "entries must be host names (letters, digits, '.', '-'), without port",
                );
            }
        }
        validate_edge(
            [
                "api.header_read_timeout_secs",
                "api.idle_timeout_secs",
                "api.max_connections",
                "api.max_connections_per_ip",
            ],
            self.api.header_read_timeout_secs,
            self.api.idle_timeout_secs,
            self.api.max_connections,
            self.api.max_connections_per_ip,
        )?;
        let r = &self.api.rate_limit;
        for (key, limit) in [("api.rate_limit.writes", r.writes), ("api.rate_limit.reads", r.reads)] {
            if let Some(problem) = limit.problem() {
                return bad(key, problem);
            }
        }
        Ok(())
    }

    /// The HTTP edge's limits as the server wants them.
    pub fn serve_options(&self) -> shelfsync_node::http::ServeOptions {
        shelfsync_node::http::ServeOptions {
            header_read_timeout: std::time::Duration::from_secs(self.api.header_read_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(self.api.idle_timeout_secs),
            max_connections: self.api.max_connections,
            max_connections_per_ip: self.api.max_connections_per_ip,
            drain: std::time::Duration::from_secs(shelfsync_node::http::DRAIN_SECS),
        }
    }

    /// The SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("agent.db")
    }

    /// The credential bundle directory.
    pub fn bundle_dir(&self) -> PathBuf {
        self.data_dir.join("bundle")
    }
}

/// Shortest token accepted for an API reachable from other machines.
pub const TOKEN_MIN_LEN: usize = 32;
/// Fewest distinct characters in such a token (`openssl rand -hex 32` has about 16).
pub const TOKEN_MIN_DISTINCT: usize = 8;

/// Why `token` cannot be used, if it cannot: it travels in a header, so printable ASCII without
/// spaces; and when the listener is reachable from the network (`exposed`), at least
/// [`TOKEN_MIN_LEN`] characters of which at least [`TOKEN_MIN_DISTINCT`] differ.
pub fn token_problem(token: &str, exposed: bool) -> Option<String> {
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Some("must be printable ASCII without spaces".into());
    }
    if !exposed || token.is_empty() {
        return None;
    }
    let mut distinct: Vec<u8> = token.bytes().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if token.len() < TOKEN_MIN_LEN || distinct.len() < TOKEN_MIN_DISTINCT {
        return Some(format!(
            "is too weak for a listener that is not loopback: use at least {TOKEN_MIN_LEN} characters with at \
             least {TOKEN_MIN_DISTINCT} different ones (e.g. `openssl rand -hex 32`)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use shelfsync_node::config::{apply_env, undocumented_keys};

    #[test]
    fn defaults_validate_and_env_overrides_apply() {
        let c = AgentConfig::default();
        c.validate().unwrap();
        let mut t = toml::Table::new();
        let vars = vec![
            ("SHELFSYNC_AGENT__API__LISTEN".to_string(), "127.0.0.1:9999".to_string()),
            ("SHELFSYNC_AGENT__STORAGE__GROUP_COMMIT_MAX".to_string(), "8".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        apply_env(&mut t, ENV_PREFIX, vars.into_iter()).unwrap();
        let c: AgentConfig = toml::Value::Table(t).try_into().unwrap();
        assert_eq!(c.api.listen.port(), 9999);
        assert_eq!(c.storage.group_commit_max, 8);
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = AgentConfig::default();
        c.storage.group_commit_max = 0;
        assert!(c.validate().unwrap_err().to_string().contains("storage.group_commit_max"));
        let mut c = AgentConfig::default();
        c.api.listen = "0.0.0.0:7070".parse().unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("api.token"));
    }

    #[test]
    fn an_exposed_listener_needs_a_strong_token() {
        let mut c = AgentConfig::default();
        c.api.listen = "0.0.0.0:7070".parse().unwrap();
        for weak in [
            "x",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "abababababababababababababababababab",
            "short-but-varied-123",
        ] {
            c.api.token = weak.into();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("api.token") && err.contains("32"), "{weak}: {err}");
        }
        c.api.token = "3f9c2a7b1e8d4c6f0a5b9e2d7c1f4a8b".into();
        c.validate().unwrap();
        c.api.token = "3f9c2a7b1e8d4c6f 0a5b9e2d7c1f4a8b".into();
        assert!(c.validate().unwrap_err().to_string().contains("api.token"));
        // On loopback a token is optional and any printable one will do.
        let mut c = AgentConfig::default();
        c.api.token = "x".into();
        c.validate().unwrap();
    }

    #[test]
    fn edge_limits_are_validated_by_key() {
        let mut c = AgentConfig::default();
        c.api.header_read_timeout_secs = 0;
        assert!(c.validate().unwrap_err().to_string().contains("api.header_read_timeout_secs"));
        let mut c = AgentConfig::default();
        c.api.max_connections_per_ip = c.api.max_connections + 1;
        assert!(c.validate().unwrap_err().to_string().contains("api.max_connections_per_ip"));
        let mut c = AgentConfig::default();
        c.api.rate_limit.writes.per_sec = 0;
        assert!(c.validate().unwrap_err().to_string().contains("api.rate_limit.writes"));
        let mut c = AgentConfig::default();
        c.api.allowed_hosts = vec!["http://pos:7070".into()];
        assert!(c.validate().unwrap_err().to_string().contains("api.allowed_hosts"));
        let t: toml::Table = "[api.rate_limit]\nreads = { per_sec = 5 }".parse().unwrap();
        let err = toml::Value::Table(t).try_into::<AgentConfig>().unwrap_err();
        assert!(err.to_string().contains("burst"), "{err}");
    }

    #[test]
    fn example_file_documents_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let from_file: AgentConfig = toml::from_str(&text).unwrap();
        let as_value = |c: &AgentConfig| toml::Value::try_from(c).unwrap();
        assert_eq!(
            as_value(&from_file),
            as_value(&AgentConfig::default()),
            "config/agent.toml drifted from the defaults"
        );
        let file: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(undocumented_keys(&as_value(&AgentConfig::default()), &file), Vec::<String>::new());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let t: toml::Table = "[api]\nlisten_addr = \"x\"".parse().unwrap();
        let err = toml::Value::Table(t).try_into::<AgentConfig>().unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }
}
