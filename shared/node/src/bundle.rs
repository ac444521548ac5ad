//! A store's credential bundle, written by `shelfsync-hub store add` and read by the agent: the
//! hub's CA certificate, the store's certificate and key, and where the hub is.
//!
//! Directory layout (mode 0700): `ca.pem`, `store.pem`, `store.key` (mode 0600), `bundle.toml` with
//! `store_id`, `hub_addr` (`host:port`) and `server_name` (the name the hub's certificate carries).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use shelfsync_shared::wire::ALPN;
use shelfsync_shared::StoreId;

/// The hub certificate's name, whatever address the agent dials.
pub const DEFAULT_SERVER_NAME: &str = "hub.shelfsync";

/// Bundle problems, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// File system.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file's content is wrong.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    store_id: StoreId,
    hub_addr: String,
    server_name: String,
}

/// A loaded bundle.
#[derive(Clone)]
pub struct Bundle {
    /// The store this bundle identifies.
    pub store_id: StoreId,
    /// `host:port` of the hub's QUIC endpoint.
    pub hub_addr: String,
    /// TLS name of the hub.
    pub server_name: String,
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key_pem: String,
}

fn write(path: &Path, data: &[u8], secret: bool) -> Result<(), BundleError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let err = |source| BundleError::Io { path: path.to_owned(), source };
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Checks a bundle's `hub_addr`: one `host:port`, or several separated by commas (hubs sharing
/// one database; the agent moves to the next when one does not answer).
pub fn check_hub_addrs(addrs: &str) -> Result<(), String> {
    let list: Vec<&str> = addrs.split(',').map(str::trim).collect();
    if list.len() > 16 {
        return Err(format!("hub_addr names {} hubs; at most 16", list.len()));
    }
    for a in list {
        if a.rsplit_once(':').and_then(|(h, p)| p.parse::<u16>().ok().filter(|_| !h.is_empty())).is_none() {
            return Err(format!("hub_addr {addrs:?}: {a:?} must be host:port (several: comma-separated)"));
        }
    }
    Ok(())
}

impl Bundle {
    /// Writes a bundle into `dir` (created if missing).
    pub fn write(
        dir: &Path,
        store: &StoreId,
        hub_addr: &str,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<(), BundleError> {
        crate::dbfile::create_private_dir(dir).map_err(|source| BundleError::Io { path: dir.to_owned(), source })?;
        let manifest = Manifest {
            store_id: store.clone(),
            hub_addr: hub_addr.to_owned(),
            server_name: DEFAULT_SERVER_NAME.to_owned(),
        };
        write(&dir.join("ca.pem"), ca_pem.as_bytes(), false)?;
        write(&dir.join("store.pem"), cert_pem.as_bytes(), false)?;
        write(&dir.join("store.key"), key_pem.as_bytes(), true)?;
        let toml = toml::to_string(&manifest).map_err(|e| BundleError::Tls(e.to_string()))?;
        write(&dir.join("bundle.toml"), toml.as_bytes(), false)
    }

    /// Copies a bundle directory's files into `to`.
    pub fn copy(from: &Path, to: &Path) -> Result<Bundle, BundleError> {
        let b = Bundle::load(from)?;
        crate::dbfile::create_private_dir(to).map_err(|source| BundleError::Io { path: to.to_owned(), source })?;
        for (name, secret) in [("ca.pem", false), ("store.pem", false), ("store.key", true), ("bundle.toml", false)] {
            let src = from.join(name);
            let data = std::fs::read(&src).map_err(|source| BundleError::Io { path: src, source })?;
            write(&to.join(name), &data, secret)?;
        }
        Ok(b)
    }

    /// The files of a bundle directory.
    pub const FILES: [&'static str; 4] = ["ca.pem", "store.pem", "store.key", "bundle.toml"];

    /// Loads and checks a bundle directory.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        Self::parse(dir, |name| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| BundleError::Io { path, source })
        })
    }

    /// Checks a bundle whose files `read` gives by name ([`Bundle::FILES`]); `dir` names them in
    /// errors (a backup's bundle is checked this way before anything is restored).
    pub fn parse(dir: &Path, read: impl Fn(&str) -> Result<String, BundleError>) -> Result<Bundle, BundleError> {
        let invalid = |name: &str, message: String| BundleError::Invalid { path: dir.join(name), message };
        let manifest: Manifest =
            toml::from_str(&read("bundle.toml")?).map_err(|e| invalid("bundle.toml", e.to_string()))?;
        let ca =
            CertificateDer::from_pem_slice(read("ca.pem")?.as_bytes()).map_err(|e| invalid("ca.pem", e.to_string()))?;
        let cert = CertificateDer::from_pem_slice(read("store.pem")?.as_bytes())
            .map_err(|e| invalid("store.pem", e.to_string()))?;
        let key_pem = read("store.key")?;
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| invalid("store.key", e.to_string()))?;
        check_hub_addrs(&manifest.hub_addr).map_err(|m| invalid("bundle.toml", m))?;
        Ok(Bundle {
            store_id: manifest.store_id,
            hub_addr: manifest.hub_addr,
            server_name: manifest.server_name,
            ca,
            cert,
            key_pem,
        })
    }

    /// The QUIC client config: TLS 1.3 trusting only the bundle's CA, presenting the store's
    /// certificate, ALPN `shelfsync/1`; keep-alive 1 s (so a live link always carries a packet
    /// within about a second, which the agent's stall check relies on), idle timeout 30 s.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, BundleError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| BundleError::Tls(e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| BundleError::Tls(e.to_string()))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| BundleError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![self.cert.clone()], key)
            .map_err(|e| BundleError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| BundleError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(Duration::from_secs(1)));
        t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("30 s fits")));
        t.max_concurrent_bidi_streams(4u32.into());
        t.max_concurrent_uni_streams(8u32.into());
        config.transport_config(Arc::new(t));
        Ok(config)
    }
}
