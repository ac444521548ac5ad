//! A deterministic, seeded simulation of one hub and several agents driven through the sans-IO
//! sessions, with in-memory "durable" stores and hosts that fulfil effects in order but late (as a
//! database thread does). Faults: frame loss, duplication and reordering within a stream, partitions,
//! crash-restarts (uncommitted work is lost), and a fake clock that jumps. After healing, every
//! replica must converge, every change must be counted exactly once, journals must be complete, and
//! a digest round must find every store equal.
//!
//! Oracles checked while running, besides convergence at the end:
//! - a session may fail only on a connection that suffered an injected fault (frames on
//!   *different* streams overtaking each other is normal QUIC, not a fault);
//! - whatever a session reports as acknowledged is durable at the peer (acks follow commits);
//! - digests never differ unless a test tampered with a replica (or frames were reordered within
//!   a stream, which a real QUIC stream never does);
//! - a failing session tells its peer why in an `Error` frame.
//!
//! A failing seed is printed; add it to `REGRESSION_SEEDS` so it runs forever after.
//! `SHELFSYNC_SIM_SEEDS=N` runs N random seeds besides the regression list;
//! `SHELFSYNC_SIM_SEED=0x...` replays one seed and `SHELFSYNC_SIM_TRACE=<store index>` prints that
//! store's frames, faults and effects.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shelfsync_shared::counter::{CounterMap, PnEntry, StateDigest};
use shelfsync_shared::sync::{
    AgentResume, AgentSession, DeltaRead, Effect, HubSession, JournalRead, SessionError, StreamKind, SyncConfig,
};
use shelfsync_shared::wire::{self, close_code, Delta, Frame, FrameV1, Hello, JournalBatch, Welcome, PROTOCOL_VERSION};
use shelfsync_shared::{EventKind, Incarnation, JournalEvent, NodeId, Sku, StoreId, WriterId};
use uuid::Uuid;

/// Seeds that run on every `cargo test`. Add any seed a random run reports.
const REGRESSION_SEEDS: &[u64] = &[1, 2, 3, 42, 0x5eed, 0xdead_beef, 0x7a7a_0001, 0xc0ff_ee00, 0x9461_0c03_3a71_7e8d];
/// Random seeds per run unless `SHELFSYNC_SIM_SEEDS` says otherwise.
const DEFAULT_RANDOM_SEEDS: u64 = 80;
const STEPS: usize = 4000;
const STORES: usize = 5;
const SKUS: usize = 4;

const UP: usize = 0;
const DOWN: usize = 1;

fn sku(i: usize) -> Sku {
    format!("SKU-{i}").parse().unwrap()
}

/// The simulation carries the state and journal streams; any other stream (catalog) would share
/// the journal's lane.
fn lane(k: StreamKind) -> usize {
    if k == StreamKind::State {
        0
    } else {
        1
    }
}

/// Every frame crosses the simulated network as bytes.
fn to_wire(frame: &Frame) -> Vec<u8> {
    wire::encode(frame).unwrap_or_else(|e| panic!("a session produced a frame the codec refuses: {e}: {frame:?}"))
}

fn from_wire(bytes: &[u8]) -> Frame {
    let (frame, used) = wire::decode(bytes).expect("valid frame").expect("complete frame");
    assert_eq!(used, bytes.len(), "one frame per buffer");
    frame
}

/// Per-seed variation of timing, flow control and fault rates.
#[derive(Clone, Debug)]
struct Knobs {
    cfg: SyncConfig,
    loss: f64,
    dup: f64,
    reorder: f64,
    /// Probability that a host works through its queue as soon as work arrives.
    eager_host: f64,
    /// Probability that a session hears of new local heads at once (else some steps later).
    eager_heads: f64,
    /// How long a connection that lost a frame lingers before its idle timeout kills it.
    idle_timeout_ms: u64,
}

impl Knobs {
    fn random(rng: &mut StdRng) -> Knobs {
        let cfg = SyncConfig {
            coalesce: Duration::from_millis(if rng.random_bool(0.5) { 0 } else { rng.random_range(1..20) }),
            digest_interval: Duration::from_millis(rng.random_range(50..3000)),
            digest_retry: Duration::from_millis(rng.random_range(10..500)),
            window: rng.random_range(1..5),
            delta_limit: rng.random_range(1..6),
            journal_limit: rng.random_range(1..6),
        };
        Knobs {
            cfg,
            loss: rng.random_range(0.0..0.03),
            dup: rng.random_range(0.0..0.03),
            reorder: rng.random_range(0.0..0.03),
            eager_host: rng.random_range(0.0..1.0),
            eager_heads: rng.random_range(0.0..1.0),
            idle_timeout_ms: rng.random_range(10..500),
        }
    }
}

/// What an agent keeps in SQLite.
#[derive(Clone, Default)]
struct AgentDb {
    counters: CounterMap,
    hub_writer: Option<WriterId>,
    applied: u64,
    journal_applied: u64,
    /// (local journal seq, event), in seq order.
    journal: Vec<(u64, JournalEvent)>,
    journal_keys: HashSet<(Uuid, u32)>,
}

impl AgentDb {
    fn journal_head(&self) -> u64 {
        self.journal.last().map_or(0, |(s, _)| *s)
    }

    fn resume(&self) -> AgentResume {
        AgentResume {
            hub_writer: self.hub_writer.clone(),
            applied: self.applied,
            journal_applied: self.journal_applied,
            head: self.counters.head(),
            journal_head: self.journal_head(),
        }
    }

    fn add_event(&mut self, e: JournalEvent) {
        if self.journal_keys.insert((e.id, e.line)) {
            let seq = self.journal_head() + 1;
            self.journal.push((seq, e));
        }
    }

    /// Watermarks refer to one life of the hub; a new life starts them over.
    fn adopt_hub(&mut self, peer: &WriterId) {
        if self.hub_writer.as_ref() != Some(peer) {
            self.hub_writer = Some(peer.clone());
            self.applied = 0;
            self.journal_applied = 0;
        }
    }

    /// One transaction: merge and record the watermark.
    fn apply_delta(&mut self, peer: &WriterId, delta: &Delta) -> Result<(), String> {
        self.adopt_hub(peer);
        self.counters.merge(delta.entries()).map_err(|e| e.to_string())?;
        self.applied = self.applied.max(delta.upto);
        Ok(())
    }

    fn apply_journal(&mut self, store: &StoreId, peer: &WriterId, batch: &JournalBatch) -> Result<(), String> {
        self.adopt_hub(peer);
        for e in &batch.events {
            if &e.store != store {
                return Err(format!("{store} received event {} of store {}", e.id, e.store));
            }
            self.add_event(e.clone());
        }
        self.journal_applied = self.journal_applied.max(batch.upto);
        Ok(())
    }

    /// Entries of this store's own writers above `after`, in seq order, at most `limit`.
    fn read_delta(&self, store: &StoreId, after: u64, limit: usize) -> DeltaRead {
        let mut entries = Vec::new();
        for (seq, k, w, e) in self.counters.delta_since(after) {
            if !w.is_store(store) {
                continue;
            }
            entries.push((k, w, e));
            if entries.len() == limit {
                return DeltaRead { upto: seq, entries, fulfilled: vec![] };
            }
        }
        DeltaRead { upto: self.counters.head().max(after), entries, fulfilled: vec![] }
    }

    fn read_journal(&self, store: &StoreId, after: u64, limit: usize) -> JournalRead {
        let mut events = Vec::new();
        for (seq, e) in self.journal.iter().filter(|(seq, e)| *seq > after && e.writer.is_store(store)) {
            events.push(e.clone());
            if events.len() == limit {
                return JournalRead { upto: *seq, events };
            }
        }
        JournalRead { upto: self.journal_head().max(after), events }
    }
}

/// What the hub keeps in its database. One GLOBAL sequence across stores for counters, one for
/// the journal; reads for a store filter by store.
#[derive(Default)]
struct HubDb {
    seq: u64,
    entries: BTreeMap<(StoreId, Sku, WriterId), (PnEntry, u64)>,
    /// (store, agent writer) → (counters applied, journal applied).
    marks: BTreeMap<(StoreId, WriterId), (u64, u64)>,
    journal_seq: u64,
    journal: Vec<(u64, JournalEvent)>,
    journal_keys: HashSet<(StoreId, Uuid, u32)>,
}

