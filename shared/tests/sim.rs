//! A deterministic, seeded simulation of one hub and several agents driven through the sans-IO
//! sessions, with in-memory "durable" stores and hosts that fulfil effects in order but late (as a
//! database thread does). Faults: frame loss, duplication and reordering within a stream, partitions,
//! crash-restarts (uncommitted work is lost), a fake clock that jumps, and what operators do to
//! files: an agent restored from a backup (new writer incarnation) or from a raw copy of its files
//! (same writer, older history), an agent's files copied to a second machine that runs too (a
//! clone), the hub restored from an old copy (with or without a new incarnation). After healing,
//! every replica must converge and every change must be counted exactly once.
//!
//! Oracles checked while running, besides convergence at the end:
//! - a session may fail only on a connection that suffered an injected fault, a refusal (a second
//!   live agent of a store) or a retirement (the agent found its writer forked);
//! - whatever a session reports as acknowledged is durable at the peer (acks follow commits);
//! - digests never differ unless a test tampered with a replica, frames were reordered within a
//!   stream (which a real QUIC stream never does), or files were put back;
//! - a failing session tells its peer why in an `Error` frame.
//!
//! And at the end, the ground truth: every change is an event with a unique id. The hub's entry of
//! an agent writer must be exactly the sum of one history of that writer (the one its lineage head
//! names); no event may be counted by two entries; every event of an agent copy that is still
//! running is counted; every event that was counted at the hub when its copy's files were replaced
//! is still counted; every retirement is recorded at the hub; the hub's own entries are prefixes of
//! its restocks, complete unless the hub itself was restored, and then at least what a surviving
//! copy held.
//!
//! A failing seed is printed; add it to `REGRESSION_SEEDS` so it runs forever after.
//! `SHELFSYNC_SIM_SEEDS=N` runs N random seeds besides the regression list;
//! `SHELFSYNC_SIM_SEED=0x...` replays one seed and `SHELFSYNC_SIM_TRACE=<agent index>` prints that
//! agent's frames, faults and effects.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shelfsync_shared::counter::{CounterMap, PnEntry, StateDigest};
use shelfsync_shared::lineage::{self, Boot, Chain, Checkpoint, HubLineage, Verdict};
use shelfsync_shared::mac::{EntryMac, MacKey};
use shelfsync_shared::sync::{
    AgentResume, AgentSession, DeltaRead, Effect, HubSession, JournalRead, PeerAccept, SessionError, StreamKind,
    SyncConfig,
};
use shelfsync_shared::wire::{
    self, close_code, Delta, DeltaLineage, Frame, FrameV1, Hello, JournalBatch, Retirement, Welcome, PROTOCOL_VERSION,
};
use shelfsync_shared::{EventKind, Incarnation, JournalEvent, NodeId, Sku, StoreId, WriterId};
use uuid::Uuid;

/// Seeds that run on every `cargo test`. Add any seed a random run reports.
const REGRESSION_SEEDS: &[u64] = &[
    1,
    2,
    3,
    42,
    0x5eed,
    0xdead_beef,
    0x7a7a_0001,
    0xc0ff_ee00,
    0x9461_0c03_3a71_7e8d,
    // Restores, roll-backs and clones whose fork points once came out wrong.
    0x3aee_b1a3_1562_8e43,
    0xd96f_7103_0f86_a119,
    0x488b_d322_f1ec_a727,
    0xe84b_5de0_eae5_c7d7,
    0x64c4_00b1_da0a_fe63,
    0xb5b0_330d_0dcc_6363,
];
/// Random seeds per run unless `SHELFSYNC_SIM_SEEDS` says otherwise.
const DEFAULT_RANDOM_SEEDS: u64 = 80;
const STEPS: usize = 4000;
const STORES: usize = 5;
const SKUS: usize = 4;
/// Most agent copies running for one store at once (the original and a clone).
const COPIES_MAX: usize = 2;

const UP: usize = 0;
const DOWN: usize = 1;

fn sku(i: usize) -> Sku {
    format!("SKU-{i}").parse().unwrap()
}

