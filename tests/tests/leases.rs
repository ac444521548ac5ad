//! SKU partitions' leases spread over the hubs sharing one PostgreSQL database: a keeper
//! (`shelfsync_hub::cluster::keep`) per hub, each with its own coordinator, in this process. Six
//! partitions balance as hubs start, stop cleanly, die and join; every check reads the `leases`
//! table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shelfsync_hub::cluster::{keep, share, Coordinator, Keeper, LeaseEvent, Taken};
use shelfsync_hub::db::{HubDb, Target};
use shelfsync_hub_core::{Partition, Partitions};
use shelfsync_tests::procs::wait_for;
use tokio_postgres::Client;

const LEASE: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(200);
const DEADLINE: Duration = Duration::from_secs(10);

fn partitions() -> Partitions {
    Partitions::new(6).unwrap()
}

/// A fresh hub database with six partitions, and a connection to read it.
async fn database() -> (String, Client) {
    let url = shelfsync_tests::pg::fresh_database().await;
    HubDb::create(&Target::Postgres(url.clone()), partitions()).await.expect("creating the hub database");
    let db = shelfsync_tests::pg::connect(&url).await;
    (url, db)
}

/// One hub: its coordinator, its keeper, and what the keeper told it.
struct Hub {
    id: String,
    /// Dropped when the hub is killed.
    coord: Option<Arc<Coordinator>>,
    keeper: Keeper,
    events: Arc<Mutex<Vec<LeaseEvent>>>,
    /// Partitions it was asked to hand over and has not said it released.
    pending: Arc<Mutex<Vec<Partition>>>,
    /// Whether it says it released a partition as soon as it is asked (nothing queued).
    at_once: Arc<AtomicBool>,
}

impl Hub {
    async fn start(url: &str, n: u16) -> Hub {
        let coord = Coordinator::join(
            url,
            &format!("127.0.0.1:{}", 18000 + n),
            &format!("127.0.0.1:{}", 19000 + n),
            LEASE,
            TICK,
        )
        .await
        .expect("joining");
        let coord = Arc::new(coord);
        let (keeper, mut rx) = keep(coord.clone(), partitions());
        let events: Arc<Mutex<Vec<LeaseEvent>>> = Arc::default();
        let pending: Arc<Mutex<Vec<Partition>>> = Arc::default();
        let at_once = Arc::new(AtomicBool::new(true));
        let (k, e, p, a) = (keeper.clone(), events.clone(), pending.clone(), at_once.clone());
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                e.lock().unwrap().push(event.clone());
                if let LeaseEvent::Releasing(partition) = event {
                    if a.load(Ordering::SeqCst) {
                        k.released(partition).await;
                    } else {
                        p.lock().unwrap().push(partition);
                    }
                }
            }
        });
        Hub { id: coord.hub_id.clone(), coord: Some(coord), keeper, events, pending, at_once }
    }

    /// Says it released every partition it was asked to hand over; which.
    async fn release_pending(&self) -> Vec<Partition> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        for p in &pending {
            self.keeper.released(*p).await;
        }
        pending
    }

    /// The `Gained` event for `partition` at `epoch`, if the keeper sent one.
    fn gained(&self, partition: Partition, epoch: i64) -> Option<Taken> {
        self.events.lock().unwrap().iter().find_map(|e| match e {
            LeaseEvent::Gained { partition: p, epoch: at, taken } if *p == partition && *at == epoch => {
                Some(taken.clone())
            }
            _ => None,
        })
    }
}

async fn start_hubs(url: &str, n: u16) -> Vec<Hub> {
    let mut hubs = Vec::new();
    for i in 0..n {
        hubs.push(Hub::start(url, i).await);
    }
    hubs
}

/// One partition's lease, as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lease {
    owner: Option<String>,
    epoch: i64,
    /// It has not expired (database clock).
    unexpired: bool,
}

async fn leases(db: &Client) -> BTreeMap<Partition, Lease> {
    db.query("SELECT partition, owner, epoch, expires_at > now() FROM leases ORDER BY partition", &[])
        .await
        .expect("reading the leases")
        .iter()
        .map(|r| {
            let p: i32 = r.get(0);
            (Partition::try_from(p).unwrap(), Lease { owner: r.get(1), epoch: r.get(2), unexpired: r.get(3) })
        })
        .collect()
}

/// How many partitions each hub should hold, by the floor/ceil rule (ids in order).
fn shares(hubs: &[&Hub]) -> BTreeMap<String, usize> {
    let mut ids: Vec<&str> = hubs.iter().map(|h| h.id.as_str()).collect();
    ids.sort_unstable();
    ids.iter()
        .enumerate()
        .map(|(rank, id)| (id.to_string(), usize::from(share(partitions(), ids.len(), rank))))
        .collect()
}