impl HubDb {
    fn merge(&mut self, store: &StoreId, k: &Sku, w: &WriterId, e: PnEntry) {
        let key = (store.clone(), k.clone(), w.clone());
        let cur = self.entries.get(&key).map(|x| x.0).unwrap_or_default();
        if !cur.covers(e) {
            self.seq += 1;
            self.entries.insert(key, (cur.join(e), self.seq));
        }
    }

    fn add_event(&mut self, e: JournalEvent) {
        if self.journal_keys.insert((e.store.clone(), e.id, e.line)) {
            self.journal_seq += 1;
            self.journal.push((self.journal_seq, e));
        }
    }

    /// Store `store`'s entries above `after` in seq order, leaving out `exclude`'s.
    fn read_delta(&self, store: &StoreId, exclude: Option<&WriterId>, after: u64, limit: usize) -> DeltaRead {
        let mut rows: Vec<_> = self
            .entries
            .iter()
            .filter(|((st, _, w), (_, seq))| st == store && *seq > after && Some(w) != exclude)
            .map(|((_, k, w), (e, seq))| (*seq, k.clone(), w.clone(), *e))
            .collect();
        rows.sort_by_key(|r| r.0);
        let upto = if rows.len() >= limit {
            rows.truncate(limit);
            rows.last().unwrap().0
        } else {
            self.seq.max(after)
        };
        DeltaRead { upto, entries: rows.into_iter().map(|(_, k, w, e)| (k, w, e)).collect(), fulfilled: vec![] }
    }

    /// Store `store`'s hub-written events above `after` (any hub incarnation), as the real hub
    /// reads them: an agent's own events never travel back down.
    fn read_journal(&self, store: &StoreId, after: u64, limit: usize) -> JournalRead {
        let mut events = Vec::new();
        for (seq, e) in self.journal.iter().filter(|(seq, e)| *seq > after && &e.store == store && e.writer.is_hub()) {
            events.push(e.clone());
            if events.len() == limit {
                return JournalRead { upto: *seq, events };
            }
        }
        JournalRead { upto: self.journal_seq.max(after), events }
    }

    fn digest(&self, store: &StoreId) -> (StateDigest, u64) {
        let mut d = StateDigest::default();
        let mut head = 0;
        for ((st, k, w), (e, seq)) in &self.entries {
            if st == store {
                d.add(k, w, *e);
                head = head.max(*seq);
            }
        }
        (d, head)
    }

    fn store_state(&self, store: &StoreId) -> BTreeMap<(Sku, WriterId), PnEntry> {
        self.entries
            .iter()
            .filter(|((s, ..), _)| s == store)
            .map(|((_, k, w), (e, _))| ((k.clone(), w.clone()), *e))
            .collect()
    }
}

struct Agent {
    store: StoreId,
    writer: WriterId,
    db: AgentDb,
    session: Option<AgentSession>,
    /// The host's queue of effects, tagged with the connection they came from.
    work: VecDeque<(u64, Effect)>,
    /// The session has not heard of the latest local heads yet.
    heads_dirty: bool,
    /// Local changes made by the current writer (journal events of its own).
    changes: usize,
    /// The last online backup of `db` (SQLite's backup API copies committed state only).
    backup: Option<AgentDb>,
}

/// A writer whose database was lost or restored from a backup: a new incarnation took over, and
/// its changes that had reached neither the hub nor the backup are gone. What survives must be a
/// prefix of what it wrote, and at least what the hub or the backup held when it retired.
struct Retired {
    store: StoreId,
    /// Per SKU, the least entry that must survive.
    floor: BTreeMap<Sku, PnEntry>,
    /// The least number of its journal events (in the order it wrote them) that must survive.
    events_floor: usize,
}

/// One connection: frames in flight per direction and stream, as bytes.
struct Link {
    gen: u64,
    q: [[VecDeque<Vec<u8>>; 2]; 2],
    /// A fault touched a frame of this connection, so a session error is expected.
    faulted: bool,
    /// A frame of this connection was reordered or duplicated within its stream. Then a `Digest`
    /// may reach the hub after a later `Delta` and compare unequal: one needless full resync, which
    /// a real (ordered) QUIC stream cannot cause.
    shuffled: bool,
    /// A frame was lost: QUIC would never deliver the rest of its stream, and the idle timeout
    /// closes the connection at this time (ms).
    dies_at: Option<u64>,
}

#[derive(Default, Debug)]
struct Stats {
    delivered: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    partitions: u64,
    crashes: u64,
    agent_restores: u64,
    hub_restores: u64,
    local_changes: u64,
    expected_errors: u64,
    connects: u64,
    /// Digest comparisons before healing.
    compared_under_faults: u64,
    /// Digests that differed on connections whose frames were reordered or duplicated.
    shuffled_mismatches: u64,
    /// Full-state reads the hub served after a digest mismatch.
    full_reads: u64,
    /// Per store: digests compared equal / different at the hub.
    matched: [u64; STORES],
    mismatched: [u64; STORES],
}

