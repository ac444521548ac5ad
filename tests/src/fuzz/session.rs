//! The sync sessions fed arbitrary sequences of frames, host answers and clock ticks.
//!
//! A host answers effects in the order it polled them, as `agent::quic::drive` does, but with
//! whatever contents the fuzzer picks (within the documented limits of a host's answers), and it
//! also calls the session out of turn. Errors are fine: the run ends there, as the connection
//! would. Besides "never panics", each step checks what the real hosts rely on:
//!
//! - every frame a session queues is one the codec accepts and gives back unchanged;
//! - a failing session's last frame is an `Error` with its code (unless the peer closed);
//! - an ack never covers more than the host reported durable;
//! - nothing is applied, read or acked before the handshake completes, and each role sees only
//!   its own effects;
//! - the hub session lets through only the store's own writers and events, and hub entries only
//!   with a tag;
//! - after `handle_timeout(now)` the next timer lies in the future (a timer stuck in the past makes
//!   the host's loop spin);
//! - one step queues a bounded number of frames and effects.

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Result, Unstructured};
use shelfsync_shared::sync::{
    AgentResume, AgentSession, DeltaRead, Effect, HubSession, JournalRead, PeerAccept, SessionError, SyncConfig,
    Transmit, EARLY_FRAMES_MAX, EARLY_JOURNAL_MAX,
};
use shelfsync_shared::wire::{self, Frame, FrameV1, HoldsSnapshot, PROTOCOL_VERSION};

use super::gen;

/// Most steps of one run.
const STEPS_MAX: usize = 512;
/// Most frames or effects one step may queue: replaying what arrived during the handshake is the
/// most any single call does.
const PER_STEP_MAX: usize = EARLY_FRAMES_MAX + EARLY_JOURNAL_MAX + 16;

/// The clock's origin (any instant will do; only differences matter).
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// `SHELFSYNC_FUZZ_TRACE=1` prints every frame, effect and answer (to replay a finding).
fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SHELFSYNC_FUZZ_TRACE").is_some())
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            eprintln!($($arg)*);
        }
    };
}

/// An agent session under fuzz.
pub fn agent(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mut run) = Run::<AgentSession>::new(&mut u) else { return };
    run.go(&mut u);
}

/// A hub session under fuzz.
pub fn hub(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mut run) = Run::<HubSession>::new(&mut u) else { return };
    run.go(&mut u);
}

fn config(u: &mut Unstructured) -> Result<SyncConfig> {
    Ok(SyncConfig {
        coalesce: Duration::from_millis(if u.arbitrary()? { 0 } else { u.int_in_range(1..=20)? }),
        digest_interval: Duration::from_millis(u.int_in_range(1..=5000)?),
        digest_retry: Duration::from_millis(u.int_in_range(1..=1000)?),
        window: u.int_in_range(1..=5)?,
        delta_limit: u.int_in_range(1..=6)?,
        journal_limit: u.int_in_range(1..=6)?,
    })
}

/// What both sessions offer the host.
trait Session: Sized {
    const ROLE: &'static str;
    fn start(u: &mut Unstructured) -> Result<(Self, Bounds)>;
    fn poll_transmit(&mut self) -> Option<Transmit>;
    fn poll_effect(&mut self) -> Option<Effect>;
    fn poll_timeout(&self) -> Option<Instant>;
    fn handle_timeout(&mut self, now: Instant);
    fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError>;
    fn local_head(&mut self, now: Instant, counter: u64, journal: u64);
    fn delta_applied(&mut self, now: Instant, upto: u64) -> Result<(), SessionError>;
    fn journal_applied(&mut self, now: Instant, upto: u64) -> Result<(), SessionError>;
    fn delta_read(&mut self, now: Instant, read: DeltaRead) -> Result<(), SessionError>;
    fn journal_read(&mut self, now: Instant, read: JournalRead) -> Result<(), SessionError>;
    fn send_catalog(&mut self, doc: wire::CatalogDoc, bytes: Vec<u8>);
    /// The role's own answers (lineage, peer lookup) and calls (ping, holds, refusal).
    /// `Ok(false)`: the host ends the connection on purpose.
    fn role_effect(
        &mut self,
        u: &mut Unstructured,
        now: Instant,
        effect: &Effect,
        bounds: &mut Bounds,
    ) -> Result<std::result::Result<bool, SessionError>>;
    fn role_call(
        &mut self,
        u: &mut Unstructured,
        now: Instant,
        bounds: &mut Bounds,
    ) -> Result<std::result::Result<(), SessionError>>;
    /// Effects this role must never see.
    fn foreign(effect: &Effect) -> bool;
    /// A read's contents as this role's host would produce them.
    fn read_entries(u: &mut Unstructured, read: &mut DeltaRead) -> Result<()>;
}

