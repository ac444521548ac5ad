//! Several hubs on one PostgreSQL database: one of them decides (it holds the lease), the others
//! stand by, forward HTTP requests to it and refuse agents (which fail over to the next address in
//! their bundle). The lease is a row with an epoch that every takeover increments; the active hub
//! renews it every second and every batch it commits first checks, under a share lock on that
//! row, that the epoch is still its own ([`Fence`]). A hub that was paused past its lease (or cut
//! from the database) therefore cannot write when it resumes: its commit fails and it stops
//! (fail-stop), and the hub that took over has loaded everything committed before the takeover.
//!
//! Time is the database's (`now()`), never a hub's clock.
//!
//! The server decides for one partition (the whole chain) through [`acquire`] and [`hold`]. For
//! SKU partitions spread over the hubs (`hub/docs/scale-out.md` §2) there is one lease per
//! partition: [`place`] says, without I/O, which partitions a hub should take or give up so that
//! every live hub holds its share, and [`keep`] runs that every tick against the database,
//! telling the hub what it gained, lost, and should hand over ([`LeaseEvent`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shelfsync_hub_core::{Partition, Partitions};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::storage::{StorageError, StorageResult};

/// How long a lease lasts without renewal, by default (`storage.lease_ms`).
pub const LEASE: Duration = Duration::from_secs(3);
/// How often the active hub renews, and a standby tries to take over, by default
/// (`storage.lease_renew_ms`).
pub const TICK: Duration = Duration::from_millis(500);

/// The partition every decision belongs to today.
pub const PARTITION: i32 = 0;

/// [`PARTITION`] as a partition number.
const FIRST: Partition = 0;

/// Schema of the coordination tables (PostgreSQL migration 2).
pub const MIGRATION: &str = "
    CREATE TABLE hubs (
        id TEXT PRIMARY KEY, http_addr TEXT NOT NULL, quic_addr TEXT NOT NULL,
        started_at TIMESTAMPTZ NOT NULL, heartbeat_at TIMESTAMPTZ NOT NULL);
    CREATE TABLE leases (
        partition INTEGER PRIMARY KEY, owner TEXT, epoch BIGINT NOT NULL DEFAULT 0,
        expires_at TIMESTAMPTZ NOT NULL DEFAULT now(), taken_at TIMESTAMPTZ);
    INSERT INTO leases (partition) VALUES (0) ON CONFLICT (partition) DO NOTHING;";

/// The epoch the hub's writes must carry: 0 until it holds the lease. Shared by the lease loop
/// and the storage writer.
#[derive(Clone, Debug)]
pub struct Fence {
    epoch: Arc<AtomicI64>,
    lease: Duration,
}

impl Fence {
    /// A fence for leases lasting `lease`, holding none yet.
    pub fn new(lease: Duration) -> Fence {
        Fence { epoch: Arc::default(), lease }
    }

    /// The epoch held (0: none).
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A fence at `epoch` with the default lease (the lease loop sets it; tests make their own).
    pub fn at(epoch: i64) -> Fence {
        Fence::holding(LEASE, epoch)
    }

    /// A fence at `epoch` of a lease lasting `lease` (a partition's, from [`LeaseEvent::Gained`]).
    pub fn holding(lease: Duration, epoch: i64) -> Fence {
        let f = Fence::new(lease);
        f.set(epoch);
        f
    }

    fn set(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// What the writer's session sets first. A commit holds the lease row's share lock, so a hub
    /// paused (or cut off) in the middle of one would stall every takeover for as long as it
    /// stays paused; the database ends such a session once it has idled in its transaction for a
    /// lease, which releases the lock and aborts the commit.
    pub fn session_setup(&self) -> String {
        format!("SET idle_in_transaction_session_timeout = {}", self.lease.as_millis().max(1))
    }

    /// The statement every fenced commit runs first (argument: the partition). The share lock
    /// makes a takeover wait for the commit, and the commit wait for a takeover in progress.
    pub const CHECK: &'static str = "SELECT epoch FROM leases WHERE partition = $1 FOR SHARE";
}

/// Whom a lease was taken from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Nobody ever held it.
    Free,
    /// A hub that gave the lease up: it stopped cleanly, or handed the partition over.
    Released,
    /// A hub that stopped renewing without leaving: it died, hangs, or lost the database.
    Expired(String),
}

