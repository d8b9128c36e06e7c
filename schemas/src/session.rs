//! The session part of a user's state, its long-term history, and the one rule that advances
//! both.
//!
//! Streaming, offline scoring and training all call [`SessionState::advance`], so a session
//! boundary is decided the same way everywhere.

use crate::{Event, EventType};
use serde::{Deserialize, Serialize};

/// How sessions are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Inactivity after which the next event starts a new session (default 30 minutes).
    pub gap_ms: i64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { gap_ms: 30 * 60 * 1000 }
    }
}

/// Per-user session counters and times. A fresh user is `SessionState::default()`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionState {
    /// The shop's session id of the current session, if events carry one.
    pub session_id: Option<String>,
    /// Index of the current session among the user's sessions (0-based).
    pub session_seq: u32,
    /// Events in the current session so far.
    pub events: u32,
    /// Units in the cart (adds minus removes, never below zero).
    pub cart_count: u32,
    /// Value of the units in the cart (never below zero).
    pub cart_value: f64,
    /// Time of the first event of the current session (epoch ms).
    pub started_ms: i64,
    /// Latest event time seen in the current session (epoch ms).
    pub last_ts_ms: i64,
    /// Whether the current session already purchased; the next event then opens a new session.
    pub purchased: bool,
    /// Every event ever applied to this user, across sessions.
    pub total_events: u64,
    /// [`item_key`] of the latest event's item in the current session, if it named one.
    pub last_item: Option<u64>,
    /// What the current session did so far: counts by kind, prices, distinct items.
    pub counts: SessionCounts,
    /// What the user did before, across sessions: the long-term half of the state, which a new
    /// session does not reset.
    pub history: UserHistory,
}

/// The current session's counts and price statistics, reset with it: the aggregates a logistic
/// regression on the session so far would use, kept so the model can read them on every event.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionCounts {
    /// Views and clicks.
    pub browsed: u32,
    /// Add-to-cart events.
    pub added: u32,
    /// Remove-from-cart events.
    pub removed: u32,
    /// Wishlist events.
    pub wished: u32,
    /// Events with a price.
    pub priced: u32,
    /// Sum of those prices (f32, as stored).
    pub price_sum: f32,
    /// Highest of those prices.
    pub price_max: f32,
    /// Lowest of those prices.
    pub price_min: f32,
    /// The items seen, as a [`DistinctSketch`].
    pub items: DistinctSketch,
    /// The categories seen (id, else path), as a [`DistinctSketch`].
    pub categories: DistinctSketch,
}

/// A 32-bit linear-counting sketch of distinct keys: each key sets one bit; the count is
/// estimated from the bits still clear (1 key reads 1.02, 3 distinct keys 3.15 unless two share
/// a bit; about 12-15 % off on average at 30-50 keys; all bits set reads 133): enough for a
/// feature on a log scale, in 4 bytes per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DistinctSketch(pub u32);

impl DistinctSketch {
    /// Adds a key (an [`item_key`]).
    pub fn insert(&mut self, key: u64) {
        // FNV-1a leaves keys that differ in their last bytes alike in their high bits: mix
        // them first (MurmurHash3's finaliser), then take 5 bits.
        let mut k = key;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^= k >> 33;
        self.0 |= 1 << (k >> 59);
    }

    /// The estimated number of distinct keys added.
    pub fn estimate(self) -> f64 {
        let clear = f64::from(self.0.count_zeros()).max(0.5);
        -32.0 * (clear / 32.0).ln()
    }
}

/// A user's long-term counters, kept across sessions (the session counters beside them are
/// reset at every session boundary). With [`SessionState::session_seq`] (sessions before the
/// current one) and [`SessionState::total_events`] they tell a returning buyer from a first
/// visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserHistory {
    /// Purchase events ever applied.
    pub purchases: u32,
    /// Add-to-cart events ever applied.
    pub carts: u32,
    /// Time from the previous session's last event to the current session's first event
    /// (0 in the user's first session).
    pub previous_gap_ms: i64,
}

/// A stable 64-bit key of an item id (FNV-1a), the same on every build and platform, so that
/// stored states and trained models agree on it.
pub fn item_key(item_id: &str) -> u64 {
    item_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// What [`SessionState::advance`] decided for one event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionStep {
    /// The event opened a new session: the caller resets the hidden intent vector.
    pub new_session: bool,
    /// Milliseconds since the previous event of the same session (0 for the first, and for an
    /// event older than the previous one).
    pub gap_ms: i64,
    /// The event names the same item as the previous event of the session.
    pub same_item: bool,
    /// [`item_key`] of the event's item, if it names one (computed once, for every use).
    pub item_key: Option<u64>,
    /// [`item_key`] of the event's category id, else its category path, if it has one.
    pub category_key: Option<u64>,
}

