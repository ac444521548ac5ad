//! Transfers in transit between real hub and agent processes on loopback: the destination's
//! POS sees `incoming` once a transfer ships and no longer once it is received (or cancelled),
//! and `on_hand` is exact at both stores, at the hub and at the agents.

use std::time::Duration;

use serde_json::{json, Value};
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::wait_until;

const DEADLINE: Duration = Duration::from_secs(60);

async fn agent_get(c: &Cluster, i: usize, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}{path}", c.agent_url(i))).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The agent's `incoming` of a SKU (0 when it does not know the SKU).
async fn agent_incoming(c: &Cluster, i: usize, sku: &str) -> u64 {
    let (s, v) = agent_get(c, i, &format!("/v1/stock/{sku}")).await;
    if s == 404 {
        return 0;
    }
    v["incoming"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_destination_sees_incoming_until_the_transfer_is_received() {
    let c = Cluster::start(2).await;
    c.restock(0, "JKT-RAIN", 10).await;
    c.converged(&["JKT-RAIN"], DEADLINE).await;

    // Ship 6: gone from store-0 at once, incoming at store-1 (its POS included).
    let id = uuid::Uuid::now_v7();
    let ship = json!({"id": id, "from": "store-0", "to": "store-1", "lines": [{"sku": "JKT-RAIN", "qty": 6}]});
    let (s, v) = c.hub_post("/v1/transfers", ship).await;
    assert_eq!((s, v["status"].as_str()), (201, Some("in_transit")), "{v}");
    wait_until("incoming at store-1's agent", DEADLINE, || async {
        (agent_incoming(&c, 1, "JKT-RAIN").await == 6).then_some(())
    })
    .await;
    let (s, stock) = agent_get(&c, 1, "/v1/stock/JKT-RAIN").await;
    assert_eq!(s, 200);
    assert_eq!((stock["on_hand"].as_i64(), stock["sellable"].as_i64()), (Some(0), Some(0)), "{stock}");
    let (_, page) = agent_get(&c, 1, "/v1/stock").await;
    assert_eq!(page["items"][0]["incoming"], 6, "{page}");
    let (s, list) = agent_get(&c, 1, "/v1/incoming").await;
    assert_eq!(s, 200);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(
        (items[0]["id"].clone(), items[0]["from"].as_str(), items[0]["lines"].clone()),
        (json!(id), Some("store-0"), json!([{"sku": "JKT-RAIN", "qty": 6}]))
    );
    assert!(items[0]["shipped_at"].is_string());
    let (_, other) = agent_get(&c, 0, "/v1/incoming").await;
    assert_eq!(other["items"], json!([]), "nothing is on its way to the source");
    let at = c.converged(&["JKT-RAIN"], DEADLINE).await;
    assert_eq!(at[&("store-0".into(), "JKT-RAIN".into())], 4);
    assert_eq!(at[&("store-1".into(), "JKT-RAIN".into())], 0);
    let v = c.hub_get("/v1/availability/JKT-RAIN").await;
    assert_eq!((v["incoming"].as_u64(), v["available"].as_u64()), (Some(6), Some(4)), "incoming is never offered: {v}");

    // 5 arrive: store-1 has 5 on hand, nothing incoming; one unit is a transit loss.
    let (s, v) =
        c.hub_post(&format!("/v1/transfers/{id}/receive"), json!({"lines": [{"sku": "JKT-RAIN", "qty": 5}]})).await;
    assert_eq!((s, v["status"].as_str(), v["lines"][0]["lost"].as_u64()), (200, Some("received"), Some(1)), "{v}");
    wait_until("incoming gone and units on hand at store-1's agent", DEADLINE, || async {
        let (_, v) = agent_get(&c, 1, "/v1/stock/JKT-RAIN").await;
        (v["incoming"] == 0 && v["on_hand"] == 5).then_some(())
    })
    .await;
    let (_, list) = agent_get(&c, 1, "/v1/incoming").await;
    assert_eq!(list["items"], json!([]));
    let at = c.converged(&["JKT-RAIN"], DEADLINE).await;
    assert_eq!(at[&("store-0".into(), "JKT-RAIN".into())], 4);
    assert_eq!(at[&("store-1".into(), "JKT-RAIN".into())], 5);

    // A cancelled transfer: incoming appears, then goes, and the units are back at the source.
    let id = uuid::Uuid::now_v7();
    let ship = json!({"id": id, "from": "store-0", "to": "store-1", "lines": [{"sku": "JKT-RAIN", "qty": 3}]});
    assert_eq!(c.hub_post("/v1/transfers", ship).await.0, 201);
    wait_until("the second transfer at store-1's agent", DEADLINE, || async {
        (agent_incoming(&c, 1, "JKT-RAIN").await == 3).then_some(())
    })
    .await;
    let (s, v) = c.hub_post(&format!("/v1/transfers/{id}/cancel"), json!({})).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    wait_until("the cancelled transfer gone from store-1's agent", DEADLINE, || async {
        (agent_incoming(&c, 1, "JKT-RAIN").await == 0).then_some(())
    })
    .await;
    let at = c.converged(&["JKT-RAIN"], DEADLINE).await;
    assert_eq!(at[&("store-0".into(), "JKT-RAIN".into())], 4);
    assert_eq!(at[&("store-1".into(), "JKT-RAIN".into())], 5);

    // The store's journal has the hub's events: the loss is a reason-coded adjustment there.
    wait_until("journals synced", DEADLINE, || async {
        let st = c.hub_get("/v1/stores").await;
        let j1 = st["items"][1]["journal_events"].as_u64().unwrap();
        let a1 = c.agent_status(1).await["journal_events"].as_u64().unwrap();
        // store-1: transfer in + transit_loss adjustment.
        (j1 == 2 && a1 == 2).then_some(())
    })
    .await;
}
