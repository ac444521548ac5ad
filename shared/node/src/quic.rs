//! Moving [`Frame`]s over quinn streams: length-prefixed, size-checked before any allocation.
//! Shared by the agent's sync client and the hub's QUIC server.

use quinn::{ReadExactError, RecvStream, SendStream};
use shelfsync_shared::wire::{self, CodecError, Frame};

/// Failures reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The bytes do not make a valid frame (or break a limit).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// QUIC read failure (connection lost, reset, refused certificate...).
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// QUIC write failure.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Reads one frame; `None` when the peer finished the stream cleanly between frames.
pub async fn read_frame(recv: &mut RecvStream) -> Result<Option<(Frame, usize)>, FrameIoError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(FrameIoError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = wire::decode_len(header)?;
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => return Err(FrameIoError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    Ok(Some((wire::decode_body(&body)?, 4 + len)))
}

/// Writes one frame; returns the bytes written.
pub async fn write_frame(send: &mut SendStream, frame: &Frame) -> Result<usize, FrameIoError> {
    let bytes = wire::encode(frame)?;
    send.write_all(&bytes).await?;
    Ok(bytes.len())
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use shelfsync_shared::sync::{AgentSession, Effect, HubSession, SessionError, StreamKind, Transmit};
use shelfsync_shared::wire::close_code;
use tokio::sync::{mpsc, watch};

use crate::db::Heads;

/// The common surface of [`AgentSession`] and [`HubSession`] the connection driver needs.
pub trait SessionIo {
    /// Next frame to send.
    fn poll_transmit(&mut self) -> Option<Transmit>;
    /// Next effect for the host.
    fn poll_effect(&mut self) -> Option<Effect>;
    /// Next timer.
    fn poll_timeout(&self) -> Option<Instant>;
    /// A received frame.
    fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError>;
    /// Timers fired.
    fn handle_timeout(&mut self, now: Instant);
    /// Local heads moved.
    fn local_head(&mut self, now: Instant, counter: u64, journal: u64);
}

macro_rules! impl_session_io {
    ($t:ty) => {
        impl SessionIo for $t {
            fn poll_transmit(&mut self) -> Option<Transmit> {
                <$t>::poll_transmit(self)
            }
            fn poll_effect(&mut self) -> Option<Effect> {
                <$t>::poll_effect(self)
            }
            fn poll_timeout(&self) -> Option<Instant> {
                <$t>::poll_timeout(self)
            }
            fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError> {
                <$t>::handle_frame(self, now, frame)
            }
            fn handle_timeout(&mut self, now: Instant) {
                <$t>::handle_timeout(self, now)
            }
            fn local_head(&mut self, now: Instant, counter: u64, journal: u64) {
                <$t>::local_head(self, now, counter, journal)
            }
        }
    };
}

impl_session_io!(AgentSession);
impl_session_io!(HubSession);

/// Carries out a session's effects against local storage.
pub trait EffectHost<S> {
    /// Does the work of `effect` and reports back to `session`. A storage failure is returned as
    /// a [`SessionError`] with code `INTERNAL`; the connection is then closed.
    fn effect(
        &mut self,
        session: &mut S,
        effect: Effect,
    ) -> impl std::future::Future<Output = Result<(), SessionError>> + Send;

    /// Local heads moved (after `session.local_head`); for host-specific pushes such as holds.
    fn heads_changed(
        &mut self,
        _session: &mut S,
        _heads: Heads,
    ) -> impl std::future::Future<Output = Result<(), SessionError>> + Send {
        async { Ok(()) }
    }

    /// When the host wants `on_deadline` (e.g. a rate-limited push is due).
    fn poll_deadline(&self) -> Option<Instant> {
        None
    }

    /// The host's deadline passed.
    fn on_deadline(&mut self, _session: &mut S) -> impl std::future::Future<Output = Result<(), SessionError>> + Send {
        async { Ok(()) }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The protocol said stop (ours or the peer's error).
    #[error("session: {0}")]
    Session(#[from] SessionError),
    /// A stream failed or carried garbage.
    #[error("stream: {0}")]
    Io(FrameIoError),
    /// The connection was lost or closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

impl From<FrameIoError> for DriveError {
    /// A stream that failed because its connection ended is the connection's end (the peer's
    /// close can overtake the frames before it): the close code says why, not the stream.
    fn from(e: FrameIoError) -> Self {
        match e {
            FrameIoError::Read(quinn::ReadError::ConnectionLost(c))
            | FrameIoError::Write(quinn::WriteError::ConnectionLost(c)) => DriveError::Connection(c),
            other => DriveError::Io(other),
        }
    }
}

/// Byte counters of a connection's frames (payload, not QUIC/UDP overhead), per stream kind.
#[derive(Debug, Default)]
pub struct FrameStats {
    /// Frame bytes sent on the state stream (counters, acks, digests).
    pub sent_state: AtomicU64,
    /// Frame bytes sent on the journal stream.
    pub sent_journal: AtomicU64,
    /// Frame bytes sent on the catalog stream.
    pub sent_catalog: AtomicU64,
    /// Frame bytes received on the state stream.
    pub received_state: AtomicU64,
    /// Frame bytes received on unidirectional streams (journal and catalog).
    pub received_journal: AtomicU64,
    /// Frames received.
    pub frames_received: AtomicU64,
}

/// Most frames buffered between the stream readers and the session.
const INBOUND_QUEUE: usize = 64;

/// Moves frames between `conn`'s streams and `session` until the connection ends. `state` is the
/// bidirectional state stream; journal frames go out on one lower-priority unidirectional stream
/// opened on first use, and come in on any unidirectional stream the peer opens. `heads` wakes the
/// session when local data changes.
pub async fn drive<S: SessionIo + Send, H: EffectHost<S> + Send>(
    conn: &quinn::Connection,
    mut send: SendStream,
    recv: RecvStream,
    session: &mut S,
    host: &mut H,
    mut heads: watch::Receiver<Heads>,
    stats: Arc<FrameStats>,
    peer: &str,
) -> Result<(), DriveError> {
    let (tx, mut rx) = mpsc::channel::<Result<Frame, DriveError>>(INBOUND_QUEUE);
    let readers = spawn_readers(conn.clone(), recv, tx, stats.clone());
    let _guard = AbortOnDrop(readers);
    let mut journal: Option<SendStream> = None;
    let mut catalog: Option<SendStream> = None;
    {
        let h = *heads.borrow_and_update();
        session.local_head(Instant::now(), h.counter, h.journal);
    }
    let result: Result<(), DriveError> = async {
        loop {
            // Run the session dry: effects may queue frames and frames may queue effects.
            loop {
                let mut progressed = false;
                while let Some(t) = session.poll_transmit() {
                    progressed = true;
                    let kind = t.stream;
                    let stream = match t.stream {
                        StreamKind::State => &mut send,
                        StreamKind::Journal => match &mut journal {
                            Some(s) => s,
                            None => {
                                let s = conn.open_uni().await?;
                                // Audit never delays stock: journal frames yield to the state stream.
                                let _ = s.set_priority(-1);
                                journal.insert(s)
                            }
                        },
                        StreamKind::Catalog => match &mut catalog {
                            Some(s) => s,
                            None => {
                                let s = conn.open_uni().await?;
                                // The catalog is reference data: it yields to stock too.
                                let _ = s.set_priority(-1);
                                catalog.insert(s)
                            }
                        },
                    };
                    let n = write_frame(stream, &t.frame).await? as u64;
                    match kind {
                        StreamKind::State => stats.sent_state.fetch_add(n, Ordering::Relaxed),
                        StreamKind::Journal => stats.sent_journal.fetch_add(n, Ordering::Relaxed),
                        StreamKind::Catalog => stats.sent_catalog.fetch_add(n, Ordering::Relaxed),
                    };
                }
                while let Some(e) = session.poll_effect() {
                    progressed = true;
                    host.effect(session, e).await?;
                }
                if !progressed {
                    break;
                }
            }
            let timeout = [session.poll_timeout(), host.poll_deadline()].into_iter().flatten().min();
            tokio::select! {
                frame = rx.recv() => match frame {
                    Some(Ok(frame)) => session.handle_frame(Instant::now(), frame)?,
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                },
                _ = sleep_until(timeout) => {
                    session.handle_timeout(Instant::now());
                    if host.poll_deadline().is_some_and(|d| d <= Instant::now()) {
                        host.on_deadline(session).await?;
                    }
                }
                changed = heads.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let h = *heads.borrow_and_update();
                    session.local_head(Instant::now(), h.counter, h.journal);
                    host.heads_changed(session, h).await?;
                }
            }
        }
    }
    .await;
    if let Err(e) = &result {
        // Flush what the session queued on failure (its Error frame), best effort, then close.
        while let Some(t) = session.poll_transmit() {
            if t.stream == StreamKind::State && write_frame(&mut send, &t.frame).await.is_err() {
                break;
            }
        }
        let (code, reason) = match e {
            DriveError::Session(s) => (s.code, s.message.clone()),
            DriveError::Io(FrameIoError::Codec(c @ CodecError::Version { .. })) => {
                (close_code::VERSION_MISMATCH, c.to_string())
            }
            DriveError::Io(FrameIoError::Codec(c)) => (close_code::PROTOCOL_VIOLATION, c.to_string()),
            DriveError::Io(FrameIoError::Truncated) => (close_code::PROTOCOL_VIOLATION, "truncated frame".into()),
            _ => (close_code::NORMAL, String::new()),
        };
        if code != close_code::NORMAL {
            tracing::warn!(peer, code = close_code::name(code), reason = %reason, "closing sync connection");
        }
        let mut reason = reason.into_bytes();
        reason.truncate(256);
        conn.close(quinn::VarInt::from_u32(code), &reason);
    }
    result
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// Most unidirectional (journal) streams a peer may open on one connection.
const UNI_STREAMS_MAX: usize = 8;

fn spawn_readers(
    conn: quinn::Connection,
    recv: RecvStream,
    tx: mpsc::Sender<Result<Frame, DriveError>>,
    stats: Arc<FrameStats>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let state = tokio::spawn(read_stream(recv, tx.clone(), stats.clone(), StreamKind::State));
    let uni = tokio::spawn(async move {
        let mut streams = Vec::new();
        loop {
            match conn.accept_uni().await {
                Ok(recv) if streams.len() < UNI_STREAMS_MAX => {
                    streams.push(AbortOnDrop(vec![tokio::spawn(read_stream(
                        recv,
                        tx.clone(),
                        stats.clone(),
                        StreamKind::Journal,
                    ))]));
                }
                Ok(_) => {
                    let _ = tx
                        .send(Err(FrameIoError::Codec(CodecError::Limit("too many journal streams".into())).into()))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    });
    vec![state, uni]
}

async fn read_stream(
    mut recv: RecvStream,
    tx: mpsc::Sender<Result<Frame, DriveError>>,
    stats: Arc<FrameStats>,
    kind: StreamKind,
) {
    loop {
        match read_frame(&mut recv).await {
            Ok(Some((frame, n))) => {
                let counter = match kind {
                    StreamKind::State => &stats.received_state,
                    StreamKind::Journal | StreamKind::Catalog => &stats.received_journal,
                };
                counter.fetch_add(n as u64, Ordering::Relaxed);
                stats.frames_received.fetch_add(1, Ordering::Relaxed);
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    }
}