/// Waits until every partition's lease is held, unexpired, by one of `hubs`, each hub holds as
/// many as `want` says, and each keeper holds exactly what the table says it does (same epochs).
async fn settled(db: &Client, hubs: &[&Hub], want: &BTreeMap<String, usize>) -> BTreeMap<Partition, Lease> {
    wait_for("the partitions held as the shares say", DEADLINE, move || async move {
        let table = leases(db).await;
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for (p, l) in &table {
            match &l.owner {
                Some(o) if l.unexpired => *counts.entry(o.clone()).or_default() += 1,
                _ => return Err(format!("partition {p} is not held: {table:?}")),
            }
        }
        if counts != *want {
            return Err(format!("held {counts:?}, want {want:?}"));
        }
        for h in hubs {
            let in_table: BTreeMap<Partition, i64> = table
                .iter()
                .filter(|(_, l)| l.owner.as_deref() == Some(h.id.as_str()))
                .map(|(p, l)| (*p, l.epoch))
                .collect();
            let held = h.keeper.held();
            if held != in_table {
                return Err(format!("hub {} holds {held:?}; the table says {in_table:?}", h.id));
            }
        }
        Ok(table)
    })
    .await
}

/// Checks that the partitions `from` held moved to other hubs with one takeover each (the
/// epoch up by one), the others stayed where they were, and every move was a `Gained` event
/// taken as `taken` says; the partitions that moved.
fn check_moves(
    before: &BTreeMap<Partition, Lease>,
    after: &BTreeMap<Partition, Lease>,
    from: &str,
    hubs: &[&Hub],
    taken: &Taken,
) -> Vec<Partition> {
    let mut moved = Vec::new();
    for (p, was) in before {
        let now = &after[p];
        if was.owner == now.owner {
            assert_eq!(now.epoch, was.epoch, "partition {p} stayed with its hub under the same epoch");
            continue;
        }
        assert_eq!(was.owner.as_deref(), Some(from), "only {from}'s partitions move: {p} did, {before:?} -> {after:?}");
        assert_eq!(now.epoch, was.epoch + 1, "partition {p} moved with one takeover");
        let owner = now.owner.as_deref().unwrap();
        let hub = hubs.iter().find(|h| h.id == owner).expect("the new owner is a hub of the test");
        assert_eq!(hub.gained(*p, now.epoch).as_ref(), Some(taken), "how hub {owner} took partition {p}");
        moved.push(*p);
    }
    moved
}

/// Three hubs end with two partitions each, every partition held by exactly one of them, and
/// stay put once there: a stable assignment moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hubs_settle_at_two_partitions_each_and_stay_put() {
    let (url, db) = database().await;
    let hubs = start_hubs(&url, 3).await;
    let all: Vec<&Hub> = hubs.iter().collect();
    let want = shares(&all);
    assert!(want.values().all(|n| *n == 2), "{want:?}");
    let table = settled(&db, &all, &want).await;

    // For a lease and more (every hub renews five times), nothing moves and nothing expires.
    let until = tokio::time::Instant::now() + LEASE + TICK;
    while tokio::time::Instant::now() < until {
        assert_eq!(leases(&db).await, table, "a stable assignment moves nothing");
        tokio::time::sleep(TICK / 4).await;
    }
    for h in &hubs {
        let gained = h.events.lock().unwrap().iter().filter(|e| matches!(e, LeaseEvent::Gained { .. })).count();
        let released = h.events.lock().unwrap().iter().filter(|e| matches!(e, LeaseEvent::Releasing(_))).count();
        assert_eq!(gained - released, 2, "hub {} gained what it holds: {:?}", h.id, h.events.lock().unwrap());
        assert!(!h.events.lock().unwrap().iter().any(|e| matches!(e, LeaseEvent::Lost(_))), "no lease was lost");
    }
}

/// A hub that stops cleanly gives its partitions up and leaves: the other two take them at once
/// (released, not expired), one takeover each, and end with three each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_that_stops_hands_its_partitions_over_at_once() {
    let (url, db) = database().await;
    let mut hubs = start_hubs(&url, 3).await;
    let all: Vec<&Hub> = hubs.iter().collect();
    let before = settled(&db, &all, &shares(&all)).await;

    let gone = hubs.remove(1);
    gone.keeper.clone().stop().await.expect("a clean stop");
    assert!(gone.keeper.held().is_empty(), "a stopped keeper holds nothing: {:?}", gone.keeper.held());
    let row: i64 = db.query_one("SELECT count(*) FROM hubs WHERE id = $1", &[&gone.id]).await.unwrap().get(0);
    assert_eq!(row, 0, "the stopped hub left the hubs table");

    let rest: Vec<&Hub> = hubs.iter().collect();
    let want = shares(&rest);
    assert!(want.values().all(|n| *n == 3), "{want:?}");
    let after = settled(&db, &rest, &want).await;
    let moved = check_moves(&before, &after, &gone.id, &rest, &Taken::Released);
    assert_eq!(moved.len(), 2, "the stopped hub's two partitions moved");
}

