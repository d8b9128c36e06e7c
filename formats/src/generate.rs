//! A seeded synthetic clickstream whose users carry a latent purchase intent.
//!
//! Each user has an intent in logit space that drifts as a random walk from event to event.
//! Sessions are bursts of events seconds to minutes apart, separated by hours. Within a
//! session, the intent decides the mix: high intent brings carts and purchases, low intent
//! brings plain views and removals. A purchase ends its session. Items come from a fixed
//! catalogue with categories and log-normal prices. Users differ in activity (log-normal), and
//! all users' events are interleaved in time order. The same seed gives the same events.

use compact_str::format_compact;
use intentflow_schemas::{Event, EventType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Parameters of [`generate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneratorConfig {
    /// Number of users (each gets at least one event).
    pub users: usize,
    /// Total number of events (at least `users`).
    pub events: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Time of the earliest possible event, epoch ms (default 2024-01-01T00:00:00Z).
    pub start_ms: i64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig { users: 1_000, events: 20_000, seed: 1, start_ms: 1_704_067_200_000 }
    }
}

/// A generated event with the generator's ground truth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GeneratedEvent {
    /// The event (schema v1).
    #[serde(flatten)]
    pub event: Event,
    /// The user's latent purchase propensity (0..1) when the event happened; unknown fields are
    /// ignored by the decoder, so this rides along in files for evaluation.
    pub latent_intent: f64,
}

const ITEMS: usize = 5_000;
const CATEGORIES: usize = 60;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Standard normal by Box–Muller (keeps the dependency list short).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -mean * rng.random_range(f64::EPSILON..1.0).ln()
}

/// Generates `cfg.events` events for `cfg.users` users, sorted by time (ties by user).
///
/// # Panics
///
/// If `cfg.users` is 0 or `cfg.events < cfg.users`.
pub fn generate(cfg: &GeneratorConfig) -> Vec<GeneratedEvent> {
    assert!(cfg.users > 0 && cfg.events >= cfg.users, "need at least one event per user");
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let prices: Vec<f64> = (0..ITEMS).map(|_| (3.0 + 1.2 * normal(&mut rng)).exp().clamp(0.5, 5_000.0)).collect();
    let item_category: Vec<usize> = (0..ITEMS).map(|_| rng.random_range(0..CATEGORIES)).collect();

    // Activity skew: every user gets one event, the rest are shared by log-normal weights.
    let weights: Vec<f64> = (0..cfg.users).map(|_| (normal(&mut rng) * 0.8).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut quota: Vec<usize> = weights.iter().map(|w| 1 + ((cfg.events - cfg.users) as f64 * w / total) as usize).collect();
    let mut assigned: usize = quota.iter().sum();
    while assigned < cfg.events {
        let u = rng.random_range(0..cfg.users);
        quota[u] += 1;
        assigned += 1;
    }

    let horizon_ms = 7.0 * 86_400_000.0;
    let mut out = Vec::with_capacity(cfg.events);
    let mut serial = 0u64;
    for (u, &n) in quota.iter().enumerate() {
        let user_id = format_compact!("u{u:06}");
        let mut intent = -2.0 + 1.5 * normal(&mut rng);
        let mut t = cfg.start_ms as f64 + rng.random_range(0.0..horizon_ms);
        let mut session = 0u32;
        let mut cart = 0u32;
        let mut new_session = true;
        for _ in 0..n {
            if new_session {
                session += 1;
                cart = 0;
                // Interest returns between sessions a little.
                intent += 0.3 * normal(&mut rng);
            } else {
                t += exponential(&mut rng, 40_000.0).min(25.0 * 60_000.0);
            }
            intent += 0.25 * normal(&mut rng);
            let p = sigmoid(intent);
            let r: f64 = rng.random();
            let kind = if cart > 0 && r < 0.35 * p {
                EventType::Purchase
            } else if r < 0.05 + 0.25 * p {
                EventType::AddToCart
            } else if cart > 0 && r < 0.35 * (1.0 - p) {
                EventType::RemoveFromCart
            } else if r < 0.55 {
                EventType::View
            } else if r < 0.9 {
                EventType::Click
            } else {
                EventType::Wishlist
            };
            // Carts make a purchase more likely later in the session: intent rises with them.
            match kind {
                EventType::AddToCart => {
                    cart += 1;
                    intent += 0.4;
                }
                EventType::RemoveFromCart => {
                    cart -= 1;
                    intent -= 0.5;
                }
                _ => {}
            }
            let item = rng.random_range(0..ITEMS);
            serial += 1;
            out.push(GeneratedEvent {
                event: Event {
                    user_id: user_id.clone(),
                    ts: t as i64,
                    kind,
                    event_id: Some(format_compact!("g{}-{serial}", cfg.seed)),
                    session_id: Some(format_compact!("{user_id}-s{session}")),
                    item_id: Some(format_compact!("i{item}")),
                    category: None,
                    category_id: Some(format_compact!("c{}", item_category[item])),
                    brand: None,
                    price: Some((prices[item] * 100.0).round() / 100.0),
                    quantity: None,
                },
                latent_intent: p,
            });
            new_session = kind == EventType::Purchase || rng.random::<f64>() < 0.12;
            if new_session {
                t += 3_600_000.0 + exponential(&mut rng, 6.0 * 3_600_000.0);
                if kind == EventType::Purchase {
                    intent -= 1.5;
                }
            }
        }
    }
    out.sort_by(|a, b| a.event.ts.cmp(&b.event.ts).then_with(|| a.event.user_id.cmp(&b.event.user_id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_sized_ordered_and_mixed() {
        let cfg = GeneratorConfig { users: 200, events: 5_000, seed: 9, ..Default::default() };
        let a = generate(&cfg);
        assert_eq!(a, generate(&cfg));
        assert_eq!(a.len(), 5_000);
        assert!(a.windows(2).all(|w| w[0].event.ts <= w[1].event.ts));
        let users: std::collections::HashSet<_> = a.iter().map(|e| &e.event.user_id).collect();
        assert_eq!(users.len(), 200);
        let count = |k| a.iter().filter(|e| e.event.kind == k).count();
        for kind in EventType::ALL {
            assert!(count(kind) > 0, "{kind} never generated");
        }
        assert!(count(EventType::View) + count(EventType::Click) > count(EventType::AddToCart) * 3);
        assert_ne!(a, generate(&GeneratorConfig { seed: 10, ..cfg }));
    }
}
