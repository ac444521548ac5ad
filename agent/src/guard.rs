//! The agent API's edge checks, before any handler: `Host` (and `Origin`, when sent) must name this
//! agent, so a web page whose DNS name was rebound to 127.0.0.1 cannot drive the POS API from a
//! browser; and request rate limits per token or client address.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shelfsync_shared::id::quote;

use shelfsync_node::http::{ApiError, EdgeStats};
use shelfsync_node::ratelimit::Limiter;

/// Which `Host` and `Origin` values name this agent.
#[derive(Clone, Debug)]
pub struct HostPolicy {
    /// The bound address (its port is the only port accepted).
    pub addr: SocketAddr,
    /// Extra host names (`api.allowed_hosts`), lower case.
    pub extra: Vec<String>,
}

impl HostPolicy {
    /// A policy for an agent bound to `addr`.
    pub fn new(addr: SocketAddr, extra: &[String]) -> Self {
        HostPolicy { addr, extra: extra.iter().map(|h| h.to_ascii_lowercase()).collect() }
    }

    /// Whether `host:port` names this agent: loopback (`127.0.0.0/8`, `::1`, `localhost`), the
    /// listen address, any IP literal when listening on all interfaces (an address cannot be
    /// rebound, a name can), or a configured name; always with the bound port.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        if port != self.addr.port() {
            return false;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Ok(ip) = IpAddr::from_str(host) {
            return ip.is_loopback() || ip == self.addr.ip() || self.addr.ip().is_unspecified();
        }
        let host = host.to_ascii_lowercase();
        host == "localhost" || self.extra.contains(&host)
    }

    /// Checks a request's target (`Host`, or the authority of an absolute URI) and its `Origin`.
    pub fn check(&self, req: &Request) -> Result<(), ApiError> {
        let host = match req.uri().authority() {
            Some(a) => a.as_str().to_owned(),
            None => match req.headers().get(header::HOST).map(|h| h.to_str()) {
                Some(Ok(h)) => h.to_owned(),
                Some(Err(_)) => return Err(forbidden("Host", "<not ASCII>")),
                None => return Err(forbidden("Host", "<none>")),
            },
        };
        let ok = Authority::from_str(&host).ok().is_some_and(|a| self.allows(a.host(), a.port_u16().unwrap_or(80)));
        if !ok {
            return Err(forbidden("Host", &host));
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let text = origin.to_str().unwrap_or("<not ASCII>");
            let ok = Uri::from_str(text).ok().is_some_and(|u| {
                let default_port = match u.scheme_str() {
                    Some("http") => 80,
                    Some("https") => 443,
                    _ => return false,
                };
                u.authority().is_some_and(|a| self.allows(a.host(), a.port_u16().unwrap_or(default_port)))
            });
            if !ok {
                return Err(forbidden("Origin", text));
            }
        }
        Ok(())
    }
}

fn forbidden(what: &str, value: &str) -> ApiError {
    let value: String = value.chars().take(256).collect();
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden_host",
        format!(
            "{what} {} does not name this agent; use its listen address, 127.0.0.1 or localhost with its port, or \
             add the name to api.allowed_hosts",
            quote(&value)
        ),
    )
    .with("host", value)
}

/// What the edge checks need.
pub struct Guard {
    /// `Host`/`Origin` policy.
    pub hosts: HostPolicy,
    /// Request rate limits (`writes`, `reads`).
    pub limiter: Arc<Limiter>,
    /// Counters for `/metrics`.
    pub stats: Arc<EdgeStats>,
}

/// The rate-limit class of a request at the agent.
pub fn class(method: &Method) -> &'static str {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        "reads"
    } else {
        "writes"
    }
}

/// Middleware: host check, then rate limit, then the route.
pub async fn check(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    if let Err(e) = guard.hosts.check(&req) {
        guard.stats.forbidden_host_total.fetch_add(1, Ordering::Relaxed);
        return e.into_response();
    }
    let key = guard.limiter.key(&req);
    if let Err(limited) = guard.limiter.check(class(req.method()), &key) {
        return limited.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_policy() {
        let p = HostPolicy::new("127.0.0.1:7070".parse().unwrap(), &["pos-box.local".to_string()]);
        for ok in ["127.0.0.1", "localhost", "LOCALHOST", "[::1]", "127.0.0.2", "pos-box.local", "localhost."] {
            assert!(p.allows(ok, 7070), "{ok}");
        }
        assert!(!p.allows("127.0.0.1", 80), "wrong port");
        for bad in ["evil.example", "192.168.1.10", "localhost.evil.example", ""] {
            assert!(!p.allows(bad, 7070), "{bad}");
        }
    }

    #[test]
    fn any_interface_accepts_address_literals_only() {
        let p = HostPolicy::new("0.0.0.0:7070".parse().unwrap(), &[]);
        assert!(p.allows("192.168.1.10", 7070));
        assert!(p.allows("[fe80::1]", 7070));
        assert!(!p.allows("store-12.example", 7070));
        let p = HostPolicy::new("192.168.1.10:7070".parse().unwrap(), &[]);
        assert!(p.allows("192.168.1.10", 7070));
        assert!(!p.allows("192.168.1.11", 7070));
    }
}
