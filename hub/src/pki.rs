//! The hub's private certificate authority. Each store gets a client certificate whose DNS name
//! is its store id; the hub's QUIC endpoint requires such a certificate (mutual TLS), checks it
//! against a CRL of revoked serials, and takes the store id from it — never from a message.
//!
//! Files in the PKI directory: `ca.pem`, `ca.key`, `hub.pem`, `hub.key` (keys mode 0600).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use shelfsync_shared::wire::ALPN;
use shelfsync_shared::StoreId;

/// The files of the PKI directory, in the order [`Pki::from_pems`] takes them.
pub const PKI_FILES: [&str; 4] = ["ca.pem", "ca.key", "hub.pem", "hub.key"];

/// The name agents verify the hub's certificate under, whatever address they dial.
pub const HUB_SERVER_NAME: &str = "hub.shelfsync";

/// The name hubs give each other on their internal API (never a store id: those have no dots).
pub const HUB_PEER_NAME: &str = "peer.hub.shelfsync";

/// ALPN of the hubs' internal API (HTTP/2 only: one connection carries every forwarded request).
pub const INTERNAL_ALPN: &[u8] = b"h2";

/// PKI failures, naming the file or value involved.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// File system.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A CA exists already.
    #[error("a CA already exists in {0}; refusing to overwrite it")]
    Exists(PathBuf),
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(String),
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The peer presented no usable certificate.
    #[error("peer certificate: {0}")]
    Peer(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_owned(), source }
}

fn cert_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Cert(e.to_string())
}

fn write_file(path: &Path, data: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(data.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// A store's freshly issued credentials.
#[derive(Clone, Debug)]
pub struct StoreCert {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: String,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint_sha256_hex: String,
}

/// Who a connected peer is, per its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The store named by the certificate.
    pub store: StoreId,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint_sha256_hex: String,
}

/// The loaded CA plus the hub's own server certificate.
pub struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    ca_pem: String,
    hub_cert: CertificateDer<'static>,
    hub_key_pem: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, PkiError> {
    if s.len() % 2 != 0 {
        return Err(PkiError::Cert(format!("serial {s:?} is not hex")));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| PkiError::Cert(format!("serial {s:?} is not hex"))))
        .collect()
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte, so hex round-trips exactly
    SerialNumber::from_slice(&bytes)
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("30 s fits")));
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(8u32.into());
    Arc::new(t)
}

/// The QUIC transport settings both ends use: keep-alive 5 s, idle timeout 30 s, few streams.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    transport()
}

impl Pki {
    /// Creates a CA and the hub's server certificate in `dir`.
    pub fn init(dir: &Path) -> Result<Pki, PkiError> {
        if dir.join("ca.pem").exists() || dir.join("ca.key").exists() {
            return Err(PkiError::Exists(dir.to_owned()));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        }
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let ca = ca_params().self_signed(&ca_key).map_err(cert_err)?;

        let hub_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut hub =
            CertificateParams::new(vec![HUB_SERVER_NAME.to_owned(), "localhost".to_owned()]).map_err(cert_err)?;
        hub.distinguished_name = DistinguishedName::new();
        hub.distinguished_name.push(DnType::CommonName, HUB_SERVER_NAME);
        hub.serial_number = Some(random_serial());
        hub.not_before = now() - time::Duration::days(1);
        hub.not_after = now() + time::Duration::days(3650);
        hub.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        hub.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let hub_cert = hub.signed_by(&hub_key, &ca, &ca_key).map_err(cert_err)?;

        write_file(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
        write_file(&dir.join("ca.pem"), &ca.pem(), false)?;
        write_file(&dir.join("hub.key"), &hub_key.serialize_pem(), true)?;
        write_file(&dir.join("hub.pem"), &hub_cert.pem(), false)?;
        Pki::load(dir)
    }

    /// Loads the CA and hub certificate from `dir`.
    pub fn load(dir: &Path) -> Result<Pki, PkiError> {
        let [ca_pem, ca_key, hub_pem, hub_key] = PKI_FILES.map(|f| read(&dir.join(f)));
        Pki::from_pems(&ca_pem?, &ca_key?, &hub_pem?, hub_key?)
            .map_err(|e| PkiError::Cert(format!("{}: {e}", dir.display())))
    }

    /// Builds the PKI from the PEM texts of [`PKI_FILES`] (a backup is checked this way before
    /// anything is restored).
    pub fn from_pems(ca_pem: &str, ca_key: &str, hub_pem: &str, hub_key_pem: String) -> Result<Pki, PkiError> {
        let ca_key = KeyPair::from_pem(ca_key).map_err(|e| PkiError::Cert(format!("ca.key: {e}")))?;
        // rcgen signs with a `Certificate`; rebuilding it from the stored params and key yields
        // the same issuer name and key, which is all a chain check looks at.
        let params = CertificateParams::from_ca_cert_pem(ca_pem).map_err(|e| PkiError::Cert(format!("ca.pem: {e}")))?;
        let ca = params.self_signed(&ca_key).map_err(cert_err)?;
        let hub_cert =
            CertificateDer::from_pem_slice(hub_pem.as_bytes()).map_err(|e| PkiError::Cert(format!("hub.pem: {e}")))?;
        PrivateKeyDer::from_pem_slice(hub_key_pem.as_bytes()).map_err(|e| PkiError::Cert(format!("hub.key: {e}")))?;
        Ok(Pki { ca, ca_key, ca_pem: ca_pem.to_owned(), hub_cert, hub_key_pem })
    }

    /// The CA certificate (PEM) agents trust.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues a client certificate naming `store`.
    pub fn issue_store(&self, store: &StoreId) -> Result<StoreCert, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut params = CertificateParams::new(vec![store.to_string()]).map_err(cert_err)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, store.as_str());
        let serial = random_serial();
        let serial_hex = hex(&serial.to_bytes());
        params.serial_number = Some(serial);
        params.not_before = now() - time::Duration::days(1);
        params.not_after = now() + time::Duration::days(3650);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).map_err(cert_err)?;
        Ok(StoreCert {
            fingerprint_sha256_hex: hex(&Sha256::digest(cert.der())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex,
        })
    }

    /// A CRL, signed by the CA, listing `revoked` (hex serial, revocation time in ms).
    pub fn crl(&self, revoked: &[(String, i64)]) -> Result<CertificateRevocationListDer<'static>, PkiError> {
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at_ms)| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(serial)?),
                    revocation_time: time::OffsetDateTime::from_unix_timestamp(at_ms / 1000).unwrap_or_else(|_| now()),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now() - time::Duration::minutes(5),
            next_update: now() + time::Duration::days(3650),
            crl_number: SerialNumber::from(shelfsync_node::now_ms() as u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.ca, &self.ca_key).map_err(cert_err)?;
        Ok(crl.der().clone())
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        let der = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).map_err(cert_err)?;
        roots.add(der).map_err(|e| PkiError::Tls(e.to_string()))?;
        Ok(Arc::new(roots))
    }

    /// The QUIC server config: TLS 1.3, client certificates required and checked against the CA
    /// and `crls`, ALPN `shelfsync/1`.
    pub fn server_config(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<quinn::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .with_crls(crls)
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(self.hub_key_pem.as_bytes()).map_err(cert_err)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.hub_cert.clone()], key)
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| PkiError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport());
        Ok(config)
    }
}

