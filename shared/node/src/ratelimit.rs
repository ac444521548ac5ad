//! Request rate limits of both HTTP APIs: one GCRA limiter ([`governor`]) per route class, keyed
//! by a hash of the request's bearer token when it carries one the server may key by, else by the
//! client's address. Over the limit a request is answered `429 {"error":"rate_limited",...}` with
//! `Retry-After`, before any handler (or storage) sees it.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::http::{bearer, client_key, constant_time_eq, peer_ip, ApiError, EdgeStats};

/// One class's limit: `per_sec` requests per second sustained, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_sec: u32,
    /// Requests that may arrive at once after a quiet spell.
    pub burst: u32,
}

impl RateLimit {
    /// A limit.
    pub const fn new(per_sec: u32, burst: u32) -> Self {
        RateLimit { per_sec, burst }
    }

    /// `None` if the limit is usable, else why not (for config validation).
    pub fn problem(&self) -> Option<&'static str> {
        if self.per_sec == 0 || self.per_sec > 10_000_000 {
            Some("per_sec must be between 1 and 10000000")
        } else if self.burst == 0 || self.burst > 10_000_000 {
            Some("burst must be between 1 and 10000000")
        } else {
            None
        }
    }

    fn quota(&self) -> Quota {
        let per_sec = NonZeroU32::new(self.per_sec.max(1)).expect("nonzero");
        let burst = NonZeroU32::new(self.burst.max(1)).expect("nonzero");
        Quota::per_second(per_sec).allow_burst(burst)
    }
}

/// Who a request is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A bearer token, by the first 16 bytes of its SHA-256 (tokens are never kept in clear).
    Token([u8; 16]),
    /// A client address (IPv6 by its /64).
    Addr(IpAddr),
}

/// Which bearer tokens may be keys: at the hub any (each token is its own client, and requests
/// whose token is refused with 401 are also charged to their address); at the agent only its
/// configured token, so made-up tokens cannot dodge the per-address limit.
#[derive(Clone, Debug)]
pub enum TokenKeys {
    /// Any bearer token.
    Any,
    /// Only this token (none configured: never a token).
    Only(Option<Arc<str>>),
}

struct Class {
    name: &'static str,
    limit: RateLimit,
    limiter: DefaultKeyedRateLimiter<Key>,
}

/// The limiters of one server.
pub struct Limiter {
    enabled: bool,
    classes: Vec<Class>,
    tokens: TokenKeys,
    stats: Arc<EdgeStats>,
    checks: AtomicU64,
    clock: DefaultClock,
}

/// Forgotten keys are pruned after this many checks, so a flood of distinct addresses or made-up
/// tokens cannot grow the maps without bound.
const PRUNE_EVERY: u64 = 8192;

/// A request over its limit.
#[derive(Debug)]
pub struct RateLimited {
    /// The route class.
    pub class: &'static str,
    /// Its limit.
    pub limit: RateLimit,
    /// Whole seconds until a request would pass (at least 1).
    pub retry_after_secs: u64,
    /// Counted by token or by address.
    pub by_token: bool,
}

impl IntoResponse for RateLimited {
    fn into_response(self) -> Response {
        let who = if self.by_token { "this token" } else { "your address" };
        let message = format!(
            "too many {} requests from {who}: the limit is {}/s with bursts of {}; retry after {} s",
            self.class, self.limit.per_sec, self.limit.burst, self.retry_after_secs
        );
        let mut resp = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
            .with("class", self.class)
            .with("retry_after_secs", self.retry_after_secs)
            .into_response();
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after_secs));
        resp
    }
}

impl Limiter {
    /// Limiters for `classes`; when `enabled` is false every check passes.
    pub fn new(
        enabled: bool,
        classes: &[(&'static str, RateLimit)],
        tokens: TokenKeys,
        stats: Arc<EdgeStats>,
    ) -> Arc<Limiter> {
        let classes = classes
            .iter()
            .map(|&(name, limit)| Class { name, limit, limiter: DefaultKeyedRateLimiter::keyed(limit.quota()) })
            .collect();
        Arc::new(Limiter { enabled, classes, tokens, stats, checks: AtomicU64::new(0), clock: DefaultClock::default() })
    }

    /// The key of a request: its token when that may be a key, else its client address.
    pub fn key(&self, req: &Request) -> Key {
        if let Some(token) = bearer(req.headers()) {
            let usable = match &self.tokens {
                TokenKeys::Any => true,
                TokenKeys::Only(Some(t)) => constant_time_eq(token.as_bytes(), t.as_bytes()),
                TokenKeys::Only(None) => false,
            };
            if usable {
                return token_key(token);
            }
        }
        Key::Addr(client_key(peer_ip(req)))
    }

    /// Takes one request of `class` from `key`'s allowance. An unknown class passes.
    pub fn check(&self, class: &'static str, key: &Key) -> Result<(), RateLimited> {
        if !self.enabled {
            return Ok(());
        }
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            for c in &self.classes {
                c.limiter.retain_recent();
                c.limiter.shrink_to_fit();
            }
        }
        let Some(c) = self.classes.iter().find(|c| c.name == class) else { return Ok(()) };
        c.limiter.check_key(key).map_err(|not_until| {
            self.stats.rate_limited_total.fetch_add(1, Ordering::Relaxed);
            let wait = not_until.wait_time_from(self.clock.now());
            RateLimited {
                class: c.name,
                limit: c.limit,
                retry_after_secs: (wait.as_secs_f64().ceil() as u64).max(1),
                by_token: matches!(key, Key::Token(_)),
            }
        })
    }
}

/// The key of a bearer token.
pub fn token_key(token: &str) -> Key {
    let digest = Sha256::digest(token.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&digest[..16]);
    Key::Token(k)
}