struct Sim {
    rng: StdRng,
    knobs: Knobs,
    t0: Instant,
    ms: u64,
    hub_writer: WriterId,
    hub: HubDb,
    hub_sessions: Vec<Option<HubSession>>,
    hub_work: VecDeque<(usize, u64, Effect)>,
    hub_heads_dirty: [bool; STORES],
    agents: Vec<Agent>,
    links: Vec<Option<Link>>,
    next_gen: u64,
    /// The ground truth: every change each writer made, in order.
    writes: BTreeMap<(StoreId, Sku, WriterId), Vec<i64>>,
    /// Every journal event each writer made, in order.
    events_by: BTreeMap<WriterId, Vec<(Uuid, u32)>>,
    retired: BTreeMap<WriterId, Retired>,
    next_event: u128,
    faults: bool,
    /// Whether local changes happen in this phase.
    busy: bool,
    /// An eager host is working through its queue.
    draining: bool,
    stats: Stats,
    /// The first broken invariant noticed while running.
    failure: Option<String>,
    /// Whether durable watermarks tell the truth (false once a test tampers with a replica).
    trust_acks: bool,
    /// `SHELFSYNC_SIM_TRACE=<store index>` prints that store's frames and effects.
    trace: Option<usize>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let knobs = Knobs::random(&mut rng);
        let hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(rng.random()));
        let agents = (0..STORES)
            .map(|i| {
                let store: StoreId = format!("store-{i}").parse().unwrap();
                Agent {
                    writer: WriterId::new(NodeId::Store(store.clone()), Incarnation::from_u64(rng.random())),
                    store,
                    db: AgentDb::default(),
                    session: None,
                    work: VecDeque::new(),
                    heads_dirty: false,
                    changes: 0,
                    backup: None,
                }
            })
            .collect();
        Sim {
            rng,
            knobs,
            t0: Instant::now(),
            ms: 0,
            hub_writer,
            hub: HubDb::default(),
            hub_sessions: (0..STORES).map(|_| None).collect(),
            hub_work: VecDeque::new(),
            hub_heads_dirty: [false; STORES],
            agents,
            links: (0..STORES).map(|_| None).collect(),
            next_gen: 1,
            writes: BTreeMap::new(),
            events_by: BTreeMap::new(),
            retired: BTreeMap::new(),
            next_event: 0,
            faults: true,
            busy: true,
            draining: false,
            stats: Stats::default(),
            failure: None,
            trust_acks: true,
            trace: std::env::var("SHELFSYNC_SIM_TRACE").ok().and_then(|v| v.parse().ok()),
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.ms)
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(format!("at {} ms: {why}", self.ms));
        }
    }

    fn trace(&self, i: usize, what: impl FnOnce() -> String) {
        if self.trace == Some(i) {
            eprintln!("{:>7} ms store-{i}: {}", self.ms, what());
        }
    }

    fn live(&self, i: usize, gen: u64) -> bool {
        self.links[i].as_ref().is_some_and(|l| l.gen == gen)
    }

    // ---- connections ----

    fn connect(&mut self, i: usize) {
        if self.links[i].is_some() {
            return;
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        self.stats.connects += 1;
        let cfg = self.knobs.cfg.clone();
        let a = &mut self.agents[i];
        a.session = Some(AgentSession::new(cfg.clone(), a.store.clone(), a.writer.clone(), a.db.resume()));
        a.heads_dirty = false;
        self.hub_sessions[i] =
            Some(HubSession::new(cfg, a.store.clone(), self.hub_writer.clone(), self.hub.seq, self.hub.journal_seq));
        self.hub_heads_dirty[i] = false;
        self.links[i] = Some(Link { gen, q: Default::default(), faulted: false, shuffled: false, dies_at: None });
        self.pump(i);
    }

    /// Both ends drop the connection and in-flight frames vanish. Work the hosts already took on
    /// stays queued: applies still commit (nobody hears of it), reads are dropped.
    fn disconnect(&mut self, i: usize) {
        self.trace(i, || "disconnect".into());
        self.agents[i].session = None;
        self.hub_sessions[i] = None;
        self.links[i] = None;
    }

    /// A session failed: it must have queued an `Error` frame naming the code (unless the peer
    /// closed first); then the connection closes. On a connection no fault touched, that is a bug.
    fn session_failed(&mut self, i: usize, at_hub: bool, err: SessionError) {
        self.trace(i, || format!("{} session failed: {err}", if at_hub { "hub" } else { "agent" }));
        let faulted = self.links[i].as_ref().is_none_or(|l| l.faulted);
        let last = if at_hub {
            let s = self.hub_sessions[i].as_mut();
            s.and_then(|s| std::iter::from_fn(|| s.poll_transmit()).last())
        } else {
            let s = self.agents[i].session.as_mut();
            s.and_then(|s| std::iter::from_fn(|| s.poll_transmit()).last())
        };
        if !err.from_peer {
            let told = last.map(|t| from_wire(&to_wire(&t.frame)));
            if !matches!(&told, Some(Frame::V1(FrameV1::Error(e))) if e.code == err.code) {
                self.fail(format!("store-{i}: failing session did not send an Error frame ({err}); last {told:?}"));
            }
        }
        let side = if at_hub { "hub" } else { "agent" };
        if faulted {
            self.stats.expected_errors += 1;
        } else {
            self.fail(format!("store-{i}: {side} session failed on a connection no fault touched: {err}"));
        }
        self.disconnect(i);
    }

    /// Moves transmits onto the link and effects into the hosts' queues; an eager host then works.
    fn pump(&mut self, i: usize) {
        let Some(link) = self.links[i].as_mut() else { return };
        let gen = link.gen;
        let a = &mut self.agents[i];
        if let Some(s) = a.session.as_mut() {
            while let Some(t) = s.poll_transmit() {
                link.q[UP][lane(t.stream)].push_back(to_wire(&t.frame));
            }
            while let Some(e) = s.poll_effect() {
                a.work.push_back((gen, e));
            }
        }
        if let Some(s) = self.hub_sessions[i].as_mut() {
            while let Some(t) = s.poll_transmit() {
                link.q[DOWN][lane(t.stream)].push_back(to_wire(&t.frame));
            }
            while let Some(e) = s.poll_effect() {
                self.hub_work.push_back((i, gen, e));
            }
        }
        // Not re-entered: work done here pumps again, and the outer loop picks up what it queues.
        if !self.draining && self.rng.random_bool(self.knobs.eager_host) {
            self.draining = true;
            while self.agent_work(i) | self.hub_work_one() {}
            self.draining = false;
        }
    }

    // ---- hosts ----

    /// The agent host fulfils its oldest effect. Returns whether there was one.
    fn agent_work(&mut self, i: usize) -> bool {
        let Some((gen, effect)) = self.agents[i].work.pop_front() else { return false };
        let live = self.live(i, gen);
        self.trace(i, || {
            format!("agent host (conn {gen}, live {live}): {effect:?} [head {}]", self.agents[i].db.counters.head())
        });
        let now = self.now();
        let a = &mut self.agents[i];
        let store = a.store.clone();
        let mut r = Ok(());
        match effect {
            Effect::ApplyDelta { peer, delta } => {
                if let Err(e) = a.db.apply_delta(&peer, &delta) {
                    self.fail(e);
                    return true;
                }
                a.heads_dirty = true;
                if live {
                    r = a.session.as_mut().unwrap().delta_applied(now, delta.upto);
                }
            }
            Effect::ApplyJournal { peer, batch } => {
                if let Err(e) = a.db.apply_journal(&store, &peer, &batch) {
                    self.fail(e);
                    return true;
                }
                a.heads_dirty = true;
                if live {
                    r = a.session.as_mut().unwrap().journal_applied(now, batch.upto);
                }
            }
            Effect::ReadDelta { after, limit, .. } if live => {
                let read = a.db.read_delta(&store, after, limit);
                r = a.session.as_mut().unwrap().delta_read(now, read);
            }
            Effect::ReadJournal { after, limit } if live => {
                let read = a.db.read_journal(&store, after, limit);
                r = a.session.as_mut().unwrap().journal_read(now, read);
            }
            Effect::ComputeDigest if live => {
                let (d, head) = (a.db.counters.digest(), a.db.counters.head());
                r = a.session.as_mut().unwrap().digest_computed(now, d, head);
            }
            Effect::LookupPeer { .. } | Effect::DigestCompared { .. } | Effect::ApplyHolds { .. } => {
                self.fail(format!("store-{i}: agent got {effect:?}"));
            }
            _ => {}
        }
        if let Err(e) = r {
            self.session_failed(i, false, e);
        }
        self.pump(i);
        true
    }

    /// The hub host (one database thread for all connections) fulfils its oldest effect.
    fn hub_work_one(&mut self) -> bool {
        let Some((i, gen, effect)) = self.hub_work.pop_front() else { return false };
        let live = self.live(i, gen);
        self.trace(i, || format!("hub host (conn {gen}, live {live}): {effect:?} [hub seq {}]", self.hub.seq));
        let now = self.now();
        let store = self.agents[i].store.clone();
        let mut r = Ok(());
        match effect {
            Effect::LookupPeer { writer } if live => {
                let (applied, japplied) = self.hub.marks.get(&(store, writer)).copied().unwrap_or((0, 0));
                r = self.hub_sessions[i].as_mut().unwrap().accept(now, applied, japplied);
            }
            Effect::ApplyDelta { peer, delta } => {
                for (k, w, e) in delta.entries() {
                    if !w.is_store(&store) {
                        self.fail(format!("the hub session let {w}'s entry through from {store}"));
                    }
                    self.hub.merge(&store, k, w, e);
                }
                let m = self.hub.marks.entry((store, peer)).or_default();
                m.0 = m.0.max(delta.upto);
                self.hub_heads_dirty = [true; STORES];
                if live {
                    let (h, j) = (self.hub.seq, self.hub.journal_seq);
                    let s = self.hub_sessions[i].as_mut().unwrap();
                    r = s.delta_applied(now, delta.upto);
                    // As the real hub does: its own session learns the heads its merge moved.
                    if r.is_ok() {
                        s.local_head(now, h, j);
                        self.hub_heads_dirty[i] = false;
                    }
                }
            }
            Effect::ApplyJournal { peer, batch } => {
                for e in &batch.events {
                    if e.store != store || !e.writer.is_store(&store) {
                        self.fail(format!("the hub session let event {} of {} through from {store}", e.id, e.writer));
                    }
                    self.hub.add_event(e.clone());
                }
                let m = self.hub.marks.entry((store, peer)).or_default();
                m.1 = m.1.max(batch.upto);
                self.hub_heads_dirty = [true; STORES];
                if live {
                    r = self.hub_sessions[i].as_mut().unwrap().journal_applied(now, batch.upto);
                }
            }
            Effect::ReadDelta { after, limit, full } if live => {
                self.stats.full_reads += u64::from(full);
                let s = self.hub_sessions[i].as_mut().unwrap();
                let exclude = if full { None } else { s.peer().cloned() };
                let read = self.hub.read_delta(&store, exclude.as_ref(), after, limit);
                r = s.delta_read(now, read);
            }
            Effect::ReadJournal { after, limit } if live => {
                let read = self.hub.read_journal(&store, after, limit);
                r = self.hub_sessions[i].as_mut().unwrap().journal_read(now, read);
            }
            Effect::ComputeDigest if live => {
                let (d, head) = self.hub.digest(&store);
                r = self.hub_sessions[i].as_mut().unwrap().digest_computed(now, d, head);
            }
            Effect::DigestCompared { matched } if live => {
                if self.faults {
                    self.stats.compared_under_faults += 1;
                }
                if matched {
                    self.stats.matched[i] += 1;
                } else if self.links[i].as_ref().is_some_and(|l| l.shuffled) {
                    self.stats.shuffled_mismatches += 1;
                } else {
                    self.stats.mismatched[i] += 1;
                    if self.trust_acks {
                        let at_hub = self.hub.store_state(&store);
                        let at_agent = self.agents[i].db.counters.state();
                        let diff: Vec<_> = at_hub
                            .iter()
                            .filter(|(k, e)| at_agent.get(*k) != Some(*e))
                            .map(|(k, e)| format!("{k:?}: hub {e:?} agent {:?}", at_agent.get(k)))
                            .chain(
                                at_agent
                                    .iter()
                                    .filter(|(k, _)| !at_hub.contains_key(*k))
                                    .map(|(k, e)| format!("{k:?}: agent only {e:?}")),
                            )
                            .collect();
                        self.fail(format!(
                            "{store}: digests differed though nobody tampered; differences now: {diff:?}"
                        ));
                    }
                }
            }
            Effect::ApplyHolds { .. } => self.fail(format!("hub got {effect:?}")),
            _ => {}
        }
        if let Err(e) = r {
            self.session_failed(i, true, e);
        }
        self.pump(i);
        true
    }

    /// Sessions hear of the current local heads (the hosts' "heads changed" watch).
    fn notify_agent(&mut self, i: usize) {
        let now = self.now();
        let a = &mut self.agents[i];
        if !std::mem::take(&mut a.heads_dirty) {
            return;
        }
        let (h, j) = (a.db.counters.head(), a.db.journal_head());
        if let Some(s) = a.session.as_mut() {
            s.local_head(now, h, j);
        }
        self.pump(i);
    }

    fn notify_hub(&mut self, i: usize) {
        if !std::mem::take(&mut self.hub_heads_dirty[i]) {
            return;
        }
        let (now, h, j) = (self.now(), self.hub.seq, self.hub.journal_seq);
        if let Some(s) = self.hub_sessions[i].as_mut() {
            s.local_head(now, h, j);
        }
        self.pump(i);
    }

    fn maybe_notify(&mut self, i: usize) {
        if self.rng.random_bool(self.knobs.eager_heads) {
            self.notify_agent(i);
            for k in 0..STORES {
                self.notify_hub(k);
            }
        }
    }

    // ---- "acked" means "durable at the peer" ----

    /// Everything a session reports as acknowledged by its peer must be durable there: acks are
    /// sent only after the receiver's transaction commits (DESIGN §4). Checked against the
    /// databases, so a premature or optimistic ack is caught even when nothing is lost later.
    fn check_acks(&mut self, i: usize) {
        if !self.trust_acks {
            return;
        }
        let mut why = Vec::new();
        if let Some(s) = self.agents[i].session.as_ref() {
            why.extend(self.hub_holds_agent_counters(i, s.acked()).err());
            why.extend(self.hub_holds_agent_journal(i, s.journal_acked()).err());
        }
        if let Some(s) = self.hub_sessions[i].as_ref() {
            why.extend(self.agent_holds_hub_counters(i, s.acked()).err());
            why.extend(self.agent_holds_hub_journal(i, s.journal_acked()).err());
        }
        if let Some(w) = why.into_iter().next() {
            self.fail(w);
        }
    }

    fn hub_holds_agent_counters(&self, i: usize, upto: u64) -> Result<(), String> {
        let a = &self.agents[i];
        for (seq, k, w, e) in a.db.counters.delta_since(0).into_iter().take_while(|r| r.0 <= upto) {
            let at_hub =
                self.hub.entries.get(&(a.store.clone(), k.clone(), w.clone())).map_or_else(Default::default, |x| x.0);
            if w.is_store(&a.store) && !at_hub.covers(e) {
                return Err(format!(
                    "{}: agent counters acked up to {upto}, but the hub holds {k}/{w} as {at_hub:?}, the agent {e:?} (seq {seq})",
                    a.store
                ));
            }
        }
        Ok(())
    }

    fn agent_holds_hub_counters(&self, i: usize, upto: u64) -> Result<(), String> {
        let a = &self.agents[i];
        for ((st, k, w), (e, seq)) in &self.hub.entries {
            let at_agent = a.db.counters.get(k).map_or_else(Default::default, |c| c.entry(w));
            if *st == a.store && *seq <= upto && !at_agent.covers(*e) {
                return Err(format!(
                    "{}: hub counters acked up to {upto}, but the agent holds {k}/{w} as {at_agent:?}, the hub {e:?} (seq {seq})",
                    a.store
                ));
            }
        }
        Ok(())
    }

    fn hub_holds_agent_journal(&self, i: usize, upto: u64) -> Result<(), String> {
        let a = &self.agents[i];
        for (seq, e) in a.db.journal.iter().take_while(|(seq, _)| *seq <= upto) {
            if e.writer.is_store(&a.store) && !self.hub.journal_keys.contains(&(a.store.clone(), e.id, e.line)) {
                return Err(format!(
                    "{}: agent journal acked up to {upto}, but the hub lacks event {} (seq {seq})",
                    a.store, e.id
                ));
            }
        }
        Ok(())
    }

    fn agent_holds_hub_journal(&self, i: usize, upto: u64) -> Result<(), String> {
        let a = &self.agents[i];
        for (seq, e) in self.hub.journal.iter().take_while(|(seq, _)| *seq <= upto) {
            if e.store == a.store && e.writer.is_hub() && !a.db.journal_keys.contains(&(e.id, e.line)) {
                return Err(format!(
                    "{}: hub journal acked up to {upto}, but the agent lacks event {} (seq {seq})",
                    a.store, e.id
                ));
            }
        }
        Ok(())
    }

    // ---- local activity (the ground truth) ----

    /// Records a change in the ground truth and returns its journal event.
    fn event(&mut self, kind: EventKind, store: &StoreId, k: &Sku, delta: i64, writer: &WriterId) -> JournalEvent {
        self.next_event += 1;
        self.writes.entry((store.clone(), k.clone(), writer.clone())).or_default().push(delta);
        self.events_by.entry(writer.clone()).or_default().push((Uuid::from_u128(self.next_event), 0));
        JournalEvent {
            id: Uuid::from_u128(self.next_event),
            line: 0,
            kind,
            store: store.clone(),
            sku: k.clone(),
            delta,
            reason: None,
            occurred_at_ms: self.ms as i64,
            recorded_at_ms: self.ms as i64,
            writer: writer.clone(),
            flags: vec![],
        }
    }

    fn local_sale(&mut self, i: usize) {
        let k = sku(self.rng.random_range(0..SKUS));
        let delta: i64 =
            if self.rng.random_bool(0.8) { -self.rng.random_range(1..4) } else { self.rng.random_range(1..3) };
        let (store, writer) = (self.agents[i].store.clone(), self.agents[i].writer.clone());
        let kind = if delta < 0 { EventKind::Sale } else { EventKind::Return };
        let e = self.event(kind, &store, &k, delta, &writer);
        let a = &mut self.agents[i];
        // Event and counter change are one transaction.
        a.db.counters.apply(&k, &writer, delta).unwrap();
        a.db.add_event(e);
        a.changes += 1;
        a.heads_dirty = true;
        self.stats.local_changes += 1;
        self.maybe_notify(i);
    }

    fn restock(&mut self, i: usize) {
        let k = sku(self.rng.random_range(0..SKUS));
        let qty: i64 =
            if self.rng.random_bool(0.9) { self.rng.random_range(1..10) } else { -self.rng.random_range(1..3) };
        let store = self.agents[i].store.clone();
        let hw = self.hub_writer.clone();
        let cur = self.hub.entries.get(&(store.clone(), k.clone(), hw.clone())).map(|x| x.0).unwrap_or_default();
        let next = cur.apply(&hw, qty).unwrap();
        let kind = if qty > 0 { EventKind::Restock } else { EventKind::Adjustment };
        let e = self.event(kind, &store, &k, qty, &hw);
        self.hub.merge(&store, &k, &hw, next);
        self.hub.add_event(e);
        self.hub_heads_dirty = [true; STORES];
        self.maybe_notify(i);
    }

    // ---- the network ----

    /// Delivers (or mangles) one frame of one queue of link `i`.
    fn deliver(&mut self, i: usize, dir: usize, stream: usize) {
        enum Fault {
            Lose,
            Duplicate,
            Reorder(usize),
        }
        let len = self.links[i].as_ref().map_or(0, |l| l.q[dir][stream].len());
        if len == 0 {
            return;
        }
        let (loss, dup, reorder) = (self.knobs.loss, self.knobs.dup, self.knobs.reorder);
        let roll: f64 = self.rng.random_range(0.0..1.0);
        let fault = match roll {
            _ if !self.faults => None,
            r if r < loss => Some(Fault::Lose),
            r if r < loss + dup => Some(Fault::Duplicate),
            r if r < loss + dup + reorder && len > 1 => Some(Fault::Reorder(self.rng.random_range(1..len))),
            _ => None,
        };
        let dies_at = self.ms + self.knobs.idle_timeout_ms;
        let link = self.links[i].as_mut().unwrap();
        let q = &mut link.q[dir][stream];
        let bytes = match fault {
            None => q.pop_front().unwrap(),
            Some(Fault::Lose) => {
                let lost = q.pop_front().unwrap();
                link.faulted = true;
                link.dies_at.get_or_insert(dies_at);
                self.stats.lost += 1;
                self.trace(i, || format!("FAULT lost {:?}", from_wire(&lost)));
                return;
            }
            Some(Fault::Duplicate) => {
                link.faulted = true;
                link.shuffled = true;
                self.stats.duplicated += 1;
                q.front().unwrap().clone()
            }
            Some(Fault::Reorder(k)) => {
                link.faulted = true;
                link.shuffled = true;
                self.stats.reordered += 1;
                q.remove(k).unwrap()
            }
        };
        self.stats.delivered += 1;
        let frame = from_wire(&bytes);
        self.trace(i, || {
            let dir = if dir == UP { "agent -> hub" } else { "hub -> agent" };
            let fault = match fault {
                None => "",
                Some(Fault::Duplicate) => " (FAULT duplicated)",
                Some(_) => " (FAULT overtook earlier frames)",
            };
            format!("{dir}{fault}: {frame:?}")
        });
        let now = self.now();
        let r = if dir == UP {
            self.hub_sessions[i].as_mut().unwrap().handle_frame(now, frame)
        } else {
            self.agents[i].session.as_mut().unwrap().handle_frame(now, frame)
        };
        if let Err(e) = r {
            self.session_failed(i, dir == UP, e);
        }
        self.pump(i);
    }

    /// Delivers the head of a random non-empty queue of link `i`, if any.
    fn deliver_any(&mut self, i: usize) -> bool {
        let Some(link) = self.links[i].as_ref() else { return false };
        let queues: Vec<(usize, usize)> =
            (0..2).flat_map(|d| (0..2).map(move |s| (d, s))).filter(|&(d, s)| !link.q[d][s].is_empty()).collect();
        if queues.is_empty() {
            return false;
        }
        let (d, s) = queues[self.rng.random_range(0..queues.len())];
        self.deliver(i, d, s);
        true
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        for i in 0..STORES {
            let Some(link) = self.links[i].as_ref() else { continue };
            if link.dies_at.is_some_and(|t| t <= self.ms) {
                self.disconnect(i);
                continue;
            }
            if let Some(s) = self.agents[i].session.as_mut() {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
            if let Some(s) = self.hub_sessions[i].as_mut() {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
            self.pump(i);
        }
    }

    fn crash_agent(&mut self, i: usize) {
        self.stats.crashes += 1;
        self.disconnect(i);
        self.agents[i].work.clear();
        self.agents[i].heads_dirty = false;
    }

    fn crash_hub(&mut self) {
        self.stats.crashes += 1;
        for i in 0..STORES {
            self.disconnect(i);
        }
        self.hub_work.clear();
        self.hub_heads_dirty = [false; STORES];
    }

    /// The store's database is lost, or restored from its last backup: the agent restarts under
    /// a new writer incarnation (DESIGN §3, §8) and re-seeds from the hub.
    fn restore_agent(&mut self, i: usize) {
        self.stats.agent_restores += 1;
        self.crash_agent(i);
        let a = &mut self.agents[i];
        let old = a.writer.clone();
        a.db = if self.rng.random_bool(0.5) { a.backup.clone().unwrap_or_default() } else { AgentDb::default() };
        a.writer = WriterId::new(NodeId::Store(a.store.clone()), Incarnation::from_u64(self.rng.random()));
        a.changes = 0;
        self.trace(i, || format!("RESTORE: {old} retired, now {}", self.agents[i].writer));
        let store = self.agents[i].store.clone();
        self.retired.insert(old, Retired { store: store.clone(), floor: BTreeMap::new(), events_floor: 0 });
        // What must survive of each retired writer of this store: what the hub holds, and what
        // the restored database holds. (A later restore may replace that database before it
        // synced, so floors are recomputed at every restore; the hub's part only grows.)
        let db = &self.agents[i].db;
        for (w, r) in self.retired.iter_mut().filter(|(_, r)| r.store == store) {
            for k in (0..SKUS).map(sku) {
                let at_hub =
                    self.hub.entries.get(&(store.clone(), k.clone(), w.clone())).map_or_else(Default::default, |x| x.0);
                let in_db = db.counters.get(&k).map_or_else(Default::default, |c| c.entry(w));
                r.floor.insert(k, at_hub.join(in_db));
            }
            let at_hub = self.hub.journal.iter().filter(|(_, e)| &e.writer == w).count();
            let in_db = db.journal.iter().filter(|(_, e)| &e.writer == w).count();
            r.events_floor = at_hub.max(in_db);
        }
    }

    /// The hub's database is moved or restored (here: without losing anything) and so runs under
    /// a new incarnation: every agent must adopt it and both sides start their watermarks over.
    fn restore_hub(&mut self) {
        self.stats.hub_restores += 1;
        self.crash_hub();
        self.hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(self.rng.random()));
    }

    fn step(&mut self, n: usize) {
        // Busy and calm phases: in calm ones nothing changes locally, so sessions settle and
        // anti-entropy compares digests while faults keep happening.
        if n.is_multiple_of(400) {
            self.busy = self.rng.random_bool(0.6);
        }
        self.ms += match self.rng.random_range(0..1000) {
            0..=4 => self.rng.random_range(0..2 * self.knobs.cfg.digest_interval.as_millis() as u64 + 1),
            _ => self.rng.random_range(0..4),
        };
        let i = self.rng.random_range(0..STORES);
        match self.rng.random_range(0..10_000) {
            0..=1599 if self.busy => self.local_sale(i),
            1600..=1999 if self.busy => self.restock(i),
            0..=1999 => {}
            2000..=6499 => {
                self.deliver_any(i);
            }
            6500..=7299 => {
                for _ in 0..self.rng.random_range(1..4) {
                    self.agent_work(i);
                }
            }
            7300..=8099 => {
                for _ in 0..self.rng.random_range(1..4) {
                    self.hub_work_one();
                }
            }
            8100..=8349 => self.notify_agent(i),
            8350..=8599 => self.notify_hub(i),
            8600..=8899 => self.connect(i),
            8900..=8949 => {
                if self.links[i].is_some() {
                    self.stats.partitions += 1;
                    self.disconnect(i);
                }
            }
            8950..=8979 => self.crash_agent(i),
            8980..=8989 => self.crash_hub(),
            8990..=9009 => self.agents[i].backup = Some(self.agents[i].db.clone()),
            9010..=9014 => self.restore_agent(i),
            9015..=9016 => self.restore_hub(),
            _ => self.fire_timers(),
        }
    }

    // ---- healing and checking ----

    fn quiet(&self) -> bool {
        self.hub_work.is_empty()
            && !self.hub_heads_dirty.iter().any(|d| *d)
            && (0..STORES).all(|i| {
                let a = &self.agents[i];
                self.links[i].as_ref().is_some_and(|l| l.q.iter().flatten().all(VecDeque::is_empty))
                    && a.work.is_empty()
                    && !a.heads_dirty
                    && a.session.as_ref().is_some_and(|s| s.is_established() && s.is_idle())
                    && self.hub_sessions[i].as_ref().is_some_and(|s| s.is_established() && s.is_idle())
            })
    }

    fn describe(&self) -> String {
        let links: Vec<String> = (0..STORES)
            .map(|i| {
                let l = self.links[i].as_ref();
                format!(
                    "store-{i}: link {:?} queued {:?} agent work {} hub session {:?} agent session {:?}",
                    l.map(|l| l.gen),
                    l.map(|l| l.q.iter().flatten().map(VecDeque::len).collect::<Vec<_>>()),
                    self.agents[i].work.len(),
                    self.hub_sessions[i].as_ref().map(|s| (s.is_established(), s.is_idle())),
                    self.agents[i].session.as_ref().map(|s| (s.is_established(), s.is_idle())),
                )
            })
            .collect();
        format!("hub work {}; {}", self.hub_work.len(), links.join("; "))
    }

    /// Without faults, runs until every connection is established and idle and the hosts are done.
    fn run_until_quiet(&mut self) -> Result<(), String> {
        for _ in 0..5_000 {
            for i in 0..STORES {
                self.connect(i);
            }
            for _ in 0..100_000 {
                let mut progressed = false;
                for i in 0..STORES {
                    progressed |= self.deliver_any(i);
                    progressed |= self.agent_work(i);
                    progressed |= self.hub_work_one();
                    if self.agents[i].heads_dirty || self.hub_heads_dirty[i] {
                        progressed = true;
                        self.notify_agent(i);
                        self.notify_hub(i);
                    }
                }
                if !progressed {
                    break;
                }
            }
            for i in 0..STORES {
                self.check_acks(i);
            }
            if let Some(f) = &self.failure {
                return Err(f.clone());
            }
            if self.quiet() {
                return Ok(());
            }
            self.ms += 10;
            self.fire_timers();
        }
        Err(format!("did not quiesce after healing: {}", self.describe()))
    }

    /// No more faults: connections that lost frames time out, everything reconnects and settles,
    /// then anti-entropy runs until every store has had its digests compared equal.
    fn heal(&mut self) -> Result<(), String> {
        self.faults = false;
        for i in 0..STORES {
            if self.links[i].as_ref().is_some_and(|l| l.faulted) {
                self.disconnect(i);
            }
        }
        self.run_until_quiet()?;
        let before = self.stats.matched;
        for _ in 0..50 {
            self.ms += self.knobs.cfg.digest_interval.as_millis() as u64 + 1;
            self.fire_timers();
            self.run_until_quiet()?;
            if (0..STORES).all(|i| self.stats.matched[i] > before[i]) {
                return Ok(());
            }
        }
        Err(format!("digest rounds never matched every store: before {before:?}, now {:?}", self.stats.matched))
    }

    fn check(&self) -> Result<(), String> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        for (i, a) in self.agents.iter().enumerate() {
            let at_hub = self.hub.store_state(&a.store);
            let at_agent = a.db.counters.state();
            if at_hub != at_agent {
                return Err(format!("{}: agent {at_agent:?} != hub {at_hub:?}", a.store));
            }
            let expected = self.expected_entries(&a.store, &at_hub)?;
            if at_hub != expected {
                return Err(format!("{}: entries {at_hub:?}, the ground truth says {expected:?}", a.store));
            }
            for k in (0..SKUS).map(sku) {
                let want: i64 = expected.iter().filter(|((s, _), _)| *s == k).map(|(_, e)| e.value() as i64).sum();
                let got = a.db.counters.value(&k).unwrap();
                if got != want {
                    return Err(format!("{} {k}: value {got}, the changes that survive sum to {want}", a.store));
                }
            }
            let own = a.db.journal.iter().filter(|(_, e)| e.writer == a.writer).count();
            if own != a.changes {
                return Err(format!("{}: {own} own journal events for {} changes", a.store, a.changes));
            }
            for (_, e) in &a.db.journal {
                if e.store != a.store {
                    return Err(format!("{} holds event {} of {}", a.store, e.id, e.store));
                }
            }
            for (_, e) in self.hub.journal.iter().filter(|(_, e)| e.store == a.store && e.writer.is_hub()) {
                if !a.db.journal_keys.contains(&(e.id, e.line)) {
                    return Err(format!("{} misses hub event {} by {}", a.store, e.id, e.writer));
                }
            }
            if self.stats.mismatched[i] > 0 {
                return Err(format!(
                    "{}: digests differed {} times though nobody tampered with a replica",
                    a.store, self.stats.mismatched[i]
                ));
            }
        }
        // The hub's journal: every event of a live writer, a prefix of each retired writer's.
        for (w, made) in &self.events_by {
            let at_hub: HashSet<(Uuid, u32)> =
                self.hub.journal.iter().filter(|(_, e)| &e.writer == w).map(|(_, e)| (e.id, e.line)).collect();
            let floor = self.retired.get(w).map_or(made.len(), |r| r.events_floor);
            let prefix: HashSet<_> = made[..at_hub.len().min(made.len())].iter().copied().collect();
            if at_hub.len() < floor || at_hub != prefix {
                return Err(format!(
                    "hub holds {} of {w}'s {} events, not a prefix of at least {floor}",
                    at_hub.len(),
                    made.len()
                ));
            }
        }
        let known: usize = self.events_by.values().map(Vec::len).sum();
        if self.hub.journal.len() > known {
            return Err(format!("hub journal holds {} events; only {known} were made", self.hub.journal.len()));
        }
        Ok(())
    }

    /// What the ground truth says `store`'s entries must be, given the surviving entries of
    /// retired writers: a live writer's entry sums all its changes (each exactly once); a retired
    /// writer's sums a prefix of them, at least as long as what the hub or the backup held when
    /// it retired.
    fn expected_entries(
        &self,
        store: &StoreId,
        actual: &BTreeMap<(Sku, WriterId), PnEntry>,
    ) -> Result<BTreeMap<(Sku, WriterId), PnEntry>, String> {
        let mut out = BTreeMap::new();
        for ((st, k, w), changes) in &self.writes {
            if st != store {
                continue;
            }
            let totals = |n: usize| {
                changes[..n].iter().fold(PnEntry::default(), |e, d| e.apply(w, *d).expect("small changes"))
            };
            let entry = match self.retired.get(w) {
                None => totals(changes.len()),
                Some(r) => {
                    assert_eq!(&r.store, st);
                    let have = actual.get(&(k.clone(), w.clone())).copied().unwrap_or_default();
                    let floor = r.floor.get(k).copied().unwrap_or_default();
                    if !(0..=changes.len()).any(|n| totals(n) == have) || !have.covers(floor) {
                        return Err(format!(
                            "{store} {k}: retired writer {w}'s entry {have:?} is not a prefix of its changes \
                             {changes:?} covering {floor:?}"
                        ));
                    }
                    have
                }
            };
            if entry != PnEntry::default() {
                out.insert((k.clone(), w.clone()), entry);
            }
        }
        Ok(out)
    }
}

