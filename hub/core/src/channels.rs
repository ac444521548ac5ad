//! Sales channels (`hub/docs/channels.md`): web, app, marketplaces, click-and-collect. A channel
//! is head-office configuration kept as a decider record: which stores fulfil it, a buffer it may
//! not promise, a cap, and how late it hears what is left (a lagged marketplace gets a margin for
//! what sells while its listing is stale). Its available-to-sell (`ats`) per SKU is computed
//! here; reservations carry their channel and take only its stores within its `ats` (a lagged
//! channel's order beyond its stores' stock is recorded short, with a `channel_oversell`
//! conflict, since a marketplace cannot refuse an order at checkout).

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use shelfsync_shared::{Sku, StoreId};

use crate::availability::{cell_available, cell_figures, live_stores_of, poisson_quantile, DISCOUNT_CONFIDENCE};
use crate::command::{Done, Outcome, Refusal};
use crate::feed::{FeedData, FeedKind};
use crate::model::{SkuIx, StoreIx};
use crate::tables::Tables;
use crate::{Ctx, Decider};

/// The channel every token and reservation from before channels belongs to.
pub const WEB: &str = "web";
/// Most channels (besides the implicit `web`).
pub const CHANNELS_MAX: usize = 32;
/// Longest channel id, in bytes.
pub const CHANNEL_ID_MAX_LEN: usize = 32;
/// Most stores a channel may list.
pub const CHANNEL_STORES_MAX: usize = 10_000;
/// Longest lag of a lagged channel (a day).
pub const LAG_SECS_MAX: u64 = 86_400;
/// Largest buffer or cap in units.
pub const CHANNEL_UNITS_MAX: u64 = 1_000_000_000;
/// Most per-SKU buffers a channel may name.
pub const CHANNEL_SKU_BUFFERS_MAX: usize = 10_000;

/// A channel's id: 1 to 32 of `a-z 0-9 -`, starting with a letter or digit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelId(String);

impl ChannelId {
    /// `web`.
    pub fn web() -> ChannelId {
        ChannelId(WEB.to_owned())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it is `web`.
    pub fn is_web(&self) -> bool {
        self.0 == WEB
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ChannelId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= CHANNEL_ID_MAX_LEN
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-');
        if ok {
            Ok(ChannelId(s.to_owned()))
        } else {
            Err(format!(
                "a channel id is 1 to {CHANNEL_ID_MAX_LEN} of a-z 0-9 - (not starting with -), got {}",
                shelfsync_shared::id::quote(s)
            ))
        }
    }
}

impl TryFrom<String> for ChannelId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Lets maps keyed by channel id be read with a `&str` (`WEB`) without making an id.
impl std::borrow::Borrow<str> for ChannelId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<ChannelId> for String {
    fn from(c: ChannelId) -> String {
        c.0
    }
}

/// Which stores fulfil a channel's orders.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fulfil {
    /// Every store.
    #[default]
    All,
    /// Only these stores.
    Stores(BTreeSet<StoreId>),
    /// Click-and-collect: only reservations that name a pickup store (any store).
    Pickup,
}

/// Units a channel may not promise of a SKU: `max(units, ⌈share_pct × pool⌉)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Buffer {
    /// At least this many.
    pub units: u64,
    /// At least this percentage of the channel's pool (0..=100).
    pub share_pct: u64,
}

/// At most what a channel may promise of a SKU (each bound optional).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cap {
    /// At most this many units.
    pub units: Option<u64>,
    /// At most this percentage of what every store has available (0..=100).
    pub share_pct: Option<u64>,
}

/// How late a channel hears what is left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Latency {
    /// Asks at checkout (our own storefront, the app): refused beyond its `ats`.
    #[default]
    Live,
    /// Shows a listing up to `lag_secs` old and cannot refuse an order (a marketplace).
    Lagged {
        /// How old its listing may be.
        lag_secs: u64,
    },
}

/// A sales channel's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// Id.
    pub id: ChannelId,
    /// Which stores fulfil it.
    #[serde(default)]
    pub fulfil: Fulfil,
    /// What it may not promise.
    #[serde(default)]
    pub buffer: Buffer,
    /// At most what it may promise.
    #[serde(default)]
    pub cap: Cap,
    /// Live or lagged.
    #[serde(default)]
    pub latency: Latency,
    /// Per SKU, units withheld instead of `buffer` (head office holds more of a hot item back
    /// from one channel without touching the others).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sku_buffers: std::collections::BTreeMap<Sku, u64>,
}

