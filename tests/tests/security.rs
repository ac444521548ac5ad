//! The security boundary of the sync endpoint: only certificates of the hub's CA, never revoked
//! ones, and a store writes only its own counters.

use std::time::Duration;

use shelfsync_node::bundle::Bundle;
use shelfsync_node::quic::{read_frame, write_frame};
use shelfsync_shared::wire::{close_code, Delta, Frame, FrameV1, Hello};
use shelfsync_shared::{Incarnation, NodeId, PnEntry, Sku, StoreId, WriterId};
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::{wait_until, Proc};

const DEADLINE: Duration = Duration::from_secs(60);

/// Opens a raw sync connection with `bundle`'s credentials and returns the state stream.
async fn raw_connect(
    bundle: &Bundle,
    addr: &str,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(bundle.client_config().unwrap(), addr.parse().unwrap(), &bundle.server_name)
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (ep, conn, send, recv)
}

fn writer(store: &str, inc: u64) -> WriterId {
    WriterId::new(NodeId::Store(store.parse().unwrap()), Incarnation::from_u64(inc))
}

/// Reads until the hub closes the connection; returns its close code.
async fn close_code_of(conn: &quinn::Connection, recv: &mut quinn::RecvStream) -> u32 {
    loop {
        match tokio::time::timeout(DEADLINE, read_frame(recv)).await.expect("hub answered") {
            Ok(Some(_)) => continue,
            _ => break,
        }
    }
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner() as u32,
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_cannot_write_another_stores_counters() {
    let mut c = Cluster::start(2).await;
    c.restock(1, "X", 5).await;
    c.converged(&["X"], DEADLINE).await;
    // The genuine store-0 agent would supersede our raw connections when it reconnects.
    c.kill_agent(0).await;
    let bundle = Bundle::load(&c.dir.path().join("bundle-0")).unwrap();
    let sku: Sku = "X".parse().unwrap();

    // 1. A delta carrying another store's writer.
    let (_ep, conn, mut send, mut recv) = raw_connect(&bundle, &c.quic_addr).await;
    let mine = writer("store-0", 42);
    let hello = Hello::fresh(bundle.store_id.clone(), mine);
    write_frame(&mut send, &Frame::V1(FrameV1::Hello(hello))).await.unwrap();
    let (welcome, _) = read_frame(&mut recv).await.unwrap().unwrap();
    assert!(matches!(welcome, Frame::V1(FrameV1::Welcome(_))), "{welcome:?}");
    let theirs = writer("store-1", 7);
    let delta = Delta::build(0, 1, [(&sku, &theirs, PnEntry { p: 1000, n: 0 })]);
    write_frame(&mut send, &Frame::V1(FrameV1::Delta(delta))).await.unwrap();
    assert_eq!(close_code_of(&conn, &mut recv).await, close_code::UNAUTHORIZED);

    // 2. A hello claiming to be another store.
    let (_ep2, conn, mut send, mut recv) = raw_connect(&bundle, &c.quic_addr).await;
    let hello = Hello::fresh("store-1".parse::<StoreId>().unwrap(), writer("store-1", 8));
    write_frame(&mut send, &Frame::V1(FrameV1::Hello(hello))).await.unwrap();
    assert_eq!(close_code_of(&conn, &mut recv).await, close_code::UNAUTHORIZED);

    // 3. A version the hub does not speak.
    let (_ep3, conn, mut send, mut recv) = raw_connect(&bundle, &c.quic_addr).await;
    let hello = Hello { protocol: 99, ..Hello::fresh(bundle.store_id.clone(), writer("store-0", 9)) };
    write_frame(&mut send, &Frame::V1(FrameV1::Hello(hello))).await.unwrap();
    assert_eq!(close_code_of(&conn, &mut recv).await, close_code::VERSION_MISMATCH);

    // 4. Garbage on the state stream.
    let (_ep4, conn, mut send, mut recv) = raw_connect(&bundle, &c.quic_addr).await;
    send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    assert_eq!(close_code_of(&conn, &mut recv).await, close_code::PROTOCOL_VIOLATION);

    // store-1's stock is untouched, and the hub counted the refusals.
    assert_eq!(c.hub_on_hand("X").await.get("store-1"), Some(&5));
    assert!(c.metric("connections_unauthorized_total").await >= 2);
    assert!(c.metric("connections_protocol_errors_total").await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_from_another_ca_is_refused() {
    let mut c = Cluster::start(1).await;
    // Another hub's CA issues a certificate for the very same store id.
    let other = c.dir.path().join("other-hub");
    let od = other.to_str().unwrap();
    Proc::run_ok("shelfsync-hub", &["init", "--data-dir", od]).await;
    let rogue_bundle = c.dir.path().join("rogue-bundle");
    Proc::run_ok(
        "shelfsync-hub",
        &[
            "store",
            "add",
            "store-0",
            "--out",
            rogue_bundle.to_str().unwrap(),
            "--hub-addr",
            &c.quic_addr,
            "--data-dir",
            od,
        ],
    )
    .await;
    let refused_before = c.metric("connections_refused_total").await;
    let rogue_dir = c.dir.path().join("rogue-agent");
    Proc::run_ok(
        "shelfsync-agent",
        &["init", "--bundle", rogue_bundle.to_str().unwrap(), "--data-dir", rogue_dir.to_str().unwrap()],
    )
    .await;
    let rogue = Proc::start(
        "shelfsync-agent",
        &["run", "--data-dir", rogue_dir.to_str().unwrap(), "--listen", "127.0.0.1:0"],
        &[("SHELFSYNC_AGENT__SYNC__BACKOFF_MS_MAX", "300"), ("SHELFSYNC_AGENT__SYNC__REFUSED_RETRY_MS", "300")],
    )
    .await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({"id": uuid::Uuid::now_v7(), "lines": [{"sku": "EVIL", "qty": 1}]});
    assert_eq!(http.post(format!("{}/v1/sales", rogue.url)).json(&body).send().await.unwrap().status(), 201);
    let status = wait_until("the rogue agent to fail a few times", DEADLINE, || async {
        let st: serde_json::Value =
            http.get(format!("{}/v1/status", rogue.url)).send().await.unwrap().json().await.unwrap();
        (st["sync"]["attempts"].as_u64().unwrap() >= 3).then_some(st)
    })
    .await;
    assert_eq!(status["sync"]["state"], "refused", "a certificate refused for its CA is permanent: {status}");
    assert!(status["sync"]["last_error"].is_string(), "{status}");
    assert!(c.metric("connections_refused_total").await > refused_before);
    assert!(c.hub_on_hand("EVIL").await.is_empty(), "nothing from the rogue reached the hub");
    // The genuine store still syncs.
    c.restock(0, "OK", 1).await;
    c.converged(&["OK"], DEADLINE).await;
    rogue.stop().await;
    c.stop_hub().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_store_is_dropped_and_refused() {
    let mut c = Cluster::start(2).await;
    c.restock(1, "R", 10).await;
    c.converged(&["R"], DEADLINE).await;
    let hd = c.hub_dir();
    let out = Proc::run_ok("shelfsync-hub", &["store", "revoke", "store-1", "--data-dir", hd.to_str().unwrap()]).await;
    assert!(out.contains("revoked"), "{out}");
    // The running hub drops the live connection and refuses reconnects.
    let st = wait_until("store-1 to be cut off", DEADLINE, || async {
        let st = c.agent_status(1).await;
        let err = st["sync"]["last_error"].as_str().unwrap_or_default().to_owned();
        (st["sync"]["state"] != "connected" && (err.contains("revoked") || err.contains("certificate"))).then_some(st)
    })
    .await;
    assert!(st["sync"]["last_error"].is_string());
    assert_eq!(c.sell(1, "R", 4).await, 201, "the store keeps selling");
    // After a hub restart the CRL refuses it at the handshake.
    c.stop_hub().await;
    c.start_hub().await;
    c.restock(0, "R", 3).await;
    c.converged_store(0, &["R"], DEADLINE).await;
    let attempts = c.agent_status(1).await["sync"]["attempts"].as_u64().unwrap();
    wait_until("more refused attempts", DEADLINE, || async {
        (c.agent_status(1).await["sync"]["attempts"].as_u64().unwrap() >= attempts + 2).then_some(())
    })
    .await;
    // The restarted hub refuses it in the TLS handshake (CRL), which the agent reports.
    wait_until("a TLS refusal naming the revocation", DEADLINE, || async {
        let err = c.agent_status(1).await["sync"]["last_error"].as_str().unwrap_or_default().to_owned();
        err.contains("invalid peer certificate: Revoked").then_some(())
    })
    .await;
    let st = c.agent_status(1).await;
    assert_eq!(st["sync"]["state"], "refused", "a revoked certificate is permanent: retried slowly: {st}");
    let stock = c.hub_get("/v1/stores/store-1/stock").await;
    assert_eq!(stock["items"][0]["sku"], "R");
    assert_eq!(stock["items"][0]["on_hand"], 10, "the revoked store's sale never reached the hub");
    assert_eq!(c.hub_on_hand("R").await.get("store-1"), None, "a revoked store offers nothing online");
    let stores = c.hub_get("/v1/stores").await;
    assert_eq!(stores["items"][1]["revoked"], true);
    assert_eq!(stores["items"][1]["connected"], false);
}

/// A store may read the catalog, never change it: a sync message carrying catalog changes closes
/// the connection as unauthorized, and the hub's catalog is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_cannot_change_the_catalog() {
    use automerge::transaction::Transactable;
    let mut c = Cluster::start(1).await;
    // Killed once connected, so no hello of the agent is still on its way to race ours (a later
    // hello would probe our raw connection, which does not answer pings, and supersede it).
    wait_until("store-0 connected", DEADLINE, || async {
        (c.agent_status(0).await["sync"]["state"] == "connected").then_some(())
    })
    .await;
    c.kill_agent(0).await; // only our raw connection speaks for store-0
    let bundle = Bundle::load(&c.dir.path().join("bundle-0")).unwrap();
    let (_ep, conn, mut send, mut recv) = raw_connect(&bundle, &c.quic_addr).await;
    let hello = Hello::fresh(bundle.store_id.clone(), writer("store-0", 77));
    write_frame(&mut send, &Frame::V1(FrameV1::Hello(hello))).await.unwrap();
    let (welcome, _) = read_frame(&mut recv).await.unwrap().unwrap();
    assert!(matches!(welcome, Frame::V1(FrameV1::Welcome(_))));

    let mut forged = automerge::AutoCommit::new();
    let skus = forged.put_object(automerge::ROOT, "skus", automerge::ObjType::Map).unwrap();
    let item = forged.put_object(&skus, "FREE", automerge::ObjType::Map).unwrap();
    forged.put(&item, "name", "Free lunch").unwrap();
    let msg = automerge::sync::Message {
        heads: forged.get_heads(),
        need: vec![],
        have: vec![],
        changes: automerge::sync::ChunkList::from(vec![forged.save()]),
        supported_capabilities: None,
        version: automerge::sync::MessageVersion::V1,
    };
    let frame = shelfsync_shared::wire::CatalogFrame {
        doc: shelfsync_shared::wire::CatalogDoc::Catalog,
        last: true,
        bytes: msg.encode(),
    };
    let mut uni = conn.open_uni().await.unwrap();
    write_frame(&mut uni, &Frame::V1(FrameV1::Catalog(frame))).await.unwrap();
    uni.finish().unwrap();
    assert_eq!(close_code_of(&conn, &mut recv).await, close_code::UNAUTHORIZED);
    let r = reqwest::Client::new()
        .get(format!("{}/v1/catalog/FREE", c.hub_url()))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the forged entry never reached the catalog");
}
