//! What stores and head office actually do to files, with real processes on loopback: a store's
//! data dir put back from an older copy (with the hub up, and with the hub down while the store
//! sells on), a data dir copied to a second machine that runs too, a second agent initialised from
//! the same bundle, and the hub's database put back from an older backup or file copy. In every
//! case every acknowledged sale and restock is counted exactly once, at the hub and at the store,
//! and head office sees a conflict.

use std::time::Duration;

use serde_json::Value;
use shelfsync_tests::cluster::{copy_dir, replace_dir, Cluster};
use shelfsync_tests::procs::wait_until;

const SETTLE: Duration = Duration::from_secs(30);

fn kinds(conflicts: &[Value]) -> Vec<String> {
    conflicts.iter().map(|c| c["kind"].as_str().unwrap_or_default().to_owned()).collect()
}

async fn journal_events(c: &Cluster, i: usize) -> u64 {
    let stores = c.hub_get("/v1/stores").await;
    stores["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == c.stores[i].as_str())
        .and_then(|s| s["journal_events"].as_u64())
        .unwrap_or(0)
}

/// Count 100, sell 30, put back the files from before the sales, sell 50 more: 20 are left, at the
/// hub and at the store, and the hub's journal holds all 80 sales. Once with the hub up (the
/// restored copy finds out at once), once with the hub down while the restored copy sells (it
/// finds out afterwards and moves those 50 sales to a new writer).
#[tokio::test]
async fn a_store_put_back_to_old_files_loses_no_sale() {
    for hub_down in [false, true] {
        let mut c = Cluster::start(1).await;
        assert_eq!(c.count(0, "A", 100).await, 201);
        c.settled(0, "A", 100, SETTLE).await;
        let writer_before = c.agent_status(0).await["writer"].as_str().unwrap().to_owned();

        // The store's files as they were (a disk image, a VM snapshot, `cp -a`).
        c.stop_agent(0).await;
        let snapshot = c.dir.path().join("agent-0-snapshot");
        copy_dir(&c.agent_dir(0), &snapshot);
        c.start_agent(0).await;
        c.sell_n(0, "A", 30).await;
        c.settled(0, "A", 70, SETTLE).await;

        c.stop_agent(0).await;
        replace_dir(&c.agent_dir(0), &snapshot);
        if hub_down {
            c.stop_hub().await;
        }
        c.start_agent(0).await;
        assert_eq!(c.agent_on_hand(0, "A").await, 100, "the old files know nothing of the 30");
        c.sell_n(0, "A", 50).await;
        if hub_down {
            c.start_hub().await;
        }
        c.settled(0, "A", 20, SETTLE).await;
        wait_until("the hub's journal to hold every sale", SETTLE, || async {
            (journal_events(&c, 0).await == 81).then_some(())
        })
        .await;

        let status = c.agent_status(0).await;
        assert_ne!(status["writer"].as_str().unwrap(), writer_before, "the forked writer was retired");
        let conflicts = wait_until("a store_rolled_back conflict", SETTLE, || async {
            let cs = c.conflicts(0).await;
            cs.iter().any(|x| x["kind"] == "store_rolled_back").then_some(cs)
        })
        .await;
        let rolled = conflicts.iter().find(|x| x["kind"] == "store_rolled_back").unwrap();
        assert_eq!(rolled["sku"], Value::Null, "{rolled}");
        assert_eq!(rolled["details"]["old_writer"], writer_before.as_str(), "{rolled}");
        assert_eq!(rolled["details"]["fork_ordinal"], 1, "the copy shared the count only: {rolled}");
        // With the hub up, the sales made before the restored copy's first handshake moved.
        let moved = rolled["details"]["moved_changes"].as_u64().unwrap();
        if hub_down {
            assert_eq!(moved, 50, "{rolled}");
        } else {
            assert!(moved <= 50, "{rolled}");
        }
        assert_eq!(rolled["details"]["ambiguous_changes"], 0, "{rolled}");
        assert!(c.metric("retirements_total").await >= 1);

        // And it goes on working under the new writer.
        c.sell_n(0, "A", 5).await;
        c.settled(0, "A", 15, SETTLE).await;
    }
}

/// The files copied to a second machine and both started: the copy is refused while the original
/// is live (no flapping; a `writer_cloned` conflict). Both sell; once head office switches the
/// original off, the copy connects, finds its history forked from the one the hub merged, moves
/// its own sales to a new writer, and they reach the hub: 1000 − 50 − 30 = 920 everywhere.
#[tokio::test]
async fn a_cloned_store_counts_every_sale_once() {
    let mut c = Cluster::start(1).await;
    assert_eq!(c.count(0, "A", 1000).await, 201);
    c.settled(0, "A", 1000, SETTLE).await;
    c.stop_agent(0).await;
    let k = c.add_copy(0);
    c.start_agent(0).await;
    c.settled(0, "A", 1000, SETTLE).await; // the original is connected first
    c.start_agent(k).await;

    // The copy is refused, not flapping with the original.
    wait_until("the copy to be refused", SETTLE, || async {
        (c.agent_status(k).await["sync"]["state"] == "refused").then_some(())
    })
    .await;
    let since = c.agent_status(0).await["sync"]["connected_since"].clone();
    let attempts = c.agent_status(k).await["sync"]["attempts"].as_u64().unwrap();
    wait_until("the copy to try again twice", SETTLE, || async {
        (c.agent_status(k).await["sync"]["attempts"].as_u64().unwrap() >= attempts + 2).then_some(())
    })
    .await;
    let status0 = c.agent_status(0).await;
    assert_eq!(status0["sync"]["state"], "connected", "the original stays connected: {status0}");
    assert_eq!(status0["sync"]["connected_since"], since, "and is never superseded by the copy");
    let err = c.agent_status(k).await["sync"]["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(err.contains("duplicate_agent"), "the copy says why: {err}");
    let cs = kinds(&c.conflicts(0).await);
    assert!(cs.contains(&"writer_cloned".to_owned()), "{cs:?}");
    assert!(c.metric("writer_clones_total").await >= 1);

    c.sell_n(0, "A", 50).await;
    c.sell_n(k, "A", 30).await;
    c.settled(0, "A", 950, SETTLE).await;

    // Head office switches the original off; the copy's sales arrive.
    let copy_writer = c.agent_status(k).await["writer"].as_str().unwrap().to_owned();
    c.stop_agent(0).await;
    c.settled(k, "A", 920, SETTLE).await;
    assert_ne!(c.agent_status(k).await["writer"].as_str().unwrap(), copy_writer, "the copy retired the writer");
    assert!(kinds(&c.conflicts(0).await).contains(&"store_rolled_back".to_owned()));
    // The original's files, started again later, catch up too.
    c.stop_agent(k).await;
    c.start_agent(0).await;
    c.settled(0, "A", 920, SETTLE).await;
}

/// A second data dir initialised from the same bundle (two agents for one store): the second is
/// refused with a clear error and a conflict, and the first stays connected.
#[tokio::test]
async fn a_second_agent_of_a_store_is_refused() {
    let mut c = Cluster::start(1).await;
    assert_eq!(c.count(0, "A", 10).await, 201);
    c.settled(0, "A", 10, SETTLE).await;
    let since = c.agent_status(0).await["sync"]["connected_since"].clone();
    let k = c.add_agent_of(0).await;
    c.start_agent(k).await;
    wait_until("the second agent to be refused", SETTLE, || async {
        let s = c.agent_status(k).await;
        (s["sync"]["state"] == "refused").then_some(())
    })
    .await;
    let attempts = c.agent_status(k).await["sync"]["attempts"].as_u64().unwrap();
    wait_until("the second agent to try again twice", SETTLE, || async {
        (c.agent_status(k).await["sync"]["attempts"].as_u64().unwrap() >= attempts + 2).then_some(())
    })
    .await;
    assert_eq!(c.agent_status(0).await["sync"]["connected_since"], since, "no flapping");
    let conflicts = c.conflicts(0).await;
    let dup = conflicts.iter().find(|x| x["kind"] == "duplicate_agent").expect("a duplicate_agent conflict");
    assert_eq!(dup["status"], "open");
    assert!(dup["details"]["live_writers"].as_array().is_some_and(|w| w.len() == 1), "{dup}");
    // Counting the one shelf twice is no longer possible: the second agent's count stays local.
    assert_eq!(c.count(k, "A", 10).await, 201);
    assert_eq!(c.hub_on_hand("A").await["store-0"], 10);
}

/// Restock 10, back up the hub, restock 5, put the backup (or a raw copy of the files) back: the
/// store has 15 and gives the lost 5 back (authenticated), the hub shows 15 again, continues under
/// a new life, and head office sees `hub_rolled_back`.
#[tokio::test]
async fn a_hub_put_back_to_an_older_copy_gets_its_restocks_back() {
    for raw_copy in [false, true] {
        let mut c = Cluster::start(1).await;
        c.restock(0, "A", 10).await;
        c.settled(0, "A", 10, SETTLE).await;
        let hub_db = c.hub_dir().join("hub.db");
        let old = c.dir.path().join("hub-old");
        if raw_copy {
            c.stop_hub().await;
            copy_dir(&c.hub_dir(), &old);
            c.start_hub().await;
        } else {
            std::fs::create_dir_all(&old).unwrap();
            let to = old.join("hub.db");
            let hd = c.hub_dir();
            shelfsync_tests::procs::Proc::run_ok(
                "shelfsync-hub",
                &["backup", "--to", to.to_str().unwrap(), "--data-dir", hd.to_str().unwrap()],
            )
            .await;
        }
        c.restock(0, "A", 5).await;
        c.settled(0, "A", 15, SETTLE).await;

        c.stop_hub().await;
        if raw_copy {
            // The whole data dir as it was (the database with its write-ahead log).
            replace_dir(&c.hub_dir(), &old);
        } else {
            for ext in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{ext}", hub_db.display()));
            }
            std::fs::copy(old.join("hub.db"), &hub_db).unwrap();
        }
        c.start_hub().await;
        c.settled(0, "A", 15, SETTLE).await;
        let conflicts = wait_until("a hub_rolled_back conflict", SETTLE, || async {
            let cs = c.conflicts(0).await;
            cs.iter().any(|x| x["kind"] == "hub_rolled_back").then_some(cs)
        })
        .await;
        let rolled = conflicts.iter().find(|x| x["kind"] == "hub_rolled_back").unwrap();
        assert!(rolled["details"]["new_writer"].as_str().is_some(), "{rolled}");
        assert!(c.metric("hub_entries_recovered_total").await >= 1, "the store gave the restock back");

        // The hub goes on under its new life.
        c.restock(0, "A", 1).await;
        c.settled(0, "A", 16, SETTLE).await;
    }
}

/// A store allowed two agents (`store agents ID 2`) runs both: each is a writer of the store's
/// counters, and each sees the other's sales through the hub.
#[tokio::test]
async fn a_store_allowed_two_agents_runs_both() {
    let mut c = Cluster::start(1).await;
    let hd = c.hub_dir();
    shelfsync_tests::procs::Proc::run_ok(
        "shelfsync-hub",
        &["store", "agents", "store-0", "2", "--data-dir", hd.to_str().unwrap()],
    )
    .await;
    assert_eq!(c.count(0, "A", 100).await, 201);
    c.settled(0, "A", 100, SETTLE).await;
    let k = c.add_agent_of(0).await;
    c.start_agent(k).await;
    wait_until("the second agent to connect", SETTLE, || async {
        (c.agent_status(k).await["sync"]["state"] == "connected").then_some(())
    })
    .await;
    c.sell_n(0, "A", 7).await;
    c.sell_n(k, "A", 5).await;
    c.settled(0, "A", 88, SETTLE).await;
    c.settled(k, "A", 88, SETTLE).await;
    let stores = c.hub_get("/v1/stores").await;
    assert_eq!(stores["items"][0]["agents"].as_array().unwrap().len(), 2, "{stores}");
    assert!(!kinds(&c.conflicts(0).await).contains(&"duplicate_agent".to_owned()));
}