fn run(seed: u64) -> Result<Sim, String> {
    let mut sim = Sim::new(seed);
    for i in 0..STORES {
        sim.connect(i);
    }
    for n in 0..STEPS {
        sim.step(n);
        sim.check_acks(n % STORES);
        if let Some(f) = &sim.failure {
            return Err(f.clone());
        }
    }
    sim.heal()?;
    sim.check()?;
    Ok(sim)
}

fn run_or_panic(seed: u64) -> Sim {
    let knobs = Knobs::random(&mut StdRng::seed_from_u64(seed));
    match std::panic::catch_unwind(|| run(seed)) {
        Ok(Ok(sim)) => sim,
        Ok(Err(reason)) => {
            panic!("simulation failed for seed {seed:#x}: {reason}; add it to REGRESSION_SEEDS (knobs {knobs:?})")
        }
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("simulation panicked for seed {seed:#x}: {msg:?}; add it to REGRESSION_SEEDS (knobs {knobs:?})")
        }
    }
}

fn parse_seed(v: &str) -> Option<u64> {
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

#[test]
fn regression_seeds_converge() {
    if let Some(seed) = std::env::var("SHELFSYNC_SIM_SEED").ok().as_deref().and_then(parse_seed) {
        let sim = run_or_panic(seed);
        eprintln!("seed {seed:#x}: {:?}", sim.stats);
        return;
    }
    let mut totals = Stats::default();
    for &seed in REGRESSION_SEEDS {
        let sim = run_or_panic(seed);
        let changes = sim.stats.local_changes;
        assert!(changes > 100, "seed {seed:#x} exercised too little ({changes} local changes)");
        let s = &sim.stats;
        totals.lost += s.lost;
        totals.duplicated += s.duplicated;
        totals.reordered += s.reordered;
        totals.partitions += s.partitions;
        totals.crashes += s.crashes;
        totals.agent_restores += s.agent_restores;
        totals.hub_restores += s.hub_restores;
        totals.expected_errors += s.expected_errors;
        totals.connects += s.connects;
        totals.delivered += s.delivered;
        totals.compared_under_faults += s.compared_under_faults;
        totals.shuffled_mismatches += s.shuffled_mismatches;
        for i in 0..STORES {
            totals.matched[i] += s.matched[i];
        }
    }
    // The fault injection must actually inject, or the test proves little.
    for (what, n) in [
        ("lost", totals.lost),
        ("duplicated", totals.duplicated),
        ("reordered", totals.reordered),
        ("partitions", totals.partitions),
        ("crashes", totals.crashes),
        ("agent restores", totals.agent_restores),
        ("hub restores", totals.hub_restores),
        ("session errors", totals.expected_errors),
        ("digest comparisons before healing", totals.compared_under_faults),
    ] {
        assert!(n > 0, "no {what} across the regression seeds");
    }
    eprintln!("regression seeds: {totals:?}");
}

#[test]
fn random_seeds_converge() {
    let n: u64 = std::env::var("SHELFSYNC_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_RANDOM_SEEDS);
    let base: u64 = rand::random();
    let started = Instant::now();
    for k in 0..n {
        run_or_panic(base.wrapping_add(k));
    }
    let took = started.elapsed();
    eprintln!(
        "{n} random seeds x {STEPS} steps in {took:?} ({:.0} steps/s; base seed {base:#x})",
        (n as f64 * STEPS as f64) / took.as_secs_f64().max(1e-9)
    );
}

/// Runs a healthy system to convergence, returns it.
fn converged(seed: u64) -> Sim {
    let mut sim = Sim::new(seed);
    for i in 0..STORES {
        sim.connect(i);
    }
    for n in 0..400 {
        let i = n % STORES;
        if n % 7 == 0 {
            sim.restock(i);
        } else {
            sim.local_sale(i);
        }
    }
    sim.heal().unwrap();
    sim.check().unwrap();
    sim
}

#[test]
fn anti_entropy_repairs_a_divergence() {
    let mut sim = converged(7);
    let store = sim.agents[0].store.clone();
    let agent_writer = sim.agents[0].writer.clone();
    let hub_writer = sim.hub_writer.clone();

    // 1. Behind every session's back, the hub loses one of store-0's entries and another one goes
    //    back in time (a bad restore, a bug).
    let mut agent_keys =
        sim.hub.entries.keys().filter(|(s, _, w)| *s == store && *w == agent_writer).cloned().collect::<Vec<_>>();
    assert!(agent_keys.len() >= 2, "store-0 sold at least two SKUs");
    sim.hub.entries.remove(&agent_keys.pop().unwrap());
    let older = sim.hub.entries.get_mut(&agent_keys.pop().unwrap()).unwrap();
    older.0.n -= 1;
    sim.trust_acks = false; // the hub's watermarks now claim entries it lost
    assert!(sim.check().is_err(), "the tampering is visible");
    let (before, full_before) = (sim.stats.mismatched[0], sim.stats.full_reads);
    sim.heal().unwrap(); // includes digest rounds
    assert!(sim.stats.mismatched[0] > before, "the digest comparison noticed");
    assert!(sim.stats.full_reads > full_before, "the hub resent the store's full state");
    sim.stats.mismatched[0] = 0; // the tampering was deliberate
    sim.check().unwrap();

    // 2. The agent loses the hub's restock entry for one SKU. Rebuild its counters without it
    //    (sequence numbers start over), then make sale/return pairs (value unchanged) until the
    //    head is back above where the hub last acked it.
    let a = &mut sim.agents[0];
    let old_head = a.db.counters.head();
    let state = a.db.counters.state();
    let lost = state.keys().find(|(_, w)| *w == hub_writer).cloned().expect("store-0 was restocked");
    let mut rebuilt = CounterMap::new();
    rebuilt.merge(state.iter().filter(|(key, _)| **key != lost).map(|((k, w), e)| (k, w, *e))).unwrap();
    let mut pairs = 0;
    while rebuilt.head() <= old_head {
        rebuilt.apply(&sku(0), &agent_writer, 1).unwrap();
        rebuilt.apply(&sku(0), &agent_writer, -1).unwrap();
        pairs += 1;
    }
    a.db.counters = rebuilt;
    let written = sim.writes.get_mut(&(store.clone(), sku(0), agent_writer.clone())).unwrap();
    written.extend(std::iter::repeat_n([1, -1], pairs).flatten());
    a.heads_dirty = true;
    sim.disconnect(0); // the agent restarts on its repaired database
    assert!(sim.check().is_err(), "the tampering is visible");
    let before = sim.stats.mismatched[0];
    sim.heal().unwrap();
    assert!(sim.stats.mismatched[0] > before, "the digest comparison noticed");
    sim.stats.mismatched[0] = 0;
    sim.check().unwrap();
}

/// Every frame a test feeds a session goes through the codec first.
fn via_wire(frame: Frame) -> Frame {
    from_wire(&to_wire(&frame))
}

fn hello(store: &str, writer: WriterId, protocol: u32) -> Frame {
    via_wire(Frame::V1(FrameV1::Hello(Hello {
        protocol,
        store: store.parse().unwrap(),
        writer,
        hub_writer: None,
        applied: 0,
        journal_applied: 0,
    })))
}

fn error_sent(transmits: impl Iterator<Item = shelfsync_shared::sync::Transmit>, code: u32) -> bool {
    transmits.map(|t| via_wire(t.frame)).any(|f| matches!(f, Frame::V1(FrameV1::Error(ref e)) if e.code == code))
}

fn established_hub(store: &str, me: &WriterId, hub_writer: &WriterId) -> HubSession {
    let now = Instant::now();
    let mut hub = HubSession::new(SyncConfig::default(), store.parse().unwrap(), hub_writer.clone(), 0, 0);
    hub.handle_frame(now, hello(store, me.clone(), PROTOCOL_VERSION)).unwrap();
    assert!(matches!(hub.poll_effect(), Some(Effect::LookupPeer { .. })));
    hub.accept(now, 0, 0).unwrap();
    while hub.poll_transmit().is_some() {}
    while hub.poll_effect().is_some() {}
    hub
}

#[test]
fn foreign_writers_and_wrong_versions_are_refused() {
    let now = Instant::now();
    let hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(1));
    let me = WriterId::new(NodeId::Store("s1".parse().unwrap()), Incarnation::from_u64(2));
    let other = WriterId::new(NodeId::Store("s2".parse().unwrap()), Incarnation::from_u64(3));
    let k = sku(0);

    // A store sends entries of another store's writer (alongside its own).
    let mut hub = established_hub("s1", &me, &hub_writer);
    let delta = Delta::build(0, 2, [(&k, &me, PnEntry { p: 1, n: 0 }), (&k, &other, PnEntry { p: 5, n: 0 })]);
    let err = hub.handle_frame(now, via_wire(Frame::V1(FrameV1::Delta(delta)))).unwrap_err();
    assert_eq!(err.code, close_code::UNAUTHORIZED);
    assert!(err.message.contains("s2@"), "{err}");
    assert_eq!(hub.poll_effect(), None, "nothing of it reaches the database");
    assert!(error_sent(std::iter::from_fn(|| hub.poll_transmit()), close_code::UNAUTHORIZED), "the peer is told why");

    // ... or the hub's own writer's.
    let mut hub = established_hub("s1", &me, &hub_writer);
    let delta = Delta::build(0, 1, [(&k, &hub_writer, PnEntry { p: 5, n: 0 })]);
    let err = hub.handle_frame(now, via_wire(Frame::V1(FrameV1::Delta(delta)))).unwrap_err();
    assert_eq!(err.code, close_code::UNAUTHORIZED);

    // ... or journal events of another store.
    let mut hub = established_hub("s1", &me, &hub_writer);
    let ev = JournalEvent {
        id: Uuid::from_u128(9),
        line: 0,
        kind: EventKind::Sale,
        store: "s2".parse().unwrap(),
        sku: k.clone(),
        delta: -1,
        reason: None,
        occurred_at_ms: 0,
        recorded_at_ms: 0,
        writer: me.clone(),
        flags: vec![],
    };
    let batch = JournalBatch { after: 0, upto: 1, events: vec![ev] };
    let err = hub.handle_frame(now, via_wire(Frame::V1(FrameV1::Journal(batch)))).unwrap_err();
    assert_eq!(err.code, close_code::UNAUTHORIZED);

    // A hello from a protocol this hub does not speak.
    let mut hub = HubSession::new(SyncConfig::default(), "s1".parse().unwrap(), hub_writer.clone(), 0, 0);
    let err = hub.handle_frame(now, hello("s1", me.clone(), PROTOCOL_VERSION + 1)).unwrap_err();
    assert_eq!(err.code, close_code::VERSION_MISMATCH);
    assert!(err.message.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)), "{err}");
    assert!(error_sent(std::iter::from_fn(|| hub.poll_transmit()), close_code::VERSION_MISMATCH));
    assert_eq!(hub.poll_effect(), None, "no peer lookup for a refused hello");

    // The certificate's store wins over the hello's.
    let mut hub = HubSession::new(SyncConfig::default(), "s1".parse().unwrap(), hub_writer.clone(), 0, 0);
    let err = hub.handle_frame(now, hello("s2", other, PROTOCOL_VERSION)).unwrap_err();
    assert_eq!(err.code, close_code::UNAUTHORIZED);

    // An agent refuses a hub speaking another version, and says so.
    let mut agent = AgentSession::new(SyncConfig::default(), "s1".parse().unwrap(), me, AgentResume::default());
    while agent.poll_transmit().is_some() {}
    let welcome = via_wire(Frame::V1(FrameV1::Welcome(Welcome {
        protocol: PROTOCOL_VERSION + 1,
        hub_writer,
        applied: 0,
        journal_applied: 0,
    })));
    let err = agent.handle_frame(now, welcome).unwrap_err();
    assert_eq!(err.code, close_code::VERSION_MISMATCH);
    assert!(error_sent(std::iter::from_fn(|| agent.poll_transmit()), close_code::VERSION_MISMATCH));
    assert!(!agent.is_established());
}

