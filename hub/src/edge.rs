//! The hub API's rate limits: which class a request belongs to, and the middleware that charges it
//! to its token (or, without one, to its client address) before any handler or storage sees it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shelfsync_node::http::{client_key, peer_ip};
use shelfsync_node::ratelimit::{Key, Limiter};

/// The rate-limit class of a request (see `[http.rate_limit]` in `config/hub.toml`).
pub fn class(method: &Method, path: &str, key: &Key) -> &'static str {
    if matches!(key, Key::Addr(_)) {
        "unauthenticated"
    } else if path == "/v1/events" {
        "events"
    } else if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        "reads"
    } else if path == "/v1/reservations" || path.starts_with("/v1/reservations/") {
        "writes"
    } else {
        "admin"
    }
}

/// Middleware: charge the request to its class, answer 429 when over. A request whose token is
/// refused (401: unknown, revoked or expired, as judged per request by `Hub::authenticate`) is
/// also charged to its address as unauthenticated, so made-up or dead tokens (each its own key)
/// cannot dodge the limits.
pub async fn rate_limit(State(limiter): State<Arc<Limiter>>, req: Request, next: Next) -> Response {
    let key = limiter.key(&req);
    if let Err(limited) = limiter.check(class(req.method(), req.uri().path(), &key), &key) {
        return limited.into_response();
    }
    let addr = Key::Addr(client_key(peer_ip(&req)));
    let resp = next.run(req).await;
    if resp.status() == StatusCode::UNAUTHORIZED && matches!(key, Key::Token(_)) {
        if let Err(limited) = limiter.check("unauthenticated", &addr) {
            return limited.into_response();
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let t = shelfsync_node::ratelimit::token_key("t");
        let a = Key::Addr("127.0.0.1".parse().unwrap());
        assert_eq!(class(&Method::GET, "/v1/availability/A", &a), "unauthenticated");
        assert_eq!(class(&Method::GET, "/v1/availability/A", &t), "reads");
        assert_eq!(class(&Method::GET, "/v1/reservations/x", &t), "reads");
        assert_eq!(class(&Method::GET, "/v1/events", &t), "events");
        assert_eq!(class(&Method::POST, "/v1/reservations", &t), "writes");
        assert_eq!(class(&Method::DELETE, "/v1/reservations/x", &t), "writes");
        assert_eq!(class(&Method::POST, "/v1/reservations/x/commit", &t), "writes");
        assert_eq!(class(&Method::POST, "/v1/restocks", &t), "admin");
        assert_eq!(class(&Method::PUT, "/v1/catalog/A", &t), "admin");
        assert_eq!(class(&Method::POST, "/v1/reservationsX", &t), "admin");
    }
}
