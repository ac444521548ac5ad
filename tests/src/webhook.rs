//! A tiny HTTP server on 127.0.0.1:0 that records webhook deliveries, optionally failing (or
//! redirecting) the first attempts, to see retries.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One received POST.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Lower-cased header names with values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Delivery {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The sink; stops when dropped.
pub struct WebhookSink {
    /// `http://127.0.0.1:port/hook`.
    pub url: String,
    /// Accepted deliveries, in arrival order.
    pub received: Arc<Mutex<Vec<Delivery>>>,
    /// Attempts answered with 503 (or the configured answer) so far.
    pub refused: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebhookSink {
    /// Starts; the first `fail_first` requests are answered 503.
    pub async fn start(fail_first: usize) -> WebhookSink {
        Self::start_answering(fail_first, "503 Service Unavailable".into()).await
    }

    /// Starts; the first `first` requests are answered with `answer` (a status line's code and
    /// reason, optionally followed by `\r\n`-separated headers, e.g. a redirect's `location`).
    pub async fn start_answering(first: usize, answer: String) -> WebhookSink {
        let fail_first = first;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let (rx, rf) = (received.clone(), refused.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (rx, rf, answer) = (rx.clone(), rf.clone(), answer.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut headers = Vec::new();
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                            }
                        }
                        let len: usize = headers
                            .iter()
                            .find(|(k, _)| k == "content-length")
                            .and_then(|(_, v)| v.parse().ok())
                            .unwrap_or(0)
                            .min(1 << 20);
                        let mut body = vec![0u8; len];
                        if reader.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let status = if rf.load(Ordering::SeqCst) < fail_first {
                            rf.fetch_add(1, Ordering::SeqCst);
                            answer.as_str()
                        } else {
                            rx.lock().unwrap().push(Delivery { headers, body });
                            "200 OK"
                        };
                        let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                        if write.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WebhookSink { url, received, refused, task }
    }
}
