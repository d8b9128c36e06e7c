//! The one feature path shared by training, offline scoring and the streaming operator.
//!
//! [`FeatureSpec::featurize`] advances a user's [`SessionState`] by one event and returns the
//! normalised dense features of the GRU step, the hashed item and category buckets whose
//! embeddings follow them, and whether the hidden state must be reset (the event opened a new
//! session). Nothing else in the project computes features.

use intentflow_schemas::{item_key, Event, EventType, SessionConfig, SessionState, SessionStep};
use serde::{Deserialize, Serialize};

/// Number of dense features per event (the embeddings come on top).
pub const FEATURE_DIM: usize = 33;

/// Names of the feature slots, in order; written to `model.json`.
pub const FEATURE_NAMES: [&str; FEATURE_DIM] = [
    "type_view",
    "type_click",
    "type_add_to_cart",
    "type_remove_from_cart",
    "type_wishlist",
    "type_purchase",
    "log_gap_seconds",
    "log_price",
    "has_price",
    "hour_sin",
    "hour_cos",
    "log_cart_count",
    "log_cart_value",
    "log_event_index",
    "first_in_session",
    "log_session_seconds",
    "same_item_as_previous",
    "has_category_path",
    "has_brand",
    "log_prior_sessions",
    "log_prior_events",
    "log_purchases",
    "log_carts",
    "log_hours_since_previous_session",
    "log_session_browsed",
    "log_session_added",
    "log_session_removed",
    "log_session_wished",
    "log_session_mean_price",
    "log_session_max_price",
    "log_session_min_price",
    "log_session_distinct_items",
    "log_session_distinct_categories",
];

/// The dense features the head's skip connection reads (the others reach the head through the
/// GRU only): the aggregates of the session so far and of the user's history, as a logistic
/// regression on them would use them. The other features (the event's type, gap, hour, cart
/// contents) stay out: on REES46 they made the linear part worse on later sessions (the
/// regression alone: test ROC-AUC 0.700 with every feature, 0.738 with these; the served
/// model: 0.675 and 0.724; `docs/model.md`).
pub const SKIP_FEATURES: [&str; 17] = column(0);

/// The signal each of [`SKIP_FEATURES`] stands for in an intent's `reasons`, in the same order.
pub const REASON_NAMES: [&str; 17] = column(1);

/// Each skip feature with the name of its signal in `reasons`.
const SKIP_SIGNALS: [(&str, &str); 17] = [
    ("log_price", "price"),
    ("log_event_index", "session_events"),
    ("log_session_seconds", "session_duration"),
    ("has_category_path", "categorised_product"),
    ("log_prior_sessions", "returning_visitor"),
    ("log_purchases", "returning_buyer"),
    ("log_carts", "past_carts"),
    ("log_hours_since_previous_session", "time_since_last_visit"),
    ("log_session_browsed", "browsing"),
    ("log_session_added", "cart_added"),
    ("log_session_removed", "cart_removed"),
    ("log_session_wished", "wishlisted"),
    ("log_session_mean_price", "mean_price"),
    ("log_session_max_price", "max_price"),
    ("log_session_min_price", "min_price"),
    ("log_session_distinct_items", "items_compared"),
    ("log_session_distinct_categories", "categories_browsed"),
];

/// One side of [`SKIP_SIGNALS`]: feature names (0) or reason names (1).
const fn column(side: usize) -> [&'static str; 17] {
    let mut out = [""; 17];
    let mut i = 0;
    while i < out.len() {
        out[i] = if side == 0 { SKIP_SIGNALS[i].0 } else { SKIP_SIGNALS[i].1 };
        i += 1;
    }
    out
}

/// The dense slot of each of [`SKIP_FEATURES`].
pub(crate) fn skip_slots() -> [usize; SKIP_FEATURES.len()] {
    SKIP_FEATURES.map(|name| FEATURE_NAMES.iter().position(|n| *n == name).expect("skip features are features"))
}

/// One event's features, before or after normalisation of the dense part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features {
    /// Dense features, slots as in [`FEATURE_NAMES`].
    pub dense: [f32; FEATURE_DIM],
    /// Item embedding bucket (0: no item or no item embedding).
    pub item: u32,
    /// Category embedding bucket (0: no category or no category embedding).
    pub category: u32,
    /// Brand bucket of the head's brand embedding (0: no brand, or no such embedding).
    pub brand: u32,
    /// Bucket of the category path's top level (`electronics` of `electronics.smartphone`) in
    /// the head's top-category embedding (0: no path, or no such embedding).
    pub top_category: u32,
}

