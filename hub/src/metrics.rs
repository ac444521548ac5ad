//! The hub's metrics at `/metrics` (Prometheus text format, `prometheus-client`): counters and
//! histograms updated where things happen, plus gauges that depend on the decider's state (per
//! store connection and silence, conflicts open by kind, the feed head, webhook lag), computed
//! at scrape time by one read through the engine, so they can never drift from the truth.

use std::sync::Arc;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use shelfsync_node::http::EdgeStats;
use shelfsync_node::observe::{self, HttpMetrics, Labels};

/// Every metric name starts with this.
pub const PREFIX: &str = "shelfsync_hub";

macro_rules! counters {
    ($($name:ident: $help:literal;)*) => {
        /// The hub's standing metrics.
        pub struct Metrics {
            /// Where they are registered (the scrape also encodes a per-scrape registry).
            pub registry: Registry,
            /// The HTTP edge's counters (connections, timeouts, 429s).
            pub edge: Arc<EdgeStats>,
            /// Request durations by route template.
            pub http: Arc<HttpMetrics>,
            /// Agent connections open now.
            pub connections_open: Gauge,
            /// The lease epoch this hub decides under (several hubs on PostgreSQL; 0 for a lone
            /// hub, which holds no lease).
            pub lease_epoch: Gauge,
            /// Reservation calls by action and outcome.
            pub reservations: Family<Labels, Counter>,
            /// Time to merge one delta from a store (decide + commit).
            pub merge_seconds: Histogram,
            /// Time from a feed event to its webhook delivery.
            pub webhook_delivery_seconds: Histogram,
            /// Last delivered cursor per webhook URL.
            pub webhook_cursor: Family<Labels, Gauge>,
            /// Change feed events a webhook has not been sent yet, per URL.
            pub webhook_lag_events: Family<Labels, Gauge>,
            /// Reservations made per sales channel.
            pub channel_reservations: Family<Labels, Counter>,
            /// Units a lagged channel sold beyond its stores' stock (recorded short), per channel.
            pub channel_oversell_units: Family<Labels, Counter>,
            $(#[doc = $help] pub $name: Counter,)*
        }

        impl Default for Metrics {
            fn default() -> Self {
                Self::with_edge(Arc::new(EdgeStats::default()))
            }
        }

        impl Metrics {
            /// The metrics, counting the HTTP edge of `edge` (a clustered hub's front serves its
            /// HTTP before this hub decides).
            pub fn with_edge(edge: Arc<EdgeStats>) -> Self {
                let mut registry = Registry::default();
                observe::register_common(&mut registry, "hub", PREFIX, edge.clone());
                let http = HttpMetrics::register(&mut registry, PREFIX);
                let m = Metrics {
                    edge,
                    http,
                    connections_open: Gauge::default(),
                    lease_epoch: Gauge::default(),
                    reservations: Family::default(),
                    merge_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
                    webhook_delivery_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
                    webhook_cursor: Family::default(),
                    webhook_lag_events: Family::default(),
                    channel_reservations: Family::default(),
                    channel_oversell_units: Family::default(),
                    $($name: Counter::default(),)*
                    registry: Registry::default(),
                };
                let r = registry.sub_registry_with_prefix(PREFIX);
                r.register("connections_open", "Agent connections open now", m.connections_open.clone());
                r.register(
                    "lease_epoch",
                    "The lease epoch this hub decides under (hubs sharing PostgreSQL: it grows at every takeover; 0 for a lone hub)",
                    m.lease_epoch.clone(),
                );
                r.register(
                    "reservations",
                    "Reservation calls by action (create, commit, extend, release, expire) and outcome",
                    m.reservations.clone(),
                );
                r.register(
                    "merge_duration_seconds",
                    "Time to merge one delta from a store, decided and committed",
                    m.merge_seconds.clone(),
                );
                r.register(
                    "webhook_delivery_lag_seconds",
                    "Time from a change feed event to its delivery to a webhook (2xx)",
                    m.webhook_delivery_seconds.clone(),
                );
                r.register(
                    "webhook_lag_events",
                    "Change feed events not yet delivered to a webhook, per URL (as of its last look at the feed)",
                    m.webhook_lag_events.clone(),
                );
                r.register("webhook_cursor", "Last change feed cursor delivered per webhook URL", m.webhook_cursor.clone());
                r.register("channel_reservations", "Reservations made per sales channel", m.channel_reservations.clone());
                r.register(
                    "channel_oversell_units",
                    "Units a lagged sales channel sold beyond its stores' stock (recorded short, each with a channel_oversell conflict)",
                    m.channel_oversell_units.clone(),
                );
                $(r.register(stringify!($name).strip_suffix("_total").expect("counter names end in _total"), $help, m.$name.clone());)*
                Metrics { registry, ..m }
            }
        }
    };
}

counters! {
    connections_accepted_total: "Agent connections that completed the sync handshake";
    connections_refused_total: "Agent connections refused (unknown, revoked or unauthorized certificate, or over the limit)";
    connections_unauthorized_total: "Connections closed because a store tried to write what it may not";
    connections_protocol_errors_total: "Connections closed for malformed or out-of-order frames";
    deltas_applied_total: "Counter deltas from agents durably applied";
    entries_merged_total: "Counter entries that changed by merge";
    journal_batches_applied_total: "Journal batches from agents durably stored";
    digests_matched_total: "Anti-entropy digest comparisons that matched";
    digests_mismatched_total: "Anti-entropy digest comparisons that differed (each starts a full resync)";
    hub_changes_total: "Restocks, transfers, batch restocks and head-office adjustments recorded";
    http_requests_total: "HTTP API requests answered";
    http_unauthorized_total: "HTTP API requests refused with 401 or 403";
    retirements_total: "Agent writers retired after their files forked (restored or copied), as reported";
    writer_clones_total: "Connections that presented a writer another live connection holds";
    duplicate_agents_total: "Connections refused because another agent of the store is live";
    hub_entries_recovered_total: "Entries the hub lacked that stores gave back (tag verified)";
    hub_rollbacks_total: "Times the hub found its files older than what stores saw and took a new life";
    webhook_deliveries_total: "Webhook events delivered (answered 2xx)";
    webhook_failures_total: "Webhook delivery attempts that failed (unreachable, non-2xx or a redirect) and will be retried";
}

impl Metrics {
    /// Adds one.
    pub fn inc(c: &Counter) {
        c.inc();
    }

    /// Counts reservations whose lease ran out (`action="expire"`, `outcome="ok"`).
    pub fn reservations_expired(&self, n: u64) {
        self.reservations.get_or_create(&vec![("action", "expire".to_owned()), ("outcome", "ok".to_owned())]).inc_by(n);
    }

    /// Counts a new reservation of `channel`, with the units it was short.
    pub fn channel_reservation(&self, channel: &str, short: u64) {
        let labels = vec![("channel", channel.to_owned())];
        self.channel_reservations.get_or_create(&labels).inc();
        if short > 0 {
            self.channel_oversell_units.get_or_create(&labels).inc_by(short);
        }
    }

    /// Counts a reservation call: `action` (create, commit, extend, release, expire) and
    /// `outcome` (ok, or the error code it was answered with).
    pub fn reservation(&self, action: &'static str, outcome: &str) {
        self.reservations.get_or_create(&vec![("action", action.to_owned()), ("outcome", outcome.to_owned())]).inc();
    }
}

/// One store as the scrape sees it.
#[derive(Clone, Debug)]
pub struct StoreGauge {
    /// Which.
    pub store: String,
    /// A live sync connection.
    pub connected: bool,
    /// Seconds since the last frame that carried data (`None`: never heard from).
    pub last_seen_age_secs: Option<f64>,
    /// Hub counter entries for the store its agent has not acked yet (capped).
    pub unacked_entries: u64,
    /// Revoked.
    pub revoked: bool,
    /// Units online holds escrow rights to at the store (`None`: not known at this scrape).
    pub escrow_granted: Option<u64>,
}

/// What the scrape reads through the engine (see [`crate::engine::Engine::metrics_snapshot`]).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Per store.
    pub stores: Vec<StoreGauge>,
    /// Open conflicts per kind (every kind, zeros included).
    pub conflicts_open: Vec<(&'static str, u64)>,
    /// Newest committed change feed cursor.
    pub feed_head: u64,
    /// Each configured channel's available-to-sell over every SKU.
    pub channel_ats: Vec<(String, u64)>,
}

/// Most unacked entries counted per store at a scrape (the gauge saturates there).
pub const UNACKED_COUNT_MAX: usize = 10_000;

/// The per-scrape part of `/metrics`.
#[derive(Debug)]
struct SnapshotCollector(Snapshot);

impl prometheus_client::collector::Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let family = gauge_family;
        let store = |g: &StoreGauge| vec![("store", g.store.clone())];
        family(
            &mut encoder,
            "store_connected",
            "1 while a store has a live sync connection",
            &mut s.stores.iter().map(|g| (store(g), if g.connected { 1.0 } else { 0.0 })),
        )?;
        family(
            &mut encoder,
            "store_last_seen_age_seconds",
            "Seconds since the hub last received data from a store",
            &mut s.stores.iter().filter_map(|g| g.last_seen_age_secs.map(|a| (store(g), a))),
        )?;
        family(
            &mut encoder,
            "store_unacked_entries",
            "Hub counter entries for a store (restocks, transfers) its agent has not acknowledged yet",
            &mut s.stores.iter().map(|g| (store(g), g.unacked_entries as f64)),
        )?;
        family(
            &mut encoder,
            "store_escrow_granted_units",
            "Units a store granted online (escrow rights: granted − returned − consumed), over its SKUs",
            &mut s.stores.iter().filter_map(|g| g.escrow_granted.map(|n| (store(g), n as f64))),
        )?;
        family(
            &mut encoder,
            "store_revoked",
            "1 for a store whose certificate was revoked",
            &mut s.stores.iter().map(|g| (store(g), if g.revoked { 1.0 } else { 0.0 })),
        )?;
        family(
            &mut encoder,
            "conflicts_open",
            "Open conflicts by kind",
            &mut s.conflicts_open.iter().map(|(k, n)| (vec![("kind", (*k).to_owned())], *n as f64)),
        )?;
        family(
            &mut encoder,
            "channel_ats_units",
            "A configured sales channel's available-to-sell summed over every SKU (as last announced on the feed)",
            &mut s.channel_ats.iter().map(|(c, n)| (vec![("channel", c.clone())], *n as f64)),
        )?;
        observe::const_gauge(&mut encoder, "feed_head", "Newest committed change feed cursor", s.feed_head as f64)?;
        observe::const_gauge(&mut encoder, "stores", "Registered stores", s.stores.len() as f64)
    }
}

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &mut dyn Iterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut rows = rows.peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut m = encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
    for (labels, v) in rows {
        observe::encode_gauge_value(m.encode_family(&labels)?, v)?;
    }
    Ok(())
}

/// The `/metrics` answer: the standing registry plus this scrape's snapshot.
pub fn render(metrics: &Metrics, snapshot: Snapshot) -> axum::response::Response {
    let mut scrape = Registry::with_prefix(PREFIX);
    scrape.register_collector(Box::new(SnapshotCollector(snapshot)));
    observe::metrics_response(&[&metrics.registry, &scrape])
}
