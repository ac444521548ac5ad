//! What both binaries expose about themselves: the Prometheus registry pieces they share (process
//! metrics, build info, the HTTP edge's counters, request duration by route template), the
//! `/metrics` text answer, and the request log (tower-http's `TraceLayer`).
//!
//! Metrics are `prometheus-client` types encoded in the Prometheus text format 0.0.4, which
//! `promtool check metrics` and every Prometheus version read. Counters are registered without
//! their `_total` suffix: the encoder adds it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::http::EdgeStats;

/// Labels as (name, value) pairs; every label set in this project is bounded by the code (route
/// templates, enum values, configured stores), never by what a client sends.
pub type Labels = Vec<(&'static str, String)>;

/// Registers what every Shelfsync process exposes: `process_*`, `shelfsync_build_info` and the
/// HTTP edge's counters under `<prefix>_http_` (e.g. `shelfsync_hub_http_connections_open`).
pub fn register_common(registry: &mut Registry, binary: &'static str, prefix: &str, edge: Arc<EdgeStats>) {
    registry.register_collector(Box::new(ProcessCollector));
    registry.register(
        "shelfsync_build",
        "Always 1; the labels name the running build",
        Info::new(vec![("binary", binary.to_owned()), ("version", env!("CARGO_PKG_VERSION").to_owned())]),
    );
    registry.sub_registry_with_prefix(format!("{prefix}_http")).register_collector(Box::new(EdgeCollector(edge)));
}

/// Encodes registries (the process's standing one and any built at scrape time) as one
/// Prometheus text answer.
pub fn metrics_response(registries: &[&Registry]) -> Response {
    let mut text = String::new();
    for r in registries {
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, r) {
            return crate::http::ApiError::internal(format!("encoding metrics: {e}")).into_response();
        }
    }
    ([("content-type", prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], text).into_response()
}

/// Encodes a gauge computed at scrape time (whole numbers without a decimal point).
pub fn const_gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    encode_gauge_value(m, v)
}

/// Encodes one gauge value: whole numbers as integers (`3`, not `3.0`), the rest as floats.
pub fn encode_gauge_value(m: prometheus_client::encoding::MetricEncoder, v: f64) -> Result<(), std::fmt::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        ConstGauge::new(v as i64).encode(m)
    } else {
        ConstGauge::new(v).encode(m)
    }
}

/// Encodes a counter read at scrape time (`name` without `_total`).
pub fn const_counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

/// `process_*` as the Prometheus client libraries name them, read from `/proc/self` at each
/// scrape (Linux; elsewhere only what is portable is shown).
#[derive(Debug)]
pub struct ProcessCollector;