/// Logs a takeover at the level it deserves: a dead or stalled predecessor is an anomaly.
fn log_taken(coord: &Coordinator, partition: Partition, epoch: i64, taken: &Taken) {
    match taken {
        Taken::Expired(prev) => tracing::warn!(
            partition,
            epoch,
            hub = %coord.hub_id,
            previous = %prev,
            "took the lease over from a hub that stopped renewing it (died, hung, or lost the database)"
        ),
        Taken::Free | Taken::Released => tracing::info!(partition, epoch, hub = %coord.hub_id, "took the lease"),
    }
}

/// One hub's connection for coordination (separate from storage: renewals never queue behind
/// writes).
pub struct Coordinator {
    client: Client,
    /// This hub process's id (new at every start).
    pub hub_id: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
    /// How often the lease is renewed, and a standby tries to take it.
    pub tick: Duration,
}

impl Coordinator {
    /// Connects and records this hub with its addresses.
    pub async fn join(
        url: &str,
        http_addr: &str,
        quic_addr: &str,
        lease: Duration,
        tick: Duration,
    ) -> StorageResult<Coordinator> {
        let client = crate::postgres::connect(url).await?;
        // A takeover waits on the lease row's lock while a commit holds it; it gives up after a
        // tick rather than stalling the loop (a paused holder's session is ended by the database,
        // `Fence::session_setup`).
        client.batch_execute(&format!("SET lock_timeout = {}", tick.as_millis().max(1))).await?;
        let hub_id = uuid::Uuid::now_v7().to_string();
        // Hubs that stopped without leaving (killed) and were not heard of for a day.
        client
            .execute(
                "DELETE FROM hubs WHERE heartbeat_at < now() - interval '1 day'
                   AND id NOT IN (SELECT owner FROM leases WHERE owner IS NOT NULL)",
                &[],
            )
            .await?;
        client
            .execute(
                "INSERT INTO hubs (id, http_addr, quic_addr, started_at, heartbeat_at) VALUES ($1, $2, $3, now(), now())",
                &[&hub_id, &http_addr, &quic_addr],
            )
            .await?;
        Ok(Coordinator { client, hub_id, lease, tick })
    }

    /// Takes the lease if it is free or expired; returns the new epoch and whom it was taken from
    /// ([`Taken`]).
    pub async fn try_acquire(&self) -> StorageResult<Option<(i64, Taken)>> {
        self.try_acquire_partition(FIRST).await
    }

    /// Extends the lease held at `epoch`; false if it is not ours any more.
    pub async fn renew(&self, epoch: i64) -> StorageResult<bool> {
        self.renew_partition(FIRST, epoch).await
    }

    /// Records that this hub is alive.
    pub async fn heartbeat(&self) -> StorageResult<()> {
        self.client.execute("UPDATE hubs SET heartbeat_at = now() WHERE id = $1", &[&self.hub_id]).await?;
        Ok(())
    }

    /// Gives the lease up and leaves (a clean stop), so a standby takes over at once.
    pub async fn release(&self, epoch: i64) -> StorageResult<()> {
        self.release_partition(FIRST, epoch).await?;
        self.leave().await
    }