impl Features {
    /// Dense features without item, category, brand or top category.
    pub fn dense(dense: [f32; FEATURE_DIM]) -> Features {
        Features { dense, item: 0, category: 0, brand: 0, top_category: 0 }
    }
}

/// Bucket of `id` among `buckets` (bucket 0 means "none"; with fewer than 2 buckets every id
/// is 0).
pub fn bucket(id: Option<&str>, buckets: u32) -> u32 {
    bucket_of_key(id.map(item_key), buckets)
}

/// [`bucket`] of an id's [`item_key`], computed already.
fn bucket_of_key(key: Option<u64>, buckets: u32) -> u32 {
    match key {
        Some(key) if buckets >= 2 => 1 + (key % u64::from(buckets - 1)) as u32,
        _ => 0,
    }
}

/// The feature contract of a trained model: the session rule and the normalisation statistics
/// fitted on its training split. Stored in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Feature names, checked against [`FEATURE_NAMES`] on load.
    pub names: Vec<String>,
    /// Per-feature mean subtracted before the GRU.
    pub mean: Vec<f32>,
    /// Per-feature standard deviation divided by before the GRU (never 0).
    pub std: Vec<f32>,
    /// How sessions are cut.
    pub session: SessionConfig,
    /// Hash buckets of the item embedding (0: none).
    #[serde(default)]
    pub item_buckets: u32,
    /// Hash buckets of the category embedding (0: none).
    #[serde(default)]
    pub category_buckets: u32,
    /// Hash buckets of the head's brand embedding (0: none).
    #[serde(default)]
    pub brand_buckets: u32,
    /// Hash buckets of the head's top-category embedding (0: none).
    #[serde(default)]
    pub top_category_buckets: u32,
    /// Dense features switched off at training (always 0 after normalisation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled: Vec<String>,
}

/// Output of [`FeatureSpec::featurize`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prepared {
    /// Normalised dense features and embedding buckets.
    pub features: Features,
    /// The event opened a new session: start from a zero hidden vector.
    pub reset_hidden: bool,
}

/// An optional attribute if it is there: given and not empty (as the CSV importers read an
/// empty cell).
fn attribute(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.is_empty())
}

/// Whether an optional attribute is there ([`attribute`]).
pub(crate) fn present(value: Option<&str>) -> bool {
    attribute(value).is_some()
}

/// Raw (unnormalised) features of `ev`, given the session state *after* applying it.
fn raw_dense(ev: &Event, after: &SessionState, step: SessionStep) -> [f32; FEATURE_DIM] {
    let mut f = [0f32; FEATURE_DIM];
    f[ev.kind.index()] = 1.0;
    f[6] = (step.gap_ms as f64 / 1000.0).ln_1p() as f32;
    if let Some(p) = ev.price {
        f[7] = p.ln_1p() as f32;
        f[8] = 1.0;
    }
    let day_ms = 86_400_000i64;
    let angle = (ev.ts.rem_euclid(day_ms) as f64 / day_ms as f64) * std::f64::consts::TAU;
    f[9] = angle.sin() as f32;
    f[10] = angle.cos() as f32;
    f[11] = f64::from(after.cart_count).ln_1p() as f32;
    f[12] = after.cart_value.ln_1p() as f32;
    f[13] = f64::from(after.events - 1).ln_1p() as f32;
    f[14] = f32::from(u8::from(step.new_session));
    f[15] = ((after.last_ts_ms - after.started_ms).max(0) as f64 / 1000.0).ln_1p() as f32;
    f[16] = f32::from(u8::from(step.same_item));
    f[17] = f32::from(u8::from(present(ev.category.as_deref())));
    f[18] = f32::from(u8::from(present(ev.brand.as_deref())));
    // The long-term half: what the user did before this session (carts and purchases count
    // this session's too: a session's first purchase ends it, so no labelled event sees its own).
    let history = &after.history;
    f[19] = f64::from(after.session_seq).ln_1p() as f32;
    f[20] = (after.total_events.saturating_sub(u64::from(after.events)) as f64).ln_1p() as f32;
    f[21] = f64::from(history.purchases).ln_1p() as f32;
    f[22] = f64::from(history.carts).ln_1p() as f32;
    f[23] = (history.previous_gap_ms as f64 / 3_600_000.0).ln_1p() as f32;
    // The session's aggregates so far, as a logistic regression on the session would see them.
    let c = &after.counts;
    for (slot, n) in f[24..28].iter_mut().zip([c.browsed, c.added, c.removed, c.wished]) {
        *slot = f64::from(n).ln_1p() as f32;
    }
    f[28] = c.mean_price().ln_1p() as f32;
    f[29] = f64::from(c.price_max).ln_1p() as f32;
    f[30] = f64::from(c.price_min).ln_1p() as f32;
    f[31] = c.items.estimate().ln_1p() as f32;
    f[32] = c.categories.estimate().ln_1p() as f32;
    debug_assert!(EventType::ALL.len() == 6);
    f
}