/// What acks may cover: the most the host reported durable (or the session was told at start).
#[derive(Debug, Default)]
struct Bounds {
    applied: u64,
    journal_applied: u64,
}

macro_rules! common {
    () => {
        fn poll_transmit(&mut self) -> Option<Transmit> {
            Self::poll_transmit(self)
        }
        fn poll_effect(&mut self) -> Option<Effect> {
            Self::poll_effect(self)
        }
        fn poll_timeout(&self) -> Option<Instant> {
            Self::poll_timeout(self)
        }
        fn handle_timeout(&mut self, now: Instant) {
            Self::handle_timeout(self, now)
        }
        fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError> {
            Self::handle_frame(self, now, frame)
        }
        fn local_head(&mut self, now: Instant, counter: u64, journal: u64) {
            Self::local_head(self, now, counter, journal)
        }
        fn delta_applied(&mut self, now: Instant, upto: u64) -> Result<(), SessionError> {
            Self::delta_applied(self, now, upto)
        }
        fn journal_applied(&mut self, now: Instant, upto: u64) -> Result<(), SessionError> {
            Self::journal_applied(self, now, upto)
        }
        fn delta_read(&mut self, now: Instant, read: DeltaRead) -> Result<(), SessionError> {
            Self::delta_read(self, now, read)
        }
        fn journal_read(&mut self, now: Instant, read: JournalRead) -> Result<(), SessionError> {
            Self::journal_read(self, now, read)
        }
        fn send_catalog(&mut self, doc: wire::CatalogDoc, bytes: Vec<u8>) {
            Self::send_catalog(self, doc, bytes)
        }
    };
}

impl Session for AgentSession {
    const ROLE: &'static str = "agent";
    common!();

    fn start(u: &mut Unstructured) -> Result<(Self, Bounds)> {
        let many = |u: &mut Unstructured| u.int_in_range(0..=40usize);
        let n = many(u)?;
        let boots = (0..n).map(|_| gen::boot(u)).collect::<Result<Vec<_>>>()?;
        let n = many(u)?;
        let retired = (0..n).map(|_| gen::retirement(u)).collect::<Result<Vec<_>>>()?;
        let resume = AgentResume {
            hub_writer: if u.arbitrary()? { Some(gen::hub_writer(u)?) } else { None },
            applied: gen::num(u)?,
            journal_applied: gen::num(u)?,
            head: gen::num(u)?,
            journal_head: gen::num(u)?,
            lineage: gen::checkpoint(u)?,
            boots,
            retired,
            acked: gen::num(u)?,
            journal_acked: gen::num(u)?,
        };
        let bounds = Bounds { applied: resume.applied, journal_applied: resume.journal_applied };
        Ok((AgentSession::new(config(u)?, gen::store(), gen::own_writer(u)?, resume), bounds))
    }

