//! Baselines the GRU has to beat, and the stacked ensemble.
//!
//! * **Base rate:** every event scores the training split's positive rate.
//! * **Logistic regression on session aggregates:** for each event, the aggregates of its
//!   session so far ([`AGGREGATE_NAMES`]: counts by type, duration, current / mean / max / min
//!   price, distinct items and categories, whether the product has a category path) and the
//!   user's history before it (sessions, purchases, carts, time since the previous session),
//!   fitted on the training split: the two regressions of `../shared/data/README.md` in one.
//! * **Gradient-boosted trees** on the same aggregates ([`crate::boosting`]).
//! * **Ensemble:** a logistic regression on the logits of the calibrated GRU score and the
//!   baseline's score, stacked on the validation split.

use crate::boosting::GradientBoosting;
use crate::logistic::{logit, Logistic};
use intentflow_schemas::{item_key, Event, EventType, SessionState};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Inputs of the logistic-regression baseline, in order.
pub const AGGREGATE_NAMES: [&str; 18] = [
    "log_browse_events",
    "log_add_to_cart",
    "log_remove_from_cart",
    "log_wishlist",
    "has_add_to_cart",
    "log_duration_seconds",
    "log_price",
    "log_mean_price",
    "log_max_price",
    "log_min_price",
    "log_distinct_items",
    "log_distinct_categories",
    "log_events",
    "has_category_path",
    "log_prior_sessions",
    "log_purchases",
    "log_carts",
    "log_hours_since_previous_session",
];

/// Running aggregates of one session.
#[derive(Debug, Clone, Default)]
pub struct SessionAggregates {
    counts: [u32; 6],
    events: u32,
    start_ms: Option<i64>,
    price_n: u32,
    price_sum: f64,
    price_max: f64,
    price_min: f64,
    items: HashSet<u64>,
    categories: HashSet<u64>,
}

fn ln1p(x: f64) -> f64 {
    x.max(0.0).ln_1p()
}

impl SessionAggregates {
    /// Adds `ev` and returns the aggregate row of the session up to and including it, with the
    /// user's history from `after` (the user's state after `ev`).
    pub fn push(&mut self, ev: &Event, after: &SessionState) -> Vec<f64> {
        self.counts[ev.kind.index()] += 1;
        self.events += 1;
        let start = *self.start_ms.get_or_insert(ev.ts);
        if let Some(p) = ev.price {
            self.price_max = if self.price_n == 0 { p } else { self.price_max.max(p) };
            self.price_min = if self.price_n == 0 { p } else { self.price_min.min(p) };
            self.price_n += 1;
            self.price_sum += p;
        }
        if let Some(i) = &ev.item_id {
            self.items.insert(item_key(i));
        }
        if let Some(c) = ev.category_id.as_ref().or(ev.category.as_ref()) {
            self.categories.insert(item_key(c));
        }
        let count = |k: EventType| f64::from(self.counts[k.index()]);
        let mean_price = if self.price_n > 0 { self.price_sum / f64::from(self.price_n) } else { 0.0 };
        vec![
            ln1p(count(EventType::View) + count(EventType::Click)),
            ln1p(count(EventType::AddToCart)),
            ln1p(count(EventType::RemoveFromCart)),
            ln1p(count(EventType::Wishlist)),
            f64::from(u8::from(count(EventType::AddToCart) > 0.0)),
            ln1p((ev.ts - start) as f64 / 1000.0),
            ln1p(ev.price.unwrap_or(0.0)),
            ln1p(mean_price),
            ln1p(self.price_max),
            ln1p(self.price_min),
            ln1p(self.items.len() as f64),
            ln1p(self.categories.len() as f64),
            ln1p(f64::from(self.events)),
            f64::from(u8::from(crate::features::present(ev.category.as_deref()))),
            ln1p(f64::from(after.session_seq)),
            ln1p(f64::from(after.history.purchases)),
            ln1p(f64::from(after.history.carts)),
            ln1p(after.history.previous_gap_ms as f64 / 3_600_000.0),
        ]
    }
}

/// The fitted baselines and ensemble, stored in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baselines {
    /// Positive rate of the training split.
    pub base_rate: f64,
    /// Logistic regression on [`AGGREGATE_NAMES`].
    pub logistic: Logistic,
    /// F1-maximising threshold of the logistic regression on validation.
    pub logistic_threshold: f64,
    /// Stacked model on `[logit(GRU score), logit(baseline score)]`.
    pub ensemble: Logistic,
    /// F1-maximising threshold of the ensemble on validation.
    pub ensemble_threshold: f64,
    /// Gradient-boosted trees on [`AGGREGATE_NAMES`] (models trained before it have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boosting: Option<GradientBoosting>,
    /// F1-maximising threshold of the boosted trees on validation.
    #[serde(default)]
    pub boosting_threshold: f64,
}

impl Baselines {
    /// The baseline's probability for an aggregate row.
    pub fn logistic_score(&self, aggregates: &[f64]) -> f32 {
        self.logistic.predict(aggregates) as f32
    }

    /// The ensemble's probability from the (calibrated) GRU score and the baseline's score.
    pub fn ensemble_score(&self, gru: f32, logistic: f32) -> f32 {
        self.ensemble.predict(&stack_row(gru, logistic)) as f32
    }
}

/// The ensemble's input row.
pub(crate) fn stack_row(gru: f32, logistic: f32) -> Vec<f64> {
    vec![logit(f64::from(gru)), logit(f64::from(logistic))]
}