fn store_id(i: usize) -> StoreId {
    format!("store-{i}").parse().unwrap()
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

/// What an agent keeps in SQLite: its files. Restoring or copying them copies all of this.
#[derive(Clone)]
struct AgentDb {
    /// The writer of this database's life (stored in it).
    writer: WriterId,
    counters: CounterMap,
    /// Tags of entries of other writers, as the hub sent them.
    tags: BTreeMap<(Sku, WriterId), EntryMac>,
    hub_writer: Option<WriterId>,
    applied: u64,
    journal_applied: u64,
    /// What the hub acked of our counters and journal.
    acked: u64,
    journal_acked: u64,
    /// (local journal seq, event), in seq order.
    journal: Vec<(u64, JournalEvent)>,
    journal_keys: HashSet<(Uuid, u32)>,
    /// The current writer's changes in order: the checkpoint after each, and its event.
    own: Vec<(Checkpoint, Uuid)>,
    /// Every start of the agent on these files (the current writer's history then).
    boots: Vec<Boot>,
    /// Retirements not yet acknowledged by a hub.
    retired: Vec<Retirement>,
    /// Oracle only: for each writer this database retired, the checkpoint its entries were cut
    /// back to (the fork point).
    frozen: BTreeMap<WriterId, Checkpoint>,
}

impl AgentDb {
    fn new(writer: WriterId) -> AgentDb {
        AgentDb {
            writer,
            counters: CounterMap::new(),
            tags: BTreeMap::new(),
            hub_writer: None,
            applied: 0,
            journal_applied: 0,
            acked: 0,
            journal_acked: 0,
            journal: Vec::new(),
            journal_keys: HashSet::new(),
            own: Vec::new(),
            boots: Vec::new(),
            retired: Vec::new(),
            frozen: BTreeMap::new(),
        }
    }

    fn journal_head(&self) -> u64 {
        self.journal.last().map_or(0, |(s, _)| *s)
    }

    fn lineage(&self) -> Checkpoint {
        self.own.last().map_or(Checkpoint::ZERO, |(c, _)| *c)
    }

    fn boot(&mut self, id: u64) {
        let at = self.lineage();
        self.boots.push(Boot { id, at });
        let skip = self.boots.len().saturating_sub(64);
        self.boots.drain(..skip);
    }

    fn resume(&self) -> AgentResume {
        AgentResume {
            hub_writer: self.hub_writer.clone(),
            applied: self.applied,
            journal_applied: self.journal_applied,
            head: self.counters.head(),
            journal_head: self.journal_head(),
            lineage: self.lineage(),
            boots: self.boots.clone(),
            retired: self.retired.clone(),
            acked: self.acked,
            journal_acked: self.journal_acked,
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

    /// One transaction: merge, keep the tags of entries that rose to the hub's value, and
    /// record the watermark.
    fn apply_delta(&mut self, peer: &WriterId, delta: &Delta) -> Result<(), String> {
        self.adopt_hub(peer);
        let tags: HashMap<u32, EntryMac> = delta.macs.iter().copied().collect();
        for (i, (k, w, e)) in delta.entries().enumerate() {
            let Some(tag) = tags.get(&(i as u32)) else {
                return Err(format!("hub sent {k}/{w} without a tag"));
            };
            let cur = self.counters.get(k).map_or_else(Default::default, |c| c.entry(w));
            if e.covers(cur) {
                self.tags.insert((k.clone(), w.clone()), *tag);
            }
        }
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

    /// Entries of the current writer and of the writers this database retired above `after`,
    /// in seq order, at most `limit`; in a full read also every other entry the hub once sent,
    /// with its tag (giving back what a restored hub lost). The lineage goes along.
    fn read_delta(&self, store: &StoreId, after: u64, limit: usize, full: bool) -> DeltaRead {
        let mut read = DeltaRead { lineage: Some(self.lineage()), ..DeltaRead::default() };
        for (seq, k, w, e) in self.counters.delta_since(after) {
            let ours = w == self.writer || self.frozen.contains_key(&w);
            let tag = if !ours && full { self.tags.get(&(k.clone(), w.clone())) } else { None };
            if !ours && tag.is_none() {
                continue;
            }
            debug_assert!(w.is_store(store) || w.is_hub());
            if read.entries.len() == limit {
                // Full, and there is more.
                return read;
            }
            if let Some(tag) = tag {
                read.macs.push((read.entries.len() as u32, *tag));
            }
            read.entries.push((k, w, e));
            read.upto = seq;
        }
        if read.entries.len() < limit || read.upto == self.counters.head() {
            read.upto = self.counters.head().max(after);
        }
        read
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

    fn hub_entries_digest(&self) -> StateDigest {
        let mut d = StateDigest::default();
        for ((k, w), e) in self.counters.state() {
            if w.is_hub() {
                d.add(&k, &w, e);
            }
        }
        d
    }

    fn own_events(&self, store: &StoreId) -> BTreeSet<Uuid> {
        self.journal.iter().filter(|(_, e)| e.writer.is_store(store)).map(|(_, e)| e.id).collect()
    }
}

/// What the hub keeps in its database. One GLOBAL sequence across stores for counters, one for
/// the journal; reads for a store filter by store.
#[derive(Clone)]
struct HubDb {
    writer: WriterId,
    key: MacKey,
    seq: u64,
    entries: BTreeMap<(StoreId, Sku, WriterId), (PnEntry, u64)>,
    /// (store, agent writer) → (counters applied, journal applied).
    marks: BTreeMap<(StoreId, WriterId), (u64, u64)>,
    journal_seq: u64,
    journal: Vec<(u64, JournalEvent)>,
    journal_keys: HashSet<(StoreId, Uuid, u32)>,
    /// What the hub merged of each agent writer's history.
    lineage: BTreeMap<(StoreId, WriterId), HubLineage>,
    /// Conflicts: retirements reported, second live agents refused, own entries given back.
    retirements: BTreeSet<(StoreId, WriterId, WriterId)>,

    refusals: u64,
    rollbacks: u64,
}

impl HubDb {
    fn merge(&mut self, store: &StoreId, k: &Sku, w: &WriterId, e: PnEntry) -> bool {
        let key = (store.clone(), k.clone(), w.clone());
        let cur = self.entries.get(&key).map(|x| x.0).unwrap_or_default();
        if cur.covers(e) {
            return false;
        }
        self.seq += 1;
        self.entries.insert(key, (cur.join(e), self.seq));
        true
    }

    fn add_event(&mut self, e: JournalEvent) {
        if self.journal_keys.insert((e.store.clone(), e.id, e.line)) {
            self.journal_seq += 1;
            self.journal.push((self.journal_seq, e));
        }
    }

    /// Store `store`'s entries above `after` in seq order, leaving out `exclude`'s; hub entries
    /// carry their tags.
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
        let macs = rows.iter().enumerate().map(|(i, (_, k, w, e))| (i as u32, self.key.tag(store, k, w, *e))).collect();
        DeltaRead {
            upto,
            entries: rows.into_iter().map(|(_, k, w, e)| (k, w, e)).collect(),
            macs,
            ..DeltaRead::default()
        }
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

    fn digest(&self, store: &StoreId, only_hub: bool) -> (StateDigest, u64) {
        let mut d = StateDigest::default();
        let mut head = 0;
        for ((st, k, w), (e, seq)) in &self.entries {
            if st == store && (!only_hub || w.is_hub()) {
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
    store: usize,
    db: AgentDb,
    session: Option<AgentSession>,
    /// The host's queue of effects, tagged with the connection they came from.
    work: VecDeque<(u64, Effect)>,
    /// The session has not heard of the latest local heads yet.
    heads_dirty: bool,
    /// The last online backup (SQLite's backup API: restoring it takes a new incarnation).
    backup: Option<AgentDb>,
    /// The last raw copy of the files (a VM snapshot, `cp -a`: restoring it keeps the writer).
    snapshot: Option<AgentDb>,
    /// Decommissioned (a clone an operator switched off after it synced).
    gone: bool,
}

impl Agent {
    /// An agent of store `store` started on `db`, not connected.
    fn new(store: usize, db: AgentDb) -> Agent {
        Agent {
            store,
            db,
            session: None,
            work: VecDeque::new(),
            heads_dirty: false,
            backup: None,
            snapshot: None,
            gone: false,
        }
    }
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
    /// The hub refused or the agent retired: the session ends by design.
    ending: bool,
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
    agent_rollbacks: u64,
    clones: u64,
    hub_restores: u64,
    hub_rollbacks: u64,
    retirements: u64,
    moved: u64,
    /// Changes reported as possibly counted twice (the fork point was still exact).
    ambiguous: u64,
    refusals: u64,
    /// Deltas refused because another copy moved the writer's history since the welcome.
    lineage_races: u64,
    /// Of those, copies of a live writer.
    clones_refused: u64,
    recovered_hub_entries: u64,
    local_changes: u64,
    expected_errors: u64,
    connects: u64,
    /// Digest comparisons before healing.
    compared_under_faults: u64,
    /// Digests that differed on connections whose frames were reordered or duplicated, or after
    /// files were put back.
    tolerated_mismatches: u64,
    /// Full-state reads the hub served after a digest mismatch.
    full_reads: u64,
    /// Per store: digests compared equal / different at the hub.
    matched: [u64; STORES],
    mismatched: [u64; STORES],
}

/// A hub entry floor: after the hub was restored, what a copy held must come back, if that copy
/// still runs the same files at the end.
struct HubFloor {
    key: (usize, Sku, WriterId),
    len: usize,
    /// The agent copy and its files' epoch (`None`: the restored hub files themselves).
    holder: Option<(usize, u64)>,
}

struct Sim {
    rng: StdRng,
    knobs: Knobs,
    t0: Instant,
    ms: u64,
    hub: HubDb,
    /// A raw copy of the hub's files.
    hub_snapshot: Option<HubDb>,
    /// The hub runs on raw-restored files and has not found out yet: restocks wait (see the
    /// README: a hub restored by copying files must not author changes before its stores
    /// reconnect).
    hub_unverified: bool,
    hub_sessions: Vec<Option<HubSession>>,
    hub_work: VecDeque<(usize, u64, Effect)>,
    hub_heads_dirty: Vec<bool>,
    agents: Vec<Agent>,
    links: Vec<Option<Link>>,
    next_gen: u64,
    // ---- the ground truth ----
    /// Every change: store, SKU, delta.
    made: BTreeMap<Uuid, (usize, Sku, i64)>,
    /// Lineage chain of an agent writer's history → the previous chain value and the event.
    parents: HashMap<(WriterId, Chain), (Chain, Uuid)>,
    /// Events that were counted at the hub when their copy's files were replaced.
    must_survive: BTreeSet<Uuid>,
    /// The deepest point of each agent writer's history whose changes the hub's entries may hold
    /// (they must all come from the history that ends there). Not rolled back with the hub's
    /// files: stores give back what it lost.
    tips: BTreeMap<(StoreId, WriterId), Checkpoint>,
    /// The starts each connection's agent reported in its hello (agent, connection).
    hello_boots: HashMap<(usize, u64), Vec<Boot>>,
    /// For each delta an agent read (agent, connection, upto): the checkpoints of the retired
    /// writers whose entries it carries.
    delta_tips: HashMap<(usize, u64, u64), Vec<(WriterId, Checkpoint)>>,
    /// Every hub change per (store, SKU, hub writer), in order.
    hub_events: BTreeMap<(usize, Sku, WriterId), Vec<Uuid>>,
    hub_floors: Vec<HubFloor>,
    /// Per agent: bumped whenever its files are replaced.
    epochs: Vec<u64>,
    /// Retirements made: (store, old writer, new writer).
    retirements: BTreeSet<(StoreId, WriterId, WriterId)>,
    /// Files were put back or copied for this store (or the hub's): digests may differ.
    rolled: [bool; STORES],
    next_event: u128,
    faults: bool,
    /// Whether local changes happen in this phase.
    busy: bool,
    /// An eager host is working through its queue.
    draining: bool,
    stats: Stats,
    /// The first broken invariant noticed while running.
    failure: Option<String>,
    /// Whether durable watermarks tell the truth (false once a test tampers with a replica, or
    /// the hub runs on restored files that reuse sequence numbers).
    trust_acks: bool,
    /// `SHELFSYNC_SIM_TRACE=<agent index>` prints that agent's frames and effects.
    trace: Option<usize>,
    /// Which files operators touch in this run: agents' (restores, roll-backs, clones) or the
    /// hub's. Not both: a hub put back to files older than a store's fork no longer knows which
    /// history of that store's writer it had merged (README, "Restores and clones").
    file_faults: FileFaults,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileFaults {
    Agents,
    Hub,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let knobs = Knobs::random(&mut rng);
        let hub = HubDb {
            writer: WriterId::new(NodeId::Hub, Incarnation::from_u64(rng.random())),
            key: MacKey::from_bytes(rng.random()),
            seq: 0,
            entries: BTreeMap::new(),
            marks: BTreeMap::new(),
            journal_seq: 0,
            journal: Vec::new(),
            journal_keys: HashSet::new(),
            lineage: BTreeMap::new(),
            retirements: BTreeSet::new(),
            refusals: 0,
            rollbacks: 0,
        };
        let agents: Vec<Agent> = (0..STORES)
            .map(|i| {
                let writer = WriterId::new(NodeId::Store(store_id(i)), Incarnation::from_u64(rng.random()));
                let mut db = AgentDb::new(writer);
                db.boot(rng.random());
                Agent::new(i, db)
            })
            .collect();
        let n = agents.len();
        Sim {
            rng,
            knobs,
            t0: Instant::now(),
            ms: 0,
            hub,
            hub_snapshot: None,
            hub_unverified: false,
            hub_sessions: (0..n).map(|_| None).collect(),
            hub_work: VecDeque::new(),
            hub_heads_dirty: vec![false; n],
            agents,
            links: (0..n).map(|_| None).collect(),
            next_gen: 1,
            made: BTreeMap::new(),
            parents: HashMap::new(),
            must_survive: BTreeSet::new(),
            delta_tips: HashMap::new(),
            hello_boots: HashMap::new(),
            tips: BTreeMap::new(),
            hub_events: BTreeMap::new(),
            hub_floors: Vec::new(),
            epochs: vec![0; n],
            retirements: BTreeSet::new(),
            rolled: [false; STORES],
            next_event: 0,
            faults: true,
            busy: true,
            draining: false,
            stats: Stats::default(),
            failure: None,
            trust_acks: true,
            trace: std::env::var("SHELFSYNC_SIM_TRACE").ok().and_then(|v| v.parse().ok()),
            file_faults: if seed.is_multiple_of(3) { FileFaults::Hub } else { FileFaults::Agents },
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

    fn trace(&self, j: usize, what: impl FnOnce() -> String) {
        if self.trace == Some(j) {
            eprintln!("{:>7} ms agent-{j}: {}", self.ms, what());
        }
    }

    fn live(&self, j: usize, gen: u64) -> bool {
        self.links[j].as_ref().is_some_and(|l| l.gen == gen)
    }

    fn sid(&self, j: usize) -> StoreId {
        store_id(self.agents[j].store)
    }

    /// Agents of store `s` still running.
    fn copies(&self, s: usize) -> Vec<usize> {
        (0..self.agents.len()).filter(|&j| self.agents[j].store == s && !self.agents[j].gone).collect()
    }

    // ---- connections ----

    fn connect(&mut self, j: usize) {
        if self.links[j].is_some() || self.agents[j].gone {
            return;
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        self.stats.connects += 1;
        let cfg = self.knobs.cfg.clone();
        let store = self.sid(j);
        let a = &mut self.agents[j];
        a.session = Some(AgentSession::new(cfg.clone(), store.clone(), a.db.writer.clone(), a.db.resume()));
        a.heads_dirty = false;
        self.hub_sessions[j] =
            Some(HubSession::new(cfg, store, self.hub.writer.clone(), self.hub.seq, self.hub.journal_seq));
        self.hub_heads_dirty[j] = false;
        self.links[j] =
            Some(Link { gen, q: Default::default(), faulted: false, shuffled: false, dies_at: None, ending: false });
        self.pump(j);
    }

    /// Both ends drop the connection and in-flight frames vanish. Work the hosts already took on
    /// stays queued: applies still commit (nobody hears of it), reads are dropped.
    fn disconnect(&mut self, j: usize) {
        self.trace(j, || "disconnect".into());
        self.agents[j].session = None;
        self.hub_sessions[j] = None;
        self.links[j] = None;
    }

    /// A session failed: it must have queued an `Error` frame naming the code (unless the peer
    /// closed first); then the connection closes. On a connection no fault touched, that is a bug.
    fn session_failed(&mut self, j: usize, at_hub: bool, err: SessionError) {
        self.trace(j, || format!("{} session failed: {err}", if at_hub { "hub" } else { "agent" }));
        let expected = self.links[j].as_ref().is_none_or(|l| l.faulted || l.ending);
        let last = if at_hub {
            let s = self.hub_sessions[j].as_mut();
            s.and_then(|s| std::iter::from_fn(|| s.poll_transmit()).last())
        } else {
            let s = self.agents[j].session.as_mut();
            s.and_then(|s| std::iter::from_fn(|| s.poll_transmit()).last())
        };
        if !err.from_peer {
            let told = last.map(|t| from_wire(&to_wire(&t.frame)));
            if !matches!(&told, Some(Frame::V1(FrameV1::Error(e))) if e.code == err.code) {
                self.fail(format!("agent-{j}: failing session did not send an Error frame ({err}); last {told:?}"));
            }
        }
        let side = if at_hub { "hub" } else { "agent" };
        if expected {
            self.stats.expected_errors += 1;
        } else {
            self.fail(format!("agent-{j}: {side} session failed on a connection no fault touched: {err}"));
        }
        self.disconnect(j);
    }

    /// Moves transmits onto the link and effects into the hosts' queues; an eager host then works.
    fn pump(&mut self, j: usize) {
        let Some(link) = self.links[j].as_mut() else { return };
        let gen = link.gen;
        let a = &mut self.agents[j];
        if let Some(s) = a.session.as_mut() {
            while let Some(t) = s.poll_transmit() {
                link.q[UP][lane(t.stream)].push_back(to_wire(&t.frame));
            }
            while let Some(e) = s.poll_effect() {
                a.work.push_back((gen, e));
            }
        }
        if let Some(s) = self.hub_sessions[j].as_mut() {
            while let Some(t) = s.poll_transmit() {
                link.q[DOWN][lane(t.stream)].push_back(to_wire(&t.frame));
            }
            while let Some(e) = s.poll_effect() {
                self.hub_work.push_back((j, gen, e));
            }
        }
        // Not re-entered: work done here pumps again, and the outer loop picks up what it queues.
        if !self.draining && self.rng.random_bool(self.knobs.eager_host) {
            self.draining = true;
            while self.agent_work(j) | self.hub_work_one() {}
            self.draining = false;
        }
    }

    // ---- hosts ----

    /// The agent host fulfils its oldest effect. Returns whether there was one.
    fn agent_work(&mut self, j: usize) -> bool {
        let Some((gen, effect)) = self.agents[j].work.pop_front() else { return false };
        let live = self.live(j, gen);
        self.trace(j, || {
            format!("agent host (conn {gen}, live {live}): {effect:?} [head {}]", self.agents[j].db.counters.head())
        });
        let now = self.now();
        let store = self.sid(j);
        let a = &mut self.agents[j];
        let mut r = Ok(());
        match effect {
            Effect::ApplyDelta { peer, delta, .. } => {
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
            Effect::CheckLineage { hub, hub_entries } if live => {
                let own = a.db.lineage();
                let chains: Vec<Chain> = a.db.own.iter().map(|(c, _)| c.chain).collect();
                let chain_at =
                    |k: u64| if k == 0 { Some(lineage::GENESIS) } else { chains.get(k as usize - 1).copied() };
                let boots = a.db.boots.clone();
                match lineage::judge(own, chain_at, &boots, &hub) {
                    Verdict::Continue => {
                        let give_back = a.db.hub_entries_digest() != hub_entries;
                        r = a.session.as_mut().unwrap().lineage_ok(now, give_back);
                        // The hub has them: the reports are done.
                        self.agents[j].db.retired.clear();
                    }
                    Verdict::Fork { at, ambiguous, reason } => {
                        // The fork point must be exactly where this copy's history and the one
                        // the hub counts under the writer part: a lower one would count shared
                        // changes twice, a higher one would lose changes of this copy.
                        let writer = a.db.writer.clone();
                        let own_ids: Vec<Uuid> = a.db.own.iter().map(|(_, id)| *id).collect();
                        let tip = self.tips.get(&(store.clone(), writer.clone())).map_or(lineage::GENESIS, |c| c.chain);
                        let theirs = self.history(&writer, tip).unwrap_or_default();
                        let lcp = |x: &[Uuid]| own_ids.iter().zip(x).take_while(|(a, b)| a == b).count() as u64;
                        let shared = lcp(&theirs);
                        if at != shared {
                            self.fail(format!(
                                "agent-{j}: fork of {writer} at {at} ({ambiguous} ambiguous), but it shares {shared} changes \
                                 with the history the hub counts (hub lineage {hub:?}, own head {own:?}, boots {boots:?})"
                            ));
                        }
                        self.stats.ambiguous += ambiguous;
                        self.retire(j, at, ambiguous, reason, hub.head.ordinal);
                        if let Some(l) = self.links[j].as_mut() {
                            l.ending = true;
                        }
                        self.disconnect(j);
                        return true;
                    }
                }
            }
            Effect::ReadDelta { after, limit, full } if live => {
                let read = a.db.read_delta(&store, after, limit, full);
                let tips: Vec<(WriterId, Checkpoint)> =
                    a.db.frozen
                        .iter()
                        .filter(|(w, _)| read.entries.iter().any(|(_, x, _)| x == *w))
                        .map(|(w, c)| (w.clone(), *c))
                        .collect();
                self.delta_tips.insert((j, gen, read.upto), tips);
                let a = &mut self.agents[j];
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
            Effect::Acked { upto, .. } => a.db.acked = a.db.acked.max(upto),
            Effect::JournalAcked { upto, .. } => a.db.journal_acked = a.db.journal_acked.max(upto),
            Effect::LookupPeer { .. }
            | Effect::DigestCompared { .. }
            | Effect::ApplyHolds { .. }
            | Effect::ApplyIncoming { .. }
            | Effect::Pong { .. } => {
                self.fail(format!("agent-{j}: agent got {effect:?}"));
            }
            _ => {}
        }
        if let Err(e) = r {
            self.session_failed(j, false, e);
        }
        self.pump(j);
        true
    }

    /// The agent's writer forked: changes after `at` move to a fresh writer, the old one keeps
    /// the shared prefix (and will take the hub's value by max), and the hub is told.
    fn retire(&mut self, j: usize, at: u64, ambiguous: u64, reason: lineage::RetireReason, hub_ordinal: u64) {
        self.stats.retirements += 1;
        let store = self.sid(j);
        let fresh = self.rng.random();
        let db = &mut self.agents[j].db;
        let old = db.writer.clone();
        let cut = if at == 0 { Checkpoint::ZERO } else { db.own[at as usize - 1].0 };
        let new = lineage::successor(&old, &cut, db.own.get(at as usize).map(|(_, id)| (*id, 0)), fresh);
        let own_ordinal = db.lineage().ordinal;
        let moved: Vec<Uuid> = db.own[at as usize..].iter().map(|(_, id)| *id).collect();
        db.frozen.insert(old.clone(), cut);
        let moved_set: HashSet<Uuid> = moved.iter().copied().collect();
        let mut sums: BTreeMap<Sku, PnEntry> = BTreeMap::new();
        let mut new_own = Vec::new();
        let mut head = Checkpoint::ZERO;
        for (_, e) in db.journal.iter_mut() {
            if e.writer == old && moved_set.contains(&e.id) {
                e.writer = new.clone();
                let s = sums.entry(e.sku.clone()).or_default();
                *s = s.apply(&new, e.delta).unwrap();
                let next = head.next(&e.id, e.line, &e.sku, e.delta);
                self.parents.insert((new.clone(), next.chain), (head.chain, e.id));
                head = next;
                new_own.push((head, e.id));
            }
        }
        assert_eq!(new_own.len(), moved.len(), "every own change has its journal event");
        let mut state = db.counters.state();
        for (k, s) in &sums {
            let e = state.get_mut(&(k.clone(), old.clone())).expect("moved changes are in the old entry");
            e.p -= s.p;
            e.n -= s.n;
            state.insert((k.clone(), new.clone()), *s);
        }
        let mut rebuilt = CounterMap::new();
        rebuilt.merge(state.iter().map(|((k, w), e)| (k, w, *e))).unwrap();
        db.counters = rebuilt;
        // Starts of these files inside the moved stretch stay starts of the new writer's history
        // (at their place in it), and the new writer starts on this copy at its head: another
        // copy that makes the same decision derives the same writer, and the two must still
        // tell their histories apart.
        db.boots = db
            .boots
            .iter()
            .filter(|b| b.at.ordinal >= at)
            .map(|b| {
                let k = (b.at.ordinal - at) as usize;
                Boot { id: b.id, at: if k == 0 { Checkpoint::ZERO } else { new_own[k - 1].0 } }
            })
            .collect();
        db.own = new_own;
        db.writer = new.clone();
        let boot = self.rng.random();
        let db = &mut self.agents[j].db;
        db.boot(boot);
        db.hub_writer = None;
        db.applied = 0;
        db.journal_applied = 0;
        db.acked = 0;
        db.journal_acked = 0;
        db.retired.push(Retirement {
            old: old.clone(),
            new: new.clone(),
            reason,
            fork_ordinal: at,
            hub_ordinal,
            own_ordinal,
            moved: moved.len() as u64,
            ambiguous,
            window_ms: None,
            at_ms: self.ms as i64,
        });
        self.stats.moved += moved.len() as u64;
        self.retirements.insert((store, old.clone(), new.clone()));
        self.trace(j, || format!("RETIRE {old} at {at} ({reason:?}): {} changes move to {new}", moved.len()));
    }

    /// The hub found it runs on files older than what its stores saw: it takes a new incarnation
    /// and closes every connection (they reconnect and start their watermarks over).
    fn hub_reincarnate(&mut self) {
        self.stats.hub_rollbacks += 1;
        self.hub.rollbacks += 1;
        self.hub.writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(self.rng.random()));
        self.hub_unverified = false;
        for k in 0..self.agents.len() {
            if let Some(l) = self.links[k].as_mut() {
                l.ending = true;
            }
            self.disconnect(k);
        }
    }

    /// Oracle: the hub merged changes of `w`'s history up to `tip`. Everything it merged of `w`
    /// must come from one history; the deepest point is kept.
    fn merged(&mut self, store: &StoreId, w: &WriterId, tip: Checkpoint) {
        let key = (store.clone(), w.clone());
        let old = self.tips.get(&key).copied().unwrap_or(Checkpoint::ZERO);
        let (deep, shallow) = if tip.ordinal >= old.ordinal { (tip, old) } else { (old, tip) };
        match self.history(w, deep.chain) {
            Ok(h) if shallow.ordinal == 0 || self.history(w, shallow.chain).is_ok_and(|s| h.starts_with(&s)) => {
                self.tips.insert(key, deep);
            }
            _ => self.fail(format!(
                "the hub merged two histories of {w} ({store}): one reaching {old:?}, one reaching {tip:?}"
            )),
        }
    }

    /// The hub host (one database thread for all connections) fulfils its oldest effect.
    fn hub_work_one(&mut self) -> bool {
        let Some((j, gen, effect)) = self.hub_work.pop_front() else { return false };
        let live = self.live(j, gen);
        self.trace(j, || format!("hub host (conn {gen}, live {live}): {effect:?} [hub seq {}]", self.hub.seq));
        let now = self.now();
        let store = self.sid(j);
        let mut r = Ok(());
        match effect {
            Effect::LookupPeer { hello } if live => {
                self.hello_boots.insert((j, gen), hello.boots.clone());
                for ret in &hello.retired {
                    self.hub.retirements.insert((store.clone(), ret.old.clone(), ret.new.clone()));
                }
                if hello.hub_writer.as_ref() == Some(&self.hub.writer) && hello.applied > self.hub.seq {
                    // The store has seen more of this hub than the hub has: restored files.
                    self.hub_reincarnate();
                    self.pump(j);
                    return true;
                }
                let s = self.agents[j].store;
                let others: Vec<usize> = self
                    .copies(s)
                    .into_iter()
                    .filter(|&k| k != j && self.hub_sessions[k].as_ref().is_some_and(|h| h.is_established()))
                    .collect();
                let cloned =
                    others.iter().any(|&k| self.hub_sessions[k].as_ref().unwrap().peer() == Some(&hello.writer));
                if !others.is_empty() {
                    // A second live agent of the store (another writer, or a copy of the same
                    // one, which waits and sorts out its history when it can connect): refused.
                    self.stats.clones_refused += u64::from(cloned);
                    self.hub.refusals += 1;
                    self.stats.refusals += 1;
                    self.links[j].as_mut().unwrap().ending = true;
                    let e = self.hub_sessions[j]
                        .as_mut()
                        .unwrap()
                        .refuse(close_code::DUPLICATE_AGENT, format!("another agent of {store} is connected"));
                    r = Err(e);
                } else {
                    let (applied, japplied) =
                        self.hub.marks.get(&(store.clone(), hello.writer.clone())).copied().unwrap_or((0, 0));
                    let acc = PeerAccept {
                        applied,
                        journal_applied: japplied,
                        lineage: self
                            .hub
                            .lineage
                            .get(&(store.clone(), hello.writer.clone()))
                            .cloned()
                            .unwrap_or_default(),
                        hub_entries: self.hub.digest(&store, true).0,
                    };
                    r = self.hub_sessions[j].as_mut().unwrap().accept(now, acc);
                }
            }
            Effect::ApplyDelta { peer, delta, lineage_base } => {
                // Compare-and-set on the writer's history: another connection (a racing copy) may
                // have moved it since this one was welcomed.
                let held = self.hub.lineage.get(&(store.clone(), peer.clone())).map_or(Checkpoint::ZERO, |l| l.head);
                if let Some(base) = lineage_base.filter(|b| *b != held) {
                    self.stats.lineage_races += 1;
                    self.trace(j, || format!("lineage race: welcomed at {base:?}, the hub now holds {held:?}"));
                    if live {
                        self.links[j].as_mut().unwrap().ending = true;
                        r = Err(self.hub_sessions[j]
                            .as_mut()
                            .unwrap()
                            .refuse(close_code::FORKED, "another copy moved this writer's history; reconnect"));
                    }
                    if let Err(e) = r {
                        self.session_failed(j, true, e);
                    }
                    self.pump(j);
                    return true;
                }
                let mut raised_own = false;
                for (i, (k, w, e)) in delta.entries().enumerate() {
                    if w.is_hub() {
                        let tag = delta.macs.iter().find(|(x, _)| *x == i as u32).map(|(_, t)| t);
                        if !tag.is_some_and(|t| self.hub.key.verify(&store, k, w, e, t)) {
                            self.fail(format!("{store} returned {k}/{w} {e:?} without a valid tag"));
                        }
                        if self.hub.merge(&store, k, w, e) {
                            self.stats.recovered_hub_entries += 1;
                            raised_own |= *w == self.hub.writer;
                        }
                    } else if !w.is_store(&store) {
                        self.fail(format!("the hub session let {w}'s entry through from {store}"));
                    } else {
                        let tag = delta.macs.iter().find(|(x, _)| *x == i as u32).map(|(_, t)| t);
                        if tag.is_some_and(|t| !self.hub.key.verify(&store, k, w, e, t)) {
                            self.fail(format!("{store} returned {k}/{w} {e:?} with a wrong tag"));
                        }
                        if self.hub.merge(&store, k, w, e) && tag.is_some() {
                            self.stats.recovered_hub_entries += 1;
                        }
                    }
                }
                if let Some(l) = &delta.lineage {
                    let pusher = self.hello_boots.get(&(j, gen)).cloned().unwrap_or_default();
                    self.hub
                        .lineage
                        .entry((store.clone(), peer.clone()))
                        .or_default()
                        .advance(l.head, &l.boots, &pusher);
                    self.merged(&store, &peer, l.head);
                }
                for (w, tip) in self.delta_tips.get(&(j, gen, delta.upto)).cloned().unwrap_or_default() {
                    self.merged(&store, &w, tip);
                }
                let m = self.hub.marks.entry((store, peer)).or_default();
                m.0 = m.0.max(delta.upto);
                self.hub_heads_dirty.iter_mut().for_each(|d| *d = true);
                if raised_own {
                    // A store gave back entries of the hub's current writer that the hub lacked.
                    self.hub_reincarnate();
                    self.pump(j);
                    return true;
                }
                if live {
                    let (h, jh) = (self.hub.seq, self.hub.journal_seq);
                    let s = self.hub_sessions[j].as_mut().unwrap();
                    r = s.delta_applied(now, delta.upto);
                    // As the real hub does: its own session learns the heads its merge moved.
                    if r.is_ok() {
                        s.local_head(now, h, jh);
                        self.hub_heads_dirty[j] = false;
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
                self.hub_heads_dirty.iter_mut().for_each(|d| *d = true);
                if live {
                    r = self.hub_sessions[j].as_mut().unwrap().journal_applied(now, batch.upto);
                }
            }
            Effect::ReadDelta { after, limit, full } if live => {
                self.stats.full_reads += u64::from(full);
                let s = self.hub_sessions[j].as_mut().unwrap();
                let exclude = if full { None } else { s.peer().cloned() };
                let read = self.hub.read_delta(&store, exclude.as_ref(), after, limit);
                r = s.delta_read(now, read);
            }
            Effect::ReadJournal { after, limit } if live => {
                let read = self.hub.read_journal(&store, after, limit);
                r = self.hub_sessions[j].as_mut().unwrap().journal_read(now, read);
            }
            Effect::ComputeDigest if live => {
                let (d, head) = self.hub.digest(&store, false);
                r = self.hub_sessions[j].as_mut().unwrap().digest_computed(now, d, head);
            }
            Effect::DigestCompared { matched } if live => {
                let s = self.agents[j].store;
                if self.faults {
                    self.stats.compared_under_faults += 1;
                }
                if matched {
                    self.stats.matched[s] += 1;
                } else if self.links[j].as_ref().is_some_and(|l| l.shuffled) || self.rolled[s] {
                    self.stats.tolerated_mismatches += 1;
                } else {
                    self.stats.mismatched[s] += 1;
                    if self.trust_acks {
                        let at_hub = self.hub.store_state(&store);
                        let at_agent = self.agents[j].db.counters.state();
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
            Effect::ApplyHolds { .. } | Effect::ApplyIncoming { .. } | Effect::CheckLineage { .. } => {
                self.fail(format!("hub got {effect:?}"))
            }
            _ => {}
        }
        if let Err(e) = r {
            self.session_failed(j, true, e);
        }
        self.pump(j);
        true
    }

    /// Sessions hear of the current local heads (the hosts' "heads changed" watch).
    fn notify_agent(&mut self, j: usize) {
        let now = self.now();
        let a = &mut self.agents[j];
        if !std::mem::take(&mut a.heads_dirty) {
            return;
        }
        let (h, jh) = (a.db.counters.head(), a.db.journal_head());
        if let Some(s) = a.session.as_mut() {
            s.local_head(now, h, jh);
        }
        self.pump(j);
    }

    fn notify_hub(&mut self, j: usize) {
        if !std::mem::take(&mut self.hub_heads_dirty[j]) {
            return;
        }
        let (now, h, jh) = (self.now(), self.hub.seq, self.hub.journal_seq);
        if let Some(s) = self.hub_sessions[j].as_mut() {
            s.local_head(now, h, jh);
        }
        self.pump(j);
    }

    fn maybe_notify(&mut self, j: usize) {
        if self.rng.random_bool(self.knobs.eager_heads) {
            self.notify_agent(j);
            for k in 0..self.agents.len() {
                self.notify_hub(k);
            }
        }
    }

    // ---- "acked" means "durable at the peer" ----

    /// Everything a session reports as acknowledged by its peer must be durable there: acks are
    /// sent only after the receiver's transaction commits (DESIGN §4). Checked against the
    /// databases, so a premature or optimistic ack is caught even when nothing is lost later.
    fn check_acks(&mut self, j: usize) {
        if !self.trust_acks {
            return;
        }
        let mut why = Vec::new();
        if let Some(s) = self.agents[j].session.as_ref().filter(|s| s.is_established()) {
            why.extend(self.hub_holds_agent_counters(j, s.acked()).err());
            why.extend(self.hub_holds_agent_journal(j, s.journal_acked()).err());
        }
        if let Some(s) = self.hub_sessions[j].as_ref().filter(|s| s.is_established()) {
            why.extend(self.agent_holds_hub_counters(j, s.acked()).err());
            why.extend(self.agent_holds_hub_journal(j, s.journal_acked()).err());
        }
        if let Some(w) = why.into_iter().next() {
            self.fail(w);
        }
    }

    fn hub_holds_agent_counters(&self, j: usize, upto: u64) -> Result<(), String> {
        let a = &self.agents[j];
        let store = self.sid(j);
        for (seq, k, w, e) in a.db.counters.delta_since(0).into_iter().take_while(|r| r.0 <= upto) {
            let at_hub =
                self.hub.entries.get(&(store.clone(), k.clone(), w.clone())).map_or_else(Default::default, |x| x.0);
            if w.is_store(&store) && !at_hub.covers(e) {
                return Err(format!(
                    "{store}: agent counters acked up to {upto}, but the hub holds {k}/{w} as {at_hub:?}, the agent {e:?} (seq {seq})"
                ));
            }
        }
        Ok(())
    }

    fn agent_holds_hub_counters(&self, j: usize, upto: u64) -> Result<(), String> {
        let a = &self.agents[j];
        let store = self.sid(j);
        for ((st, k, w), (e, seq)) in &self.hub.entries {
            let at_agent = a.db.counters.get(k).map_or_else(Default::default, |c| c.entry(w));
            // The agent's own writer never comes back down (a rolled-back copy is behind on it
            // until it retires it).
            if *st == store && *seq <= upto && !at_agent.covers(*e) && *w != a.db.writer {
                return Err(format!(
                    "{store}: hub counters acked up to {upto}, but the agent holds {k}/{w} as {at_agent:?}, the hub {e:?} (seq {seq})"
                ));
            }
        }
        Ok(())
    }

    fn hub_holds_agent_journal(&self, j: usize, upto: u64) -> Result<(), String> {
        let a = &self.agents[j];
        let store = self.sid(j);
        for (seq, e) in a.db.journal.iter().take_while(|(seq, _)| *seq <= upto) {
            if e.writer.is_store(&store) && !self.hub.journal_keys.contains(&(store.clone(), e.id, e.line)) {
                return Err(format!(
                    "{store}: agent journal acked up to {upto}, but the hub lacks event {} (seq {seq})",
                    e.id
                ));
            }
        }
        Ok(())
    }

    fn agent_holds_hub_journal(&self, j: usize, upto: u64) -> Result<(), String> {
        let a = &self.agents[j];
        let store = self.sid(j);
        for (seq, e) in self.hub.journal.iter().take_while(|(seq, _)| *seq <= upto) {
            if e.store == store && e.writer.is_hub() && !a.db.journal_keys.contains(&(e.id, e.line)) {
                return Err(format!(
                    "{store}: hub journal acked up to {upto}, but the agent lacks event {} (seq {seq})",
                    e.id
                ));
            }
        }
        Ok(())
    }

    // ---- local activity (the ground truth) ----

    fn new_event(&mut self, kind: EventKind, s: usize, k: &Sku, delta: i64, writer: &WriterId) -> JournalEvent {
        self.next_event += 1;
        let id = Uuid::from_u128(self.next_event);
        self.made.insert(id, (s, k.clone(), delta));
        JournalEvent {
            id,
            line: 0,
            kind,
            store: store_id(s),
            sku: k.clone(),
            delta,
            reason: None,
            occurred_at_ms: self.ms as i64,
            recorded_at_ms: self.ms as i64,
            writer: writer.clone(),
            flags: vec![],
        }
    }

    fn local_sale(&mut self, j: usize) {
        if self.agents[j].gone {
            return;
        }
        let k = sku(self.rng.random_range(0..SKUS));
        let delta: i64 =
            if self.rng.random_bool(0.8) { -self.rng.random_range(1..4) } else { self.rng.random_range(1..3) };
        self.change(j, k, delta);
    }

    /// Agent `j` records a change of `delta` units of `k`.
    fn change(&mut self, j: usize, k: Sku, delta: i64) {
        let writer = self.agents[j].db.writer.clone();
        let kind = if delta < 0 { EventKind::Sale } else { EventKind::Return };
        let e = self.new_event(kind, self.agents[j].store, &k, delta, &writer);
        let db = &mut self.agents[j].db;
        // Event, counter change and lineage are one transaction.
        db.counters.apply(&k, &writer, delta).unwrap();
        let prev = db.lineage();
        let next = prev.next(&e.id, e.line, &e.sku, e.delta);
        self.parents.insert((writer, next.chain), (prev.chain, e.id));
        db.own.push((next, e.id));
        db.add_event(e);
        self.agents[j].heads_dirty = true;
        self.stats.local_changes += 1;
        self.maybe_notify(j);
    }

    fn restock(&mut self, s: usize) {
        if self.hub_unverified {
            return;
        }
        let k = sku(self.rng.random_range(0..SKUS));
        let qty: i64 =
            if self.rng.random_bool(0.9) { self.rng.random_range(1..10) } else { -self.rng.random_range(1..3) };
        let store = store_id(s);
        let hw = self.hub.writer.clone();
        let cur = self.hub.entries.get(&(store.clone(), k.clone(), hw.clone())).map(|x| x.0).unwrap_or_default();
        let next = cur.apply(&hw, qty).unwrap();
        let kind = if qty > 0 { EventKind::Restock } else { EventKind::Adjustment };
        let e = self.new_event(kind, s, &k, qty, &hw);
        self.hub_events.entry((s, k.clone(), hw.clone())).or_default().push(e.id);
        self.hub.merge(&store, &k, &hw, next);
        self.hub.add_event(e);
        self.hub_heads_dirty.iter_mut().for_each(|d| *d = true);
        if let Some(&j) = self.copies(s).first() {
            self.maybe_notify(j);
        }
    }

    // ---- the network ----

    /// Delivers (or mangles) one frame of one queue of link `j`.
    fn deliver(&mut self, j: usize, dir: usize, stream: usize) {
        enum Fault {
            Lose,
            Duplicate,
            Reorder(usize),
        }
        let len = self.links[j].as_ref().map_or(0, |l| l.q[dir][stream].len());
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
        let link = self.links[j].as_mut().unwrap();
        let q = &mut link.q[dir][stream];
        let bytes = match fault {
            None => q.pop_front().unwrap(),
            Some(Fault::Lose) => {
                let lost = q.pop_front().unwrap();
                link.faulted = true;
                link.dies_at.get_or_insert(dies_at);
                self.stats.lost += 1;
                self.trace(j, || format!("FAULT lost {:?}", from_wire(&lost)));
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
        self.trace(j, || {
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
            self.hub_sessions[j].as_mut().unwrap().handle_frame(now, frame)
        } else {
            self.agents[j].session.as_mut().unwrap().handle_frame(now, frame)
        };
        if let Err(e) = r {
            self.session_failed(j, dir == UP, e);
        }
        self.pump(j);
    }

    /// Delivers the head of a random non-empty queue of link `j`, if any.
    fn deliver_any(&mut self, j: usize) -> bool {
        let Some(link) = self.links[j].as_ref() else { return false };
        let queues: Vec<(usize, usize)> =
            (0..2).flat_map(|d| (0..2).map(move |s| (d, s))).filter(|&(d, s)| !link.q[d][s].is_empty()).collect();
        if queues.is_empty() {
            return false;
        }
        let (d, s) = queues[self.rng.random_range(0..queues.len())];
        self.deliver(j, d, s);
        true
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        for j in 0..self.agents.len() {
            let Some(link) = self.links[j].as_ref() else { continue };
            if link.dies_at.is_some_and(|t| t <= self.ms) {
                self.disconnect(j);
                continue;
            }
            if let Some(s) = self.agents[j].session.as_mut() {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
            if let Some(s) = self.hub_sessions[j].as_mut() {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
            self.pump(j);
        }
    }

    // ---- crashes and what operators do to files ----

    /// The agent process dies (uncommitted work is lost) and starts again: a boot.
    fn crash_agent(&mut self, j: usize) {
        self.stats.crashes += 1;
        self.disconnect(j);
        let a = &mut self.agents[j];
        a.work.clear();
        a.heads_dirty = false;
        a.db.boot(self.rng.random());
    }

    fn crash_hub(&mut self) {
        self.stats.crashes += 1;
        for j in 0..self.agents.len() {
            self.disconnect(j);
        }
        self.hub_work.clear();
        self.hub_heads_dirty.iter_mut().for_each(|d| *d = false);
    }

    /// Events counted at the hub right now: for each agent writer of the store, the history its
    /// lineage head names.
    fn counted_at_hub(&self, s: usize) -> BTreeSet<Uuid> {
        let store = store_id(s);
        let mut per_writer: BTreeMap<WriterId, BTreeMap<Sku, PnEntry>> = BTreeMap::new();
        for ((st, k, w), (e, _)) in &self.hub.entries {
            if *st == store && !w.is_hub() {
                per_writer.entry(w.clone()).or_default().insert(k.clone(), *e);
            }
        }
        per_writer.iter().flat_map(|(w, entries)| self.counted_by(s, w, entries).unwrap_or_default()).collect()
    }

    /// The events `w`'s entries of store `s` count (`entries`: per SKU): per SKU a prefix of the
    /// history that ends at the deepest point the hub merged of it. `None` if they are not.
    fn counted_by(&self, s: usize, w: &WriterId, entries: &BTreeMap<Sku, PnEntry>) -> Option<Vec<Uuid>> {
        let tip = self.tips.get(&(store_id(s), w.clone())).map_or(lineage::GENESIS, |c| c.chain);
        let history = self.history(w, tip).ok()?;
        let mut counted = Vec::new();
        for k in (0..SKUS).map(sku) {
            let of_k: Vec<Uuid> = history.iter().copied().filter(|id| self.made[id].1 == k).collect();
            let have = entries.get(&k).copied().unwrap_or_default();
            let n = prefix_len(&self.made, &of_k, have)?;
            counted.extend(&of_k[..n]);
        }
        Some(counted)
    }

    /// The events of `writer`'s history that ends in `chain`.
    fn history(&self, writer: &WriterId, mut chain: Chain) -> Result<Vec<Uuid>, String> {
        let mut out = Vec::new();
        while chain != lineage::GENESIS {
            let Some((prev, id)) = self.parents.get(&(writer.clone(), chain)) else {
                return Err(format!("no history of {writer} ends in {chain:02x?}"));
            };
            out.push(*id);
            chain = *prev;
        }
        out.reverse();
        Ok(out)
    }

    /// Agent `j`'s files are replaced by `with`: what only they held is gone, except what the hub
    /// counted, which must survive.
    fn replace_files(&mut self, j: usize, with: AgentDb) {
        let s = self.agents[j].store;
        let store = store_id(s);
        let counted = self.counted_at_hub(s);
        let mine = self.agents[j].db.own_events(&store);
        self.must_survive.extend(mine.intersection(&counted).copied());
        // Retirements it had not reported yet are gone with the files.
        for r in &self.agents[j].db.retired {
            let key = (store.clone(), r.old.clone(), r.new.clone());
            if !self.hub.retirements.contains(&key) {
                self.retirements.remove(&key);
            }
        }
        self.crash_agent(j);
        self.agents[j].db = with;
        self.agents[j].db.boot(self.rng.random());
        self.epochs[j] += 1;
        self.rolled[s] = true;
    }

    /// The store's database is lost (the agent re-seeds from the hub under a new writer), or
    /// restored with the backup command: the backup keeps its writer, whose history the hub then
    /// checks like any other copy's (a new writer here would freeze the old one's entries, which
    /// may hold changes the hub's history of it does not).
    fn restore_agent(&mut self, j: usize) {
        if self.agents[j].gone {
            return;
        }
        self.stats.agent_restores += 1;
        let db = match (self.rng.random_bool(0.5), self.agents[j].backup.clone()) {
            (true, Some(b)) => b,
            _ => AgentDb::new(WriterId::new(NodeId::Store(self.sid(j)), Incarnation::from_u64(self.rng.random()))),
        };
        self.trace(j, || format!("RESTORE from a backup or nothing as {}", db.writer));
        self.replace_files(j, db);
    }

    /// Someone puts back a raw copy of the agent's files (same writer, older history).
    fn roll_back_agent(&mut self, j: usize) {
        let Some(snapshot) = self.agents[j].snapshot.clone() else { return };
        if self.agents[j].gone {
            return;
        }
        self.stats.agent_rollbacks += 1;
        self.trace(j, || format!("ROLL BACK to a copy at {:?}", snapshot.lineage()));
        self.replace_files(j, snapshot);
    }

    /// Agent `j`'s files (as they are now, or its last raw copy) start running on a second
    /// machine.
    fn clone_agent(&mut self, j: usize) {
        let s = self.agents[j].store;
        if self.agents[j].gone || self.copies(s).len() >= COPIES_MAX {
            return;
        }
        let mut db = match (self.rng.random_bool(0.5), self.agents[j].snapshot.clone()) {
            (true, Some(snap)) => snap,
            _ => self.agents[j].db.clone(),
        };
        db.boot(self.rng.random());
        self.stats.clones += 1;
        self.rolled[s] = true;
        let k = self.agents.len();
        self.trace(j, || format!("CLONE to agent-{k} at {:?}", db.lineage()));
        self.agents.push(Agent::new(s, db));
        self.hub_sessions.push(None);
        self.hub_heads_dirty.push(false);
        self.links.push(None);
        self.epochs.push(0);
    }

    /// The hub's files are replaced by an older copy. `marked`: restored with the restore command
    /// (a new incarnation at once); otherwise a raw copy, found out from what stores tell it.
    fn restore_hub(&mut self, marked: bool) {
        let Some(snapshot) = self.hub_snapshot.clone() else { return };
        self.stats.hub_restores += 1;
        self.crash_hub();
        // What each running copy holds of the hub's entries must come back.
        for (j, a) in self.agents.iter().enumerate().filter(|(_, a)| !a.gone) {
            for ((k, w), e) in a.db.counters.state() {
                if let Some(events) = self.hub_events.get(&(a.store, k.clone(), w.clone())) {
                    let len = prefix_len(&self.made, events, e).expect("agents hold prefixes of hub entries");
                    self.hub_floors.push(HubFloor { key: (a.store, k, w), len, holder: Some((j, self.epochs[j])) });
                }
            }
        }
        for ((st, k, w), (e, _)) in &snapshot.entries {
            let s: usize = st.as_str().trim_start_matches("store-").parse().unwrap();
            if let Some(events) = self.hub_events.get(&(s, k.clone(), w.clone())) {
                let len = prefix_len(&self.made, events, *e).expect("the hub holds prefixes of its entries");
                self.hub_floors.push(HubFloor { key: (s, k.clone(), w.clone()), len, holder: None });
            }
        }
        // Conflicts recorded after the copy are gone with it; reports still pending at an agent
        // will come again.
        let pending: BTreeSet<_> = self
            .agents
            .iter()
            .flat_map(|a| a.db.retired.iter().map(|r| (store_id(a.store), r.old.clone(), r.new.clone())))
            .collect();
        self.retirements.retain(|r| snapshot.retirements.contains(r) || pending.contains(r));
        self.hub = snapshot;
        if marked {
            self.hub.writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(self.rng.random()));
        } else {
            // Sequence numbers are reused: watermarks no longer tell the truth until the hub finds
            // out and starts a new life.
            self.hub_unverified = true;
            self.trust_acks = false;
        }
        self.rolled = [true; STORES];
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
        let j = self.rng.random_range(0..self.agents.len());
        let s = self.agents[j].store;
        match self.rng.random_range(0..10_000) {
            0..=1599 if self.busy => self.local_sale(j),
            1600..=1999 if self.busy => self.restock(s),
            0..=1999 => {}
            2000..=6499 => {
                self.deliver_any(j);
            }
            6500..=7299 => {
                for _ in 0..self.rng.random_range(1..4) {
                    self.agent_work(j);
                }
            }
            7300..=8099 => {
                for _ in 0..self.rng.random_range(1..4) {
                    self.hub_work_one();
                }
            }
            8100..=8349 => self.notify_agent(j),
            8350..=8599 => self.notify_hub(j),
            8600..=8899 => self.connect(j),
            8900..=8949 => {
                if self.links[j].is_some() {
                    self.stats.partitions += 1;
                    self.disconnect(j);
                }
            }
            8950..=8979 => self.crash_agent(j),
            8980..=8989 => self.crash_hub(),
            8990..=9004 => self.agents[j].backup = Some(self.agents[j].db.clone()),
            9005..=9019 => self.agents[j].snapshot = Some(self.agents[j].db.clone()),
            9020..=9024 if self.file_faults == FileFaults::Agents => self.restore_agent(j),
            9025..=9032 if self.file_faults == FileFaults::Agents => self.roll_back_agent(j),
            9033..=9038 if self.file_faults == FileFaults::Agents => self.clone_agent(j),
            9039..=9043 => self.hub_snapshot = Some(self.hub.clone()),
            9044..=9045 if self.file_faults == FileFaults::Hub => self.restore_hub(true),
            9046..=9047 if self.file_faults == FileFaults::Hub => self.restore_hub(false),
            _ => self.fire_timers(),
        }
    }

    // ---- healing and checking ----

    fn quiet(&self, agents: &[usize]) -> bool {
        self.hub_work.is_empty()
            && agents.iter().all(|&j| {
                let a = &self.agents[j];
                !self.hub_heads_dirty[j]
                    && self.links[j].as_ref().is_some_and(|l| l.q.iter().flatten().all(VecDeque::is_empty))
                    && a.work.is_empty()
                    && !a.heads_dirty
                    && a.session.as_ref().is_some_and(|s| s.is_established() && s.is_idle())
                    && self.hub_sessions[j].as_ref().is_some_and(|s| s.is_established() && s.is_idle())
            })
    }

    fn describe(&self) -> String {
        let links: Vec<String> = (0..self.agents.len())
            .map(|j| {
                let l = self.links[j].as_ref();
                format!(
                    "agent-{j} (store-{}{}): link {:?} queued {:?} agent work {} hub session {:?} agent session {:?}",
                    self.agents[j].store,
                    if self.agents[j].gone { ", gone" } else { "" },
                    l.map(|l| l.gen),
                    l.map(|l| l.q.iter().flatten().map(VecDeque::len).collect::<Vec<_>>()),
                    self.agents[j].work.len(),
                    self.hub_sessions[j].as_ref().map(|s| (s.is_established(), s.is_idle())),
                    self.agents[j].session.as_ref().map(|s| (s.is_established(), s.is_idle())),
                )
            })
            .collect();
        format!("hub work {}; {}", self.hub_work.len(), links.join("; "))
    }

    /// Without faults, runs `agents` until every connection is established and idle and the hosts
    /// are done (others stay disconnected).
    fn run_until_quiet(&mut self, agents: &[usize]) -> Result<(), String> {
        for _ in 0..5_000 {
            for &j in agents {
                self.connect(j);
            }
            for _ in 0..100_000 {
                let mut progressed = false;
                for &j in agents {
                    progressed |= self.deliver_any(j);
                    progressed |= self.agent_work(j);
                    progressed |= self.hub_work_one();
                    if self.agents[j].heads_dirty || self.hub_heads_dirty[j] {
                        progressed = true;
                        self.notify_agent(j);
                        self.notify_hub(j);
                    }
                }
                // Work of connections that already closed still drains.
                progressed |= self.hub_work_one();
                if !progressed {
                    break;
                }
            }
            for &j in agents {
                self.check_acks(j);
            }
            if let Some(f) = &self.failure {
                return Err(f.clone());
            }
            if self.quiet(agents) {
                return Ok(());
            }
            self.ms += 10;
            self.fire_timers();
        }
        Err(format!("did not quiesce after healing: {}", self.describe()))
    }

    /// No more faults: connections that lost frames time out; an operator switches off every
    /// clone after letting it sync alone; everything reconnects and settles; then anti-entropy
    /// runs until every store has had its digests compared equal.
    fn heal(&mut self) -> Result<(), String> {
        self.faults = false;
        for j in 0..self.agents.len() {
            if self.links[j].as_ref().is_some_and(|l| l.faulted) {
                self.disconnect(j);
            }
        }
        for s in 0..STORES {
            let copies = self.copies(s);
            for &extra in copies.iter().skip(1) {
                for &k in &copies {
                    self.disconnect(k);
                }
                self.run_until_quiet(&[extra])?;
                // Everything it did is at the hub now, so it survives its switch-off.
                let store = store_id(s);
                let mine = self.agents[extra].db.own_events(&store);
                self.must_survive.extend(mine);
                self.disconnect(extra);
                self.agents[extra].gone = true;
                self.agents[extra].work.clear();
            }
        }
        let running: Vec<usize> = (0..self.agents.len()).filter(|&j| !self.agents[j].gone).collect();
        self.run_until_quiet(&running)?;
        let before = self.stats.matched;
        for _ in 0..50 {
            self.ms += self.knobs.cfg.digest_interval.as_millis() as u64 + 1;
            self.fire_timers();
            self.run_until_quiet(&running)?;
            if (0..STORES).all(|s| self.stats.matched[s] > before[s]) {
                return Ok(());
            }
        }
        Err(format!("digest rounds never matched every store: before {before:?}, now {:?}", self.stats.matched))
    }

    fn check(&self) -> Result<(), String> {
        if let Some(f) = &self.failure {
            return Err(f.clone());
        }
        let mut counted: BTreeMap<Uuid, WriterId> = BTreeMap::new();
        for s in 0..STORES {
            let store = store_id(s);
            let at_hub = self.hub.store_state(&store);
            let copies = self.copies(s);
            if copies.len() != 1 {
                return Err(format!("{store}: {} copies still run after healing", copies.len()));
            }
            let a = &self.agents[copies[0]];
            let at_agent = a.db.counters.state();
            if at_hub != at_agent {
                return Err(format!("{store}: agent {at_agent:?} != hub {at_hub:?}"));
            }
            // Agent writers: per SKU, each entry is the sum of a prefix of one history of its
            // writer (what a copy merged before its files were replaced may be partial), and no
            // event is counted twice.
            let mut per_writer: BTreeMap<WriterId, BTreeMap<Sku, PnEntry>> = BTreeMap::new();
            for ((k, w), e) in at_hub.iter().filter(|((_, w), _)| !w.is_hub()) {
                per_writer.entry(w.clone()).or_default().insert(k.clone(), *e);
            }
            for (w, entries) in &per_writer {
                let Some(events) = self.counted_by(s, w, entries) else {
                    return Err(format!(
                        "{store}: {w}'s entries {entries:?} are no prefixes of any one of its histories"
                    ));
                };
                for id in events {
                    if let Some(other) = counted.insert(id, w.clone()) {
                        return Err(format!("event {id} is counted twice: by {other} and by {w}"));
                    }
                }
            }
            // Every change of the running copy is counted.
            for id in a.db.own_events(&store) {
                if !counted.contains_key(&id) {
                    return Err(format!("{store}: change {id} of the running copy is not counted"));
                }
            }
            // The hub's own entries: a prefix of its changes, complete unless the hub was
            // restored, and at least what a copy that still runs held then.
            for ((k, w), e) in at_hub.iter().filter(|((_, w), _)| w.is_hub()) {
                let events = self.hub_events.get(&(s, k.clone(), w.clone())).cloned().unwrap_or_default();
                let Some(len) = prefix_len(&self.made, &events, *e) else {
                    return Err(format!("{store} {k}: hub entry {w} {e:?} is no prefix of its changes"));
                };
                let floor = self
                    .hub_floors
                    .iter()
                    .filter(|f| f.key == (s, k.clone(), w.clone()))
                    .filter(|f| f.holder.is_none_or(|(j, epoch)| !self.agents[j].gone && self.epochs[j] == epoch))
                    .map(|f| f.len)
                    .max();
                let floor = if self.stats.hub_restores == 0 { events.len() } else { floor.unwrap_or(0) };
                if len < floor {
                    return Err(format!(
                        "{store} {k}: hub entry {w} counts {len} of its changes; {floor} must survive"
                    ));
                }
            }
            for (_, e) in self.hub.journal.iter().filter(|(_, e)| e.store == store && e.writer.is_hub()) {
                if !a.db.journal_keys.contains(&(e.id, e.line)) {
                    return Err(format!("{store} misses hub event {} by {}", e.id, e.writer));
                }
            }
            for (_, e) in a.db.journal.iter().filter(|(_, e)| e.writer.is_store(&store)) {
                if !self.hub.journal_keys.contains(&(store.clone(), e.id, e.line)) {
                    return Err(format!("the hub misses {store}'s event {} by {}", e.id, e.writer));
                }
            }
            if self.stats.mismatched[s] > 0 {
                return Err(format!(
                    "{store}: digests differed {} times though nobody tampered with a replica",
                    self.stats.mismatched[s]
                ));
            }
        }
        if let Some(id) = self.must_survive.iter().find(|id| !counted.contains_key(id)) {
            return Err(format!("change {id} was counted at the hub when its copy's files were replaced, and is lost"));
        }
        if let Some(r) = self.retirements.iter().find(|r| !self.hub.retirements.contains(r)) {
            return Err(format!("the hub never heard that {} retired {} for {}", r.0, r.1, r.2));
        }
        let mut keys = HashSet::new();
        for (_, e) in &self.hub.journal {
            if !self.made.contains_key(&e.id) || !keys.insert((e.store.clone(), e.id, e.line)) {
                return Err(format!("hub journal event {} is unknown or held twice", e.id));
            }
        }
        Ok(())
    }
}

/// How many of `events` (in order) sum to `entry`, if a prefix does.
fn prefix_len(made: &BTreeMap<Uuid, (usize, Sku, i64)>, events: &[Uuid], entry: PnEntry) -> Option<usize> {
    let mut e = PnEntry::default();
    let w = WriterId::new(NodeId::Hub, Incarnation::from_u64(0));
    for n in 0..=events.len() {
        if e == entry {
            return Some(n);
        }
        if n < events.len() {
            e = e.apply(&w, made[&events[n]].2).unwrap();
        }
    }
    None
}

fn run(seed: u64) -> Result<Sim, String> {
    let mut sim = Sim::new(seed);
    for j in 0..STORES {
        sim.connect(j);
    }
    for n in 0..STEPS {
        sim.step(n);
        sim.check_acks(n % sim.agents.len());
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
        totals.agent_rollbacks += s.agent_rollbacks;
        totals.clones += s.clones;
        totals.hub_restores += s.hub_restores;
        totals.hub_rollbacks += s.hub_rollbacks;
        totals.retirements += s.retirements;
        totals.moved += s.moved;
        totals.refusals += s.refusals;
        totals.clones_refused += s.clones_refused;
        totals.recovered_hub_entries += s.recovered_hub_entries;
        totals.expected_errors += s.expected_errors;
        totals.connects += s.connects;
        totals.delivered += s.delivered;
        totals.compared_under_faults += s.compared_under_faults;
        totals.tolerated_mismatches += s.tolerated_mismatches;
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
        ("agent roll-backs", totals.agent_rollbacks),
        ("clones", totals.clones),
        ("hub restores", totals.hub_restores),
        ("retirements", totals.retirements),
        ("moved changes", totals.moved),
        ("refusals of a second agent", totals.refusals),
        ("hub entries given back", totals.recovered_hub_entries),
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
    let store = sim.sid(0);
    let agent_writer = sim.agents[0].db.writer.clone();
    let hub_writer = sim.hub.writer.clone();

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
    a.db.counters = rebuilt;
    while sim.agents[0].db.counters.head() <= old_head {
        sim.change(0, sku(0), 1);
        sim.change(0, sku(0), -1);
    }
    sim.agents[0].heads_dirty = true;
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
        acked: 0,
        journal_acked: 0,
        lineage: Checkpoint::ZERO,
        boots: vec![],
        retired: vec![],
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
    hub.accept(now, PeerAccept::default()).unwrap();
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

    // ... or the hub's own writer's without a tag (with one, the host checks it).
    let mut hub = established_hub("s1", &me, &hub_writer);
    let delta = Delta::build(0, 1, [(&k, &hub_writer, PnEntry { p: 5, n: 0 })]);
    let err = hub.handle_frame(now, via_wire(Frame::V1(FrameV1::Delta(delta)))).unwrap_err();
    assert_eq!(err.code, close_code::UNAUTHORIZED);
    assert!(err.message.contains("untagged"), "{err}");

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
    // An agent of the previous version (2: no incoming transfers) is told so, never sent a frame
    // it could not decode.
    let mut hub = HubSession::new(SyncConfig::default(), "s1".parse().unwrap(), hub_writer.clone(), 0, 0);
    let err = hub.handle_frame(now, hello("s1", me.clone(), PROTOCOL_VERSION - 1)).unwrap_err();
    assert_eq!(err.code, close_code::VERSION_MISMATCH);
    assert!(err.message.contains(&format!("agent speaks protocol {}", PROTOCOL_VERSION - 1)), "{err}");

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
        lineage: HubLineage::default(),
        hub_entries: StateDigest::default(),
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
    hub.accept(now, PeerAccept::default()).unwrap();
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
    assert!(matches!(agent.poll_effect(), Some(Effect::CheckLineage { .. })));
    assert!(!agent.is_established(), "not before the host checked the lineage");
    agent.lineage_ok(now, false).unwrap();
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
    let refusal = |code| via_wire(Frame::V1(FrameV1::Error(wire::ErrorMsg { code, message: "no thanks".into() })));

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

/// The hub asks a live agent whether it is there; the agent answers with the same nonce, and the
/// hub reports it. A refusal queues the peer's `Error` frame with the code.
#[test]
fn liveness_probes_and_refusals() {
    let now = Instant::now();
    let store: StoreId = "s1".parse().unwrap();
    let hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(1));
    let me = WriterId::new(NodeId::Store(store.clone()), Incarnation::from_u64(2));
    let mut hub = established_hub("s1", &me, &hub_writer);
    let mut agent = AgentSession::new(SyncConfig::default(), store.clone(), me.clone(), AgentResume::default());
    while agent.poll_transmit().is_some() {}
    let welcome = Welcome {
        protocol: PROTOCOL_VERSION,
        hub_writer: hub_writer.clone(),
        applied: 0,
        journal_applied: 0,
        lineage: HubLineage::default(),
        hub_entries: StateDigest::default(),
    };
    agent.handle_frame(now, via_wire(Frame::V1(FrameV1::Welcome(welcome)))).unwrap();
    while agent.poll_effect().is_some() {}
    agent.lineage_ok(now, false).unwrap();
    while agent.poll_transmit().is_some() {}

    hub.ping(7);
    let ping = hub.poll_transmit().expect("a ping goes out");
    agent.handle_frame(now, via_wire(ping.frame)).unwrap();
    let pong = std::iter::from_fn(|| agent.poll_transmit()).find(|t| matches!(t.frame, Frame::V1(FrameV1::Pong(_))));
    hub.handle_frame(now, via_wire(pong.expect("the agent answers").frame)).unwrap();
    assert!(std::iter::from_fn(|| hub.poll_effect()).any(|e| e == Effect::Pong { nonce: 7 }));

    let err = hub.refuse(close_code::DUPLICATE_AGENT, "another agent of s1 is live");
    assert_eq!(err.code, close_code::DUPLICATE_AGENT);
    assert!(error_sent(std::iter::from_fn(|| hub.poll_transmit()), close_code::DUPLICATE_AGENT));
    assert!(!hub.is_established());
}

/// A delta whose lineage head is behind (or beside) what the hub merged of the writer is refused
/// with `forked`; one that extends it names, for the host's compare-and-set, the head the hub
/// must still hold.
#[test]
fn deltas_carry_the_history_they_extend() {
    let now = Instant::now();
    let hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(1));
    let me = WriterId::new(NodeId::Store("s1".parse().unwrap()), Incarnation::from_u64(2));
    let k = sku(0);
    let c = |ordinal: u64, tag: u8| Checkpoint { ordinal, chain: [tag; 16] };
    let accept = |head: Checkpoint| {
        let mut hub = HubSession::new(SyncConfig::default(), "s1".parse().unwrap(), hub_writer.clone(), 0, 0);
        hub.handle_frame(now, hello("s1", me.clone(), PROTOCOL_VERSION)).unwrap();
        while hub.poll_effect().is_some() {}
        let mut lineage = HubLineage::default();
        lineage.advance(head, &[], &[]);
        hub.accept(now, PeerAccept { lineage, ..PeerAccept::default() }).unwrap();
        while hub.poll_transmit().is_some() {}
        while hub.poll_effect().is_some() {}
        hub
    };
    let delta = |after: u64, head: Checkpoint| {
        let mut d = Delta::build(after, after + 1, [(&k, &me, PnEntry { p: 0, n: 1 })]);
        d.lineage = Some(DeltaLineage { head, boots: vec![] });
        via_wire(Frame::V1(FrameV1::Delta(d)))
    };

    let mut hub = accept(c(5, 1));
    let err = hub.handle_frame(now, delta(0, c(4, 1))).unwrap_err();
    assert_eq!(err.code, close_code::FORKED, "behind: {err}");
    let mut hub = accept(c(5, 1));
    let err = hub.handle_frame(now, delta(0, c(5, 2))).unwrap_err();
    assert_eq!(err.code, close_code::FORKED, "beside: {err}");

    let mut hub = accept(c(5, 1));
    hub.handle_frame(now, delta(0, c(7, 3))).unwrap();
    hub.handle_frame(now, delta(1, c(9, 4))).unwrap();
    let bases: Vec<Option<Checkpoint>> = std::iter::from_fn(|| hub.poll_effect())
        .filter_map(|e| match e {
            Effect::ApplyDelta { lineage_base, .. } => Some(lineage_base),
            _ => None,
        })
        .collect();
    assert_eq!(bases, vec![Some(c(5, 1)), Some(c(7, 3))]);
}