    fn role_effect(
        &mut self,
        u: &mut Unstructured,
        now: Instant,
        effect: &Effect,
        _bounds: &mut Bounds,
    ) -> Result<std::result::Result<bool, SessionError>> {
        Ok(match effect {
            // The host judges the lineage: it continues, or retires the writer and hangs up.
            Effect::CheckLineage { .. } if u.ratio(1, 8)? => Ok(false),
            Effect::CheckLineage { .. } => self.lineage_ok(now, u.arbitrary()?).map(|()| true),
            Effect::ComputeDigest => {
                // Usually the head the hub acked (the session only sends a digest when quiet).
                let head = if u.ratio(3, 4)? { self.acked() } else { gen::num(u)? };
                self.digest_computed(now, gen::digest(u)?, head).map(|()| true)
            }
            _ => Ok(true),
        })
    }

    fn role_call(
        &mut self,
        u: &mut Unstructured,
        now: Instant,
        _bounds: &mut Bounds,
    ) -> Result<std::result::Result<(), SessionError>> {
        Ok(if u.arbitrary()? {
            self.lineage_ok(now, u.arbitrary()?)
        } else {
            self.digest_computed(now, gen::digest(u)?, gen::num(u)?)
        })
    }

    fn foreign(effect: &Effect) -> bool {
        matches!(effect, Effect::LookupPeer { .. } | Effect::Pong { .. } | Effect::DigestCompared { .. })
    }

    fn read_entries(u: &mut Unstructured, read: &mut DeltaRead) -> Result<()> {
        // Own entries, and in a full read the hub's with their tags.
        read.fulfilled = gen::vec_of(u, gen::uuid)?;
        read.lineage = if u.ratio(3, 4)? { Some(gen::checkpoint(u)?) } else { None };
        Ok(())
    }
}

impl Session for HubSession {
    const ROLE: &'static str = "hub";
    common!();

    fn start(u: &mut Unstructured) -> Result<(Self, Bounds)> {
        let (head, journal_head) = (gen::num(u)?, gen::num(u)?);
        let s = HubSession::new(config(u)?, gen::store(), gen::hub_writer(u)?, head, journal_head);
        Ok((s, Bounds::default()))
    }

    fn role_effect(
        &mut self,
        u: &mut Unstructured,
        now: Instant,
        effect: &Effect,
        bounds: &mut Bounds,
    ) -> Result<std::result::Result<bool, SessionError>> {
        Ok(match effect {
            Effect::LookupPeer { .. } if u.ratio(1, 8)? => Err(refuse(self, u)?),
            Effect::LookupPeer { .. } => {
                let acc = peer_accept(u)?;
                bounds.applied = bounds.applied.max(acc.applied);
                bounds.journal_applied = bounds.journal_applied.max(acc.journal_applied);
                self.accept(now, acc).map(|()| true)
            }
            Effect::ComputeDigest => self.digest_computed(now, gen::digest(u)?, gen::num(u)?).map(|()| true),
            _ => Ok(true),
        })
    }

    fn role_call(
        &mut self,
        u: &mut Unstructured,
        now: Instant,
        bounds: &mut Bounds,
    ) -> Result<std::result::Result<(), SessionError>> {
        Ok(match u.int_in_range(0u8..=4)? {
            0 => {
                self.ping(gen::num(u)?);
                Ok(())
            }
            1 if u.arbitrary()? => {
                let transfers = gen::vec_of(u, gen::incoming)?;
                self.send_incoming(shelfsync_shared::wire::IncomingSnapshot { version: gen::num(u)?, transfers });
                Ok(())
            }
            1 => {
                self.send_holds(HoldsSnapshot { version: gen::num(u)?, holds: gen::vec_of(u, gen::hold)? });
                Ok(())
            }
            2 => Err(refuse(self, u)?),
            3 => {
                let acc = peer_accept(u)?;
                bounds.applied = bounds.applied.max(acc.applied);
                bounds.journal_applied = bounds.journal_applied.max(acc.journal_applied);
                self.accept(now, acc)
            }
            _ => self.digest_computed(now, gen::digest(u)?, gen::num(u)?),
        })
    }