    /// Takes `partition`'s lease if it is free, released or expired; returns the new epoch and
    /// whom it was taken from.
    ///
    /// The row is locked while it is checked, so what [`Taken`] says is the holder this takeover
    /// ended (a lease released while another hub waited for its lock reads as released).
    pub async fn try_acquire_partition(&self, partition: Partition) -> StorageResult<Option<(i64, Taken)>> {
        let row = self
            .client
            .query_opt(
                "WITH prev AS (
                    SELECT l.partition, l.owner, l.taken_at IS NULL AS released,
                           EXISTS (SELECT 1 FROM hubs h WHERE h.id = l.owner) AS registered
                    FROM leases l WHERE l.partition = $1 AND (l.owner IS NULL OR l.expires_at < now())
                    FOR UPDATE OF l)
                 UPDATE leases SET owner = $2, epoch = epoch + 1, expires_at = now() + make_interval(secs => $3),
                    taken_at = now()
                 FROM prev WHERE leases.partition = prev.partition
                 RETURNING leases.epoch, prev.owner, prev.released, prev.registered",
                &[&i32::from(partition), &self.hub_id, &self.lease.as_secs_f64()],
            )
            .await?;
        Ok(row.map(|r| {
            let (owner, released, registered): (Option<String>, bool, bool) = (r.get(1), r.get(2), r.get(3));
            let taken = match owner {
                None => Taken::Free,
                // A hub that is still registered and did not give the lease up stopped renewing.
                Some(o) if !released && registered && o != self.hub_id => Taken::Expired(o),
                Some(_) => Taken::Released,
            };
            (r.get(0), taken)
        }))
    }

    /// Extends `partition`'s lease held at `epoch`; false if it is not ours any more (taken over,
    /// or released).
    pub async fn renew_partition(&self, partition: Partition, epoch: i64) -> StorageResult<bool> {
        let n = self
            .client
            .execute(
                "UPDATE leases SET expires_at = now() + make_interval(secs => $4)
                 WHERE partition = $1 AND owner = $2 AND epoch = $3 AND taken_at IS NOT NULL",
                &[&i32::from(partition), &self.hub_id, &epoch, &self.lease.as_secs_f64()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Gives `partition`'s lease held at `epoch` up: it expires now, so another hub takes it at
    /// once (as [`Taken::Released`]); this hub stays registered. False if it was not ours any
    /// more. The hub must have stopped writing to the partition first: the epoch stays the
    /// fence's until the next takeover.
    pub async fn release_partition(&self, partition: Partition, epoch: i64) -> StorageResult<bool> {
        // `taken_at` is cleared to mark the lease given up rather than expired (no holding began
        // since); the owner stays, for `status`.
        let n = self
            .client
            .execute(
                "UPDATE leases SET expires_at = now() - interval '1 second', taken_at = NULL
                 WHERE partition = $1 AND owner = $2 AND epoch = $3",
                &[&i32::from(partition), &self.hub_id, &epoch],
            )
            .await?;
        Ok(n == 1)
    }

    /// Removes this hub from the hubs the others count (a clean stop).
    pub async fn leave(&self) -> StorageResult<()> {
        self.client.execute("DELETE FROM hubs WHERE id = $1", &[&self.hub_id]).await?;
        Ok(())
    }

    /// The ids of the hubs that said they were alive within a lease (by the database's clock),
    /// sorted.
    pub async fn live_hubs(&self) -> StorageResult<Vec<String>> {
        let rows = self
            .client
            .query(
                "SELECT id FROM hubs WHERE heartbeat_at > now() - make_interval(secs => $1)",
                &[&self.lease.as_secs_f64()],
            )
            .await?;
        // Sorted here, not by the database's collation: every hub must rank them the same way.
        let mut ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Who holds each partition whose lease is unexpired (the others are free, released or
    /// expired: anyone may take them).
    pub async fn holders(&self) -> StorageResult<BTreeMap<Partition, String>> {
        let rows = self
            .client
            .query("SELECT partition, owner FROM leases WHERE owner IS NOT NULL AND expires_at > now()", &[])
            .await?;
        rows.iter()
            .map(|r| {
                let p: i32 = r.get(0);
                let p = Partition::try_from(p)
                    .map_err(|_| StorageError::Corrupt(format!("the leases table has a partition {p}")))?;
                Ok((p, r.get(1)))
            })
            .collect()
    }
}

/// Tries to take the lease every tick until it does (heartbeating meanwhile); returns the
/// epoch and sets it on `fence`.
pub async fn acquire(coord: &Coordinator, fence: &Fence) -> i64 {
    let mut tick = tokio::time::interval(coord.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = coord.heartbeat().await {
            tracing::warn!(error = %e, "hub heartbeat failed");
        }
        match coord.try_acquire().await {
            Ok(Some((epoch, taken))) => {
                fence.set(epoch);
                log_taken(coord, FIRST, epoch, &taken);
                return epoch;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not take the lease this time; trying again"),
        }
    }
}

/// Takes the lease now if it is free (sets it on `fence`).
pub async fn acquire_now(coord: &Coordinator, fence: &Fence) -> StorageResult<Option<i64>> {
    let taken = coord.try_acquire().await?;
    if let Some((e, how)) = &taken {
        fence.set(*e);
        log_taken(coord, FIRST, *e, how);
    }
    Ok(taken.map(|(e, _)| e))
}

/// Renews the lease held at `epoch` every tick; stops the hub (fail-stop) once it is lost
/// or cannot be renewed before it expires.
pub async fn hold(coord: Arc<Coordinator>, epoch: i64) {
    let mut tick = tokio::time::interval(coord.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        match coord.renew(epoch).await {
            Ok(true) => renewed = tokio::time::Instant::now(),
            Ok(false) => {
                shelfsync_node::fatal::stop(&format!(
                    "lost the lease (epoch {epoch}): another hub took over; this one stops deciding"
                ));
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the lease failed");
                if renewed.elapsed() >= coord.lease {
                    shelfsync_node::fatal::stop(&format!(
                        "could not renew the lease (epoch {epoch}) before it expired: {e}"
                    ));
                    return;
                }
            }
        }
        let _ = coord.heartbeat().await;
    }
}

/// The hubs sharing a database and the lease, for `status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterView {
    /// Partition 0's lease's epoch (the number of takeovers so far).
    pub epoch: i64,
    /// Seconds until partition 0's lease expires (negative: expired), by the database's clock.
    pub lease_expires_in_secs: f64,
    /// Every partition's lease, in order (one unless the database was made with
    /// `init --partitions`).
    pub leases: Vec<LeaseView>,
    /// Every hub the database knows, the active one first.
    pub hubs: Vec<HubView>,
}

/// One partition's lease.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LeaseView {
    /// The partition.
    pub partition: i32,
    /// The hub that holds (or last held) it.
    pub owner: Option<String>,
    /// The number of takeovers so far.
    pub epoch: i64,
    /// Seconds until it expires (negative: expired), by the database's clock.
    pub expires_in_secs: f64,
}

/// One hub as the database knows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HubView {
    /// Its id (new at every start).
    pub id: String,
    /// Where its HTTP API listens.
    pub http_addr: String,
    /// Where agents reach it.
    pub quic_addr: String,
    /// Where other hubs reach it ([`crate::internal`]; none for a hub of an older version).
    pub internal_addr: Option<String>,
    /// Seconds since it last said it is alive.
    pub heartbeat_age_secs: f64,
    /// It holds partition 0's unexpired lease.
    pub active: bool,
    /// The partitions whose unexpired leases it holds.
    pub partitions: Vec<i32>,
}

/// Reads the hubs and the lease.
pub async fn view(c: &Client) -> StorageResult<ClusterView> {
    let leases: Vec<LeaseView> = c
        .query(
            "SELECT partition, owner, epoch, EXTRACT(EPOCH FROM (expires_at - now()))::float8 FROM leases ORDER BY partition",
            &[],
        )
        .await?
        .iter()
        .map(|r| LeaseView { partition: r.get(0), owner: r.get(1), epoch: r.get(2), expires_in_secs: r.get(3) })
        .collect();
    let Some(first) = leases.iter().find(|l| l.partition == PARTITION) else {
        return Err(crate::storage::StorageError::Corrupt("the leases table has no row for partition 0".into()));
    };
    let (owner, epoch, left) = (first.owner.clone(), first.epoch, first.expires_in_secs);
    let mut hubs: Vec<HubView> = c
        .query(
            "SELECT id, http_addr, quic_addr, EXTRACT(EPOCH FROM (now() - heartbeat_at))::float8, internal_addr
             FROM hubs ORDER BY started_at",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            HubView {
                active: left > 0.0 && owner.as_deref() == Some(id.as_str()),
                partitions: leases
                    .iter()
                    .filter(|l| l.expires_in_secs > 0.0 && l.owner.as_deref() == Some(id.as_str()))
                    .map(|l| l.partition)
                    .collect(),
                id,
                http_addr: r.get(1),
                quic_addr: r.get(2),
                heartbeat_age_secs: r.get(3),
                internal_addr: r.get(4),
            }
        })
        .collect();
    hubs.sort_by_key(|h| !h.active);
    Ok(ClusterView { epoch, lease_expires_in_secs: left, leases, hubs })
}