/// The journal has its own QUIC stream, so the hub's first journal batch can reach the agent
/// before the `Welcome` on the state stream (the agent's stream readers feed one queue). The agent
/// must keep it and apply it once established, not call it a protocol violation.
#[test]
fn journal_batch_overtaking_the_welcome_is_kept() {
    let now = Instant::now();
    let store: StoreId = "s1".parse().unwrap();
    let hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(1));
    let me = WriterId::new(NodeId::Store(store.clone()), Incarnation::from_u64(2));
    let restock = JournalEvent {
        id: Uuid::from_u128(1),
        line: 0,
        kind: EventKind::Restock,
        store: store.clone(),
        sku: sku(0),
        delta: 3,
        reason: None,
        occurred_at_ms: 0,
        recorded_at_ms: 0,
        writer: hub_writer.clone(),
        flags: vec![],
    };

    let mut agent = AgentSession::new(SyncConfig::default(), store.clone(), me.clone(), AgentResume::default());
    let mut hub = HubSession::new(SyncConfig::default(), store.clone(), hub_writer.clone(), 0, 7);
    hub.handle_frame(now, via_wire(agent.poll_transmit().unwrap().frame)).unwrap();
    assert!(matches!(hub.poll_effect(), Some(Effect::LookupPeer { .. })));
    hub.accept(now, 0, 0).unwrap();
    while let Some(e) = hub.poll_effect() {
        if let Effect::ReadJournal { after: 0, .. } = e {
            hub.journal_read(now, JournalRead { upto: 7, events: vec![restock.clone()] }).unwrap();
        }
    }
    let (mut state, mut journal) = (Vec::new(), Vec::new());
    while let Some(t) = hub.poll_transmit() {
        assert!(matches!(t.stream, StreamKind::State | StreamKind::Journal), "no catalog traffic expected here");
        let lane = if t.stream == StreamKind::State { &mut state } else { &mut journal };
        lane.push(via_wire(t.frame));
    }
    assert!(matches!(state[0], Frame::V1(FrameV1::Welcome(_))));
    assert_eq!(journal.len(), 1);

    // The journal stream wins the race.
    agent.handle_frame(now, journal.remove(0)).expect("an early journal batch is no violation");
    assert_eq!(agent.poll_effect(), None, "nothing is applied before the handshake completes");
    for f in state {
        agent.handle_frame(now, f).unwrap();
    }
    assert!(agent.is_established());
    let effects: Vec<Effect> = std::iter::from_fn(|| agent.poll_effect()).collect();
    assert!(matches!(effects[0], Effect::Established { .. }), "{effects:?}");
    let applied = effects.iter().position(
        |e| matches!(e, Effect::ApplyJournal { batch, .. } if batch.events == vec![restock.clone()] && batch.upto == 7),
    );
    assert!(applied.is_some(), "the kept batch is applied after the welcome: {effects:?}");
    agent.journal_applied(now, 7).unwrap();
    let acks: Vec<Frame> = std::iter::from_fn(|| agent.poll_transmit()).map(|t| via_wire(t.frame)).collect();
    assert!(acks.contains(&Frame::V1(FrameV1::JournalAck(wire::Ack { upto: 7 }))), "{acks:?}");

    // Early batches are bounded: a hub never has more than its window in flight before an ack.
    let mut agent = AgentSession::new(SyncConfig::default(), store.clone(), me, AgentResume::default());
    let batch = |n: u64| via_wire(Frame::V1(FrameV1::Journal(JournalBatch { after: n, upto: n + 1, events: vec![] })));
    for n in 0..shelfsync_shared::sync::EARLY_JOURNAL_MAX as u64 {
        agent.handle_frame(now, batch(n)).unwrap();
    }
    let err = agent.handle_frame(now, batch(99)).unwrap_err();
    assert_eq!(err.code, close_code::PROTOCOL_VIOLATION);
}