/// A hub's credentials on the internal API: a certificate the CA signs for [`HUB_PEER_NAME`],
/// made at every start (only a holder of the CA key can make one), for both ends of a connection.
pub struct PeerCredentials {
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
    roots: Arc<rustls::RootCertStore>,
}

impl Pki {
    /// Mints this hub process's internal-API certificate.
    pub fn peer_credentials(&self) -> Result<PeerCredentials, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let mut params = CertificateParams::new(vec![HUB_PEER_NAME.to_owned()]).map_err(cert_err)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, HUB_PEER_NAME);
        params.serial_number = Some(random_serial());
        params.not_before = now() - time::Duration::days(1);
        params.not_after = now() + time::Duration::days(3650);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).map_err(cert_err)?;
        Ok(PeerCredentials { chain: vec![cert.der().clone()], key_pem: key.serialize_pem(), roots: self.roots()? })
    }
}

impl PeerCredentials {
    fn key(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(cert_err)
    }

    /// The internal API's server side: TLS 1.3, HTTP/2, a client certificate from the CA
    /// required (whose name [`is_hub_peer`] then checks).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| PkiError::Tls(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key()?)
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![INTERNAL_ALPN.to_vec()];
        Ok(tls)
    }

    /// The internal API's client side: presents this hub's certificate and accepts only a
    /// server whose certificate the CA signed for [`HUB_PEER_NAME`], whatever address it dials.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerServerVerifier { inner }))
            .with_client_auth_cert(self.chain.clone(), self.key()?)
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![INTERNAL_ALPN.to_vec()];
        Ok(tls)
    }
}

/// Whether a verified client certificate is another hub's (not a store's).
pub fn is_hub_peer(der: &CertificateDer<'_>) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return false };
    let san = cert.subject_alternative_name().ok().flatten().map(|san| {
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if *d == HUB_PEER_NAME))
    });
    san == Some(true)
}

/// Verifies a hub's internal-API certificate against the CA under [`HUB_PEER_NAME`], whatever
/// host name the URL dialled (hubs know each other by address).
#[derive(Debug)]
struct PeerServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(HUB_PEER_NAME).expect("a valid DNS name");
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "Shelfsync hub CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial());
    params.not_before = now() - time::Duration::days(1);
    params.not_after = now() + time::Duration::days(3650 * 3);
    params
}

/// The identity of a connected agent, from its (already verified) certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, PkiError> {
    let any = conn.peer_identity().ok_or_else(|| PkiError::Peer("no certificate presented".into()))?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PkiError::Peer("unexpected identity type".into()))?;
    let leaf = chain.first().ok_or_else(|| PkiError::Peer("empty certificate chain".into()))?;
    identity_of(leaf)
}

/// The store a certificate names (SAN DNS name, else CN), its serial and fingerprint.
pub fn identity_of(der: &CertificateDer<'_>) -> Result<PeerIdentity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Peer(e.to_string()))?;
    let mut name: Option<String> = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                name = Some((*d).to_owned());
                break;
            }
        }
    }
    if name.is_none() {
        name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    }
    let name = name.ok_or_else(|| PkiError::Peer("certificate names no store".into()))?;
    let store: StoreId =
        name.parse().map_err(|e| PkiError::Peer(format!("certificate name {name:?} is not a store id: {e}")))?;
    Ok(PeerIdentity {
        store,
        serial_hex: hex(cert.raw_serial()),
        fingerprint_sha256_hex: hex(&Sha256::digest(der.as_ref())),
    })
}