/// What one hub should do with the partitions' leases now ([`place`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free, released or expired partitions to take, lowest first.
    pub take: Vec<Partition>,
    /// Partitions it holds beyond its share, to hand over, highest first.
    pub release: Vec<Partition>,
}

/// How many of `partitions` the hub ranked `rank` (0-based, in id order) among `hubs` live hubs
/// should hold: `floor(P / n)`, plus one for the first `P mod n` hubs.
pub fn share(partitions: Partitions, hubs: usize, rank: usize) -> u16 {
    let (p, n) = (usize::from(partitions.count()), hubs.max(1));
    // At most `p`, which is a u16.
    (p / n + usize::from(rank < p % n)) as u16
}

/// Which partitions `me` should take and give up, given the live hubs (`me` counts as one of
/// them whether listed or not) and who holds each partition whose lease is unexpired (the others
/// are free, released or expired).
///
/// A hub above its [`share`] releases its highest partitions; one below takes the lowest that
/// nobody holds, never one another hub holds. Every hub computes the same shares, so once each
/// holds its own nobody moves.
pub fn place(partitions: Partitions, live: &[String], holders: &BTreeMap<Partition, String>, me: &str) -> Plan {
    let hubs: BTreeSet<&str> = live.iter().map(String::as_str).chain([me]).collect();
    let rank = hubs.iter().position(|h| *h == me).unwrap_or(0);
    let target = usize::from(share(partitions, hubs.len(), rank));
    let mine: Vec<Partition> =
        holders.iter().filter(|(p, h)| h.as_str() == me && **p < partitions.count()).map(|(p, _)| *p).collect();
    if mine.len() > target {
        return Plan { take: Vec::new(), release: mine.iter().rev().take(mine.len() - target).copied().collect() };
    }
    let take = partitions.all().filter(|p| !holders.contains_key(p)).take(target - mine.len()).collect();
    Plan { take, release: Vec::new() }
}

