//! Sync through a UDP proxy that drops, duplicates, delays, reorders and cuts datagrams:
//! after the link heals, every replica converges and every sale is counted exactly once.

use std::time::Duration;

use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::wait_until;
use shelfsync_tests::proxy::{Faults, UdpProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn convergence_after_a_lossy_link_heals() {
    let mut c = Cluster::start(2).await;
    for i in 0..2 {
        c.kill_agent(i).await;
    }
    let proxy = UdpProxy::start(c.quic_addr.parse().unwrap(), 0x5eed).await.unwrap();
    let ctl = proxy.control();
    c.agent_env = vec![("SHELFSYNC_AGENT__SYNC__HUB_ADDR".into(), proxy.addr().to_string())];
    for i in 0..2 {
        c.start_agent(i).await;
    }
    ctl.set_faults(Faults { drop: 0.15, duplicate: 0.1, reorder: 0.1, delay_ms: (0, 15) });

    for i in 0..2 {
        c.restock(i, "A", 500).await;
        c.restock(i, "B", 500).await;
    }
    let mut sold = [0i64; 2];
    let mut sold_b = 0i64;
    for round in 0..6 {
        if round == 3 {
            ctl.cut(true); // a full outage in the middle
        }
        for n in 0..40 {
            let i = n % 2;
            let sku = if n % 3 == 0 { "B" } else { "A" };
            assert_eq!(c.sell(i, sku, 1).await, 201);
            sold[i] += 1;
            sold_b += (sku == "B") as i64;
        }
        if round == 4 {
            ctl.cut(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // let the faulty link carry some of it
    }
    c.restock(0, "A", 7).await; // a hub change while the link is still lossy
    ctl.heal();
    let all = c.converged(&["A", "B"], Duration::from_secs(90)).await;
    // Every sale counted exactly once; store-0 got the extra 7 A.
    for (i, store) in ["store-0", "store-1"].iter().enumerate() {
        let at_store = all[&(store.to_string(), "A".into())] + all[&(store.to_string(), "B".into())];
        assert_eq!(at_store, 1000 + if i == 0 { 7 } else { 0 } - sold[i], "{all:?}");
    }
    assert_eq!(all[&("store-0".into(), "B".into())] + all[&("store-1".into(), "B".into())], 1000 - sold_b);
    let s = ctl.stats();
    assert!(s.dropped > 0 && s.duplicated > 0 && s.reordered > 0, "faults were injected: {s:?}");
}

/// A store cut off for longer than the old backoff (30 s cap) would have needed to reach its
/// ceiling is back within about a second of the link healing: the hub has the sales made during
/// the outage well within 2 s (the deadline is lenient for a loaded machine; the time is printed).
/// The production backoff cap (1 s) applies; only the first delay is shortened, so the backoff
/// reaches that cap within the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_is_back_within_seconds_after_a_long_outage() {
    let mut c = Cluster::start(1).await;
    c.kill_agent(0).await;
    let proxy = UdpProxy::start(c.quic_addr.parse().unwrap(), 0x4ea1).await.unwrap();
    let ctl = proxy.control();
    c.agent_env = vec![
        ("SHELFSYNC_AGENT__SYNC__HUB_ADDR".into(), proxy.addr().to_string()),
        ("SHELFSYNC_AGENT__SYNC__BACKOFF_MS_MIN".into(), "20".into()),
        // The production default, over the cluster's test setting.
        ("SHELFSYNC_AGENT__SYNC__BACKOFF_MS_MAX".into(), "1000".into()),
    ];
    c.start_agent(0).await;
    c.restock(0, "A", 100).await;
    c.converged(&["A"], Duration::from_secs(30)).await;

    ctl.cut(true);
    let cut_at = std::time::Instant::now();
    // The agent notices the dead link by itself (nothing arrives, not even keep-alive answers).
    wait_until("the agent to notice the outage", Duration::from_secs(15), || async {
        (c.agent_status(0).await["sync"]["state"] != "connected").then_some(())
    })
    .await;
    println!("agent noticed the outage after {:?}", cut_at.elapsed());
    for _ in 0..5 {
        assert_eq!(c.sell(0, "A", 1).await, 201);
    }
    // Longer than a whole failed connection attempt (10 s of handshakes), so the heal lands
    // on a backed-off store in its second attempt.
    while cut_at.elapsed() < Duration::from_secs(13) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.hub_on_hand("A").await["store-0"], 100, "nothing crossed the cut");
    ctl.cut(false);
    let healed = std::time::Instant::now();
    wait_until("the hub to have the sales made during the outage", Duration::from_secs(5), || async {
        (c.hub_on_hand("A").await.get("store-0") == Some(&95)).then_some(())
    })
    .await;
    let took = healed.elapsed();
    println!("converged {took:?} after the link healed (outage {:?})", healed - cut_at);
    assert!(took < Duration::from_secs(5), "{took:?}");
}
