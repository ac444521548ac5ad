//! A small typed client of an agent's (or hub's) HTTP API, used by the CLIs, tests and benchmarks.

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// A failed call: either the server could not be reached or it answered with an error.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer.
    #[error("cannot reach {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    /// An error answer (`{"error","message"}`).
    #[error("{status} {code}: {message}")]
    Api { status: StatusCode, code: String, message: String, body: Value },
}

/// An API client bound to one base URL.
#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client for `base` (e.g. `http://127.0.0.1:7070`) with an optional bearer token.
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("a plain HTTP client always builds");
        ApiClient { base: base.into().trim_end_matches('/').to_owned(), token, http }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One call; returns the status and JSON body of a 2xx answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|source| ClientError::Unreachable { url: url.clone(), source })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Unreachable { url, source })?;
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_success() {
            Ok((status, body))
        } else {
            let field = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
            Err(ClientError::Api { status, code: field("error"), message: field("message"), body })
        }
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        Ok(self.call(Method::GET, path, None).await?.1)
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(StatusCode, Value), ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }
}
