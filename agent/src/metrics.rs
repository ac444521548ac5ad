//! The agent's metrics at `/metrics` (Prometheus text format, `prometheus-client`): POS changes
//! recorded, commit (fsync) latency, the HTTP edge, and, read at scrape time, what is not yet
//! synced and where the connection to the hub stands.

use std::sync::Arc;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use shelfsync_node::http::EdgeStats;
use shelfsync_node::observe::{self, HttpMetrics, Labels};

use crate::ledger::LedgerStatus;
use crate::status::{SyncState, SyncStatus};

/// Every metric name starts with this.
pub const PREFIX: &str = "shelfsync_agent";

/// The agent's standing metrics.
pub struct AgentMetrics {
    /// Where they are registered.
    pub registry: Registry,
    /// The HTTP edge's counters.
    pub edge: Arc<EdgeStats>,
    /// Request durations by route template.
    pub http: Arc<HttpMetrics>,
    /// Changes recorded by kind (sale, return, adjustment, count) and outcome (created, replayed).
    pub changes: Family<Labels, Counter>,
    /// Units sold (sale lines, new sales only).
    pub units_sold: Counter,
}

impl AgentMetrics {
    /// Registers everything, with the ledger's commit-time histogram.
    pub fn new(commit_seconds: prometheus_client::metrics::histogram::Histogram) -> AgentMetrics {
        let mut registry = Registry::default();
        let edge = Arc::new(EdgeStats::default());
        observe::register_common(&mut registry, "agent", PREFIX, edge.clone());
        let http = HttpMetrics::register(&mut registry, PREFIX);
        let m = AgentMetrics {
            edge,
            http,
            changes: Family::default(),
            units_sold: Counter::default(),
            registry: Registry::default(),
        };
        let r = registry.sub_registry_with_prefix(PREFIX);
        r.register("changes", "POS changes recorded by kind and outcome (created, replayed)", m.changes.clone());
        r.register("units_sold", "Units sold at this store (new sales)", m.units_sold.clone());
        r.register(
            "commit_duration_seconds",
            "Time each group commit of the ledger took (the fsync with synchronous=FULL)",
            commit_seconds,
        );
        AgentMetrics { registry, ..m }
    }

    /// Counts a recorded change.
    pub fn change(&self, kind: &'static str, created: bool, units_sold: u64) {
        let outcome = if created { "created" } else { "replayed" };
        self.changes.get_or_create(&vec![("kind", kind.to_owned()), ("outcome", outcome.to_owned())]).inc();
        if created {
            self.units_sold.inc_by(units_sold);
        }
    }
}

/// What the scrape reads.
#[derive(Debug)]
struct Snapshot {
    ledger: LedgerStatus,
    sync: SyncStatus,
    now_ms: i64,
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (l, s) = (&self.ledger, &self.sync);
        observe::const_gauge(
            &mut encoder,
            "unsynced_changes",
            "Own counter entries changed since the hub's last ack",
            l.unsynced_changes as f64,
        )?;
        observe::const_gauge(
            &mut encoder,
            "unsynced_events",
            "Own journal events the hub has not acked yet",
            l.unsynced_events as f64,
        )?;
        observe::const_gauge(
            &mut encoder,
            "ledger_sequence",
            "Local sequence of the stock ledger (the last change numbered)",
            l.counter_head as f64,
        )?;
        observe::const_gauge(&mut encoder, "skus", "SKUs this store has seen", l.skus as f64)?;
        let connected = if s.state == SyncState::Connected { 1.0 } else { 0.0 };
        observe::const_gauge(
            &mut encoder,
            "sync_connected",
            "1 while connected to the hub (Welcome received)",
            connected,
        )?;
        let refused = if s.state == SyncState::Refused { 1.0 } else { 0.0 };
        observe::const_gauge(
            &mut encoder,
            "sync_refused",
            "1 while the hub refuses this agent (another agent of the store, revoked or unknown certificate)",
            refused,
        )?;
        observe::const_counter(
            &mut encoder,
            "sync_attempts",
            "Connection attempts to the hub since start",
            s.attempts,
        )?;
        if let Some(t) = l.last_sync_ms {
            observe::const_gauge(
                &mut encoder,
                "last_sync_age_seconds",
                "Seconds since the hub last acknowledged something from this store",
                (self.now_ms - t).max(0) as f64 / 1000.0,
            )?;
        }
        Ok(())
    }
}

/// The `/metrics` answer.
pub fn render(metrics: &AgentMetrics, ledger: LedgerStatus, sync: SyncStatus) -> axum::response::Response {
    let mut scrape = Registry::with_prefix(PREFIX);
    scrape.register_collector(Box::new(Snapshot { ledger, sync, now_ms: shelfsync_node::now_ms() }));
    observe::metrics_response(&[&metrics.registry, &scrape])
}
