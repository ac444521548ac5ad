//! The hubs' internal API: how one hub hands another the requests it does not decide.
//!
//! Each hub listens on a second address (`http.internal_listen`, recorded in the `hubs` table)
//! for HTTP/2 over TLS 1.3 with mutual authentication: both ends present a certificate the
//! chain's CA signed for [`HUB_PEER_NAME`], minted when the hub starts (only a holder of the CA
//! key, which is every hub's data dir and no store's, can make one). A store's certificate is
//! signed by the same CA but names a store, so it is turned away after the handshake, with a
//! WARN: a store has no business on this port.
//!
//! One connection per pair of hubs carries every forwarded request as an HTTP/2 stream, so the
//! public API's per-address connection caps never see forwarding, and a standby serving
//! thousands of storefront clients holds one connection to the active hub, not thousands.
//! A forwarded request still carries its caller's token, which the deciding hub checks as if
//! the caller had come straight to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::pki::{is_hub_peer, PeerCredentials, HUB_PEER_NAME};

/// Most hub connections served at once (a chain runs a handful of hubs; each needs one).
pub const MAX_PEER_CONNECTIONS: usize = 64;
/// Most requests in flight on one hub connection.
pub const MAX_STREAMS: u32 = 4096;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The client a hub forwards with: its own certificate, only hubs accepted, HTTP/2 only.
pub fn client(creds: &PeerCredentials) -> Result<reqwest::Client, String> {
    let tls = creds.client_config().map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .http2_prior_knowledge()
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        .build()
        .map_err(|e| format!("the internal API's client: {e}"))
}

/// Serves `app` to other hubs on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "internal API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = MAX_PEER_CONNECTIONS, "internal API: too many hub connections; refusing one");
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        conns.spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "internal API: TLS handshake refused (not a hub of this chain)");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "internal API: TLS handshake timed out");
                    return;
                }
            };
            let hub = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).is_some_and(is_hub_peer);
            if !hub {
                tracing::warn!(
                    %peer,
                    "internal API: a certificate of this chain's CA that does not name {HUB_PEER_NAME} (a store's?) \
                     was turned away"
                );
                return;
            }
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut http = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            http.timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(Some(Duration::from_secs(10)))
                .keep_alive_timeout(Duration::from_secs(20));
            if let Err(e) = http.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "internal API: hub connection ended");
            }
        });
    }
}

/// The deciding hub's addresses, as a hub that forwards needs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decider {
    /// Its id.
    pub hub: String,
    /// Its internal API (None: a hub of an older version, reached on its public API).
    pub internal_addr: Option<SocketAddr>,
    /// Its public HTTP API.
    pub http_addr: String,
}

/// Who holds an unexpired lease of `partition`, and where to reach it.
pub async fn decider(c: &tokio_postgres::Client, partition: i32) -> crate::storage::StorageResult<Option<Decider>> {
    let row = c
        .query_opt(
            "SELECT l.owner, h.internal_addr, h.http_addr FROM leases l JOIN hubs h ON h.id = l.owner
             WHERE l.partition = $1 AND l.expires_at > now()",
            &[&partition],
        )
        .await?;
    Ok(row.map(|r| Decider {
        hub: r.get(0),
        internal_addr: r.get::<_, Option<String>>(1).and_then(|a| a.parse().ok()),
        http_addr: r.get(2),
    }))
}

/// Records where this hub's internal API listens.
pub async fn advertise(c: &tokio_postgres::Client, hub: &str, addr: SocketAddr) -> crate::storage::StorageResult<()> {
    c.execute("UPDATE hubs SET internal_addr = $2 WHERE id = $1", &[&hub, &addr.to_string()]).await?;
    Ok(())
}

/// PostgreSQL migration: where each hub's internal API listens.
pub const MIGRATION: &str = "ALTER TABLE hubs ADD COLUMN internal_addr TEXT;";