/// One reading of this process from `/proc`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time.
    pub cpu_seconds: f64,
    /// Resident set size.
    pub resident_bytes: u64,
    /// Virtual memory size.
    pub virtual_bytes: u64,
    /// Threads.
    pub threads: u64,
    /// Start time (Unix seconds).
    pub start_time_seconds: f64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on file descriptors.
    pub max_fds: u64,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` where there is no procfs.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[0] is field 3 (state) of proc(5); field n is f[n - 3].
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let page = if page > 0 { page as u64 } else { 4096 };
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<u64>().ok())
        })?;
        let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we own.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 0 };
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            threads: field(20)?,
            start_time_seconds: boot as f64 + field(22)? as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds,
            max_fds: max_fds as u64,
        })
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(p) = ProcessStats::read() else { return Ok(()) };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        const_gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_bytes as f64,
        )?;
        const_gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_bytes as f64,
        )?;
        const_gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            p.start_time_seconds,
        )?;
        const_gauge(&mut encoder, "process_open_fds", "Number of open file descriptors", p.open_fds as f64)?;
        const_gauge(&mut encoder, "process_max_fds", "Maximum number of open file descriptors", p.max_fds as f64)?;
        const_gauge(&mut encoder, "process_threads", "Number of OS threads in the process", p.threads as f64)
    }
}

/// The HTTP edge's counters ([`EdgeStats`]), read at scrape time.
#[derive(Debug)]
struct EdgeCollector(Arc<EdgeStats>);

impl prometheus_client::collector::Collector for EdgeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        const_gauge(&mut encoder, "connections_open", "HTTP connections open now", load(&s.connections_open) as f64)?;
        const_counter(
            &mut encoder,
            "connections_accepted",
            "HTTP connections accepted",
            load(&s.connections_accepted_total),
        )?;
        const_counter(
            &mut encoder,
            "connections_refused",
            "HTTP connections closed at once because a connection cap was reached",
            load(&s.connections_refused_total),
        )?;
        const_counter(
            &mut encoder,
            "connections_timed_out",
            "HTTP connections closed for a header-read or idle timeout",
            load(&s.connections_timed_out_total),
        )?;
        const_counter(
            &mut encoder,
            "rate_limited",
            "HTTP requests answered 429 rate_limited",
            load(&s.rate_limited_total),
        )?;
        const_counter(
            &mut encoder,
            "forbidden_host",
            "HTTP requests answered 403 forbidden_host (a Host or Origin that is not this server)",
            load(&s.forbidden_host_total),
        )
    }
}

fn http_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Request durations by route template (axum's `MatchedPath`; `unmatched` for anything no route
/// took, so a scan of random paths adds no series), method and status.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    duration: Family<Labels, Histogram, fn() -> Histogram>,
}

impl HttpMetrics {
    /// Registers `<prefix>_http_request_duration_seconds`.
    pub fn register(registry: &mut Registry, prefix: &str) -> Arc<HttpMetrics> {
        let m = HttpMetrics { duration: Family::new_with_constructor(http_histogram as fn() -> Histogram) };
        registry.register(
            format!("{prefix}_http_request_duration_seconds"),
            "HTTP requests by route template, method and status: time to the response head",
            m.duration.clone(),
        );
        Arc::new(m)
    }

    fn observe(&self, route: String, method: &Method, status: u16, took: Duration) {
        let labels =
            vec![("route", route), ("method", method_label(method).to_owned()), ("status", status.to_string())];
        self.duration.get_or_create(&labels).observe(took.as_secs_f64());
    }
}

/// The route template a request matched, or `unmatched`.
pub fn route_of<B>(req: &axum::http::Request<B>) -> String {
    req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned())
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware (add with `Router::layer`, so `MatchedPath` is known): times each request.
pub async fn track_http(State(m): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let (route, method, start) = (route_of(&req), req.method().clone(), Instant::now());
    let resp = next.run(req).await;
    m.observe(route, &method, resp.status().as_u16(), start.elapsed());
    resp
}

/// Target of the request log lines (filter them with e.g. `shelfsync::request=warn`).
pub const REQUEST_LOG_TARGET: &str = "shelfsync::request";

/// Adds the request log to a router: one INFO line per answered request, target
/// [`REQUEST_LOG_TARGET`], inside a span with `method`, `route` (the template, not the raw path)
/// and `token` (the token's name, recorded by the auth middleware when a token was accepted);
/// the line itself carries `status` and `ms`.
pub fn with_request_log<S: Clone + Send + Sync + 'static>(router: axum::Router<S>) -> axum::Router<S> {
    use tower_http::trace::TraceLayer;
    router.layer(
        TraceLayer::new_for_http()
            .make_span_with(|req: &axum::http::Request<Body>| {
                tracing::info_span!(
                    target: REQUEST_LOG_TARGET,
                    "request",
                    method = %req.method(),
                    route = %route_of(req),
                    token = tracing::field::Empty,
                )
            })
            .on_request(())
            .on_response(|resp: &Response, took: Duration, _: &tracing::Span| {
                tracing::info!(
                    target: REQUEST_LOG_TARGET,
                    status = resp.status().as_u16(),
                    ms = (took.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
                    "request"
                );
            })
            .on_body_chunk(())
            .on_eos(())
            .on_failure(()),
    )
}

/// Records the authenticated token's name in the request span (see [`with_request_log`]).
pub fn record_token_name(name: &str) {
    tracing::Span::current().record("token", name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let p = ProcessStats::read().expect("procfs");
        assert!(p.resident_bytes > 0 && p.threads >= 1 && p.open_fds >= 1 && p.max_fds >= p.open_fds, "{p:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time_seconds > now - 3600.0 && p.start_time_seconds <= now + 1.0, "{p:?}");
    }

    #[test]
    fn encodes_prometheus_text() {
        let mut r = Registry::default();
        register_common(&mut r, "test", "shelfsync_test", Arc::new(EdgeStats::default()));
        let m = HttpMetrics::register(&mut r, "shelfsync_test");
        m.observe("/v1/x/{id}".into(), &Method::GET, 200, Duration::from_millis(3));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &r).unwrap();
        for want in [
            "# TYPE process_cpu_seconds_total counter",
            "shelfsync_build_info{binary=\"test\",version=\"",
            "shelfsync_test_http_connections_open 0",
            "shelfsync_test_http_rate_limited_total 0",
            "shelfsync_test_http_request_duration_seconds_count{route=\"/v1/x/{id}\",method=\"GET\",status=\"200\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