    fn foreign(effect: &Effect) -> bool {
        matches!(
            effect,
            Effect::CheckLineage { .. }
                | Effect::ApplyHolds { .. }
                | Effect::ApplyIncoming { .. }
                | Effect::ApplyRights { .. }
        )
    }

    fn read_entries(_u: &mut Unstructured, _read: &mut DeltaRead) -> Result<()> {
        Ok(())
    }
}

/// A refusal with any message, long ones included (the `Error` frame's message has a limit).
fn refuse(s: &mut HubSession, u: &mut Unstructured) -> Result<SessionError> {
    let code = u.int_in_range(0..=8)?;
    let message = gen::text(u)?.repeat(u.int_in_range(1..=80)?);
    Ok(s.refuse(code, message))
}

fn peer_accept(u: &mut Unstructured) -> Result<PeerAccept> {
    Ok(PeerAccept {
        applied: gen::num(u)?,
        journal_applied: gen::num(u)?,
        lineage: gen::hub_lineage(u)?,
        hub_entries: gen::digest(u)?,
    })
}

/// One session, its host's queue of effects and what the oracles remember.
struct Run<S> {
    s: S,
    now: Instant,
    queue: VecDeque<Effect>,
    bounds: Bounds,
    established: bool,
    handshakes: usize,
    /// The last counter and journal ranges and ping the session sent (the peer acks them).
    last_delta: Option<u64>,
    last_journal: Option<u64>,
    last_ping: Option<u64>,
}

enum Step {
    Go,
    /// The host hangs up on purpose.
    End,
    Failed(SessionError),
}

impl<S: Session> Run<S> {
    fn new(u: &mut Unstructured) -> Result<Self> {
        let (s, bounds) = S::start(u)?;
        let mut run = Run {
            s,
            now: origin(),
            queue: VecDeque::new(),
            bounds,
            established: false,
            handshakes: 0,
            last_delta: None,
            last_journal: None,
            last_ping: None,
        };
        run.drain();
        Ok(run)
    }