impl FeatureSpec {
    /// A spec with identity normalisation, used before statistics are fitted.
    pub fn identity(session: SessionConfig) -> FeatureSpec {
        FeatureSpec {
            names: FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
            mean: vec![0.0; FEATURE_DIM],
            std: vec![1.0; FEATURE_DIM],
            session,
            item_buckets: 0,
            category_buckets: 0,
            brand_buckets: 0,
            top_category_buckets: 0,
            disabled: Vec::new(),
        }
    }

    /// Sets the embedding bucket counts (0 switches an embedding off).
    pub fn with_buckets(mut self, item_buckets: u32, category_buckets: u32) -> FeatureSpec {
        self.item_buckets = item_buckets;
        self.category_buckets = category_buckets;
        self
    }

    /// Sets the bucket counts of the head's brand and top-category embeddings (0 switches one
    /// off).
    pub fn with_head_buckets(mut self, brand_buckets: u32, top_category_buckets: u32) -> FeatureSpec {
        self.brand_buckets = brand_buckets;
        self.top_category_buckets = top_category_buckets;
        self
    }

    /// Fits mean and standard deviation of the dense features on raw rows (a zero deviation
    /// becomes 1), keeping the session rule, buckets and switched-off features.
    pub fn fit(&self, rows: &[Features]) -> FeatureSpec {
        self.fit_stream(rows.len(), || rows.iter().copied())
    }

    /// [`FeatureSpec::fit`] on `n` rows that `rows` yields, twice (for the mean, then the
    /// variance), so that they need not be in memory.
    pub fn fit_stream<I: Iterator<Item = Features>>(&self, n: usize, rows: impl Fn() -> I) -> FeatureSpec {
        let n = n.max(1) as f64;
        let mut mean = [0f64; FEATURE_DIM];
        for r in rows() {
            for (m, x) in mean.iter_mut().zip(&r.dense) {
                *m += f64::from(*x) / n;
            }
        }
        let mut var = [0f64; FEATURE_DIM];
        for r in rows() {
            for ((v, x), m) in var.iter_mut().zip(&r.dense).zip(&mean) {
                *v += (f64::from(*x) - m).powi(2) / n;
            }
        }
        FeatureSpec {
            mean: mean.iter().map(|m| *m as f32).collect(),
            std: var.iter().map(|v| if *v > 1e-12 { v.sqrt() as f32 } else { 1.0 }).collect(),
            ..self.clone()
        }
    }

    /// Advances `session` by `ev` and returns the raw features with the reset decision.
    pub fn featurize_raw(&self, session: &mut SessionState, ev: &Event) -> (Features, bool) {
        let step = session.advance(ev, &self.session);
        let features = Features {
            dense: raw_dense(ev, session, step),
            item: bucket_of_key(step.item_key, self.item_buckets),
            category: bucket_of_key(step.category_key, self.category_buckets),
            brand: bucket(attribute(ev.brand.as_deref()), self.brand_buckets),
            top_category: bucket(attribute(ev.category.as_deref().and_then(|path| path.split('.').next())), self.top_category_buckets),
        };
        (features, step.new_session)
    }

    /// Applies the fitted normalisation to the dense part of raw features; switched-off
    /// features become 0.
    pub fn normalize(&self, raw: &Features) -> Features {
        let mut dense: [f32; FEATURE_DIM] = std::array::from_fn(|i| (raw.dense[i] - self.mean[i]) / self.std[i]);
        for name in &self.disabled {
            if let Some(i) = FEATURE_NAMES.iter().position(|n| n == name) {
                dense[i] = 0.0;
            }
        }
        Features { dense, ..*raw }
    }

    /// Advances `session` by `ev` and returns the normalised GRU input.
    pub fn featurize(&self, session: &mut SessionState, ev: &Event) -> Prepared {
        let (raw, reset_hidden) = self.featurize_raw(session, ev);
        Prepared { features: self.normalize(&raw), reset_hidden }
    }