impl SessionState {
    /// Applies one event and says whether it opened a new session.
    ///
    /// A new session starts on a user's first event; after `gap_ms` of inactivity; when the
    /// event's `session_id` differs from the current one (both present); or after a purchase,
    /// which closes its session. A new session resets `events`, the cart and the start time and
    /// increments `session_seq`; `total_events` and the [`UserHistory`] always count on. An event older than the
    /// previous one stays in the session with a gap of 0 and does not move `last_ts_ms` back.
    pub fn advance(&mut self, ev: &Event, cfg: &SessionConfig) -> SessionStep {
        let fresh = self.total_events == 0;
        let id_changed = matches!((&self.session_id, &ev.session_id), (Some(a), Some(b)) if a.as_str() != b.as_str());
        let new_session = fresh || self.purchased || id_changed || ev.ts - self.last_ts_ms > cfg.gap_ms;
        let gap_ms = if new_session {
            if !fresh {
                self.session_seq += 1;
                self.history.previous_gap_ms = (ev.ts - self.last_ts_ms).max(0);
            }
            self.events = 0;
            self.cart_count = 0;
            self.cart_value = 0.0;
            self.started_ms = ev.ts;
            self.last_ts_ms = ev.ts;
            self.purchased = false;
            self.session_id = None;
            self.last_item = None;
            self.counts = SessionCounts::default();
            0
        } else {
            (ev.ts - self.last_ts_ms).max(0)
        };
        if let Some(id) = &ev.session_id {
            // The kept id's buffer is reused: no allocation per event of a session.
            match &mut self.session_id {
                Some(kept) => {
                    kept.clear();
                    kept.push_str(id);
                }
                None => self.session_id = Some(id.to_string()),
            }
        }
        let item = ev.item_id.as_deref().map(item_key);
        let category = ev.category_id.as_deref().or(ev.category.as_deref()).map(item_key);
        let same_item = item.is_some() && item == self.last_item;
        self.counts.add(ev, item, category);
        self.last_item = item;
        self.events += 1;
        self.total_events += 1;
        self.last_ts_ms = self.last_ts_ms.max(ev.ts);
        let units = ev.quantity.unwrap_or(1);
        let value = ev.price.unwrap_or(0.0) * f64::from(units);
        match ev.kind {
            EventType::AddToCart => {
                self.cart_count = self.cart_count.saturating_add(units);
                self.cart_value += value;
                self.history.carts = self.history.carts.saturating_add(1);
            }
            EventType::RemoveFromCart => {
                self.cart_count = self.cart_count.saturating_sub(units);
                self.cart_value = (self.cart_value - value).max(0.0);
            }
            EventType::Purchase => {
                self.purchased = true;
                self.history.purchases = self.history.purchases.saturating_add(1);
            }
            EventType::View | EventType::Click | EventType::Wishlist => {}
        }
        SessionStep { new_session, gap_ms, same_item, item_key: item, category_key: category }
    }
}

impl SessionCounts {
    fn add(&mut self, ev: &Event, item: Option<u64>, category: Option<u64>) {
        match ev.kind {
            EventType::View | EventType::Click => self.browsed = self.browsed.saturating_add(1),
            EventType::AddToCart => self.added = self.added.saturating_add(1),
            EventType::RemoveFromCart => self.removed = self.removed.saturating_add(1),
            EventType::Wishlist => self.wished = self.wished.saturating_add(1),
            EventType::Purchase => {}
        }
        if let Some(p) = ev.price {
            // Prices are capped by the decoder's limit (10^9 by default); a limit set past f32's
            // range still gives a finite value.
            let p = p.min(f64::from(f32::MAX)) as f32;
            (self.price_max, self.price_min) = if self.priced == 0 { (p, p) } else { (self.price_max.max(p), self.price_min.min(p)) };
            self.price_sum += p;
            self.priced = self.priced.saturating_add(1);
        }
        if let Some(key) = item {
            self.items.insert(key);
        }
        if let Some(key) = category {
            self.categories.insert(key);
        }
    }

