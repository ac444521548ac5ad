//! A deterministic, seeded simulation of one hub and several agents driven through the sans-IO
//! sessions, with in-memory "durable" stores, frame loss, duplication, reordering, partitions and
//! crash-restarts. After healing, every replica must converge and every change must be counted
//! exactly once.
//!
//! A failing seed is printed; add it to `REGRESSION_SEEDS` so it runs forever after.
//! `SHELFSYNC_SIM_SEEDS=N` runs N random seeds besides the regression list.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use shelfsync_shared::counter::{CounterMap, PnEntry, StateDigest};
use shelfsync_shared::sync::{
    AgentResume, AgentSession, DeltaRead, Effect, HubSession, JournalRead, SessionError, StreamKind, SyncConfig,
};
use shelfsync_shared::wire::{self, close_code, Delta, Frame, FrameV1, Hello, JournalBatch, PROTOCOL_VERSION};
use shelfsync_shared::{EventKind, Incarnation, JournalEvent, NodeId, Sku, StoreId, WriterId};
use uuid::Uuid;

const REGRESSION_SEEDS: &[u64] = &[1, 2, 3, 42, 0x5eed, 0xdead_beef];
const STEPS: usize = 3000;
const STORES: usize = 5;
const SKUS: usize = 4;

fn cfg() -> SyncConfig {
    // Small frames so ranges split into several chunks.
    SyncConfig { delta_limit: 3, journal_limit: 4, window: 2, ..SyncConfig::default() }
}

fn sku(i: usize) -> Sku {
    format!("SKU-{i}").parse().unwrap()
}

/// An apply the host has started but not yet committed (lost on crash).
enum Pending {
    Delta(WriterId, Delta),
    Journal(WriterId, JournalBatch),
}

struct Agent {
    store: StoreId,
    writer: WriterId,
    counters: CounterMap,
    hub_writer: Option<WriterId>,
    applied: u64,
    journal_applied: u64,
    journal: Vec<(u64, JournalEvent)>,
    journal_keys: HashSet<(Uuid, u32)>,
    session: Option<AgentSession>,
    pending: VecDeque<Pending>,
}

impl Agent {
    fn journal_head(&self) -> u64 {
        self.journal.last().map_or(0, |(s, _)| *s)
    }
    fn add_event(&mut self, e: JournalEvent) {
        if self.journal_keys.insert((e.id, e.line)) {
            let seq = self.journal_head() + 1;
            self.journal.push((seq, e));
        }
    }
}

#[derive(Default)]
struct HubDb {
    seq: u64,
    entries: BTreeMap<(StoreId, Sku, WriterId), (PnEntry, u64)>,
    peers: HashMap<(StoreId, WriterId), (u64, u64)>,
    journal: Vec<(u64, JournalEvent)>,
    journal_keys: HashSet<(StoreId, Uuid, u32)>,
}

impl HubDb {
    fn merge(&mut self, store: &StoreId, sku: &Sku, w: &WriterId, e: PnEntry) {
        let key = (store.clone(), sku.clone(), w.clone());
        let cur = self.entries.get(&key).map(|x| x.0).unwrap_or_default();
        if !cur.covers(e) {
            self.seq += 1;
            self.entries.insert(key, (cur.join(e), self.seq));
        }
    }
    fn journal_head(&self) -> u64 {
        self.journal.last().map_or(0, |(s, _)| *s)
    }
    fn add_event(&mut self, e: JournalEvent) {
        if self.journal_keys.insert((e.store.clone(), e.id, e.line)) {
            let seq = self.journal_head() + 1;
            self.journal.push((seq, e));
        }
    }
    fn store_state(&self, store: &StoreId) -> BTreeMap<(Sku, WriterId), PnEntry> {
        self.entries
            .iter()
            .filter(|((s, ..), _)| s == store)
            .map(|((_, k, w), (e, _))| ((k.clone(), w.clone()), *e))
            .collect()
    }
}

/// One link: frames in flight per direction and stream, encoded.
#[derive(Default)]
struct Link {
    up: [VecDeque<Vec<u8>>; 2],
    down: [VecDeque<Vec<u8>>; 2],
    connected: bool,
    /// A frame was lost: a real QUIC connection would be dead (its idle timeout closes it).
    doomed: bool,
}

fn lane(k: StreamKind) -> usize {
    match k {
        StreamKind::State => 0,
        StreamKind::Journal => 1,
    }
}

