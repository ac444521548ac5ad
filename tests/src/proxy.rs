//! A fault-injecting UDP proxy for QUIC on loopback: sits between agents and the hub and drops,
//! duplicates, delays, reorders or cuts datagrams in both directions, from a seeded RNG.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Largest datagram forwarded.
const DATAGRAM_MAX: usize = 65_535;
/// Most distinct clients (one upstream socket each).
const CLIENTS_MAX: usize = 1024;

/// What to do to each datagram (probabilities in 0..=1).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Drop it.
    pub drop: f64,
    /// Send it twice.
    pub duplicate: f64,
    /// Hold it back and release it after the next datagram in the same direction.
    pub reorder: f64,
    /// Delay uniformly in this range (ms); (0, 0) for none.
    pub delay_ms: (u64, u64),
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Datagrams passed on (duplicates counted once each).
    pub forwarded: u64,
    /// Datagrams dropped (faults or cut).
    pub dropped: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Datagrams held back for reordering.
    pub reordered: u64,
}

#[derive(Default)]
struct Shared {
    faults: Mutex<Faults>,
    cut: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

/// Cloneable control of a running proxy.
#[derive(Clone)]
pub struct ProxyControl(Arc<Shared>);

impl ProxyControl {
    /// Sets the faults.
    pub fn set_faults(&self, f: Faults) {
        *self.0.faults.lock().unwrap() = f;
    }
    /// No more faults (does not undo a cut).
    pub fn heal(&self) {
        self.set_faults(Faults::default());
    }
    /// Drops everything both ways while `true`.
    pub fn cut(&self, cut: bool) {
        self.0.cut.store(cut, Ordering::SeqCst);
    }
    /// Counters so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            forwarded: self.0.forwarded.load(Ordering::Relaxed),
            dropped: self.0.dropped.load(Ordering::Relaxed),
            duplicated: self.0.duplicated.load(Ordering::Relaxed),
            reordered: self.0.reordered.load(Ordering::Relaxed),
        }
    }
}

/// A running proxy; stops when dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    control: ProxyControl,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Per-direction fault state: the RNG and a datagram held back for reordering.
struct Lane {
    rng: StdRng,
    held: Option<Vec<u8>>,
}

impl UdpProxy {
    /// Binds 127.0.0.1:0 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, seed: u64) -> std::io::Result<UdpProxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let control = ProxyControl(Arc::default());
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (shared, tasks2) = (control.0.clone(), tasks.clone());
        let main = tokio::spawn(async move {
            let mut clients: HashMap<SocketAddr, (Arc<UdpSocket>, Arc<Mutex<Lane>>)> = HashMap::new();
            let mut buf = vec![0u8; DATAGRAM_MAX];
            let mut n_client = 0u64;
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else { return };
                let entry = match clients.get(&from) {
                    Some(e) => e.clone(),
                    None => {
                        if clients.len() >= CLIENTS_MAX {
                            continue;
                        }
                        let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                        let up = Arc::new(up);
                        n_client += 1;
                        let up_lane = Arc::new(Mutex::new(Lane {
                            rng: StdRng::seed_from_u64(seed ^ (n_client << 1)),
                            held: None,
                        }));
                        let down_lane = Arc::new(Mutex::new(Lane {
                            rng: StdRng::seed_from_u64(seed ^ (n_client << 1 | 1)),
                            held: None,
                        }));
                        // Downstream: hub → client.
                        let (front2, up2, shared2) = (front.clone(), up.clone(), shared.clone());
                        let t = tokio::spawn(async move {
                            let mut buf = vec![0u8; DATAGRAM_MAX];
                            loop {
                                let Ok(n) = up2.recv(&mut buf).await else { return };
                                let data = buf[..n].to_vec();
                                let sock = front2.clone();
                                forward(&shared2, &down_lane, data, move |d| {
                                    let sock = sock.clone();
                                    async move {
                                        let _ = sock.send_to(&d, from).await;
                                    }
                                })
                                .await;
                            }
                        });
                        tasks2.lock().unwrap().push(t);
                        clients.insert(from, (up.clone(), up_lane.clone()));
                        (up, up_lane)
                    }
                };
                let (up, lane) = entry;
                let data = buf[..n].to_vec();
                forward(&shared, &lane, data, move |d| {
                    let up = up.clone();
                    async move {
                        let _ = up.send_to(&d, upstream).await;
                    }
                })
                .await;
            }
        });
        tasks.lock().unwrap().push(main);
        Ok(UdpProxy { addr, control, tasks })
    }

    /// Where clients should send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Control handle.
    pub fn control(&self) -> ProxyControl {
        self.control.clone()
    }
}