/// A hub killed (its keeper ends without giving anything up, its connection closes): once its
/// leases expire the other two take its partitions, told that they took them from a hub that
/// stopped renewing, and end with three each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_hubs_partitions_are_taken_once_its_leases_expire() {
    let (url, db) = database().await;
    let mut hubs = start_hubs(&url, 3).await;
    let all: Vec<&Hub> = hubs.iter().collect();
    let before = settled(&db, &all, &shares(&all)).await;

    let mut gone = hubs.remove(0);
    gone.keeper.abort();
    drop(gone.coord.take());
    let killed_at = tokio::time::Instant::now();

    let rest: Vec<&Hub> = hubs.iter().collect();
    let after = settled(&db, &rest, &shares(&rest)).await;
    let moved = check_moves(&before, &after, &gone.id, &rest, &Taken::Expired(gone.id.clone()));
    assert_eq!(moved.len(), 2, "the killed hub's two partitions moved");
    // Its leases had up to a lease left when it was killed; the takeover waited for them (less
    // a tick: the last renewal may have come up to a tick before the kill).
    assert!(killed_at.elapsed() >= LEASE - TICK, "taken after {:?}, before the leases expired", killed_at.elapsed());
    let row: i64 = db.query_one("SELECT count(*) FROM hubs WHERE id = $1", &[&gone.id]).await.unwrap().get(0);
    assert_eq!(row, 1, "a killed hub did not leave (its row stays, its heartbeat stale)");
}

/// A fourth hub joins: the hubs above their new share are asked to hand partitions over, keep
/// renewing them until they say they released them (their queues drained), and only then the
/// newcomer takes them, one takeover each. The end is 2/2/1/1 in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_hub_gets_its_share_once_the_others_have_drained() {
    let (url, db) = database().await;
    let mut hubs = start_hubs(&url, 3).await;
    let three: Vec<&Hub> = hubs.iter().collect();
    let before = settled(&db, &three, &shares(&three)).await;
    for h in &hubs {
        h.at_once.store(false, Ordering::SeqCst);
    }

    hubs.push(Hub::start(&url, 3).await);
    let all: Vec<&Hub> = hubs.iter().collect();
    let want = shares(&all);
    let mut counts: Vec<usize> = want.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, [1, 1, 2, 2], "{want:?}");
    let new = &hubs[3];
    let excess: BTreeMap<&str, usize> = hubs[..3].iter().map(|h| (h.id.as_str(), 2 - want[&h.id])).collect();
    let asked: usize = excess.values().sum();
    assert!(asked >= 1, "someone must make room: {want:?}");

    // Each hub above its share is asked for exactly its excess.
    wait_for("the hubs above their share asked to hand over", DEADLINE, || async {
        let pending: BTreeMap<&str, usize> =
            hubs[..3].iter().map(|h| (h.id.as_str(), h.pending.lock().unwrap().len())).collect();
        if pending == excess {
            Ok(())
        } else {
            Err(format!("asked {pending:?}, want {excess:?}"))
        }
    })
    .await;
    let releasing: BTreeMap<Partition, &Hub> =
        hubs[..3].iter().flat_map(|h| h.pending.lock().unwrap().clone().into_iter().map(move |p| (p, h))).collect();
    for (p, h) in &releasing {
        assert!(
            h.events.lock().unwrap().contains(&LeaseEvent::Releasing(*p)),
            "hub {} was told to hand partition {p} over",
            h.id
        );
    }

    // Unconfirmed, nothing moves for twice the lease: the releasing hubs keep renewing.
    let until = tokio::time::Instant::now() + 2 * LEASE;
    while tokio::time::Instant::now() < until {
        let table = leases(&db).await;
        for (p, h) in &releasing {
            let l = &table[p];
            assert_eq!(l.owner.as_deref(), Some(h.id.as_str()), "partition {p} stays until released");
            assert!(l.unexpired, "partition {p} is renewed while its hub drains it");
            assert_eq!(l.epoch, before[p].epoch, "partition {p} was not taken over");
            assert!(h.keeper.held().contains_key(p), "hub {} still holds partition {p}", h.id);
        }
        assert!(new.keeper.held().is_empty(), "the newcomer takes nothing held: {:?}", new.keeper.held());
        tokio::time::sleep(TICK / 4).await;
    }

    for h in &hubs[..3] {
        h.release_pending().await;
    }
    let after = settled(&db, &all, &want).await;
    for (p, was) in &before {
        let now = &after[p];
        if releasing.contains_key(p) {
            assert_eq!(now.owner.as_deref(), Some(new.id.as_str()), "partition {p} went to the newcomer");
            assert_eq!(now.epoch, was.epoch + 1, "partition {p} moved with one takeover");
            assert_eq!(new.gained(*p, now.epoch), Some(Taken::Released), "handed over, not expired");
        } else {
            assert_eq!(now, was, "partition {p} did not move");
        }
    }
}