struct Sim {
    rng: StdRng,
    t0: Instant,
    ms: u64,
    hub_writer: WriterId,
    hub: HubDb,
    hub_sessions: HashMap<usize, HubSession>,
    hub_pending: VecDeque<(usize, Pending)>,
    agents: Vec<Agent>,
    links: Vec<Link>,
    ledger: BTreeMap<(StoreId, Sku), i64>,
    faults: bool,
    next_event: u64,
    resyncs: u64,
    digests: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(seed ^ 0xabcdef));
        let agents = (0..STORES)
            .map(|i| {
                let store: StoreId = format!("store-{i}").parse().unwrap();
                Agent {
                    writer: WriterId::new(
                        NodeId::Store(store.clone()),
                        Incarnation::from_u64(seed.wrapping_add(i as u64)),
                    ),
                    store,
                    counters: CounterMap::new(),
                    hub_writer: None,
                    applied: 0,
                    journal_applied: 0,
                    journal: Vec::new(),
                    journal_keys: HashSet::new(),
                    session: None,
                    pending: VecDeque::new(),
                }
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed),
            t0: Instant::now(),
            ms: 0,
            hub_writer,
            hub: HubDb::default(),
            hub_sessions: HashMap::new(),
            hub_pending: VecDeque::new(),
            agents,
            links: (0..STORES).map(|_| Link::default()).collect(),
            ledger: BTreeMap::new(),
            faults: true,
            next_event: 1,
            resyncs: 0,
            digests: 0,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.ms)
    }

    fn event_id(&mut self) -> Uuid {
        self.next_event += 1;
        Uuid::from_u128(self.next_event as u128)
    }

    fn connect(&mut self, i: usize) {
        self.disconnect(i);
        let a = &mut self.agents[i];
        let resume = AgentResume {
            hub_writer: a.hub_writer.clone(),
            applied: a.applied,
            journal_applied: a.journal_applied,
            head: a.counters.head(),
            journal_head: a.journal_head(),
        };
        a.session = Some(AgentSession::new(cfg(), a.store.clone(), a.writer.clone(), resume));
        let hs =
            HubSession::new(cfg(), a.store.clone(), self.hub_writer.clone(), self.hub.seq, self.hub.journal_head());
        self.hub_sessions.insert(i, hs);
        self.links[i].connected = true;
        self.pump(i);
    }

    /// Both ends drop the connection; in-flight frames vanish. Pending applies stay (the hosts
    /// will commit them; only a crash loses them) but acks for them go nowhere.
    fn disconnect(&mut self, i: usize) {
        self.agents[i].session = None;
        self.hub_sessions.remove(&i);
        self.links[i] = Link::default();
    }

    fn close_on(&mut self, i: usize, r: Result<(), SessionError>) {
        if r.is_err() {
            self.disconnect(i);
        }
    }

    /// Moves transmits onto the link and fulfils effects until both sessions are quiet.
    fn pump(&mut self, i: usize) {
        for _ in 0..10_000 {
            let mut progressed = false;
            let now = self.now();
            if let Some(s) = self.agents[i].session.as_mut() {
                while let Some(t) = s.poll_transmit() {
                    progressed = true;
                    self.links[i].up[lane(t.stream)].push_back(wire::encode(&t.frame).unwrap());
                }
            }
            if let Some(s) = self.hub_sessions.get_mut(&i) {
                while let Some(t) = s.poll_transmit() {
                    progressed = true;
                    self.links[i].down[lane(t.stream)].push_back(wire::encode(&t.frame).unwrap());
                }
            }
            let effect = self.agents[i].session.as_mut().and_then(|s| s.poll_effect());
            if let Some(e) = effect {
                progressed = true;
                let r = self.agent_effect(i, e, now);
                self.close_on(i, r);
            }
            let effect = self.hub_sessions.get_mut(&i).and_then(|s| s.poll_effect());
            if let Some(e) = effect {
                progressed = true;
                let r = self.hub_effect(i, e, now);
                self.close_on(i, r);
            }
            if !progressed {
                return;
            }
        }
        panic!("session {i} never settles");
    }

    fn agent_effect(&mut self, i: usize, e: Effect, now: Instant) -> Result<(), SessionError> {
        let a = &mut self.agents[i];
        let Some(mut session) = a.session.take() else { return Ok(()) };
        let r = Self::agent_effect_on(a, &mut session, e, now);
        a.session = Some(session);
        r
    }

    fn agent_effect_on(a: &mut Agent, s: &mut AgentSession, e: Effect, now: Instant) -> Result<(), SessionError> {
        match e {
            Effect::ReadDelta { after, limit, .. } => {
                let mut entries = Vec::new();
                let mut last = after;
                for (seq, sku, w, e) in a.counters.delta_since(after) {
                    if !w.is_store(&a.store) {
                        continue;
                    }
                    entries.push((sku, w, e));
                    last = seq;
                    if entries.len() == limit {
                        break;
                    }
                }
                let upto = if entries.len() == limit { last } else { a.counters.head().max(after) };
                s.delta_read(now, DeltaRead { upto, entries, fulfilled: vec![] })
            }
            Effect::ReadJournal { after, limit } => {
                let mut events = Vec::new();
                let mut last = after;
                for (seq, e) in a.journal.iter().filter(|(seq, e)| *seq > after && e.writer.is_store(&a.store)) {
                    events.push(e.clone());
                    last = *seq;
                    if events.len() == limit {
                        break;
                    }
                }
                let upto = if events.len() == limit { last } else { a.journal_head().max(after) };
                s.journal_read(now, JournalRead { upto, events })
            }
            Effect::ApplyDelta { peer, delta } => {
                a.pending.push_back(Pending::Delta(peer, delta));
                Ok(())
            }
            Effect::ApplyJournal { peer, batch } => {
                a.pending.push_back(Pending::Journal(peer, batch));
                Ok(())
            }
            Effect::ComputeDigest => {
                let d = a.counters.digest();
                let head = a.counters.head();
                s.digest_computed(now, d, head)
            }
            Effect::Established { .. } | Effect::Acked { .. } | Effect::JournalAcked { .. } => Ok(()),
            Effect::ApplyHolds { .. } => Ok(()),
            Effect::LookupPeer { .. } | Effect::DigestCompared { .. } => panic!("hub-only effect at an agent"),
        }
    }

    fn hub_effect(&mut self, i: usize, e: Effect, now: Instant) -> Result<(), SessionError> {
        let store = self.agents[i].store.clone();
        let hub = &mut self.hub;
        let Some(s) = self.hub_sessions.get_mut(&i) else { return Ok(()) };
        match e {
            Effect::LookupPeer { writer } => {
                let (applied, japplied) = hub.peers.get(&(store, writer)).copied().unwrap_or((0, 0));
                s.accept(now, applied, japplied)
            }
            Effect::ReadDelta { after, limit, full } => {
                let exclude = if full { None } else { s.peer().cloned() };
                let mut rows: Vec<_> = hub
                    .entries
                    .iter()
                    .filter(|((st, _, w), (_, seq))| *st == store && *seq > after && Some(w) != exclude.as_ref())
                    .map(|((_, k, w), (e, seq))| (*seq, k.clone(), w.clone(), *e))
                    .collect();
                rows.sort_by_key(|r| r.0);
                rows.truncate(limit);
                let upto = if rows.len() == limit { rows.last().unwrap().0 } else { hub.seq.max(after) };
                s.delta_read(
                    now,
                    DeltaRead {
                        upto,
                        entries: rows.into_iter().map(|(_, k, w, e)| (k, w, e)).collect(),
                        fulfilled: vec![],
                    },
                )
            }
            Effect::ReadJournal { after, limit } => {
                let mut events = Vec::new();
                let mut last = after;
                for (seq, e) in
                    hub.journal.iter().filter(|(seq, e)| *seq > after && e.store == store && e.writer.is_hub())
                {
                    events.push(e.clone());
                    last = *seq;
                    if events.len() == limit {
                        break;
                    }
                }
                let upto = if events.len() == limit { last } else { hub.journal_head().max(after) };
                s.journal_read(now, JournalRead { upto, events })
            }
            Effect::ApplyDelta { peer, delta } => {
                self.hub_pending.push_back((i, Pending::Delta(peer, delta)));
                Ok(())
            }
            Effect::ApplyJournal { peer, batch } => {
                self.hub_pending.push_back((i, Pending::Journal(peer, batch)));
                Ok(())
            }
            Effect::ComputeDigest => {
                let mut d = StateDigest::default();
                let mut head = 0;
                for ((st, k, w), (e, seq)) in &hub.entries {
                    if *st == store {
                        d.add(k, w, *e);
                        head = head.max(*seq);
                    }
                }
                s.digest_computed(now, d, head)
            }
            Effect::DigestCompared { matched } => {
                self.digests += 1;
                if !matched {
                    self.resyncs += 1;
                }
                Ok(())
            }
            Effect::Established { .. } | Effect::Acked { .. } | Effect::JournalAcked { .. } => Ok(()),
            Effect::ApplyHolds { .. } => panic!("agent-only effect at the hub"),
        }
    }

    /// The agent host commits its oldest pending apply.
    fn commit_agent(&mut self, i: usize) {
        let now = self.now();
        let a = &mut self.agents[i];
        let Some(p) = a.pending.pop_front() else { return };
        let r = match p {
            Pending::Delta(peer, delta) => {
                if a.hub_writer.as_ref() != Some(&peer) {
                    a.hub_writer = Some(peer);
                    a.applied = 0;
                    a.journal_applied = 0;
                }
                a.counters.merge(delta.entries()).unwrap();
                a.applied = a.applied.max(delta.upto);
                let (h, j) = (a.counters.head(), a.journal_head());
                a.session.as_mut().map(|s| {
                    let r = s.delta_applied(now, delta.upto);
                    // The real agent's writer thread publishes its new heads after every commit.
                    s.local_head(now, h, j);
                    r
                })
            }
            Pending::Journal(peer, batch) => {
                if a.hub_writer.as_ref() != Some(&peer) {
                    a.hub_writer = Some(peer);
                    a.applied = 0;
                    a.journal_applied = 0;
                }
                for e in &batch.events {
                    assert_eq!(e.store, a.store);
                    a.add_event(e.clone());
                }
                a.journal_applied = a.journal_applied.max(batch.upto);
                a.session.as_mut().map(|s| s.journal_applied(now, batch.upto))
            }
        };
        // A commit after a reconnect belongs to the old connection: the new session never asked
        // for it, so the host must not report it there (real hosts hold the session they serve).
        if let Some(Err(_)) = r {
            self.disconnect(i);
        }
        self.pump(i);
    }

    fn commit_hub(&mut self) {
        let now = self.now();
        let Some((i, p)) = self.hub_pending.pop_front() else { return };
        let store = self.agents[i].store.clone();
        let r = match p {
            Pending::Delta(peer, delta) => {
                for (k, w, e) in delta.entries() {
                    assert!(w.is_store(&store), "the session let a foreign writer through");
                    self.hub.merge(&store, k, w, e);
                }
                let m = self.hub.peers.entry((store, peer)).or_default();
                m.0 = m.0.max(delta.upto);
                let (h, j) = (self.hub.seq, self.hub.journal_head());
                self.hub_sessions.get_mut(&i).map(|s| {
                    let r = s.delta_applied(now, delta.upto);
                    // As the real hub does: its own session learns the new heads, so its outbox
                    // knows the merged entries need not go back.
                    s.local_head(now, h, j);
                    r
                })
            }
            Pending::Journal(peer, batch) => {
                for e in &batch.events {
                    self.hub.add_event(e.clone());
                }
                let m = self.hub.peers.entry((store, peer)).or_default();
                m.1 = m.1.max(batch.upto);
                self.hub_sessions.get_mut(&i).map(|s| s.journal_applied(now, batch.upto))
            }
        };
        if let Some(Err(_)) = r {
            self.disconnect(i);
        }
        self.pump(i);
    }

    fn local_sale(&mut self, i: usize) {
        let k = sku(self.rng.random_range(0..SKUS));
        let delta: i64 =
            if self.rng.random_bool(0.8) { -self.rng.random_range(1..4) } else { self.rng.random_range(1..3) };
        let id = self.event_id();
        let now = self.now();
        let a = &mut self.agents[i];
        a.counters.apply(&k, &a.writer.clone(), delta).unwrap();
        let e = JournalEvent {
            id,
            line: 0,
            kind: if delta < 0 { EventKind::Sale } else { EventKind::Return },
            store: a.store.clone(),
            sku: k.clone(),
            delta,
            reason: None,
            occurred_at_ms: self.ms as i64,
            recorded_at_ms: self.ms as i64,
            writer: a.writer.clone(),
            flags: vec![],
        };
        a.add_event(e);
        *self.ledger.entry((a.store.clone(), k)).or_default() += delta;
        let (h, j) = (a.counters.head(), a.journal_head());
        if let Some(s) = a.session.as_mut() {
            s.local_head(now, h, j);
        }
        self.pump(i);
    }

    fn restock(&mut self, i: usize) {
        let k = sku(self.rng.random_range(0..SKUS));
        let qty: i64 = self.rng.random_range(1..10);
        let store = self.agents[i].store.clone();
        let hw = self.hub_writer.clone();
        let cur = self.hub.entries.get(&(store.clone(), k.clone(), hw.clone())).map(|x| x.0).unwrap_or_default();
        let next = cur.apply(&hw, qty).unwrap();
        self.hub.merge(&store, &k, &hw, next);
        let id = self.event_id();
        self.hub.add_event(JournalEvent {
            id,
            line: 0,
            kind: EventKind::Restock,
            store: store.clone(),
            sku: k.clone(),
            delta: qty,
            reason: None,
            occurred_at_ms: self.ms as i64,
            recorded_at_ms: self.ms as i64,
            writer: hw,
            flags: vec![],
        });
        *self.ledger.entry((store, k)).or_default() += qty;
        let (h, j, now) = (self.hub.seq, self.hub.journal_head(), self.now());
        if let Some(s) = self.hub_sessions.get_mut(&i) {
            s.local_head(now, h, j);
        }
        self.pump(i);
    }

    /// Delivers (or mangles) the next frame of one queue of link `i`.
    fn deliver(&mut self, i: usize, up: bool, stream: usize) {
        let faults = self.faults;
        let roll: f64 = self.rng.random_range(0.0..1.0);
        let q = if up { &mut self.links[i].up[stream] } else { &mut self.links[i].down[stream] };
        let Some(bytes) = q.pop_front() else { return };
        if faults && roll < 0.03 {
            self.links[i].doomed = true;
            return; // lost
        }
        if faults && roll < 0.06 {
            q.push_front(bytes.clone()); // duplicated
        } else if faults && roll < 0.09 && !q.is_empty() {
            let next = q.pop_front().unwrap(); // reordered
            q.push_front(bytes);
            q.push_front(next);
            return;
        }
        let (frame, used) = wire::decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        let now = self.now();
        let r = if up {
            match self.hub_sessions.get_mut(&i) {
                Some(s) => s.handle_frame(now, frame),
                None => Ok(()),
            }
        } else {
            match self.agents[i].session.as_mut() {
                Some(s) => s.handle_frame(now, frame),
                None => Ok(()),
            }
        };
        self.pump(i);
        self.close_on(i, r);
    }

    fn fire_timers(&mut self) {
        let now = self.now();
        for i in 0..STORES {
            if self.links[i].doomed {
                self.disconnect(i); // the idle timeout of a connection that lost a frame
                continue;
            }
            if let Some(s) = self.agents[i].session.as_mut() {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
            if let Some(s) = self.hub_sessions.get_mut(&i) {
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
            self.pump(i);
        }
    }

    fn crash_agent(&mut self, i: usize) {
        self.disconnect(i);
        self.agents[i].pending.clear();
    }

    fn crash_hub(&mut self) {
        for i in 0..STORES {
            self.disconnect(i);
        }
        self.hub_pending.clear();
    }

    fn step(&mut self) {
        self.ms += self.rng.random_range(0..5);
        let i = self.rng.random_range(0..STORES);
        match self.rng.random_range(0..100) {
            0..=24 => self.local_sale(i),
            25..=29 => self.restock(i),
            30..=69 => {
                let up = self.rng.random_bool(0.5);
                let stream = if self.rng.random_bool(0.8) { 0 } else { 1 };
                self.deliver(i, up, stream);
            }
            70..=79 => self.commit_agent(i),
            80..=89 => self.commit_hub(),
            90..=93 => {
                if !self.links[i].connected {
                    self.connect(i);
                }
            }
            94..=95 => self.disconnect(i),
            96 => self.crash_agent(i),
            97 => {
                if self.rng.random_bool(0.2) {
                    self.crash_hub();
                }
            }
            _ => self.fire_timers(),
        }
    }

    fn quiet(&self) -> bool {
        self.hub_pending.is_empty()
            && (0..STORES).all(|i| {
                let l = &self.links[i];
                l.connected
                    && l.up.iter().chain(l.down.iter()).all(VecDeque::is_empty)
                    && self.agents[i].pending.is_empty()
                    && self.agents[i].session.as_ref().is_some_and(|s| s.is_established() && s.is_idle())
                    && self.hub_sessions.get(&i).is_some_and(|s| s.is_established() && s.is_idle())
            })
    }

    /// No more faults: reconnect everything and run until quiet (and one digest round later).
    fn heal(&mut self) -> Result<(), String> {
        self.faults = false;
        for i in 0..STORES {
            if self.links[i].doomed {
                self.disconnect(i);
            }
        }
        let mut quiet_rounds = 0;
        for round in 0..20_000 {
            for i in 0..STORES {
                if !self.links[i].connected {
                    self.connect(i);
                }
                for up in [true, false] {
                    for stream in 0..2 {
                        while !(if up { &self.links[i].up[stream] } else { &self.links[i].down[stream] }).is_empty() {
                            self.deliver(i, up, stream);
                        }
                    }
                }
                while !self.agents[i].pending.is_empty() {
                    self.commit_agent(i);
                }
            }
            while !self.hub_pending.is_empty() {
                self.commit_hub();
            }
            if self.quiet() {
                quiet_rounds += 1;
                if quiet_rounds > 120 {
                    return Ok(());
                }
            } else {
                quiet_rounds = 0;
            }
            self.ms += if round % 50 == 49 { 31_000 } else { 100 }; // now and then past a digest interval
            self.fire_timers();
        }
        let why: Vec<String> = (0..STORES)
            .map(|i| {
                let l = &self.links[i];
                format!(
                    "link {i}: connected {} queued {:?} pending {} agent {:?} hub {:?}",
                    l.connected,
                    l.up.iter().chain(l.down.iter()).map(VecDeque::len).collect::<Vec<_>>(),
                    self.agents[i].pending.len(),
                    self.agents[i].session.as_ref().map(|s| (s.is_established(), s.is_idle())),
                    self.hub_sessions.get(&i).map(|s| (s.is_established(), s.is_idle())),
                )
            })
            .collect();
        Err(format!("did not quiesce after healing: {why:?}"))
    }

    fn check(&self) -> Result<(), String> {
        for a in &self.agents {
            let at_hub = self.hub.store_state(&a.store);
            let at_agent = a.counters.state();
            if at_hub != at_agent {
                return Err(format!("{}: agent {at_agent:?} != hub {at_hub:?}", a.store));
            }
            for k in 0..SKUS {
                let k = sku(k);
                let expected = self.ledger.get(&(a.store.clone(), k.clone())).copied().unwrap_or(0);
                let got = a.counters.value(&k).unwrap();
                if got != expected {
                    return Err(format!("{} {k}: value {got}, ledger says {expected}", a.store));
                }
            }
            for (_, e) in &a.journal {
                if e.writer.is_store(&a.store) && !self.hub.journal_keys.contains(&(a.store.clone(), e.id, e.line)) {
                    return Err(format!("hub misses {}'s event {}", a.store, e.id));
                }
            }
            for (_, e) in &self.hub.journal {
                if e.store == a.store && !a.journal_keys.contains(&(e.id, e.line)) {
                    return Err(format!("{} misses hub event {}", a.store, e.id));
                }
            }
        }
        Ok(())
    }
}

fn run(seed: u64) -> Result<Sim, String> {
    let mut sim = Sim::new(seed);
    for i in 0..STORES {
        sim.connect(i);
    }
    for _ in 0..STEPS {
        sim.step();
    }
    sim.heal()?;
    sim.check()?;
    Ok(sim)
}

fn run_or_panic(seed: u64) -> Sim {
    match std::panic::catch_unwind(|| run(seed)) {
        Ok(Ok(sim)) => sim,
        Ok(Err(reason)) => panic!("simulation failed for seed {seed:#x}: {reason}; add it to REGRESSION_SEEDS"),
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("simulation panicked for seed {seed:#x}: {msg:?}; add it to REGRESSION_SEEDS")
        }
    }
}

