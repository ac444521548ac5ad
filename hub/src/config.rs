//! Hub configuration: defaults, TOML file, `SHELFSYNC_HUB__SECTION__KEY` environment overrides,
//! flags, then validation naming the key. Every key is documented in `config/hub.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shelfsync_node::config::{ConfigError, RateLimit, Synchronous};

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "SHELFSYNC_HUB__";

/// The whole hub configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Database, PKI and backups.
    pub data_dir: PathBuf,
    /// QUIC sync endpoint.
    pub quic: QuicSection,
    /// HTTP API.
    pub http: HttpSection,
    /// SQLite.
    pub storage: StorageSection,
    /// Sync behaviour.
    pub sync: SyncSection,
    /// Online reservations.
    pub reservations: ReservationsSection,
    /// Discounting silent stores online.
    pub staleness: StalenessSection,
    /// Escrow rights: stores grant online the right to some of their units
    /// (`hub/docs/escrow.md`).
    pub escrow: EscrowSection,
    /// Logging.
    pub log: LogSection,
    /// Webhook endpoints for the change feed.
    pub webhooks: Vec<crate::feed::WebhookConfig>,
}

/// `[reservations]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReservationsSection {
    /// Lease when a reservation names no `ttl_secs`.
    pub default_ttl_secs: u64,
    /// Longest lease a reservation or extension may ask.
    pub max_ttl_secs: u64,
    /// How often due leases are expired.
    pub expiry_check_ms: u64,
}

/// `[staleness]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StalenessSection {
    /// Discount what a silent store offers online.
    pub enabled: bool,
    /// Silence shorter than this costs nothing.
    pub grace_secs: u64,
    /// Time constant of the sales velocity estimate.
    pub velocity_window_secs: u64,
}

impl Default for ReservationsSection {
    fn default() -> Self {
        ReservationsSection { default_ttl_secs: 900, max_ttl_secs: 7 * 24 * 3600, expiry_check_ms: 200 }
    }
}

impl Default for StalenessSection {
    fn default() -> Self {
        StalenessSection { enabled: true, grace_secs: 60, velocity_window_secs: 3600 }
    }
}

impl StalenessSection {
    /// As storage wants it.
    pub fn to_staleness(&self) -> shelfsync_hub_core::Staleness {
        shelfsync_hub_core::Staleness {
            enabled: self.enabled,
            grace_ms: self.grace_secs as i64 * 1000,
            tau_ms: self.velocity_window_secs.max(1) as i64 * 1000,
        }
    }
}

/// `[escrow]`: `enabled = false` is today's behaviour (stock offered online as is, with the
/// staleness discount if `[staleness]` is on); `enabled = true` offers online only what stores
/// granted, `share` of their units at most `max`, keeping `keep` for walk-ins. With
/// `[staleness] enabled` too, the discount applies on top ("escrow+staleness").
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscrowSection {
    /// Online promises only within granted rights.
    pub enabled: bool,
    /// Share of a store's units it grants online (0..=1).
    pub share: f64,
    /// At most this many unreserved units granted per store and SKU (0: no cap).
    pub max: u64,
    /// Units a store always keeps for walk-ins.
    pub keep: u64,
}

impl Default for EscrowSection {
    fn default() -> Self {
        let p = shelfsync_shared::EscrowPolicy::default();
        EscrowSection { enabled: false, share: p.share, max: 0, keep: p.keep }
    }
}

impl EscrowSection {
    /// As the decider wants it.
    pub fn to_escrow(&self) -> shelfsync_hub_core::Escrow {
        shelfsync_hub_core::Escrow {
            enabled: self.enabled,
            policy: shelfsync_shared::EscrowPolicy {
                share: self.share,
                max: (self.max > 0).then_some(self.max),
                keep: self.keep,
            },
        }
    }
}

/// `[quic]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicSection {
    /// Where agents connect.
    pub listen: SocketAddr,
    /// Most concurrent agent connections.
    pub max_connections: usize,
}

/// `[http]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// The API, dashboard and metrics.
    pub listen: SocketAddr,
    /// Several hubs on PostgreSQL: where the hubs' internal API listens (mutual TLS between
    /// hubs, [`crate::internal`]). Unset: `listen`'s address, any free port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_listen: Option<SocketAddr>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Most SKUs in one batch availability query.
    pub max_batch_skus: usize,
    /// Most concurrent `GET /v1/events` streams.
    pub max_event_streams: usize,
    /// Seconds a client has to send a request's headers (also the keep-alive idle limit).
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may move no byte while no request is being handled.
    pub idle_timeout_secs: u64,
    /// Most connections open at once.
    pub max_connections: usize,
    /// Most connections open at once from one client address; 0 = no per-address cap.
    pub max_connections_per_ip: usize,
    /// Origins a browser storefront may call the API from (CORS), e.g. `https://shop.example.com`;
    /// empty (the default): no cross-origin access.
    pub cors_allowed_origins: Vec<String>,
    /// Request rate limits.
    pub rate_limit: HubRateLimits,
}