/// What a [`keep`] loop tells its hub, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    /// This hub holds `partition` at `epoch` from now on (it renews it): load it and decide.
    Gained {
        /// The partition.
        partition: Partition,
        /// The epoch its commits must carry.
        epoch: i64,
        /// Whom it was taken from.
        taken: Taken,
    },
    /// This hub holds more than its share: finish this partition's queued commits, stop deciding
    /// for it, then say so with [`Keeper::released`]. It is renewed until then.
    Releasing(Partition),
    /// The partition is not this hub's any more (taken over, or not renewed within a lease):
    /// stop deciding for it; its commits are fenced off already.
    Lost(Partition),
}

/// How many [`LeaseEvent`]s wait for the hub at most. While they are that many, the keeper takes
/// and hands over nothing (losses wait their turn, in order).
pub const EVENTS_MAX: usize = 64;

/// A [`keep`] loop's handle. Dropping every clone stops the loop as [`Keeper::stop`] does.
#[derive(Clone, Debug)]
pub struct Keeper {
    commands: mpsc::Sender<Command>,
    held: watch::Receiver<BTreeMap<Partition, i64>>,
    task: tokio::task::AbortHandle,
}

/// What a [`Keeper`] asks of its loop.
#[derive(Debug)]
enum Command {
    Released(Partition),
    Stop(oneshot::Sender<StorageResult<()>>),
}

impl Keeper {
    /// The partitions held now, with their epochs (those being handed over included).
    pub fn held(&self) -> BTreeMap<Partition, i64> {
        self.held.borrow().clone()
    }

    /// The partitions held, as they change.
    pub fn watch(&self) -> watch::Receiver<BTreeMap<Partition, i64>> {
        self.held.clone()
    }

    /// Says that the hub stopped deciding for `partition` after [`LeaseEvent::Releasing`] (its
    /// queued commits are done): the lease is given up at once. Ignored for a partition not being
    /// handed over.
    pub async fn released(&self, partition: Partition) {
        // An error means the loop has ended, having given up every lease.
        let _ = self.commands.send(Command::Released(partition)).await;
    }

