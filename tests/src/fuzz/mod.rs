//! Fuzz targets as plain functions: each takes any bytes and must never panic (a panic is a
//! finding). `tests/fuzz/` runs them under libFuzzer (`cargo +nightly fuzz run <target>`), and
//! `tests/tests/fuzz_corpus.rs` replays the committed corpus through them on any toolchain.

mod gen;
mod http;
mod session;
mod wire;

/// The wire decoder on any bytes (every frame type), and round trips of what decodes or encodes.
pub fn wire(data: &[u8]) {
    wire::run(data)
}

/// An agent's sync session fed frames, host answers and clock ticks.
pub fn agent_session(data: &[u8]) {
    session::agent(data)
}

/// The hub's sync session fed frames, host answers and clock ticks.
pub fn hub_session(data: &[u8]) {
    session::hub(data)
}

/// One request with any body, query or path segment to the agent's HTTP API.
pub fn agent_bodies(data: &[u8]) {
    http::agent(data)
}

/// One request with any body, query or path segment to the hub's HTTP API.
pub fn hub_bodies(data: &[u8]) {
    http::hub(data)
}

/// A fuzz target: any bytes in, a panic on a finding.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `tests/fuzz/fuzz_targets/*.rs` and of the corpus folders).
pub const TARGETS: &[(&str, Target)] = &[
    ("wire", wire),
    ("agent_session", agent_session),
    ("hub_session", hub_session),
    ("agent_bodies", agent_bodies),
    ("hub_bodies", hub_bodies),
];