impl Channel {
    /// `web` as it is when nobody configured it: every store, no buffer, no cap, live.
    pub fn web() -> Channel {
        Channel {
            id: ChannelId::web(),
            fulfil: Fulfil::All,
            buffer: Buffer::default(),
            cap: Cap::default(),
            latency: Latency::Live,
            sku_buffers: Default::default(),
        }
    }

    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let pct = |field: &str, v: u64| {
            if v > 100 {
                Err(format!("{field} must be between 0 and 100, got {v}"))
            } else {
                Ok(())
            }
        };
        let units = |field: &str, v: u64| {
            if v > CHANNEL_UNITS_MAX {
                Err(format!("{field} must be at most {CHANNEL_UNITS_MAX}, got {v}"))
            } else {
                Ok(())
            }
        };
        pct("buffer.share_pct", self.buffer.share_pct)?;
        units("buffer.units", self.buffer.units)?;
        if let Some(p) = self.cap.share_pct {
            pct("cap.share_pct", p)?;
        }
        if let Some(u) = self.cap.units {
            units("cap.units", u)?;
        }
        if let Fulfil::Stores(s) = &self.fulfil {
            if s.is_empty() || s.len() > CHANNEL_STORES_MAX {
                return Err(format!("fulfil.stores must list 1 to {CHANNEL_STORES_MAX} stores, got {}", s.len()));
            }
        }
        if self.sku_buffers.len() > CHANNEL_SKU_BUFFERS_MAX {
            return Err(format!(
                "sku_buffers may name at most {CHANNEL_SKU_BUFFERS_MAX} SKUs, got {}",
                self.sku_buffers.len()
            ));
        }
        if let Some((sku, u)) = self.sku_buffers.iter().find(|(_, u)| **u > CHANNEL_UNITS_MAX) {
            return Err(format!("sku_buffers.{sku} must be at most {CHANNEL_UNITS_MAX}, got {u}"));
        }
        if let Latency::Lagged { lag_secs } = self.latency {
            if lag_secs == 0 || lag_secs > LAG_SECS_MAX {
                return Err(format!("latency.lagged.lag_secs must be between 1 and {LAG_SECS_MAX}, got {lag_secs}"));
            }
        }
        Ok(())
    }

    /// Whether a store fulfils this channel's orders (`pickup`: the pickup store of the order).
    pub fn fulfils(&self, store: &StoreId) -> bool {
        match &self.fulfil {
            Fulfil::All | Fulfil::Pickup => true,
            Fulfil::Stores(s) => s.contains(store),
        }
    }

    /// Whether orders may be refused beyond `ats`.
    pub fn is_live(&self) -> bool {
        self.latency == Latency::Live
    }

    /// The stores its orders may take from, when it names them (`None`: any store).
    pub fn among(&self) -> Option<&BTreeSet<StoreId>> {
        match &self.fulfil {
            Fulfil::Stores(s) => Some(s),
            Fulfil::All | Fulfil::Pickup => None,
        }
    }
}

/// A channel's available-to-sell of one SKU, with how it came about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelFigures {
    /// The channel.
    pub channel: ChannelId,
    /// What its stores have available (after safety stock, staleness and escrow, as per store).
    pub pool: u64,
    /// Withheld by its buffer.
    pub buffer: u64,
    /// Withheld for what may sell while a lagged channel's listing is stale.
    pub lag_margin: u64,
    /// Its cap (`None`: none).
    pub cap: Option<u64>,
    /// What it may promise now.
    pub ats: u64,
}

/// Whether figures are for a read (staleness discount as of now) or for the feed (without it:
/// the feed's figures only move with decisions, never with time alone).
#[derive(Clone, Copy)]
pub(crate) enum Basis<'a> {
    Read { now_ms: i64, connected: &'a HashSet<StoreId>, staleness: crate::availability::Staleness },
    Feed,
}

fn store_available(t: &Tables, st: StoreIx, sk: SkuIx, basis: Basis<'_>) -> u64 {
    match basis {
        Basis::Read { now_ms, connected, staleness } => cell_figures(t, st, sk, now_ms, connected, staleness).available,
        Basis::Feed => cell_available(t, st, sk).0,
    }
}

