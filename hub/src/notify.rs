//! Wake-ups between hubs sharing a database: "store X changed" (a delta merged, holds or hub
//! entries committed) reaches every hub through PostgreSQL's `LISTEN/NOTIFY`, so the hub a
//! store is connected to sends it what another hub decided without polling for it.
//!
//! A notification is only a wake-up, never the truth: the receiver reads the tables. It is
//! delivered after its transaction commits, and not at all if it rolls back. A listener whose
//! connection broke may have missed some, so after every (re)connection it says
//! [`Notice::Resync`]: "read everything you follow again". A receiver too slow to keep up gets
//! a `Resync` instead of an unbounded queue.

use std::time::Duration;

use shelfsync_shared::StoreId;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::storage::{StorageError, StorageResult};

/// The channel stores' changes are announced on.
pub const CHANNEL: &str = "shelfsync_store";

/// Most notices queued for a slow receiver; beyond, they collapse into one [`Notice::Resync`].
pub const QUEUE: usize = 1024;

/// How long the listener waits before reconnecting, at first and at most.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// What a listener hears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// This store's rows changed.
    Store(StoreId),
    /// Notices may have been missed (the listener (re)connected, or the receiver fell behind):
    /// re-read everything followed.
    Resync,
}

/// The statement that announces a change of `$1` (a store id) when its transaction commits.
pub const NOTIFY: &str = "SELECT pg_notify('shelfsync_store', $1)";

/// Listens until the receiver is dropped; reconnects (with a [`Notice::Resync`]) whenever the
/// connection breaks.
pub fn listen(url: String) -> mpsc::Receiver<Notice> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let mut backoff = BACKOFF.0;
        loop {
            match session(&url, &tx).await {
                Ok(()) => return, // the receiver is gone
                Err(e) => {
                    tracing::warn!(error = %e, "the change listener lost its database connection; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    });
    rx
}

/// One connection's life: LISTEN, say Resync, pass notifications on. Ok once the receiver is
/// gone; Err when the connection broke.
async fn session(url: &str, tx: &mpsc::Sender<Notice>) -> StorageResult<()> {
    let (plain, tls) = crate::postgres::tls_of(url)?;
    let (msgs_tx, mut msgs) = mpsc::channel(QUEUE);
    let failed = |e: tokio_postgres::Error| StorageError::Backend(format!("listening for changes: {e}"));
    let client = match tls {
        None => {
            let (client, conn) = tokio_postgres::connect(&plain, NoTls).await.map_err(failed)?;
            tokio::spawn(pump(conn, msgs_tx));
            client
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
            let (client, conn) = tokio_postgres::connect(&plain, tls).await.map_err(failed)?;
            tokio::spawn(pump(conn, msgs_tx));
            client
        }
    };
    client
        .batch_execute(&format!("SET application_name = 'shelfsync-listener'; LISTEN {CHANNEL}"))
        .await
        .map_err(failed)?;
    if !offer(tx, Notice::Resync).await {
        return Ok(());
    }
    let mut behind = false;
    loop {
        let msg = tokio::select! {
            m = msgs.recv() => m,
            _ = tx.closed() => return Ok(()),
        };
        let Some(msg) = msg else {
            return Err(StorageError::Backend("the listener's connection closed".into()));
        };
        let notice = match msg {
            Ok(n) => match n.payload().parse::<StoreId>() {
                Ok(s) => Notice::Store(s),
                Err(e) => {
                    tracing::warn!(payload = n.payload(), error = %e, "a change notice that names no store; ignored");
                    continue;
                }
            },
            Err(e) => return Err(e),
        };
        // A receiver that fell behind gets one Resync once there is room, not a backlog.
        if behind {
            match tx.try_send(Notice::Resync) {
                Ok(()) => behind = false,
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
            }
        }
        match tx.try_send(notice) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => behind = true,
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        }
    }
}

/// Sends unless the receiver is gone (false).
async fn offer(tx: &mpsc::Sender<Notice>, n: Notice) -> bool {
    tx.send(n).await.is_ok()
}

/// Drives a connection, handing its notifications (and its end, as an error) to `out`.
async fn pump<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    out: mpsc::Sender<StorageResult<tokio_postgres::Notification>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let next = std::future::poll_fn(|cx| conn.poll_message(cx)).await;
        match next {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if out.send(Ok(n)).await.is_err() {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                let _ = out.send(Err(StorageError::Backend(format!("listening for changes: {e}")))).await;
                return;
            }
            None => {
                let _ = out.send(Err(StorageError::Backend("the listener's connection ended".into()))).await;
                return;
            }
        }
    }
}