    /// Checks that the spec matches this build's feature layout.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let names_ok = self.names.len() == FEATURE_DIM && self.names.iter().zip(FEATURE_NAMES).all(|(a, b)| a == b);
        if !names_ok {
            return Err(format!("feature names {:?} do not match this build's {:?}", self.names, FEATURE_NAMES));
        }
        if self.mean.len() != FEATURE_DIM || self.std.len() != FEATURE_DIM {
            return Err("feature statistics have the wrong length".into());
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err("feature statistics must be finite with positive deviations".into());
        }
        if let Some(unknown) = self.disabled.iter().find(|d| !FEATURE_NAMES.contains(&d.as_str())) {
            return Err(format!("switched-off feature `{unknown}` is not a feature of this build"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_follow_the_session() {
        let spec = FeatureSpec::identity(SessionConfig::default());
        let mut s = SessionState::default();
        let mk = |ts: i64, kind, price| Event {
            user_id: "u".into(),
            ts,
            kind,
            event_id: None,
            session_id: None,
            item_id: None,
            category: None,
            category_id: None,
            brand: None,
            price,
            quantity: None,
        };
        let a = spec.featurize(&mut s, &mk(0, EventType::View, Some(9.0)));
        assert!(a.reset_hidden);
        assert_eq!(a.features.dense[0], 1.0);
        assert_eq!(a.features.dense[14], 1.0);
        assert!((a.features.dense[7] - 10f32.ln()).abs() < 1e-6);
        // The head's brand and top-category buckets: a path's first level, empty strings absent.
        let heads = FeatureSpec::identity(SessionConfig::default()).with_head_buckets(64, 16);
        let mut branded = mk(5, EventType::View, None);
        (branded.brand, branded.category) = (Some("samsung".into()), Some("electronics.smartphone".into()));
        let f = heads.featurize(&mut SessionState::default(), &branded).features;
        assert_eq!((f.brand, f.top_category), (bucket(Some("samsung"), 64), bucket(Some("electronics"), 16)));
        assert!(f.brand > 0 && f.top_category > 0);
        (branded.brand, branded.category) = (Some(Default::default()), None);
        let f = heads.featurize(&mut SessionState::default(), &branded).features;
        assert_eq!((f.brand, f.top_category), (0, 0));
        let b = spec.featurize(&mut s, &mk(9_000, EventType::AddToCart, Some(9.0)));
        assert!(!b.reset_hidden);
        assert_eq!(b.features.dense[2], 1.0);
        assert!((b.features.dense[6] - 10f32.ln()).abs() < 1e-6, "gap of 9 s");
        assert!((b.features.dense[11] - 2f32.ln()).abs() < 1e-6, "one unit in cart");
        assert!((b.features.dense[13] - 2f32.ln()).abs() < 1e-6, "second event");
    }

    #[test]
    fn buckets_are_stable_and_switched_off_features_are_zero() {
        assert_eq!(bucket(None, 1024), 0);
        assert_eq!(bucket(Some("44600062"), 0), 0);
        let b = bucket(Some("44600062"), 1024);
        assert!((1..1024).contains(&b));
        assert_eq!(b, bucket(Some("44600062"), 1024));
        assert_eq!(b, 1 + (item_key("44600062") % 1023) as u32);
        let spec = FeatureSpec { disabled: vec!["hour_sin".into()], ..FeatureSpec::identity(SessionConfig::default()) };
        let raw = Features::dense([1.0; FEATURE_DIM]);
        let z = spec.normalize(&raw);
        assert_eq!(z.dense[9], 0.0);
        assert_eq!(z.dense[10], 1.0);
        assert!(spec.validate().is_ok());
        let bad = FeatureSpec { disabled: vec!["shoe_size".into()], ..spec };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn fit_normalises_to_zero_mean_unit_std() {
        let rows: Vec<Features> = (0..100).map(|i| Features::dense([i as f32; FEATURE_DIM])).collect();
        let spec = FeatureSpec::identity(SessionConfig::default()).fit(&rows);
        let z: Vec<Features> = rows.iter().map(|r| spec.normalize(r)).collect();
        let mean: f32 = z.iter().map(|r| r.dense[3]).sum::<f32>() / 100.0;
        let var: f32 = z.iter().map(|r| r.dense[3] * r.dense[3]).sum::<f32>() / 100.0;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
        assert!(spec.validate().is_ok());
    }
}