#[test]
fn regression_seeds_converge() {
    for &seed in REGRESSION_SEEDS {
        let sim = run_or_panic(seed);
        let changes: usize = sim.agents.iter().map(|a| a.journal.len()).sum();
        assert!(changes > 100, "seed {seed:#x} exercised too little ({changes} events)");
        assert!(sim.digests > 0, "seed {seed:#x}: anti-entropy never compared digests");
        assert_eq!(sim.resyncs, 0, "seed {seed:#x}: digests differed without any divergence");
    }
}

#[test]
fn random_seeds_converge() {
    let n: u64 = std::env::var("SHELFSYNC_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let base: u64 = rand::random();
    let started = Instant::now();
    for k in 0..n {
        run_or_panic(base.wrapping_add(k));
    }
    eprintln!("{n} random seeds x {STEPS} steps in {:?} (base seed {base:#x})", started.elapsed());
}

#[test]
fn anti_entropy_repairs_a_divergence() {
    let mut sim = Sim::new(7);
    for i in 0..STORES {
        sim.connect(i);
    }
    for _ in 0..200 {
        let i = sim.rng.random_range(0..STORES);
        sim.local_sale(i);
    }
    sim.heal().unwrap();
    sim.check().unwrap();
    // Behind every session's back, the hub loses one of store-0's entries (a bad restore, a bug).
    let store = sim.agents[0].store.clone();
    let key = sim.hub.entries.keys().find(|(s, ..)| *s == store).cloned().expect("store-0 sold something");
    sim.hub.entries.remove(&key);
    assert!(sim.check().is_err(), "the tampering is visible");
    let before = sim.resyncs;
    sim.heal().unwrap(); // includes digest rounds
    assert!(sim.resyncs > before, "the digest comparison noticed ({} comparisons)", sim.digests);
    sim.check().unwrap();
}

fn hello(store: &str, writer: WriterId, protocol: u32) -> Frame {
    Frame::V1(FrameV1::Hello(Hello {
        protocol,
        store: store.parse().unwrap(),
        writer,
        hub_writer: None,
        applied: 0,
        journal_applied: 0,
    }))
}

#[test]
fn foreign_writers_and_wrong_versions_are_refused() {
    let now = Instant::now();
    let hub_writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(1));
    let me = WriterId::new(NodeId::Store("s1".parse().unwrap()), Incarnation::from_u64(2));
    let other = WriterId::new(NodeId::Store("s2".parse().unwrap()), Incarnation::from_u64(3));

    let mut hub = HubSession::new(cfg(), "s1".parse().unwrap(), hub_writer.clone(), 0, 0);
    hub.handle_frame(now, hello("s1", me.clone(), PROTOCOL_VERSION)).unwrap();
    assert!(matches!(hub.poll_effect(), Some(Effect::LookupPeer { .. })));
    hub.accept(now, 0, 0).unwrap();
    let k = sku(0);
    let delta = Delta::build(0, 1, [(&k, &other, PnEntry { p: 5, n: 0 })]);
    let err = hub.handle_frame(now, Frame::V1(FrameV1::Delta(delta))).unwrap_err();
    assert_eq!(err.code, close_code::UNAUTHORIZED);
    assert!(err.message.contains("s2@"), "{err}");
    // The refusal is also told to the peer before closing.
    let mut saw_error = false;
    while let Some(t) = hub.poll_transmit() {
        saw_error |= matches!(t.frame, Frame::V1(FrameV1::Error(ref e)) if e.code == close_code::UNAUTHORIZED);
    }
    assert!(saw_error);

    let mut hub = HubSession::new(cfg(), "s1".parse().unwrap(), hub_writer.clone(), 0, 0);
    let err = hub.handle_frame(now, hello("s1", me.clone(), PROTOCOL_VERSION + 1)).unwrap_err();
    assert_eq!(err.code, close_code::VERSION_MISMATCH);

    let mut hub = HubSession::new(cfg(), "s1".parse().unwrap(), hub_writer.clone(), 0, 0);
    let err = hub.handle_frame(now, hello("s2", other, PROTOCOL_VERSION)).unwrap_err();
    assert_eq!(err.code, close_code::UNAUTHORIZED, "the certificate's store wins over the hello's");

    // An agent refuses a hub speaking another version.
    let mut agent = AgentSession::new(cfg(), "s1".parse().unwrap(), me, AgentResume::default());
    let welcome = Frame::V1(FrameV1::Welcome(shelfsync_shared::wire::Welcome {
        protocol: 9,
        hub_writer,
        applied: 0,
        journal_applied: 0,
    }));
    assert_eq!(agent.handle_frame(now, welcome).unwrap_err().code, close_code::VERSION_MISMATCH);
}
