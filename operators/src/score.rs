//! The scoring operator: per-user state in, batched GRU steps, scored intents and states out.

use crate::OperatorError;
use intentflow_model::{Features, IntentModel};
use intentflow_schemas::{format_ts_ms, Event, ScoredIntent, SourcePosition, INTENT_SCHEMA_VERSION};
use intentflow_state::{StateStore, UserState};
use std::collections::HashMap;

/// A valid event and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionedEvent {
    /// Source position.
    pub source: SourcePosition,
    /// The event.
    pub event: Event,
}

/// Everything one batch produced.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// One intent per input event, in input order (so each user's intents are in event order).
    pub intents: Vec<ScoredIntent>,
    /// The final state of every user the batch touched, keyed by (partition, user id).
    pub states: Vec<(i32, String, UserState)>,
    /// Users whose stored hidden vector did not fit the model and was restarted from zero.
    pub reset_states: usize,
    /// Batched model steps taken (the number of waves).
    pub waves: usize,
}

/// What a batch's intents carry as `emitted_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmittedAt {
    /// The wall-clock time of the batch (epoch ms): the live operator.
    Now(i64),
    /// Each event's own time: replays, whose outputs must be the same every time.
    EventTime,
}

/// One user's slot during a batch.
struct Slot {
    partition: i32,
    user: String,
    state: UserState,
    inputs: Vec<usize>,
}

/// Scores events with a trained [`IntentModel`], keeping per-user state.
pub struct IntentOperator {
    model: IntentModel,
}

impl IntentOperator {
    /// Wraps a loaded model.
    pub fn new(model: IntentModel) -> IntentOperator {
        IntentOperator { model }
    }

    /// The model in use.
    pub fn model(&self) -> &IntentModel {
        &self.model
    }

