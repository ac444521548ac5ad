//! A small W3C WebDriver client (plain HTTP JSON) that drives headless Chromium through
//! `chromedriver` on a loopback port, for tests of the pages the hub serves. Chromium and
//! chromedriver are required (Debian: `apt-get install chromium chromium-driver`); a test that
//! needs them fails, saying so, when they are missing. Dropping the [`Browser`] ends the session
//! and kills chromedriver and every browser process it started.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// Chromium flags for a quiet, sandbox-free headless run in a container.
const CHROMIUM_ARGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
];

/// The first of `names` found on `PATH` (or `env` when set).
fn locate(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/lib/chromium")]) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn missing(what: &str, env: &str) -> ! {
    panic!(
        "{what} is missing: this test drives a real headless browser. Install it with \
         `apt-get install chromium chromium-driver` (Debian; CI does this in .ci/run), or point \
         {env} at the executable."
    )
}

/// A headless Chromium session driven through chromedriver.
pub struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a session with a fresh profile.
    pub async fn start() -> Browser {
        let driver_bin = locate("SHELFSYNC_CHROMEDRIVER", &["chromedriver"])
            .unwrap_or_else(|| missing("chromedriver", "SHELFSYNC_CHROMEDRIVER"));
        let chromium = locate("SHELFSYNC_CHROMIUM", &["chromium", "chromium-browser", "google-chrome"])
            .unwrap_or_else(|| missing("chromium", "SHELFSYNC_CHROMIUM"));
        let profile = tempfile::Builder::new().prefix("shelfsync-chromium-").tempdir().expect("profile dir");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("http client");
        // A free port: bind, learn it, release it; retried in the unlikely case another process
        // takes it in between.
        for attempt in 0..5 {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let mut cmd = Command::new(&driver_bin);
            cmd.arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            #[cfg(unix)]
            {
                // Its own process group, so Drop can kill chromedriver and the browser together.
                use std::os::unix::process::CommandExt;
                cmd.process_group(0);
            }
            let mut driver = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", driver_bin.display()));
            let base = format!("http://127.0.0.1:{port}");
            if !ready(&http, &base, &mut driver).await {
                kill_group(&mut driver);
                eprintln!("chromedriver did not come up on port {port} (attempt {attempt}); retrying");
                continue;
            }
            let caps = json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": CHROMIUM_ARGS.iter().map(|a| a.to_string())
                        .chain([format!("--user-data-dir={}", profile.path().display())])
                        .collect::<Vec<_>>(),
                },
            }}});
            let r = http.post(format!("{base}/session")).json(&caps).send().await;
            let v: Value = match r {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(e) => {
                    kill_group(&mut driver);
                    panic!("opening a WebDriver session: {e}");
                }
            };
            let Some(session) = v["value"]["sessionId"].as_str().map(str::to_owned) else {
                kill_group(&mut driver);
                panic!("chromedriver could not start {}: {v}", chromium.display());
            };
            return Browser { http, base, session, driver, _profile: profile };
        }
        panic!("chromedriver ({}) did not start on a loopback port after 5 attempts", driver_bin.display());
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = r.status();
        let v: Value = r.json().await.unwrap_or_else(|e| panic!("WebDriver {method} {path}: not JSON: {e}"));
        assert!(status.is_success(), "WebDriver {method} {path} answered {status}: {v}");
        v["value"].clone()
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page; its return value.
    pub async fn eval(&self, script: &str, args: Vec<Value>) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": args }))).await
    }

    /// The visible text of the first element matching `selector` (`""` when there is none).
    pub async fn text(&self, selector: &str) -> String {
        let v = self
            .eval("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", vec![json!(selector)])
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Types `text` into the element matching `selector` (CSS) and presses nothing else.
    pub async fn type_into(&self, selector: &str, text: &str) {
        let el = self
            .call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": selector})))
            .await;
        let id = el.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("element id").to_owned();
        self.call(reqwest::Method::POST, &format!("/element/{id}/value"), Some(json!({ "text": text }))).await;
    }

    /// Clicks the element matching `selector` (CSS).
    pub async fn click(&self, selector: &str) {
        let el = self
            .call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": selector})))
            .await;
        let id = el.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("element id").to_owned();
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        decode_base64(v.as_str().expect("a base64 screenshot")).expect("valid base64")
    }

    /// Saves a screenshot as `name` in `dir` (created if needed); its path.
    pub async fn save_screenshot(&self, dir: &Path, name: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join(name);
        std::fs::write(&path, self.screenshot().await).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}

async fn ready(http: &reqwest::Client, base: &str, driver: &mut Child) -> bool {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < until {
        if let Ok(Some(_)) = driver.try_wait() {
            return false;
        }
        if let Ok(r) = http.get(format!("{base}/status")).send().await {
            if let Ok(v) = r.json::<Value>().await {
                if v["value"]["ready"] == true {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn kill_group(driver: &mut Child) {
    #[cfg(unix)]
    // SAFETY: kill(2) on the process group we created for our own child.
    unsafe {
        libc::kill(-(driver.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = driver.kill();
    let _ = driver.wait();
}

impl Drop for Browser {
    fn drop(&mut self) {
        // End the session (chromedriver closes the browser), then kill whatever is left. Plain
        // blocking HTTP: Drop cannot await, and this may run outside any runtime.
        let addr = self.base.trim_start_matches("http://").to_owned();
        if let Ok(mut s) = TcpStream::connect(&addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
            let req = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session
            );
            if s.write_all(req.as_bytes()).is_ok() {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        }
        kill_group(&mut self.driver);
    }
}

/// Standard base64 (with or without padding); `None` on anything else.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]),
            3 => out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8]),
            2 => out.push((n >> 16) as u8),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes_padded_and_unpadded() {
        assert_eq!(super::decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(super::decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(super::decode_base64("aGV5").unwrap(), b"hey");
        assert!(super::decode_base64("a$==").is_none());
    }
}
