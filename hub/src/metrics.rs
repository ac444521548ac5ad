//! Counters the hub exposes at `/metrics` in the Prometheus text format. Plain atomics: no
//! registry crate is needed for a fixed set of counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($($name:ident: $kind:literal, $help:literal;)*) => {
        /// The hub's counters and gauges.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(#[doc = $help] pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// Renders every metric as `shelfsync_hub_<name>`.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP shelfsync_hub_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE shelfsync_hub_{} {}", stringify!($name), $kind);
                    let _ = writeln!(out, "shelfsync_hub_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
}

metrics! {
    connections_accepted_total: "counter", "Agent connections that completed the sync handshake.";
    connections_refused_total: "counter", "Agent connections refused (unknown, revoked or unauthorized certificate, or over the limit).";
    connections_unauthorized_total: "counter", "Connections closed because a store tried to write what it may not.";
    connections_protocol_errors_total: "counter", "Connections closed for malformed or out-of-order frames.";
    connections_open: "gauge", "Agent connections open now.";
    deltas_applied_total: "counter", "Counter deltas from agents durably applied.";
    entries_merged_total: "counter", "Counter entries that changed by merge.";
    journal_batches_applied_total: "counter", "Journal batches from agents durably stored.";
    digests_matched_total: "counter", "Anti-entropy digest comparisons that matched.";
    digests_mismatched_total: "counter", "Anti-entropy digest comparisons that differed (each starts a full resync).";
    hub_changes_total: "counter", "Restocks and transfers recorded.";
    http_requests_total: "counter", "HTTP API requests answered.";
    http_unauthorized_total: "counter", "HTTP API requests refused with 401 or 403.";
    retirements_total: "counter", "Agent writers retired after their files forked (restored or copied), as reported.";
    writer_clones_total: "counter", "Connections that presented a writer another live connection holds.";
    duplicate_agents_total: "counter", "Connections refused because another agent of the store is live.";
    hub_entries_recovered_total: "counter", "Entries the hub lacked that stores gave back (tag verified).";
    hub_rollbacks_total: "counter", "Times the hub found its files older than what stores saw and took a new life.";
    webhook_deliveries_total: "counter", "Webhook events delivered (answered 2xx).";
    webhook_failures_total: "counter", "Webhook delivery attempts that failed (unreachable, non-2xx or a redirect) and will be retried.";
}

impl Metrics {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