    fn go(&mut self, u: &mut Unstructured) {
        for _ in 0..STEPS_MAX {
            if u.is_empty() {
                return;
            }
            let Ok(step) = self.step(u) else { return };
            match step {
                Step::Go => {
                    self.drain();
                }
                Step::End => return,
                Step::Failed(e) => {
                    let last = self.drain();
                    if !e.from_peer {
                        let told = matches!(&last, Some(Frame::V1(FrameV1::Error(m))) if m.code == e.code);
                        assert!(told, "{} session failed ({e}) without telling the peer; last frame {last:?}", S::ROLE);
                    }
                    return;
                }
            }
        }
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<Step> {
        let now = self.now;
        let action = u.int_in_range(0u8..=13)?;
        trace!("-- action {action}");
        let r = match action {
            // A frame built field by field; the codec would refuse an invalid one before the
            // session saw it.
            0..=2 => {
                let frame = gen::frame(u)?;
                if frame.validate().is_err() {
                    return Ok(Step::Go);
                }
                trace!("peer -> {frame:?}");
                self.s.handle_frame(now, frame)
            }
            // Raw bytes through the codec.
            3 => {
                let n = u.int_in_range(0..=256)?;
                match wire::decode_body(u.bytes(n)?) {
                    Ok(frame) => {
                        trace!("peer (bytes) -> {frame:?}");
                        self.s.handle_frame(now, frame)
                    }
                    Err(_) => Ok(()),
                }
            }
            // The peer acknowledges (or answers) what the session sent last.
            4 => {
                let frame = match u.int_in_range(0u8..=2)? {
                    0 => self.last_delta.map(|upto| FrameV1::Ack(wire::Ack { upto })),
                    1 => self.last_journal.map(|upto| FrameV1::JournalAck(wire::Ack { upto })),
                    _ => self.last_ping.map(FrameV1::Pong),
                };
                match frame {
                    Some(f) => {
                        trace!("peer answers -> {f:?}");
                        self.s.handle_frame(now, Frame::V1(f))
                    }
                    None => Ok(()),
                }
            }
            // The host answers the oldest effect (usually), or all of them.
            5..=8 => return self.answer(u),
            9 => {
                // Bounded: a host whose reads stop short of its head is asked to read again.
                for _ in 0..64 {
                    if self.queue.is_empty() {
                        break;
                    }
                    match self.answer(u)? {
                        Step::Go => self.drain_effects(),
                        other => return Ok(other),
                    }
                }
                Ok(())
            }
            // Time passes; due timers fire.
            10 => {
                let ms = match u.int_in_range(0u8..=3)? {
                    0 => 0,
                    1 => u.int_in_range(1..=50)?,
                    2 => u.int_in_range(1..=5000)?,
                    _ => u.int_in_range(1..=86_400_000)?,
                };
                self.now += Duration::from_millis(ms);
                self.timers();
                Ok(())
            }
            11 => {
                let (c, j) = (gen::num(u)?, gen::num(u)?);
                self.s.local_head(now, c, j);
                Ok(())
            }
            // The host calls out of turn: answers nobody asked for, role calls.
            12 => match u.int_in_range(0u8..=5)? {
                // The host says so: what it reports durable bounds the acks either way.
                0 => {
                    let upto = gen::num(u)?;
                    self.bounds.applied = self.bounds.applied.max(upto);
                    self.s.delta_applied(now, upto)
                }
                1 => {
                    let upto = gen::num(u)?;
                    self.bounds.journal_applied = self.bounds.journal_applied.max(upto);
                    self.s.journal_applied(now, upto)
                }
                2 => {
                    let after = gen::num(u)?;
                    let read = self.delta_read(u, after, 4)?;
                    self.s.delta_read(now, read)
                }
                3 => {
                    let after = gen::num(u)?;
                    let read = journal_read(u, after, 4)?;
                    self.s.journal_read(now, read)
                }
                4 => {
                    self.s.handle_timeout(now);
                    Ok(())
                }
                _ => {
                    let n = u.int_in_range(0..=64)?;
                    self.s.send_catalog(gen::catalog_doc(u)?, u.bytes(n)?.to_vec());
                    Ok(())
                }
            },
            _ => self.s.role_call(u, now, &mut self.bounds)?,
        };
        Ok(match r {
            Ok(()) => Step::Go,
            Err(e) => Step::Failed(e),
        })
    }

    /// Fires due timers and checks that none is left in the past.
    fn timers(&mut self) {
        if self.s.poll_timeout().is_some_and(|t| t <= self.now) {
            self.s.handle_timeout(self.now);
            self.drain();
            let next = self.s.poll_timeout();
            assert!(
                next.is_none_or(|t| t > self.now),
                "{}: after handle_timeout the next timer is still due ({:?} ≤ now): the host would spin",
                S::ROLE,
                next.map(|t| self.now - t)
            );
        }
    }

    /// The host fulfils its oldest effect with contents of the fuzzer's choosing.
    fn answer(&mut self, u: &mut Unstructured) -> Result<Step> {
        let Some(effect) = self.queue.pop_front() else { return Ok(Step::Go) };
        trace!("host answers {effect:?}");
        let now = self.now;
        let r = match &effect {
            Effect::ApplyDelta { delta, .. } => {
                let upto = if u.ratio(7, 8)? { delta.upto } else { gen::num(u)? };
                let r = self.s.delta_applied(now, upto);
                if r.is_ok() {
                    self.bounds.applied = self.bounds.applied.max(upto);
                }
                r
            }
            Effect::ApplyJournal { batch, .. } => {
                let upto = if u.ratio(7, 8)? { batch.upto } else { gen::num(u)? };
                let r = self.s.journal_applied(now, upto);
                if r.is_ok() {
                    self.bounds.journal_applied = self.bounds.journal_applied.max(upto);
                }
                r
            }
            Effect::ReadDelta { after, limit, .. } => {
                let read = self.delta_read(u, *after, *limit)?;
                self.s.delta_read(now, read)
            }
            Effect::ReadJournal { after, limit } => {
                let read = journal_read(u, *after, *limit)?;
                self.s.journal_read(now, read)
            }
            Effect::CatalogMessage { doc, .. } if u.arbitrary()? => {
                let n = u.int_in_range(0..=64)?;
                self.s.send_catalog(*doc, u.bytes(n)?.to_vec());
                Ok(())
            }
            _ => match self.s.role_effect(u, now, &effect, &mut self.bounds)? {
                Ok(true) => Ok(()),
                Ok(false) => return Ok(Step::End),
                Err(e) => Err(e),
            },
        };
        Ok(match r {
            Ok(()) => Step::Go,
            Err(e) => Step::Failed(e),
        })
    }

    /// A read the host might answer: entries within the limit, up to a sequence at or after
    /// `after` (usually).
    fn delta_read(&mut self, u: &mut Unstructured, after: u64, limit: usize) -> Result<DeltaRead> {
        let n = u.int_in_range(0..=limit.min(4))?;
        let entries =
            (0..n).map(|_| Ok((gen::sku(u)?, gen::writer(u)?, gen::entry(u)?))).collect::<Result<Vec<_>>>()?;
        // At most one tag per entry (a host tags each hub entry once); sometimes one past the
        // end, which the session must refuse.
        let mut macs = Vec::new();
        for i in 0..=n as u32 {
            if u.ratio(1, 3)? && (i < n as u32 || u.ratio(1, 4)?) {
                macs.push((i, gen::mac(u)?));
            }
        }
        let mut read = DeltaRead { upto: upto(u, after)?, entries, macs, ..DeltaRead::default() };
        S::read_entries(u, &mut read)?;
        Ok(read)
    }

    /// Moves the session's frames and effects out, checking each; returns the last frame.
    fn drain(&mut self) -> Option<Frame> {
        let mut last = None;
        let mut n = 0;
        while let Some(t) = self.s.poll_transmit() {
            n += 1;
            assert!(n <= PER_STEP_MAX, "{}: one step queued over {PER_STEP_MAX} frames", S::ROLE);
            trace!("{} sends {:?}", S::ROLE, t.frame);
            self.check_transmit(&t.frame);
            last = Some(t.frame);
        }
        self.drain_effects();
        last
    }

    fn drain_effects(&mut self) {
        let mut n = 0;
        while let Some(e) = self.s.poll_effect() {
            n += 1;
            assert!(n <= PER_STEP_MAX, "{}: one step queued over {PER_STEP_MAX} effects", S::ROLE);
            trace!("{} effect {e:?}", S::ROLE);
            self.check_effect(&e);
            self.queue.push_back(e);
        }
        // The host's queue grows only with what the peer or the host itself caused.
        assert!(self.queue.len() <= STEPS_MAX * PER_STEP_MAX);
    }

    fn check_transmit(&mut self, frame: &Frame) {
        let bytes = wire::encode(frame)
            .unwrap_or_else(|e| panic!("{}: the session queued a frame the codec refuses ({e}): {frame:?}", S::ROLE));
        let (back, _) = wire::decode(&bytes).expect("decodes").expect("whole");
        assert_eq!(&back, frame, "{}: a queued frame changed on the wire", S::ROLE);
        let Frame::V1(f) = frame;
        match f {
            FrameV1::Ack(a) => assert!(
                a.upto <= self.bounds.applied,
                "{}: acked {} but the host made only {} durable",
                S::ROLE,
                a.upto,
                self.bounds.applied
            ),
            FrameV1::JournalAck(a) => assert!(
                a.upto <= self.bounds.journal_applied,
                "{}: acked journal {} but the host made only {} durable",
                S::ROLE,
                a.upto,
                self.bounds.journal_applied
            ),
            FrameV1::Delta(d) => self.last_delta = Some(d.upto),
            FrameV1::Journal(j) => self.last_journal = Some(j.upto),
            FrameV1::Ping(n) => self.last_ping = Some(*n),
            _ => {}
        }
    }

    fn check_effect(&mut self, e: &Effect) {
        assert!(!S::foreign(e), "{} got {e:?}", S::ROLE);
        match e {
            Effect::Established { .. } => {
                assert!(!self.established, "{}: established twice", S::ROLE);
                self.established = true;
            }
            Effect::CheckLineage { .. } | Effect::LookupPeer { .. } => {
                assert!(!self.established, "{}: handshake effect after the handshake: {e:?}", S::ROLE);
                self.handshakes += 1;
                assert_eq!(self.handshakes, 1, "{}: a second handshake effect {e:?}", S::ROLE);
            }
            Effect::ApplyDelta { .. }
            | Effect::ApplyJournal { .. }
            | Effect::ApplyHolds { .. }
            | Effect::ApplyIncoming { .. }
            | Effect::ApplyRights { .. }
            | Effect::ReadDelta { .. }
            | Effect::ReadJournal { .. }
            | Effect::Acked { .. }
            | Effect::JournalAcked { .. }
            | Effect::ComputeDigest
            | Effect::DigestCompared { .. }
            | Effect::Pong { .. } => {
                assert!(self.established, "{}: {e:?} before the handshake completed", S::ROLE)
            }
            Effect::CatalogMessage { .. } => {}
        }
        if S::ROLE == "hub" {
            check_authorised(e);
        }
    }
}

/// The hub's security invariant: a store writes only its own writers' entries and events, and
/// returns hub entries only with a tag (which the host then verifies).
fn check_authorised(e: &Effect) {
    let store = gen::store();
    match e {
        Effect::LookupPeer { hello } => {
            assert_eq!(hello.protocol, PROTOCOL_VERSION);
            assert_eq!(hello.store, store);
            assert!(hello.writer.is_store(&store), "hello of foreign writer {}", hello.writer);
            for r in &hello.retired {
                assert!(r.old.is_store(&store) && r.new.is_store(&store), "foreign retirement {r:?}");
            }
        }
        Effect::ApplyDelta { peer, delta, lineage_base } => {
            assert!(peer.is_store(&store));
            // The compare-and-set base goes with every delta that names the writer's history.
            assert_eq!(lineage_base.is_some(), delta.lineage.is_some(), "a lineage delta without its base");
            Frame::V1(FrameV1::Delta(delta.clone())).validate().expect("an applied delta is valid");
            for (i, e) in delta.entries.iter().enumerate() {
                let w = &delta.writers[e.writer as usize];
                assert!(w.is_store(&store) || w.is_hub(), "entry of foreign writer {w} let through");
                if w.is_hub() {
                    assert!(delta.macs.iter().any(|(k, _)| *k as usize == i), "untagged hub entry let through");
                }
            }
        }
        Effect::ApplyJournal { peer, batch } => {
            assert!(peer.is_store(&store));
            for ev in &batch.events {
                assert!(ev.store == store && ev.writer.is_store(&store), "foreign event let through: {ev:?}");
            }
        }
        _ => {}
    }
}

fn upto(u: &mut Unstructured, after: u64) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=7)? {
        0..=5 => after.saturating_add(u.int_in_range(0..=4)?),
        6 => after.saturating_sub(1),
        _ => gen::num(u)?,
    })
}

fn journal_read(u: &mut Unstructured, after: u64, limit: usize) -> Result<JournalRead> {
    let n = u.int_in_range(0..=limit.min(4))?;
    let mut events = (0..n).map(|_| gen::event(u)).collect::<Result<Vec<_>>>()?;
    // A host reads events it stored, so their reasons are within the limit.
    for e in &mut events {
        if let Some(r) = &mut e.reason {
            while r.len() > shelfsync_shared::qty::REASON_MAX_LEN {
                r.pop();
            }
        }
    }
    Ok(JournalRead { upto: upto(u, after)?, events })
}