/// `[http.rate_limit]`: per bearer token (by its hash), or per client address for requests
/// without one. Each class has its own allowance.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubRateLimits {
    /// Enforce the limits.
    pub enabled: bool,
    /// Requests without a token (dashboard page, health checks), per client address; requests
    /// answered 401 (unknown, revoked or expired token) are charged here too.
    pub unauthenticated: RateLimit,
    /// GET requests with a token (availability, stores, changes, catalog, metrics, reservations).
    pub reads: RateLimit,
    /// Reservation writes: create, extend, commit, release.
    pub writes: RateLimit,
    /// Other writes: restocks, transfers, catalog edits and imports, token creation and revocation.
    pub admin: RateLimit,
    /// `GET /v1/events` connects (the open streams are capped by `http.max_event_streams`).
    pub events: RateLimit,
}

impl Default for HubRateLimits {
    fn default() -> Self {
        HubRateLimits {
            enabled: true,
            unauthenticated: RateLimit::new(20, 100),
            reads: RateLimit::new(500, 1000),
            writes: RateLimit::new(200, 400),
            admin: RateLimit::new(100, 500),
            events: RateLimit::new(2, 20),
        }
    }
}

impl HubRateLimits {
    /// Every class at `per_sec` with bursts of `per_sec` (for load tests and benchmarks).
    pub fn raised(per_sec: u32) -> Self {
        let l = RateLimit::new(per_sec, per_sec);
        HubRateLimits { enabled: true, unauthenticated: l, reads: l, writes: l, admin: l, events: l }
    }

    /// The classes as the limiter wants them.
    pub fn classes(&self) -> [(&'static str, RateLimit); 5] {
        [
            ("unauthenticated", self.unauthenticated),
            ("reads", self.reads),
            ("writes", self.writes),
            ("admin", self.admin),
            ("events", self.events),
        ]
    }
}

/// `[storage]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// The database: unset for the embedded SQLite database in the data dir (or what
    /// `init --database-url` wrote there), or `postgres://user@host:port/database`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Several hubs on PostgreSQL: how long the deciding hub's lease lasts without renewal (ms);
    /// the bound on failover, before the new hub's load.
    pub lease_ms: u64,
    /// How often the lease is renewed, and a standby tries to take it (ms).
    pub lease_renew_ms: u64,
    /// Several hubs on PostgreSQL: a standby keeps a decider loaded and follows the active hub's
    /// commits, so a takeover reads only the last moments (it costs a standby the active hub's
    /// memory). Off: a takeover loads every record.
    pub warm_standby: bool,
    /// `full` or `normal` (SQLite).
    pub synchronous: Synchronous,
    /// Most writes per group commit.
    pub group_commit_max: usize,
    /// Reader threads.
    pub readers: usize,
}

/// `[sync]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSection {
    /// How long a hub change waits for company before it is pushed to a store.
    pub coalesce_ms: u64,
    /// How often connected stores are re-checked against revocations.
    pub revocation_check_secs: u64,
    /// How long a store's live connection has to answer a liveness probe when another connection
    /// of the store arrives (a silent one is taken as gone and superseded).
    pub probe_timeout_ms: u64,
}

/// `[log]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `tracing` filter; `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` (default) or `json`, one object per line.
    pub format: shelfsync_node::cli::LogFormat,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            data_dir: PathBuf::from("/var/lib/shelfsync-hub"),
            quic: QuicSection::default(),
            http: HttpSection::default(),
            storage: StorageSection::default(),
            sync: SyncSection::default(),
            reservations: ReservationsSection::default(),
            staleness: StalenessSection::default(),
            escrow: EscrowSection::default(),
            log: LogSection::default(),
            webhooks: Vec::new(),
        }
    }
}

impl Default for QuicSection {
    fn default() -> Self {
        QuicSection { listen: "0.0.0.0:7443".parse().expect("valid"), max_connections: 10_000 }
    }
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: "127.0.0.1:8080".parse().expect("valid"),
            internal_listen: None,
            max_body_bytes: 256 * 1024,
            max_batch_skus: 100,
            max_event_streams: 1000,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 4096,
            max_connections_per_ip: 512,
            cors_allowed_origins: Vec::new(),
            rate_limit: HubRateLimits::default(),
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            url: None,
            lease_ms: 3000,
            lease_renew_ms: 500,
            warm_standby: true,
            synchronous: Synchronous::Full,
            group_commit_max: 512,
            readers: 2,
        }
    }
}