/// A channel's figures of a SKU. The lag margin is the 99.9 % Poisson quantile of what can take
/// its listed units while its listing is stale, over `lag_secs`: what the channel's stores sell
/// at their sales velocity, and what every other channel reserves of the SKU at its
/// reservation velocity (each as of its last update).
pub(crate) fn figures(t: &Tables, ch: &Channel, sk: SkuIx, basis: Basis<'_>) -> ChannelFigures {
    let (mut pool, mut chain, mut rate_per_ms) = (0u64, 0u64, 0f64);
    for st in live_stores_of(t, sk) {
        let a = store_available(t, st, sk, basis);
        chain = chain.saturating_add(a);
        if ch.fulfils(&t.store(st).id) {
            pool = pool.saturating_add(a);
            let score = t.cell(st, sk).and_then(|c| c.velocity).map_or(0.0, |v| v.score);
            rate_per_ms += score / t.tau_ms.max(1) as f64;
        }
    }
    if let Some(others) = t.channel_demand.get(&sk) {
        for (c, v) in others {
            if *c != ch.id {
                rate_per_ms += v.score / t.tau_ms.max(1) as f64;
            }
        }
    }
    let lag_margin = match ch.latency {
        Latency::Live => 0,
        Latency::Lagged { lag_secs } => poisson_quantile(rate_per_ms * (lag_secs * 1000) as f64, DISCOUNT_CONFIDENCE),
    };
    let share = (ch.buffer.share_pct as f64 * pool as f64 / 100.0 - 1e-9).ceil().max(0.0) as u64;
    let buffer = match ch.sku_buffers.get(&t.sku(sk).sku) {
        Some(units) => *units,
        None => ch.buffer.units.max(share),
    };
    let cap = match (ch.cap.units, ch.cap.share_pct) {
        (None, None) => None,
        (u, p) => {
            let by_share = p.map(|p| (p as f64 * chain as f64 / 100.0 + 1e-9).floor() as u64);
            Some(u.unwrap_or(u64::MAX).min(by_share.unwrap_or(u64::MAX)))
        }
    };
    let ats = pool.saturating_sub(buffer).saturating_sub(lag_margin).min(cap.unwrap_or(u64::MAX));
    ChannelFigures { channel: ch.id.clone(), pool, buffer, lag_margin, cap, ats }
}

/// Emits `channel_ats_changed` for every configured channel whose feed `ats` of the SKU moved
/// (after a change of one of its cells, of the catalog or of the channel).
pub(crate) fn emit_ats(t: &mut Tables, sk: SkuIx, now_ms: i64) {
    if t.channels.is_empty() {
        return;
    }
    let changed: Vec<ChannelFigures> = t
        .channels
        .values()
        .map(|ch| figures(t, ch, sk, Basis::Feed))
        .filter(|f| t.announced_ats(&f.channel, sk) != f.ats)
        .collect();
    for f in changed {
        t.set_channel_ats(&f.channel, sk, f.ats);
        let sku = t.sku(sk).sku.clone();
        t.emit(FeedKind::ChannelAtsChanged, now_ms, FeedData::ChannelAts { sku, figures: f });
    }
}

/// What the decider remembers of every channel's feed `ats` (rebuilt from the state on load).
pub(crate) fn rebuild_ats(t: &mut Tables) {
    let channels: Vec<Channel> = t.channels.values().cloned().collect();
    for ch in channels {
        for i in 0..t.skus.len() {
            let sk = SkuIx(i as u32);
            let f = figures(t, &ch, sk, Basis::Feed);
            if f.ats > 0 {
                t.set_channel_ats(&ch.id, sk, f.ats);
            }
        }
    }
}

/// Adds or replaces a channel; announces its `ats` of every SKU.
pub(crate) fn put(cx: &mut Ctx<'_>, ch: &Channel) -> Outcome {
    ch.validate().map_err(Refusal::Invalid)?;
    if !cx.t.channels.contains_key(&ch.id) && cx.t.channels.len() >= CHANNELS_MAX {
        return Err(Refusal::Invalid(format!("there are {CHANNELS_MAX} channels already; remove one first")));
    }
    if let Fulfil::Stores(stores) = &ch.fulfil {
        if let Some(s) = stores.iter().find(|s| !cx.t.store_ix.contains_key(*s)) {
            return Err(Refusal::UnknownStore(s.clone()));
        }
    }
    cx.t.put_channel(ch.clone());
    for i in 0..cx.t.skus.len() {
        emit_ats(cx.t, SkuIx(i as u32), cx.now);
    }
    Ok(Done::ChannelPut(ch.clone()))
}

/// Removes a channel (not `web`, which always exists). Its reservations keep its id.
pub(crate) fn remove(cx: &mut Ctx<'_>, id: &ChannelId) -> Outcome {
    if id.is_web() {
        return Err(Refusal::Invalid("channel web always exists; it cannot be removed".into()));
    }
    if !cx.t.channels.contains_key(id) {
        return Err(Refusal::NotFound(format!("no channel {id}")));
    }
    cx.t.remove_channel(id);
    Ok(Done::ChannelRemoved(id.clone()))
}