/// A peer that gives up before the handshake completes (say, the agent refuses the hub) closes
/// with its own code: the other side reports that code as the peer's, and does not answer with an
/// `Error` of its own (nor blame the peer for a protocol violation).
#[test]
fn an_error_before_the_handshake_is_the_peers() {
    let now = Instant::now();
    let hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(1));
    let me = WriterId::new(NodeId::Store("s1".parse().unwrap()), Incarnation::from_u64(2));
    let refusal = |code| {
        via_wire(Frame::V1(FrameV1::Error(wire::ErrorMsg { code, message: "no thanks".into() })))
    };

    // The hub has not seen a hello yet, or has not answered it (its lookup is still running).
    for hello_first in [false, true] {
        let mut hub = HubSession::new(SyncConfig::default(), "s1".parse().unwrap(), hub_writer.clone(), 0, 0);
        if hello_first {
            hub.handle_frame(now, hello("s1", me.clone(), PROTOCOL_VERSION)).unwrap();
            assert!(matches!(hub.poll_effect(), Some(Effect::LookupPeer { .. })));
        }
        let err = hub.handle_frame(now, refusal(close_code::INTERNAL)).unwrap_err();
        assert_eq!((err.code, err.from_peer), (close_code::INTERNAL, true), "{err}");
        assert!(err.message.contains("no thanks"), "{err}");
        assert!(hub.poll_transmit().is_none(), "no error answers an error");
    }

    // The agent before the welcome.
    let mut agent = AgentSession::new(SyncConfig::default(), "s1".parse().unwrap(), me, AgentResume::default());
    while agent.poll_transmit().is_some() {}
    let err = agent.handle_frame(now, refusal(close_code::REVOKED)).unwrap_err();
    assert_eq!((err.code, err.from_peer), (close_code::REVOKED, true), "{err}");
    assert!(agent.poll_transmit().is_none(), "no error answers an error");
}