impl Default for SyncSection {
    fn default() -> Self {
        SyncSection { coalesce_ms: 0, revocation_check_secs: 5, probe_timeout_ms: 2000 }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { filter: "info".into(), format: shelfsync_node::cli::LogFormat::Text }
    }
}

impl HubConfig {
    /// Loads `path` (if given) over the defaults, then applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        shelfsync_node::config::load_toml(path, ENV_PREFIX)
    }

    /// Rejects values that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, message: &str| Err(ConfigError::Invalid { key, message: message.to_owned() });
        if self.http.max_body_bytes < 1024 || self.http.max_body_bytes > 64 << 20 {
            return bad("http.max_body_bytes", "must be between 1024 and 67108864");
        }
        if self.http.max_batch_skus == 0 || self.http.max_batch_skus > 1000 {
            return bad("http.max_batch_skus", "must be between 1 and 1000");
        }
        if self.http.max_event_streams == 0 {
            return bad("http.max_event_streams", "must be at least 1");
        }
        shelfsync_node::config::validate_edge(
            [
                "http.header_read_timeout_secs",
                "http.idle_timeout_secs",
                "http.max_connections",
                "http.max_connections_per_ip",
            ],
            self.http.header_read_timeout_secs,
            self.http.idle_timeout_secs,
            self.http.max_connections,
            self.http.max_connections_per_ip,
        )?;
        if self.http.idle_timeout_secs < SSE_KEEP_ALIVE_SECS + 5 {
            return bad("http.idle_timeout_secs", "must be at least 20: event streams send a keep-alive every 15 s");
        }
        for o in &self.http.cors_allowed_origins {
            if let Err(m) = check_origin(o) {
                return Err(ConfigError::Invalid { key: "http.cors_allowed_origins", message: format!("{o:?}: {m}") });
            }
        }
        for (class, limit) in self.http.rate_limit.classes() {
            if let Some(problem) = limit.problem() {
                return Err(ConfigError::Invalid { key: rate_limit_key(class), message: problem.to_owned() });
            }
        }
        if self.quic.max_connections == 0 {
            return bad("quic.max_connections", "must be at least 1");
        }
        if self.storage.group_commit_max == 0 || self.storage.group_commit_max > 10_000 {
            return bad("storage.group_commit_max", "must be between 1 and 10000");
        }
        if let Some(url) = &self.storage.url {
            if let Err(e) = crate::db::Target::new(&self.data_dir, Some(url)) {
                return bad("storage.url", &e.to_string());
            }
        }
        if !(1000..=60_000).contains(&self.storage.lease_ms) {
            return bad("storage.lease_ms", "must be between 1000 and 60000");
        }
        if self.storage.lease_renew_ms < 100 || self.storage.lease_renew_ms * 3 > self.storage.lease_ms {
            return bad("storage.lease_renew_ms", "must be at least 100 and at most a third of storage.lease_ms");
        }
        if self.storage.readers == 0 || self.storage.readers > 64 {
            return bad("storage.readers", "must be between 1 and 64");
        }
        if self.sync.coalesce_ms > 1000 {
            return bad("sync.coalesce_ms", "must be at most 1000");
        }
        let r = &self.reservations;
        if r.max_ttl_secs == 0 || r.max_ttl_secs > shelfsync_hub_core::TTL_SECS_MAX {
            return bad("reservations.max_ttl_secs", "must be between 1 and 604800");
        }
        if r.default_ttl_secs == 0 || r.default_ttl_secs > r.max_ttl_secs {
            return bad("reservations.default_ttl_secs", "must be at least 1 and at most reservations.max_ttl_secs");
        }
        if r.expiry_check_ms == 0 || r.expiry_check_ms > 60_000 {
            return bad("reservations.expiry_check_ms", "must be between 1 and 60000");
        }
        if self.staleness.velocity_window_secs == 0 {
            return bad("staleness.velocity_window_secs", "must be at least 1");
        }
        if let Err(e) = self.escrow.to_escrow().policy.validate() {
            return bad("escrow.share", &e);
        }
        if self.webhooks.len() > 32 {
            return bad("webhooks", "at most 32 endpoints");
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if !w.url.starts_with("http://") {
                return bad("webhooks.url", "must start with http:// (terminate TLS in a sidecar or proxy)");
            }
            if w.secret.len() < 16 {
                return bad("webhooks.secret", "must be at least 16 bytes");
            }
            if let Err(e) = w.check_channel() {
                return bad("webhooks", &format!("webhooks[{i}]: {e}"));
            }
            // The delivery cursor is kept per URL: two entries sharing one would skip events.
            if let Some(j) = self.webhooks[..i].iter().position(|o| o.url == w.url) {
                return bad(
                    "webhooks.url",
                    &format!(
                        "webhooks[{i}] repeats the URL of webhooks[{j}] ({}); each URL may appear once \
                         (list several kinds in one entry's `kinds`)",
                        w.url
                    ),
                );
            }
        }
        if self.sync.revocation_check_secs == 0 {
            return bad("sync.revocation_check_secs", "must be at least 1");
        }
        if !(50..=60_000).contains(&self.sync.probe_timeout_ms) {
            return bad("sync.probe_timeout_ms", "must be 50 .. 60000");
        }
        Ok(())
    }

    /// The PKI directory.
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("pki")
    }

    /// The HTTP edge's limits as the server wants them.
    pub fn serve_options(&self) -> shelfsync_node::http::ServeOptions {
        shelfsync_node::http::ServeOptions {
            header_read_timeout: std::time::Duration::from_secs(self.http.header_read_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(self.http.idle_timeout_secs),
            max_connections: self.http.max_connections,
            max_connections_per_ip: self.http.max_connections_per_ip,
            drain: std::time::Duration::from_secs(shelfsync_node::http::DRAIN_SECS),
        }
    }
}