/// A lagged channel's order took `short` units of a SKU more than its stores had: they were
/// recorded short at store `at`; a `channel_oversell` conflict names the channel, what it had to
/// sell (`f`) and the reservation, and the feed tells it (`reservation_short`, `channel_oversell`).
pub(crate) fn oversell(
    cx: &mut Ctx<'_>,
    ch: &Channel,
    reservation: uuid::Uuid,
    sk: SkuIx,
    at: StoreIx,
    short: u64,
    f: &ChannelFigures,
) {
    let now = cx.now;
    let (store, sku) = (cx.t.store(at).id.clone(), cx.t.sku(sk).sku.clone());
    let lag_secs = match ch.latency {
        Latency::Lagged { lag_secs } => lag_secs,
        Latency::Live => 0,
    };
    let conflict = crate::model::Conflict {
        id: cx.t.mint(now),
        kind: crate::model::ConflictKind::ChannelOversell,
        store: store.clone(),
        sku: Some(sku.clone()),
        shortfall: short,
        reservations: vec![reservation],
        resolution: format!(
            "channel {} sold {short} more than its stores had; the units are short on the reservation \
             (a larger buffer or lag for the channel would have kept them)",
            ch.id
        ),
        status: crate::model::ConflictStatus::Open,
        detected_at_ms: now,
        resolved_at_ms: None,
        details: Some(serde_json::json!({
            "channel": ch.id, "ats": f.ats, "pool": f.pool, "buffer": f.buffer, "lag_margin": f.lag_margin,
            "lag_secs": lag_secs,
        })),
    };
    cx.t.put_conflict(conflict.clone());
    let view = crate::view::build(cx.t, &cx.t.reservations[&reservation]);
    cx.t.emit(FeedKind::ReservationShort, now, FeedData::Short { reservation: view, store, sku, short });
    cx.t.emit(FeedKind::ChannelOversell, now, FeedData::Conflict { conflict });
}

/// The stores a reservation of `channel` may take from (`None`: any store).
pub(crate) fn among_of(t: &Tables, channel: Option<&ChannelId>) -> Option<BTreeSet<StoreId>> {
    t.channels.get(channel?)?.among().cloned()
}

impl Tables {
    /// A channel by id (`web` as configured, else its defaults; `None`: no such channel).
    pub(crate) fn channel(&self, id: &ChannelId) -> Option<Channel> {
        match self.channels.get(id) {
            Some(c) => Some(c.clone()),
            None if id.is_web() => Some(Channel::web()),
            None => None,
        }
    }
}

impl Decider {
    /// Every channel, by id (`web` included, configured or not).
    pub fn channels(&self) -> Vec<Channel> {
        let mut out: Vec<Channel> = self.t.channels.values().cloned().collect();
        if !self.t.channels.contains_key(WEB) {
            out.push(Channel::web());
            out.sort_by(|a, b| a.id.cmp(&b.id));
        }
        out
    }

    /// The channels head office configured (`web` only when it was).
    pub fn configured_channels(&self) -> BTreeSet<ChannelId> {
        self.t.channels.keys().cloned().collect()
    }

    /// Each configured channel's available-to-sell summed over every SKU, as last announced on
    /// the feed (without any staleness discount), by id.
    pub fn ats_totals(&self) -> Vec<(ChannelId, u64)> {
        self.t
            .channels
            .keys()
            .map(|id| {
                let total =
                    self.t.channel_ats.get(id).map_or(0, |m| m.values().fold(0u64, |a, n| a.saturating_add(*n)));
                (id.clone(), total)
            })
            .collect()
    }

    /// One channel (`None`: no such channel).
    pub fn channel(&self, id: &ChannelId) -> Option<Channel> {
        self.t.channel(id)
    }

    /// A channel's available-to-sell of a SKU as of `now_ms` (`None`: no such channel).
    pub fn channel_figures(
        &self,
        id: &ChannelId,
        sku: &Sku,
        now_ms: i64,
        connected: &HashSet<StoreId>,
    ) -> Option<ChannelFigures> {
        let ch = self.t.channel(id)?;
        let basis = Basis::Read { now_ms, connected, staleness: self.config.staleness };
        Some(match self.t.sku_ix.get(sku) {
            Some(&sk) => figures(&self.t, &ch, sk, basis),
            None => ChannelFigures { channel: ch.id, pool: 0, buffer: 0, lag_margin: 0, cap: None, ats: 0 },
        })
    }
}