    /// Mean of the session's prices (0 without any).
    pub fn mean_price(&self) -> f64 {
        if self.priced == 0 { 0.0 } else { f64::from(self.price_sum) / f64::from(self.priced) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts_s: i64, kind: EventType, session: Option<&str>) -> Event {
        Event {
            user_id: "u".into(),
            ts: ts_s * 1000,
            kind,
            event_id: None,
            session_id: session.map(Into::into),
            item_id: None,
            category: None,
            category_id: None,
            brand: None,
            price: Some(10.0),
            quantity: None,
        }
    }

    #[test]
    fn gap_session_id_and_purchase_cut_sessions() {
        let cfg = SessionConfig::default();
        let mut s = SessionState::default();
        let steps: Vec<_> = [
            ev(0, EventType::View, None),
            ev(60, EventType::AddToCart, None),
            ev(60 + 1801, EventType::View, None),         // 30 min + 1 s gap
            ev(60 + 1802, EventType::View, Some("a")),     // id appears: same session
            ev(60 + 1803, EventType::View, Some("b")),     // id changes
            ev(60 + 1804, EventType::Purchase, Some("b")),
            ev(60 + 1805, EventType::View, Some("b")),     // after purchase
        ]
        .iter()
        .map(|e| s.advance(e, &cfg))
        .collect();
        let news: Vec<bool> = steps.iter().map(|s| s.new_session).collect();
        assert_eq!(news, [true, false, true, false, true, false, true]);
        assert_eq!(steps[1].gap_ms, 60_000);
        assert_eq!(s.session_seq, 3, "four sessions, numbered from 0");
        assert_eq!(s.events, 1);
        assert_eq!(s.total_events, 7);
        assert_eq!(s.cart_count, 0);
        // The long-term half survives every boundary; the session's counts do not.
        assert_eq!(s.history, UserHistory { purchases: 1, carts: 1, previous_gap_ms: 1_000 });
        assert_eq!((s.counts.browsed, s.counts.priced, s.counts.price_sum), (1, 1, 10.0));
    }

    #[test]
    fn session_counts_follow_the_session() {
        let cfg = SessionConfig::default();
        let mut s = SessionState::default();
        for (i, (kind, item, price)) in [(EventType::View, "a", 5.0), (EventType::View, "b", 20.0), (EventType::AddToCart, "a", 5.0), (EventType::Wishlist, "c", 2.0)].into_iter().enumerate() {
            let mut e = ev(i as i64, kind, None);
            (e.item_id, e.price) = (Some(item.into()), Some(price));
            s.advance(&e, &cfg);
        }
        let c = s.counts;
        assert_eq!((c.browsed, c.added, c.removed, c.wished, c.priced), (2, 1, 0, 1, 4));
        assert_eq!((c.price_sum, c.price_max, c.price_min, c.mean_price()), (32.0, 20.0, 2.0, 8.0));
        let distinct = c.items.estimate();
        assert!((2.5..3.5).contains(&distinct), "three items, estimated {distinct}");
        assert_eq!(DistinctSketch::default().estimate(), 0.0);
        // Keys that differ only in their last characters still spread over the bits.
        let mut ten = DistinctSketch::default();
        (0..10).for_each(|i| ten.insert(item_key(&format!("1000{i}"))));
        assert!((7.0..14.0).contains(&ten.estimate()), "ten items, estimated {}", ten.estimate());
    }

    #[test]
    fn same_item_is_seen_within_a_session_only() {
        let cfg = SessionConfig::default();
        let mut s = SessionState::default();
        let mut with_item = |ts, item: &str| {
            let mut e = ev(ts, EventType::View, None);
            e.item_id = Some(item.into());
            s.advance(&e, &cfg).same_item
        };
        assert_eq!([with_item(0, "a"), with_item(10, "a"), with_item(20, "b"), with_item(30, "a")], [false, true, false, false]);
        assert!(!with_item(30 + 3600, "a"), "a new session forgets the item");
        assert_ne!(item_key("a"), item_key("b"));
        assert_eq!(item_key(""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn cart_never_negative_and_late_events_keep_time() {
        let cfg = SessionConfig::default();
        let mut s = SessionState::default();
        s.advance(&ev(100, EventType::AddToCart, None), &cfg);
        assert_eq!((s.cart_count, s.cart_value), (1, 10.0));
        s.advance(&ev(101, EventType::RemoveFromCart, None), &cfg);
        let step = s.advance(&ev(50, EventType::RemoveFromCart, None), &cfg);
        assert_eq!((s.cart_count, s.cart_value), (0, 0.0));
        assert!(!step.new_session);
        assert_eq!(step.gap_ms, 0);
        assert_eq!(s.last_ts_ms, 101_000);
    }
}