    /// Scores a batch. Users are keyed by (input partition, user id); their states are read from
    /// `store` once per batch and returned, not written: the caller writes them after the
    /// outputs are acknowledged. `stamp` says what `emitted_at` holds.
    ///
    /// # Errors
    ///
    /// State read errors and model errors; the batch then has no effect.
    pub fn process(&self, events: &[PositionedEvent], store: &StateStore, stamp: EmittedAt) -> Result<BatchOutput, OperatorError> {
        let mut slots: Vec<Slot> = Vec::new();
        let mut index: HashMap<(i32, &str), usize> = HashMap::new();
        for (i, pe) in events.iter().enumerate() {
            let key = (pe.source.partition, pe.event.user_id.as_str());
            let slot = *index.entry(key).or_insert_with(|| {
                slots.push(Slot { partition: key.0, user: key.1.to_string(), state: UserState::default(), inputs: Vec::new() });
                slots.len() - 1
            });
            slots[slot].inputs.push(i);
        }
        let stored = store.get_many(slots.iter().map(|s| (s.partition, s.user.as_str())))?;
        let h = self.model.hidden_dim();
        let version = self.model.version();
        let mut reset_states = 0;
        for (slot, state) in slots.iter_mut().zip(stored) {
            slot.state = state.unwrap_or_default();
            // A hidden vector from a model of another size cannot continue; the session
            // counters stay, and the next event's step starts from zero.
            if slot.state.hidden.len() != h {
                if !slot.state.hidden.is_empty() {
                    reset_states += 1;
                }
                slot.state.hidden = vec![0.0; h];
            }
            slot.state.model_version.clear();
            slot.state.model_version.push_str(version);
        }

        let now = match stamp {
            EmittedAt::Now(ms) => Some(format_ts_ms(ms)),
            EmittedAt::EventTime => None,
        };
        let mut intents: Vec<Option<ScoredIntent>> = vec![None; events.len()];
        let max_len = slots.iter().map(|s| s.inputs.len()).max().unwrap_or(0);
        let mut features: Vec<Features> = Vec::with_capacity(slots.len());
        let mut hidden: Vec<f32> = Vec::with_capacity(slots.len() * h);
        let mut wave_slots: Vec<usize> = Vec::with_capacity(slots.len());
        for wave in 0..max_len {
            features.clear();
            hidden.clear();
            wave_slots.clear();
            for (si, slot) in slots.iter_mut().enumerate() {
                let Some(&input) = slot.inputs.get(wave) else { continue };
                let prepared = self.model.features().featurize(&mut slot.state.session, &events[input].event);
                if prepared.reset_hidden {
                    slot.state.hidden.fill(0.0);
                }
                features.push(prepared.features);
                hidden.extend_from_slice(&slot.state.hidden);
                wave_slots.push(si);
            }
            let out = self.model.step(&features, &hidden)?;
            for (k, &si) in wave_slots.iter().enumerate() {
                let slot = &mut slots[si];
                slot.state.hidden.copy_from_slice(&out.hidden[k * h..(k + 1) * h]);
                let input = slot.inputs[wave];
                let pe = &events[input];
                let event_ts = format_ts_ms(pe.event.ts);
                intents[input] = Some(ScoredIntent {
                    v: INTENT_SCHEMA_VERSION,
                    user_id: pe.event.user_id.clone(),
                    score: out.scores[k],
                    emitted_at: now.clone().unwrap_or_else(|| event_ts.clone()),
                    event_ts,
                    event_type: pe.event.kind,
                    event_id: pe.event.event_id.clone(),
                    session_id: slot.state.session.session_id.clone(),
                    session_seq: slot.state.session.session_seq,
                    session_events: slot.state.session.events,
                    model_version: version.to_string(),
                    source: pe.source.clone(),
                });
            }
        }
        Ok(BatchOutput {
            intents: intents.into_iter().map(|i| i.expect("every input is scored in its wave")).collect(),
            states: slots.into_iter().map(|s| (s.partition, s.user, s.state)).collect(),
            reset_states,
            waves: max_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{generate, GeneratorConfig};
    use intentflow_model::Device;
    use intentflow_model::train::{train, TrainConfig};
    use intentflow_state::StoreOptions;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    /// Streaming in waves over arbitrary batch cuts reproduces offline per-user scoring.
    #[test]
    fn waves_over_batches_equal_offline_sequences() {
        let events: Vec<Event> = generate(&GeneratorConfig { users: 300, events: 6_000, seed: 3, ..Default::default() })
            .into_iter()
            .map(|g| g.event)
            .collect();
        let cfg = TrainConfig { hidden_dim: 16, members: 1, epochs: 1, ..TrainConfig::default() };
        let trained = train(&events, &cfg, &Device::Cpu, |_, _| {}).unwrap();
        let model_dir = tempfile::tempdir().unwrap();
        trained.save(model_dir.path()).unwrap();
        let model = IntentModel::load(model_dir.path(), &Device::Cpu).unwrap();
        let op = IntentOperator::new(model.clone());

        let state_dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(state_dir.path(), StoreOptions::default()).unwrap();
        let positioned: Vec<PositionedEvent> = events
            .iter()
            .enumerate()
            .map(|(i, e)| PositionedEvent {
                source: SourcePosition { topic: "t".into(), partition: (e.user_id.bytes().map(u32::from).sum::<u32>() % 4) as i32, offset: i as i64 },
                event: e.clone(),
            })
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut streamed: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut start = 0;
        while start < positioned.len() {
            let end = (start + rng.random_range(1..700)).min(positioned.len());
            let out = op.process(&positioned[start..end], &store, EmittedAt::Now(0)).unwrap();
            assert_eq!(out.intents.len(), end - start);
            for (intent, input) in out.intents.iter().zip(&positioned[start..end]) {
                assert_eq!(intent.source, input.source, "outputs keep input order");
                streamed.entry(intent.user_id.clone()).or_default().push(intent.score);
            }
            store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
            start = end;
        }

        let mut by_user: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in &events {
            by_user.entry(&e.user_id).or_default().push(e);
        }
        assert_eq!(streamed.len(), by_user.len());
        let states: BTreeMap<String, UserState> = store.users().unwrap().into_iter().map(|(_, u, s)| (u, s)).collect();
        for (user, evs) in by_user {
            let offline = model.score_sequence(evs.iter().copied()).unwrap();
            let online = &streamed[user];
            assert_eq!(online.len(), offline.scores.len());
            for (a, b) in online.iter().zip(&offline.scores) {
                assert!((a - b).abs() <= 1e-5, "user {user}: streamed {a} vs offline {b}");
            }
            let state = &states[user];
            assert_eq!(state.session, offline.session);
            for (a, b) in state.hidden.iter().zip(&offline.hidden) {
                assert!((a - b).abs() <= 1e-5);
            }
        }
    }
}