/// How often an SSE stream sends a keep-alive comment (`feed.rs`).
const SSE_KEEP_ALIVE_SECS: u64 = 15;

fn rate_limit_key(class: &str) -> &'static str {
    match class {
        "unauthenticated" => "http.rate_limit.unauthenticated",
        "reads" => "http.rate_limit.reads",
        "writes" => "http.rate_limit.writes",
        "admin" => "http.rate_limit.admin",
        _ => "http.rate_limit.events",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_documents_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/hub.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let from_file: HubConfig = toml::from_str(&text).unwrap();
        let v = |c: &HubConfig| toml::Value::try_from(c).unwrap();
        assert_eq!(v(&from_file), v(&HubConfig::default()), "config/hub.toml drifted from the defaults");
        let file: toml::Value = toml::from_str(&text).unwrap();
        let missing = shelfsync_node::config::undocumented_keys(&v(&HubConfig::default()), &file);
        assert_eq!(missing, Vec::<String>::new(), "keys config/hub.toml does not document");
        HubConfig::default().validate().unwrap();
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = HubConfig::default();
        c.storage.readers = 0;
        assert!(c.validate().unwrap_err().to_string().contains("storage.readers"));
        c.storage.readers = 2;
        c.storage.lease_ms = 900;
        assert!(c.validate().unwrap_err().to_string().contains("storage.lease_ms"));
        c.storage.lease_ms = 3000;
        c.storage.lease_renew_ms = 1001;
        assert!(c.validate().unwrap_err().to_string().contains("storage.lease_renew_ms"));
        c.storage.lease_renew_ms = 1000;
        assert!(c.validate().is_ok());
        let mut c = HubConfig::default();
        c.http.rate_limit.events.burst = 0;
        assert!(c.validate().unwrap_err().to_string().contains("http.rate_limit.events"));
        let mut c = HubConfig::default();
        c.http.idle_timeout_secs = 10;
        assert!(c.validate().unwrap_err().to_string().contains("http.idle_timeout_secs"));
        let mut c = HubConfig::default();
        c.http.max_connections = 0;
        assert!(c.validate().unwrap_err().to_string().contains("http.max_connections"));
    }

    #[test]
    fn a_webhook_url_may_appear_once() {
        let hook = |url: &str, kinds: &[&str]| crate::feed::WebhookConfig {
            url: url.into(),
            secret: "0123456789abcdef".into(),
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        };
        let mut c = HubConfig {
            webhooks: vec![hook("http://a/x", &[]), hook("http://b/x", &[]), hook("http://a/x/", &[])],
            ..HubConfig::default()
        };
        c.validate().unwrap();
        c.webhooks.push(hook("http://b/x", &["oversell_detected"]));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("webhooks.url") && e.contains("webhooks[3] repeats the URL of webhooks[1]"), "{e}");
        assert!(e.contains("http://b/x"), "{e}");
    }
}

/// An origin as browsers send it: `http` or `https`, a host, an optional port, nothing else
/// (no path, no trailing slash, no wildcard).
pub fn check_origin(o: &str) -> Result<(), &'static str> {
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
        .ok_or("an origin starts with https:// or http://")?;
    if rest.is_empty() {
        return Err("the host is missing");
    }
    if !rest.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')) {
        return Err("an origin is scheme://host[:port] only: no path, slash, wildcard or spaces");
    }
    Ok(())
}

#[cfg(test)]
mod origin_tests {
    use super::check_origin;

    #[test]
    fn origins_are_exact() {
        for ok in ["https://shop.example.com", "http://localhost:3000", "https://[::1]:8443"] {
            assert_eq!(check_origin(ok), Ok(()), "{ok}");
        }
        for bad in ["shop.example.com", "https://", "https://shop.example.com/", "https://*.example.com", "ftp://x"] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