    /// Gives up every lease held and leaves the hubs (a clean stop): other hubs take the
    /// partitions at once. The hub must have stopped writing first. The first error, if any
    /// (a lease that could not be given up expires on its own).
    pub async fn stop(self) -> StorageResult<()> {
        let (tx, rx) = oneshot::channel();
        let gone = || StorageError::Stopped("the lease keeper has ended".into());
        self.commands.send(Command::Stop(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Ends the loop without giving anything up, as if the process died: its leases expire.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// A lease the keeper holds.
#[derive(Clone, Copy, Debug)]
struct Held {
    epoch: i64,
    /// When the last renewal that succeeded was sent (the lease lasts at least that long).
    renewed: Instant,
    /// [`LeaseEvent::Releasing`] was sent: waiting for the hub to say it is done.
    releasing: bool,
}

/// Keeps `coord`'s hub at its share of `partitions`' leases, every `coord.tick`: heartbeats,
/// renews what it holds, and takes and hands over partitions as [`place`] says. What changes is
/// told on the receiver, which the hub must keep reading (a keeper whose receiver is dropped
/// stops as [`Keeper::stop`] does). Call inside a tokio runtime.
pub fn keep(coord: Arc<Coordinator>, partitions: Partitions) -> (Keeper, mpsc::Receiver<LeaseEvent>) {
    let (events, rx) = mpsc::channel(EVENTS_MAX);
    // At most one confirmation per partition is pending, and one stop.
    let (commands, commands_rx) = mpsc::channel(usize::from(partitions.count()) + 1);
    let (published, held) = watch::channel(BTreeMap::new());
    let keeping = Keeping { coord, partitions, held: BTreeMap::new(), events, unsent: VecDeque::new(), published };
    let task = tokio::spawn(keeping.run(commands_rx)).abort_handle();
    (Keeper { commands, held, task }, rx)
}

/// The state of a [`keep`] loop.
struct Keeping {
    coord: Arc<Coordinator>,
    partitions: Partitions,
    held: BTreeMap<Partition, Held>,
    events: mpsc::Sender<LeaseEvent>,
    /// Losses the hub has not had room for yet (at most one per partition).
    unsent: VecDeque<LeaseEvent>,
    published: watch::Sender<BTreeMap<Partition, i64>>,
}

impl Keeping {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(self.coord.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if self.events.is_closed() {
                        // Nobody serves the partitions any more.
                        let _ = self.leave().await;
                        return;
                    }
                    self.round().await;
                }
                command = commands.recv() => match command {
                    Some(Command::Released(p)) => self.give_up(p).await,
                    Some(Command::Stop(reply)) => {
                        let _ = reply.send(self.leave().await);
                        return;
                    }
                    None => {
                        let _ = self.leave().await;
                        return;
                    }
                },
            }
        }
    }

    /// One tick.
    async fn round(&mut self) {
        while let Some(event) = self.unsent.pop_front() {
            if let Err(e) = self.events.try_send(event) {
                self.unsent.push_front(e.into_inner());
                break;
            }
        }
        if let Err(e) = self.coord.heartbeat().await {
            tracing::warn!(error = %e, "hub heartbeat failed");
        }
        self.renew().await;
        if !self.unsent.is_empty() {
            // A gain told before an earlier loss would reach the hub out of order.
            return;
        }
        let (live, mut holders) = match tokio::try_join!(self.coord.live_hubs(), self.coord.holders()) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "reading the leases failed; trying again next tick");
                return;
            }
        };
        // What this hub holds is what it renews: a row still naming it after it let go is not its
        // own, and a partition it renews counts as its own even if the read came just before.
        let me = self.coord.hub_id.clone();
        holders.retain(|p, h| *h != me || self.held.contains_key(p));
        holders.extend(self.held.keys().map(|p| (*p, me.clone())));
        let plan = place(self.partitions, &live, &holders, &me);
        for p in plan.release {
            let Some(held) = self.held.get_mut(&p) else { continue };
            if held.releasing {
                continue;
            }
            let Ok(permit) = self.events.try_reserve() else { break };
            held.releasing = true;
            tracing::info!(partition = p, epoch = held.epoch, hub = %me, "handing the partition over (above this hub's share)");
            permit.send(LeaseEvent::Releasing(p));
        }
        for p in plan.take {
            let Ok(permit) = self.events.try_reserve() else { break };
            let sent = Instant::now();
            match self.coord.try_acquire_partition(p).await {
                Ok(Some((epoch, taken))) => {
                    log_taken(&self.coord, p, epoch, &taken);
                    self.held.insert(p, Held { epoch, renewed: sent, releasing: false });
                    self.publish();
                    permit.send(LeaseEvent::Gained { partition: p, epoch, taken });
                }
                // Another hub was faster.
                Ok(None) => {}
                Err(e) => tracing::warn!(partition = p, error = %e, "could not take the lease this time"),
            }
        }
    }

    /// Renews every lease held; those lost are dropped and told.
    async fn renew(&mut self) {
        let sent = Instant::now();
        let held: Vec<(Partition, i64)> = self.held.iter().map(|(p, h)| (*p, h.epoch)).collect();
        let coord = &self.coord;
        let results =
            futures_util::future::join_all(held.iter().map(|&(p, epoch)| coord.renew_partition(p, epoch))).await;
        for ((p, epoch), result) in held.into_iter().zip(results) {
            let lost = match result {
                Ok(true) => {
                    if let Some(h) = self.held.get_mut(&p) {
                        h.renewed = sent;
                    }
                    None
                }
                Ok(false) => Some("another hub took it over".to_owned()),
                Err(e) if self.held.get(&p).is_some_and(|h| h.renewed.elapsed() >= self.coord.lease) => {
                    Some(format!("it could not be renewed before it expired: {e}"))
                }
                Err(e) => {
                    tracing::warn!(partition = p, epoch, error = %e, "renewing the lease failed");
                    None
                }
            };
            if let Some(why) = lost {
                tracing::warn!(partition = p, epoch, hub = %self.coord.hub_id, "lost the lease: {why}; this hub stops deciding for it");
                self.held.remove(&p);
                self.publish();
                self.tell(LeaseEvent::Lost(p));
            }
        }
    }

    /// Gives up a partition the hub is done with.
    async fn give_up(&mut self, p: Partition) {
        let Some(held) = self.held.get(&p).copied() else { return };
        if !held.releasing {
            tracing::warn!(partition = p, "the hub said it released a partition it was not asked to; ignored");
            return;
        }
        self.held.remove(&p);
        self.publish();
        match self.coord.release_partition(p, held.epoch).await {
            Ok(true) => tracing::info!(partition = p, epoch = held.epoch, "gave the lease up"),
            Ok(false) => tracing::warn!(partition = p, epoch = held.epoch, "the lease was lost before it was given up"),
            Err(e) => tracing::warn!(partition = p, error = %e, "could not give the lease up; it expires on its own"),
        }
    }

    /// Leaves, then gives every lease up (the others count one hub fewer as the leases come
    /// free). The first error.
    async fn leave(&mut self) -> StorageResult<()> {
        let mut result = self.coord.leave().await;
        for (p, held) in std::mem::take(&mut self.held) {
            if let Err(e) = self.coord.release_partition(p, held.epoch).await {
                tracing::warn!(partition = p, error = %e, "could not give the lease up; it expires on its own");
                result = result.and(Err(e));
            }
        }
        self.publish();
        result
    }

    /// Tells the hub, after the losses it has not had room for.
    fn tell(&mut self, event: LeaseEvent) {
        if !self.unsent.is_empty() {
            self.unsent.push_back(event);
        } else if let Err(e) = self.events.try_send(event) {
            self.unsent.push_back(e.into_inner());
        }
    }

    fn publish(&self) {
        let now: BTreeMap<Partition, i64> = self.held.iter().map(|(p, h)| (*p, h.epoch)).collect();
        self.published.send_if_modified(|held| {
            let changed = *held != now;
            *held = now;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a seeded generator, so a failing case names the seed that replays it.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Hubs sharing one lease table, acting one at a time (each applies its whole plan).
    struct Sim {
        partitions: Partitions,
        live: Vec<String>,
        holders: BTreeMap<Partition, String>,
        /// How many times each partition was taken since the last `settle`.
        taken: BTreeMap<Partition, usize>,
        seed: u64,
    }

    impl Sim {
        fn new(count: u16, live: Vec<String>, seed: u64) -> Sim {
            let mut live = live;
            live.sort();
            Sim {
                partitions: Partitions::new(count).unwrap(),
                live,
                holders: BTreeMap::new(),
                taken: BTreeMap::new(),
                seed,
            }
        }

        fn target(&self, hub: &str) -> usize {
            let rank = self.live.iter().position(|h| h == hub).unwrap();
            usize::from(share(self.partitions, self.live.len(), rank))
        }

        fn count(&self, hub: &str) -> usize {
            self.holders.values().filter(|h| *h == hub).count()
        }

        /// One hub applies its plan; whether it moved anything.
        fn act(&mut self, hub: &str) -> bool {
            let plan = place(self.partitions, &self.live, &self.holders, hub);
            for p in &plan.release {
                assert_eq!(self.holders.remove(p).as_deref(), Some(hub), "seed {}: {hub} released {p}", self.seed);
            }
            for p in &plan.take {
                assert!(self.holders.insert(*p, hub.to_owned()).is_none(), "seed {}: {hub} took held {p}", self.seed);
                *self.taken.entry(*p).or_default() += 1;
            }
            !plan.take.is_empty() || !plan.release.is_empty()
        }

        /// Rounds in random turn orders until a whole round moves nothing; how many rounds moved.
        fn settle(&mut self, rng: &mut Rng) -> usize {
            self.taken.clear();
            for rounds in 0..10 {
                let mut order = self.live.clone();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i + 1));
                }
                let mut moved = false;
                for hub in &order {
                    moved |= self.act(hub);
                }
                if !moved {
                    return rounds;
                }
            }
            panic!("seed {}: no stable assignment after 10 rounds: {:?}", self.seed, self.holders);
        }

        /// Every partition held by exactly one live hub, each within its share.
        fn check_balanced(&self) {
            let seed = self.seed;
            let p = usize::from(self.partitions.count());
            assert_eq!(self.holders.len(), p, "seed {seed}: every partition is held: {:?}", self.holders);
            for h in self.holders.values() {
                assert!(self.live.contains(h), "seed {seed}: {h} is not live");
            }
            let (lo, hi) = (p / self.live.len(), p.div_ceil(self.live.len()));
            for hub in &self.live {
                let n = self.count(hub);
                assert_eq!(n, self.target(hub), "seed {seed}: {hub} holds {n}");
                assert!((lo..=hi).contains(&n), "seed {seed}: {hub} holds {n}, not in [{lo}, {hi}]");
            }
            for hub in &self.live {
                assert_eq!(
                    place(self.partitions, &self.live, &self.holders, hub),
                    Plan::default(),
                    "seed {seed}: a stable assignment moves nothing"
                );
            }
        }

        /// Moves are only what balance needs: no partition moves twice, and one held by a hub
        /// within its share never moves.
        fn check_moves(&self, before: &BTreeMap<Partition, String>) {
            for (p, n) in &self.taken {
                assert_eq!(*n, 1, "seed {}: partition {p} was taken {n} times", self.seed);
            }
            let excess: usize = self
                .live
                .iter()
                .map(|h| before.values().filter(|o| *o == h).count().saturating_sub(self.target(h)))
                .sum();
            let open = usize::from(self.partitions.count()) - before.values().filter(|h| self.live.contains(h)).count();
            assert_eq!(self.taken.len(), excess + open, "seed {}: moves beyond the excess and the open", self.seed);
        }
    }

    fn hub_ids(rng: &mut Rng, n: usize) -> Vec<String> {
        let mut ids = BTreeSet::new();
        while ids.len() < n {
            ids.insert(format!("{:016x}", rng.next()));
        }
        ids.into_iter().collect()
    }

    #[test]
    fn shares_are_floor_or_ceil_and_add_up() {
        for count in 1..=Partitions::MAX {
            let parts = Partitions::new(count).unwrap();
            for hubs in 1..=12 {
                let shares: Vec<u16> = (0..hubs).map(|r| share(parts, hubs, r)).collect();
                assert_eq!(shares.iter().map(|s| usize::from(*s)).sum::<usize>(), usize::from(count));
                let (lo, hi) = (usize::from(count) / hubs, usize::from(count).div_ceil(hubs));
                assert!(shares.iter().all(|s| (lo..=hi).contains(&usize::from(*s))), "{count} over {hubs}: {shares:?}");
                assert!(shares.windows(2).all(|w| w[0] >= w[1]), "the ceil goes to the first hubs: {shares:?}");
            }
        }
    }

    #[test]
    fn a_lone_hub_takes_everything_and_never_what_another_holds() {
        let parts = Partitions::new(6).unwrap();
        let plan = place(parts, &[], &BTreeMap::new(), "a");
        assert_eq!(plan, Plan { take: vec![0, 1, 2, 3, 4, 5], release: vec![] });
        // b is not live (its heartbeat is late) but its leases have not expired: a takes the rest.
        let holders = BTreeMap::from([(1, "b".to_owned()), (4, "b".to_owned())]);
        assert_eq!(place(parts, &["a".to_owned()], &holders, "a").take, vec![0, 2, 3, 5]);
        // Above its share, a hub gives up its highest partitions.
        let holders: BTreeMap<Partition, String> = (0..6).map(|p| (p, "a".to_owned())).collect();
        let live = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        assert_eq!(place(parts, &live, &holders, "a"), Plan { take: vec![], release: vec![5, 4, 3, 2] });
        assert_eq!(place(parts, &live, &holders, "b"), Plan::default(), "b takes nothing a holds");
    }

    /// Random starts (some partitions held, by live hubs or by hubs that left), then hubs leave and
    /// join: each time the hubs settle within a few rounds into every partition held by one live
    /// hub at its share, nothing moves once they have, and only what balance needs moved.
    #[test]
    fn hubs_settle_at_their_shares_through_joins_and_leaves() {
        for seed in 0..2_000u64 {
            let mut rng = Rng(seed);
            let count = if seed % 50 == 0 { Partitions::MAX } else { 1 + rng.below(40) as u16 };
            let n = 1 + rng.below(8);
            let ids = hub_ids(&mut rng, n + 3);
            let mut sim = Sim::new(count, ids[..n].to_vec(), seed);
            // A third held by live hubs; the rest never held, or held by hubs gone since.
            for p in 0..count {
                if rng.below(3) == 0 {
                    sim.holders.insert(p, sim.live[rng.below(n)].clone());
                }
            }
            let before = sim.holders.clone();
            assert!(sim.settle(&mut rng) <= 2, "seed {seed}: settles in two rounds");
            sim.check_balanced();
            sim.check_moves(&before);

            // A hub leaves: its leases expire and its partitions spread over the rest.
            if sim.live.len() > 1 {
                let gone = sim.live.remove(rng.below(sim.live.len()));
                sim.holders.retain(|_, h| *h != gone);
                let before = sim.holders.clone();
                assert!(sim.settle(&mut rng) <= 2, "seed {seed}: settles in two rounds after a leave");
                sim.check_balanced();
                sim.check_moves(&before);
            }

            // Hubs join, one at a time: each gets its share.
            for id in &ids[n..] {
                sim.live.push(id.clone());
                sim.live.sort();
                let before = sim.holders.clone();
                assert!(sim.settle(&mut rng) <= 2, "seed {seed}: settles in two rounds after a join");
                sim.check_balanced();
                sim.check_moves(&before);
            }
        }
    }
}