async fn forward<F, Fut>(shared: &Arc<Shared>, lane: &Arc<Mutex<Lane>>, data: Vec<u8>, send: F)
where
    F: Fn(Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if shared.cut.load(Ordering::SeqCst) {
        shared.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let faults = *shared.faults.lock().unwrap();
    // Decide everything under the lane lock, send after.
    let (out, delay) = {
        let mut lane = lane.lock().unwrap();
        if lane.rng.random_bool(faults.drop.clamp(0.0, 1.0)) {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut out = Vec::new();
        if lane.rng.random_bool(faults.reorder.clamp(0.0, 1.0)) && lane.held.is_none() {
            shared.reordered.fetch_add(1, Ordering::Relaxed);
            lane.held = Some(data);
        } else {
            out.push(data.clone());
            if lane.rng.random_bool(faults.duplicate.clamp(0.0, 1.0)) {
                shared.duplicated.fetch_add(1, Ordering::Relaxed);
                out.push(data);
            }
            if let Some(h) = lane.held.take() {
                out.push(h);
            }
        }
        let (lo, hi) = faults.delay_ms;
        let delay = if hi > 0 { lane.rng.random_range(lo..=hi.max(lo)) } else { 0 };
        (out, delay)
    };
    shared.forwarded.fetch_add(out.len() as u64, Ordering::Relaxed);
    if delay == 0 {
        for d in out {
            send(d).await;
        }
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            for d in out {
                send(d).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo() -> (SocketAddr, JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let t = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let (n, from) = s.recv_from(&mut buf).await.unwrap();
                s.send_to(&buf[..n], from).await.unwrap();
            }
        });
        (addr, t)
    }

    /// Receives until `quiet` passes with nothing new.
    async fn drain(c: &UdpSocket, quiet: Duration) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 2048];
        while let Ok(Ok(n)) = tokio::time::timeout(quiet, c.recv(&mut buf)).await {
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[tokio::test]
    async fn faults_do_what_they_say() {
        let (upstream, _echo) = echo().await;
        let proxy = UdpProxy::start(upstream, 1).await.unwrap();
        let ctl = proxy.control();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(proxy.addr()).await.unwrap();

        c.send(b"a").await.unwrap();
        assert_eq!(drain(&c, Duration::from_millis(300)).await, vec![b"a".to_vec()]);

        ctl.set_faults(Faults { duplicate: 1.0, ..Default::default() });
        c.send(b"b").await.unwrap();
        // Duplicated both ways: 4 copies come back.
        assert_eq!(drain(&c, Duration::from_millis(300)).await.len(), 4);

        ctl.set_faults(Faults { drop: 1.0, ..Default::default() });
        let dropped = ctl.stats().dropped;
        c.send(b"c").await.unwrap();
        assert!(drain(&c, Duration::from_millis(200)).await.is_empty());
        assert_eq!(ctl.stats().dropped, dropped + 1);

        ctl.heal();
        ctl.cut(true);
        c.send(b"d").await.unwrap();
        assert!(drain(&c, Duration::from_millis(200)).await.is_empty());
        ctl.cut(false);
        c.send(b"e").await.unwrap();
        assert_eq!(drain(&c, Duration::from_millis(300)).await, vec![b"e".to_vec()]);

        // Reordering, observed where it happens: at a sink that records arrival order.
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rproxy = UdpProxy::start(sink.local_addr().unwrap(), 2).await.unwrap();
        rproxy.control().set_faults(Faults { reorder: 1.0, ..Default::default() });
        let c2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c2.connect(rproxy.addr()).await.unwrap();
        c2.send(b"1").await.unwrap();
        c2.send(b"2").await.unwrap();
        let got = drain(&sink, Duration::from_millis(300)).await;
        assert_eq!(got, vec![b"2".to_vec(), b"1".to_vec()], "the held-back datagram comes after the next one");
        assert_eq!(rproxy.control().stats().reordered, 1);

        ctl.set_faults(Faults { delay_ms: (50, 60), ..Default::default() });
        let t = std::time::Instant::now();
        c.send(b"late").await.unwrap();
        let got = drain(&c, Duration::from_millis(400)).await;
        assert!(got.contains(&b"late".to_vec()));
        assert!(t.elapsed() >= Duration::from_millis(100), "delayed both ways");

        drop(proxy);
        c.send(b"gone").await.unwrap();
        assert!(drain(&c, Duration::from_millis(200)).await.is_empty(), "a dropped proxy forwards nothing");
    }
}
