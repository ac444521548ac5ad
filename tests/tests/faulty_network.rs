//! Sync through a UDP proxy that drops, duplicates, delays, reorders and cuts datagrams:
//! after the link heals, every replica converges and every sale is counted exactly once.

use std::time::Duration;

use shelfsync_tests::cluster::Cluster;
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
