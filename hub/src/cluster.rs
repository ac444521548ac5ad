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
//! This is one partition (the whole chain): the design for SKU partitions spread over the hubs
//! is in `hub/docs/scale-out.md`; the lease table is already keyed by partition.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::storage::StorageResult;

/// How long a lease lasts without renewal, by default (`storage.lease_ms`).
pub const LEASE: Duration = Duration::from_secs(3);
/// How often the active hub renews, and a standby tries to take over, by default
/// (`storage.lease_renew_ms`).
pub const TICK: Duration = Duration::from_millis(500);

/// The partition every decision belongs to today.
pub const PARTITION: i32 = 0;

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
        let f = Fence::new(LEASE);
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
    /// A hub that stopped cleanly (it gave the lease up and left).
    Released,
    /// A hub that stopped renewing without leaving: it died, hangs, or lost the database.
    Expired(String),
}

/// Logs a takeover at the level it deserves: a dead or stalled predecessor is an anomaly.
fn log_taken(coord: &Coordinator, epoch: i64, taken: &Taken) {
    match taken {
        Taken::Expired(prev) => tracing::warn!(
            epoch,
            hub = %coord.hub_id,
            previous = %prev,
            "took the lease over from a hub that stopped renewing it (died, hung, or lost the database)"
        ),
        Taken::Free | Taken::Released => tracing::info!(epoch, hub = %coord.hub_id, "took the lease"),
    }
}

/// Who holds the lease, as a standby sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The hub's id.
    pub hub: String,
    /// Its HTTP address.
    pub http_addr: String,
    /// The lease's epoch.
    pub epoch: i64,
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
        let row = self
            .client
            .query_opt(
                "WITH prev AS (
                    SELECT l.owner, EXISTS (SELECT 1 FROM hubs h WHERE h.id = l.owner) AS registered
                    FROM leases l WHERE l.partition = $1)
                 UPDATE leases SET owner = $2, epoch = epoch + 1, expires_at = now() + make_interval(secs => $3),
                    taken_at = now()
                 WHERE partition = $1 AND (owner IS NULL OR expires_at < now())
                 RETURNING epoch, (SELECT owner FROM prev), (SELECT registered FROM prev)",
                &[&PARTITION, &self.hub_id, &self.lease.as_secs_f64()],
            )
            .await?;
        Ok(row.map(|r| {
            let (owner, registered): (Option<String>, Option<bool>) = (r.get(1), r.get(2));
            let taken = match owner {
                None => Taken::Free,
                Some(o) if registered == Some(true) && o != self.hub_id => Taken::Expired(o),
                Some(_) => Taken::Released,
            };
            (r.get(0), taken)
        }))
    }

    /// Extends the lease held at `epoch`; false if it is not ours any more.
    pub async fn renew(&self, epoch: i64) -> StorageResult<bool> {
        let n = self
            .client
            .execute(
                "UPDATE leases SET expires_at = now() + make_interval(secs => $4)
                 WHERE partition = $1 AND owner = $2 AND epoch = $3",
                &[&PARTITION, &self.hub_id, &epoch, &self.lease.as_secs_f64()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Records that this hub is alive.
    pub async fn heartbeat(&self) -> StorageResult<()> {
        self.client.execute("UPDATE hubs SET heartbeat_at = now() WHERE id = $1", &[&self.hub_id]).await?;
        Ok(())
    }

    /// Gives the lease up (a clean stop), so a standby takes over at once.
    pub async fn release(&self, epoch: i64) -> StorageResult<()> {
        self.client
            .execute(
                "UPDATE leases SET expires_at = now() - interval '1 second' WHERE partition = $1 AND owner = $2 AND epoch = $3",
                &[&PARTITION, &self.hub_id, &epoch],
            )
            .await?;
        self.client.execute("DELETE FROM hubs WHERE id = $1", &[&self.hub_id]).await?;
        Ok(())
    }
}

/// Who holds an unexpired lease, through any connection.
pub async fn owner(client: &Client) -> StorageResult<Option<Owner>> {
    let row = client
        .query_opt(
            "SELECT l.owner, h.http_addr, l.epoch FROM leases l JOIN hubs h ON h.id = l.owner
             WHERE l.partition = $1 AND l.expires_at > now()",
            &[&PARTITION],
        )
        .await?;
    Ok(row.map(|r| Owner { hub: r.get(0), http_addr: r.get(1), epoch: r.get(2) }))
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
                log_taken(coord, epoch, &taken);
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
        log_taken(coord, *e, how);
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
    /// Seconds since it last said it is alive.
    pub heartbeat_age_secs: f64,
    /// It holds an unexpired lease.
    pub active: bool,
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
            "SELECT id, http_addr, quic_addr, EXTRACT(EPOCH FROM (now() - heartbeat_at))::float8 FROM hubs ORDER BY started_at",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let id: String = r.get(0);
            HubView {
                active: left > 0.0 && owner.as_deref() == Some(id.as_str()),
                id,
                http_addr: r.get(1),
                quic_addr: r.get(2),
                heartbeat_age_secs: r.get(3),
            }
        })
        .collect();
    hubs.sort_by_key(|h| !h.active);
    Ok(ClusterView { epoch, lease_expires_in_secs: left, leases, hubs })
}
