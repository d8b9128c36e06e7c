//! The scoring operator: per-user state in, batched GRU steps, scored intents and states out.

use crate::emit::{Emission, EmitPolicy, InvalidPolicy, PolicyOutput, Published};
use crate::OperatorError;
use intentflow_model::{Features, IntentModel, Reasons};
use intentflow_schemas::{format_ts_ms, write_ts_ms, Crossing, Event, EventType, IntentDetail, IntentSchema, Placement, ScoredIntent, SourcePosition, HORIZON_SESSION};
use intentflow_state::changelog::ModelPolicy;
use intentflow_state::{topic_id, Loaded, StateError, StateRead, UserState};
use crate::resident::{Resident, ResidentBatch};
use intentflow_model::{ResidentRow, ResidentStates};
use rayon::prelude::*;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};

/// A valid event and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionedEvent {
    /// Source position.
    pub source: SourcePosition,
    /// The event.
    pub event: Event,
}

/// One applied event's score and the session it was in: an intent, less what its event and
/// its batch hold ([`BatchOutput::intent`], [`BatchOutput::encode_intent`]).
#[derive(Debug, Clone, Copy)]
pub struct Scored {
    /// Index of the event in the batch's input.
    pub input: usize,
    /// Calibrated purchase probability.
    pub score: f32,
    /// Index of the user's session among its sessions, after the event.
    pub session_seq: u32,
    /// Events in the session, this one included.
    pub session_events: u32,
    /// Items added to the cart in the session, after the event.
    pub cart_count: u32,
    /// Their value.
    pub cart_value: f64,
    /// The shop's session id, as an index into the batch's session ids.
    session_id: Option<u32>,
    /// The signals that raised the score most, when the operator gives reasons
    /// ([`IntentOperator::with_reasons`]); empty otherwise.
    pub reasons: Reasons,
}

/// Everything one batch produced.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// One per applied event, in input order (so each user's intents are in event order). An
    /// intent is built from one with its event ([`BatchOutput::intent`]) or written as JSON
    /// straight from both ([`BatchOutput::encode_intent`]): no strings per event.
    pub scored: Vec<Scored>,
    /// The shop's session ids the batch's intents name, each once per user and session.
    session_ids: Vec<String>,
    /// `emitted_at` of every intent, or `None` for each event's own time.
    emitted_at: Option<String>,
    /// The model that scored the batch.
    model_version: String,
    /// The model's decision threshold, if it has one (schema v2's `decision`).
    threshold: Option<f64>,
    /// Events in the batch's input: the slice `intent` and `encode_intent` must be given.
    inputs: usize,
    /// The final state of every user the batch touched, keyed by (partition, user id), in the
    /// order of each user's first event in the batch.
    pub states: Vec<(i32, String, UserState)>,
    /// Input index of the first event of each of `states`' users: how shards' states merge.
    state_firsts: Vec<usize>,
    /// The same for each of `invalid_states`.
    invalid_firsts: Vec<usize>,
    /// Users whose stored hidden vector did not fit the model and was restarted from zero.
    pub reset_states: usize,
    /// Users whose stored state was built by another model and was dropped
    /// ([`ModelPolicy::Reset`]).
    pub foreign_states: usize,
    /// Stored states that did not decode, in the order of each user's first event in the
    /// batch: their users started fresh, the bytes are here to be quarantined.
    pub invalid_states: Vec<InvalidState>,
    /// Events their user's state had already applied (fenced: a redelivery after a crash under
    /// at-least-once). They are not applied again and get no intent.
    pub already_applied: usize,
    /// Waves of the batch: the most events one user had applied in it (each shard steps its
    /// own waves).
    pub waves: usize,
    /// Wall time of each batched model step in seconds (one per wave of each shard; the
    /// recurrent step and the head, not the features or the state reads around it).
    pub step_seconds: Vec<f64>,
    /// Events left for the next batch by the wave cap ([`IntentOperator::with_wave_cap`]): the
    /// later events of users with more than the cap, as input indices in input order. They are
    /// not applied, get no intent and move no fence: the caller gives them again, ahead of any
    /// newer record, and commits no input offset past them.
    pub deferred: Vec<usize>,
    /// What the resident slab did, when the operator has one.
    pub resident: Option<ResidentBatch>,
    /// The intents the operator's policy outputs publish ([`IntentOperator::with_outputs`]),
    /// by scored event, then output: each user's in event order.
    pub published: Vec<Published>,
}

impl BatchOutput {
    /// One batch's output from the outputs of its shards, each of which scored a disjoint set
    /// of its users: scores in input order (published intents with them), session ids,
    /// states, rejections and deferrals of all, counts summed, `waves` the deepest shard's.
    fn merge(parts: Vec<BatchOutput>) -> BatchOutput {
        // Where each shard's scored events go among all, by input index (unique to one shard).
        let mut order: Vec<(usize, usize, usize)> =
            parts.iter().enumerate().flat_map(|(p, part)| part.scored.iter().enumerate().map(move |(j, s)| (s.input, p, j))).collect();
        order.sort_unstable_by_key(|&(input, _, _)| input);
        let mut position: Vec<Vec<usize>> = parts.iter().map(|p| vec![0; p.scored.len()]).collect();
        let mut session_base = Vec::with_capacity(parts.len());
        let mut base = 0;
        for part in &parts {
            session_base.push(base);
            base += part.session_ids.len() as u32;
        }
        let mut scored = Vec::with_capacity(order.len());
        for (k, &(_, p, j)) in order.iter().enumerate() {
            position[p][j] = k;
            let mut s = parts[p].scored[j];
            s.session_id = s.session_id.map(|i| i + session_base[p]);
            scored.push(s);
        }
        let first = &parts[0];
        let mut out = BatchOutput {
            scored,
            emitted_at: first.emitted_at.clone(),
            model_version: first.model_version.clone(),
            threshold: first.threshold,
            inputs: first.inputs,
            ..BatchOutput::default()
        };
        for (part, position) in parts.into_iter().zip(&position) {
            out.session_ids.extend(part.session_ids);
            out.states.extend(part.states);
            out.state_firsts.extend(part.state_firsts);
            out.published.extend(part.published.into_iter().map(|p| Published { scored: position[p.scored], ..p }));
            out.reset_states += part.reset_states;
            out.foreign_states += part.foreign_states;
            out.invalid_states.extend(part.invalid_states);
            out.invalid_firsts.extend(part.invalid_firsts);
            out.already_applied += part.already_applied;
            out.waves = out.waves.max(part.waves);
            out.step_seconds.extend(part.step_seconds);
            out.deferred.extend(part.deferred);
        }
        // Stable: one event's intents (one per output) come from one shard, in output order.
        out.published.sort_by_key(|p| p.scored);
        (out.state_firsts, out.states) = by_first(std::mem::take(&mut out.state_firsts), std::mem::take(&mut out.states));
        (out.invalid_firsts, out.invalid_states) = by_first(std::mem::take(&mut out.invalid_firsts), std::mem::take(&mut out.invalid_states));
        out.deferred.sort_unstable();
        out
    }

    /// The shop's session id of a scored event.
    pub fn session_id(&self, scored: &Scored) -> Option<&str> {
        scored.session_id.map(|i| self.session_ids[i as usize].as_str())
    }

    /// The intent (schema v1) of a scored event; `events` must be the slice the batch was
    /// processed from.
    pub fn intent(&self, events: &[PositionedEvent], scored: &Scored) -> ScoredIntent {
        self.intent_as(events, scored, IntentSchema::V1)
    }

    /// The intent of a scored event in `schema`; `events` is the batch's input.
    pub fn intent_as(&self, events: &[PositionedEvent], scored: &Scored, schema: IntentSchema) -> ScoredIntent {
        debug_assert_eq!(events.len(), self.inputs, "intents are built from the batch's own input");
        let pe = &events[scored.input];
        let event_ts = format_ts_ms(pe.event.ts);
        let ev = &pe.event;
        let text = |t: &Option<intentflow_schemas::Text>| t.as_deref().map(str::to_string);
        let detail = match schema {
            IntentSchema::V1 => IntentDetail::default(),
            IntentSchema::V2 => IntentDetail {
                item_id: text(&ev.item_id),
                category: text(&ev.category),
                category_id: text(&ev.category_id),
                brand: text(&ev.brand),
                price: ev.price,
                cart_count: Some(scored.cart_count),
                cart_value: Some(scored.cart_value),
                decision: self.threshold.map(|t| f64::from(scored.score) >= t),
                threshold: self.threshold,
                horizon: Some(HORIZON_SESSION.to_string()),
            },
        };
        ScoredIntent {
            v: schema.number(),
            user_id: ev.user_id.to_string(),
            score: scored.score,
            emitted_at: self.emitted_at.clone().unwrap_or_else(|| event_ts.clone()),
            event_ts,
            event_type: ev.kind,
            event_id: text(&ev.event_id),
            session_id: self.session_id(scored).map(str::to_string),
            session_seq: scored.session_seq,
            session_events: scored.session_events,
            model_version: self.model_version.clone(),
            source: pe.source.clone(),
            reasons: scored.reasons.names().map(str::to_string).collect(),
            detail,
            placement: Placement::default(),
        }
    }

    /// The intent `published` names, as `output` publishes it: the scored event's intent in
    /// the output's schema with the previous published score, the crossing or the segment.
    /// `events` is the batch's input.
    pub fn published_intent(&self, events: &[PositionedEvent], published: &Published, output: &PolicyOutput) -> ScoredIntent {
        let (previous_score, crossing, segment) = placement(published.emission, &output.policy);
        let placement = Placement { previous_score, crossing, segment: segment.map(str::to_string) };
        ScoredIntent { placement, ..self.intent_as(events, &self.scored[published.scored], output.schema) }
    }

    /// Every intent of the batch (schema v1), in input order; `events` is the batch's input.
    pub fn intents<'a>(&'a self, events: &'a [PositionedEvent]) -> impl Iterator<Item = ScoredIntent> + 'a {
        self.intents_as(events, IntentSchema::V1)
    }

    /// Every intent of the batch in `schema`, in input order; `events` is the batch's input.
    pub fn intents_as<'a>(&'a self, events: &'a [PositionedEvent], schema: IntentSchema) -> impl Iterator<Item = ScoredIntent> + 'a {
        self.scored.iter().map(move |s| self.intent_as(events, s, schema))
    }

    /// Appends a scored event's intent to `out` as the JSON object [`crate::encode::encode_intent`]
    /// writes for [`BatchOutput::intent`] — the same bytes — without building the intent.
    pub fn encode_intent(&self, events: &[PositionedEvent], scored: &Scored, out: &mut Vec<u8>) {
        self.encode_intent_as(events, scored, IntentSchema::V1, out);
    }

    /// [`BatchOutput::encode_intent`] in `schema`: the bytes of [`BatchOutput::intent_as`]'s
    /// serde encoding.
    pub fn encode_intent_as(&self, events: &[PositionedEvent], scored: &Scored, schema: IntentSchema, out: &mut Vec<u8>) {
        self.write_intent_fields(events, scored, schema, out);
        out.push(b'}');
    }

    /// Appends the intent `published` names as `output` publishes it: the bytes of
    /// [`BatchOutput::published_intent`]'s serde encoding, without building it.
    pub fn encode_published(&self, events: &[PositionedEvent], published: &Published, output: &PolicyOutput, out: &mut Vec<u8>) {
        self.write_intent_fields(events, &self.scored[published.scored], output.schema, out);
        let (previous_score, crossing, segment) = placement(published.emission, &output.policy);
        if let Some(previous) = previous_score {
            out.extend_from_slice(b",\"previous_score\":");
            json(out, &previous);
        }
        if let Some(crossing) = crossing {
            out.extend_from_slice(b",\"crossing\":");
            json(out, &crossing);
        }
        if let Some(segment) = segment {
            out.extend_from_slice(b",\"segment\":");
            json(out, segment);
        }
        out.push(b'}');
    }

    /// The intent's JSON object in `schema` up to its closing brace.
    fn write_intent_fields(&self, events: &[PositionedEvent], scored: &Scored, schema: IntentSchema, out: &mut Vec<u8>) {
        debug_assert_eq!(events.len(), self.inputs, "intents are built from the batch's own input");
        let (pe, ev) = (&events[scored.input], &events[scored.input].event);
        out.extend_from_slice(b"{\"v\":");
        json(out, &schema.number());
        out.extend_from_slice(b",\"user_id\":");
        json(out, ev.user_id.as_str());
        out.extend_from_slice(b",\"score\":");
        json(out, &scored.score);
        out.extend_from_slice(b",\"event_ts\":\"");
        write_ts_ms(ev.ts, out);
        out.extend_from_slice(b"\",\"event_type\":");
        json(out, &ev.kind);
        if let Some(id) = &ev.event_id {
            out.extend_from_slice(b",\"event_id\":");
            json(out, id.as_str());
        }
        if let Some(id) = self.session_id(scored) {
            out.extend_from_slice(b",\"session_id\":");
            json(out, id);
        }
        out.extend_from_slice(b",\"session_seq\":");
        json(out, &scored.session_seq);
        out.extend_from_slice(b",\"session_events\":");
        json(out, &scored.session_events);
        out.extend_from_slice(b",\"model_version\":");
        json(out, self.model_version.as_str());
        out.extend_from_slice(b",\"source\":");
        json(out, &pe.source);
        out.extend_from_slice(b",\"emitted_at\":");
        match &self.emitted_at {
            Some(at) => json(out, at.as_str()),
            None => {
                out.push(b'"');
                write_ts_ms(ev.ts, out);
                out.push(b'"');
            }
        }
        if !scored.reasons.is_empty() {
            out.extend_from_slice(b",\"reasons\":[");
            for (k, name) in scored.reasons.names().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                json(out, name);
            }
            out.push(b']');
        }
        if schema == IntentSchema::V2 {
            self.write_detail(ev, scored, out);
        }
    }

    /// v2's fields, in [`IntentDetail`]'s order.
    fn write_detail(&self, ev: &Event, scored: &Scored, out: &mut Vec<u8>) {
        for (name, value) in [(&b",\"item_id\":"[..], &ev.item_id), (b",\"category\":", &ev.category), (b",\"category_id\":", &ev.category_id), (b",\"brand\":", &ev.brand)] {
            if let Some(v) = value {
                out.extend_from_slice(name);
                json(out, v.as_str());
            }
        }
        if let Some(price) = ev.price {
            out.extend_from_slice(b",\"price\":");
            json(out, &price);
        }
        out.extend_from_slice(b",\"cart_count\":");
        json(out, &scored.cart_count);
        out.extend_from_slice(b",\"cart_value\":");
        json(out, &scored.cart_value);
        if let Some(threshold) = self.threshold {
            out.extend_from_slice(b",\"decision\":");
            json(out, &(f64::from(scored.score) >= threshold));
            out.extend_from_slice(b",\"threshold\":");
            json(out, &threshold);
        }
        out.extend_from_slice(b",\"horizon\":");
        json(out, HORIZON_SESSION);
    }
}

/// Appends a string or number to `out` through serde_json's own writers (its escaping, its
/// number formats): nothing is allocated.
fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(&mut *out, value).expect("strings and numbers serialise");
}

/// What a published intent adds to the scored event's: the previous published score, the
/// crossing (threshold outputs) and the segment (segment outputs).
fn placement(emission: Emission, policy: &EmitPolicy) -> (Option<f32>, Option<Crossing>, Option<&str>) {
    match policy {
        EmitPolicy::Every => (None, None, None),
        EmitPolicy::Delta { .. } => (emission.previous, None, None),
        EmitPolicy::Threshold { .. } => (emission.previous, Some(if emission.level == 1 { Crossing::Up } else { Crossing::Down }), None),
        EmitPolicy::Segments { names, .. } => (emission.previous, None, names.get(usize::from(emission.level)).map(String::as_str)),
    }
}

/// A stored state that could not be read.
#[derive(Debug)]
pub struct InvalidState {
    /// Input partition.
    pub partition: i32,
    /// User id.
    pub user: String,
    /// The stored bytes.
    pub bytes: Vec<u8>,
    /// Why they do not decode.
    pub error: StateError,
}

/// What a batch's intents carry as `emitted_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmittedAt {
    /// The wall-clock time of the batch (epoch ms): the live operator.
    Now(i64),
    /// Each event's own time: replays, whose outputs must be the same every time.
    EventTime,
}

/// `items` ordered by their users' first input indices `firsts` (unique: one user each).
fn by_first<T>(firsts: Vec<usize>, items: Vec<T>) -> (Vec<usize>, Vec<T>) {
    // The small keys are sorted, and each (large) item moved once into its place.
    let mut order: Vec<(usize, usize)> = firsts.into_iter().zip(0..).collect();
    order.sort_unstable();
    let mut items: Vec<Option<T>> = items.into_iter().map(Some).collect();
    order.into_iter().map(|(first, i)| (first, items[i].take().expect("each item once"))).unzip()
}

/// Seed of the hash that puts a user in a shard: any fixed value (a user's shard changes
/// nothing but which core scores it).
const SHARD_SEED: u64 = 0x1e7e_47f1_0a5c_0de5;

/// One user's slot during a batch.
struct Slot {
    partition: i32,
    user: String,
    state: UserState,
    inputs: Vec<usize>,
    /// Input index of the user's first event in the batch, applied or not.
    first: usize,
    /// The batch's index of this user's current session id, once one was recorded.
    session_id: Option<u32>,
}

/// Scores events with a trained [`IntentModel`], keeping per-user state.
pub struct IntentOperator {
    model: IntentModel,
    policy: ModelPolicy,
    fencing: bool,
    /// Whether intents carry their reasons.
    reasons: bool,
    /// Hidden states resident where the model steps (on a GPU), if any.
    resident: Option<Mutex<Resident>>,
    /// Most waves per batch, if capped.
    wave_cap: Option<NonZeroUsize>,
    /// Outputs with an emit policy, and the keys of their memories in user states.
    outputs: Vec<PolicyOutput>,
    output_ids: Vec<u32>,
    /// Shards a batch's users are split into, each scored on a core of its own; `None`: one per
    /// core of rayon's pool, at most one per [`MIN_SHARD_EVENTS`] events.
    shards: Option<NonZeroUsize>,
}

/// Events per shard below which a batch is not split further: a shard must outweigh handing it
/// to another core.
const MIN_SHARD_EVENTS: usize = 512;

impl IntentOperator {
    /// Wraps a loaded model; states of another model are refused. Every wave is stepped with
    /// the stateless [`IntentModel::step`] until [`IntentOperator::with_resident_slots`].
    pub fn new(model: IntentModel) -> IntentOperator {
        IntentOperator {
            model,
            policy: ModelPolicy::Refuse,
            fencing: true,
            reasons: false,
            resident: None,
            wave_cap: None,
            outputs: Vec::new(),
            output_ids: Vec::new(),
            shards: None,
        }
    }

    /// Keeps up to `slots` users' hidden states resident where the model steps (least recently
    /// used out first; see [`crate::resident`]); 0 steps every wave with the stateless
    /// [`IntentModel::step`]. Meant for a GPU; on the CPU it runs the same logic on a slab in
    /// memory (what its tests do).
    ///
    /// # Errors
    ///
    /// When the model's device cannot hold the slab.
    pub fn with_resident_slots(self, slots: usize) -> Result<IntentOperator, OperatorError> {
        Ok(match slots {
            0 => IntentOperator { resident: None, ..self },
            n => {
                let slab = self.model.resident_states(n)?;
                self.with_resident_states(slab)
            }
        })
    }

    /// [`IntentOperator::with_resident_slots`] when the model steps on a GPU; on the CPU the
    /// operator stays stateless (a slab in host memory would only add copies). What `run`,
    /// `replay` and `bench` call with their `gpu_resident_users`.
    ///
    /// # Errors
    ///
    /// When the GPU cannot hold the slab.
    pub fn with_gpu_resident_slots(self, slots: usize) -> Result<IntentOperator, OperatorError> {
        if self.model.device().is_cuda() {
            self.with_resident_slots(slots)
        } else {
            Ok(self)
        }
    }

    /// Keeps users' hidden states resident in `slab` (one of the model's
    /// [`IntentModel::resident_states`], or a wrapper of one).
    pub fn with_resident_states(mut self, slab: Box<dyn ResidentStates>) -> IntentOperator {
        self.resident = Some(Mutex::new(Resident::new(slab)));
        self
    }

    /// Whether events are fenced by their source position (the default). Sources whose
    /// positions are not Kafka offsets of a stable topic — files, whose "offset" is a row and
    /// whose names repeat across directories — must not fence.
    pub fn with_fencing(mut self, fencing: bool) -> IntentOperator {
        self.fencing = fencing;
        self
    }

    /// Whether each intent carries the signals that raised its score most
    /// ([`IntentModel::reasons`]; off by default).
    pub fn with_reasons(mut self, reasons: bool) -> IntentOperator {
        self.reasons = reasons;
        self
    }

    /// Caps the waves of a batch at `cap` (`None`: no cap). A user with more events in the
    /// batch has its first `cap` applied; the rest come back as [`BatchOutput::deferred`], so
    /// one user with thousands of events cannot serialise the batch into thousands of
    /// one-row waves while every other user waits. States are the same whatever the cap: each
    /// user's events are still applied in order, only later.
    ///
    /// The caller must give the deferred events again and commit no input offset past the
    /// first of them; events of other users between that offset and the batch's end are then
    /// read again after a restart, and their fences skip them. So a cap needs fencing (the
    /// default); without it the cap is ignored.
    pub fn with_wave_cap(mut self, cap: Option<NonZeroUsize>) -> IntentOperator {
        self.wave_cap = cap;
        self
    }

    /// Decides for each of `outputs` which scores it publishes ([`BatchOutput::published`]),
    /// keeping what each remembers of a user in the user's state; memories of outputs not
    /// among `outputs` are dropped from the states the operator writes.
    ///
    /// # Errors
    ///
    /// A policy that cannot work, two outputs with one name, more than 255 outputs.
    pub fn with_outputs(mut self, outputs: Vec<PolicyOutput>) -> Result<IntentOperator, InvalidPolicy> {
        let refuse = |policy: String, reason| Err(InvalidPolicy { policy, reason });
        if outputs.len() > usize::from(u8::MAX) {
            return refuse(format!("{} outputs", outputs.len()), "at most 255 outputs");
        }
        for (i, o) in outputs.iter().enumerate() {
            o.policy.validate()?;
            if outputs[..i].iter().any(|p| p.id() == o.id()) {
                return refuse(o.name.clone(), "two outputs with one name (or names of one hash)");
            }
        }
        self.output_ids = outputs.iter().map(PolicyOutput::id).collect();
        self.outputs = outputs;
        Ok(self)
    }

    /// The outputs with an emit policy, in the order [`Published::output`] indexes.
    pub fn outputs(&self) -> &[PolicyOutput] {
        &self.outputs
    }

    /// Splits each batch's users into `shards` shards (0: one per core, the default), scored on
    /// rayon's pool side by side: a user's events all fall into one shard (by a hash of its
    /// partition and id) and stay in order there. Nothing but time depends on it: a row's step is
    /// the same whatever rows share its wave, so scores, states, intents and their order are
    /// the same for any number of shards (tested). A batch is split into at most one shard per
    /// 512 events unless `shards` is given, and never when the model runs on a GPU: its step
    /// holds the device's buffers for the whole wave, and its waves are better large.
    pub fn with_shards(mut self, shards: usize) -> IntentOperator {
        self.shards = NonZeroUsize::new(shards);
        self
    }

    /// The shards a batch of `events` events is split into.
    fn shards_for(&self, events: usize) -> usize {
        if self.resident.is_some() || !self.model.device().is_cpu() {
            return 1;
        }
        match self.shards {
            Some(n) => n.get(),
            None => rayon::current_num_threads().min(events / MIN_SHARD_EVENTS).max(1),
        }
    }

    /// What to do with a stored state built by another model.
    pub fn with_model_policy(mut self, policy: ModelPolicy) -> IntentOperator {
        self.policy = policy;
        self
    }

    /// The model in use.
    pub fn model(&self) -> &IntentModel {
        &self.model
    }

    /// Scores a batch. Users are keyed by (input partition, user id); their states are read from
    /// `store` (the state store, or a view of it with an open transaction's writes) once per batch and returned, not written: the caller writes them after the
    /// outputs are acknowledged. `stamp` says what `emitted_at` holds.
    ///
    /// An event below its user's fence for its topic is already in the state and is skipped, so
    /// no event is applied twice to a hidden state even when a crash let a state reach the
    /// changelog ahead of its input offset. A stored state that does not decode, or (under
    /// [`ModelPolicy::Reset`]) was built by another model, is replaced by a fresh one and
    /// reported in the output; under [`ModelPolicy::Migrate`] a state of another model goes on
    /// with its hidden vector restarted from zero.
    ///
    /// # Errors
    ///
    /// State read errors, a state of another model under [`ModelPolicy::Refuse`], and model
    /// errors; the batch then has no effect.
    ///
    /// The batch's users are scored in shards side by side ([`IntentOperator::with_shards`]).
    pub fn process(&self, events: &[PositionedEvent], store: &(impl StateRead + Sync), stamp: EmittedAt) -> Result<BatchOutput, OperatorError> {
        let shards = self.shards_for(events.len());
        if shards == 1 {
            return self.process_shard(events, 0..events.len(), store, stamp);
        }
        let hasher = foldhash::fast::FixedState::with_seed(SHARD_SEED);
        let mut rows: Vec<Vec<usize>> = vec![Vec::with_capacity(events.len() / shards + 1); shards];
        for (i, pe) in events.iter().enumerate() {
            let shard = hasher.hash_one((pe.source.partition, pe.event.user_id.as_str())) % shards as u64;
            rows[shard as usize].push(i);
        }
        let parts: Vec<Result<BatchOutput, OperatorError>> = rows.par_iter().map(|rows| self.process_shard(events, rows.iter().copied(), store, stamp)).collect();
        // The first shard's error, whichever failed first in time.
        Ok(BatchOutput::merge(parts.into_iter().collect::<Result<_, _>>()?))
    }

    /// Scores the events at `rows` (ascending indices into `events`, every event of each of
    /// their users): [`IntentOperator::process`] of one shard.
    fn process_shard(&self, events: &[PositionedEvent], rows: impl Iterator<Item = usize>, store: &impl StateRead, stamp: EmittedAt) -> Result<BatchOutput, OperatorError> {
        let mut slots: Vec<Slot> = Vec::new();
        let mut index: HashMap<(i32, &str), usize> = HashMap::new();
        for i in rows {
            let pe = &events[i];
            let key = (pe.source.partition, pe.event.user_id.as_str());
            let slot = *index.entry(key).or_insert_with(|| {
                slots.push(Slot { partition: key.0, user: key.1.to_string(), state: UserState::default(), inputs: Vec::new(), first: i, session_id: None });
                slots.len() - 1
            });
            slots[slot].inputs.push(i);
        }
        let stored = store.get_many(slots.iter().map(|s| (s.partition, s.user.as_str())))?;
        let h = self.model.state_dim();
        let version = self.model.version();
        let (mut reset_states, mut foreign_states, mut already_applied) = (0, 0, 0);
        let (mut invalid_states, mut invalid_firsts) = (Vec::new(), Vec::new());
        let mut deferred = Vec::new();
        let mut topics = TopicIds::default();
        for (slot, loaded) in slots.iter_mut().zip(stored) {
            slot.state = match loaded {
                Loaded::Absent => UserState::default(),
                Loaded::State(state) if state.built_by(version) => state,
                Loaded::State(state) => match self.policy {
                    ModelPolicy::Refuse => {
                        let (partition, user) = (slot.partition, slot.user.clone());
                        return Err(StateError::ForeignModel { partition, user, found: state.model_version, expected: version.to_string() }.into());
                    }
                    ModelPolicy::Reset => {
                        foreign_states += 1;
                        // The fences stay: events the old state applied are not applied again
                        // (a restart reads them again behind events a wave cap deferred). So do
                        // the outputs' memories: what they published is a fact of their topics.
                        UserState { fences: state.fences, outputs: state.outputs, ..UserState::default() }
                    }
                    ModelPolicy::Migrate => {
                        foreign_states += 1;
                        // Only the hidden vector means nothing to the loaded model: it restarts
                        // from zero below, and everything else goes on.
                        UserState { hidden: Vec::new(), ..state }
                    }
                },
                Loaded::Invalid { bytes, error } => {
                    invalid_states.push(InvalidState { partition: slot.partition, user: slot.user.clone(), bytes, error });
                    invalid_firsts.push(slot.first);
                    UserState::default()
                }
            };
            if self.fencing && !slot.state.fences.is_empty() {
                let before = slot.inputs.len();
                let state = &slot.state;
                slot.inputs.retain(|&i| !state.has_applied(topics.id(&events[i].source.topic), events[i].source.offset));
                already_applied += before - slot.inputs.len();
            }
            if let Some(cap) = self.wave_cap.filter(|_| self.fencing) {
                if slot.inputs.len() > cap.get() {
                    deferred.extend(slot.inputs.drain(cap.get()..));
                }
            }
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
            slot.state.outputs.retain(|m| self.output_ids.contains(&m.output));
        }

        let emitted_at = match stamp {
            EmittedAt::Now(ms) => Some(format_ts_ms(ms)),
            EmittedAt::EventTime => None,
        };
        let mut scored: Vec<Option<Scored>> = vec![None; events.len()];
        let mut session_ids: Vec<String> = Vec::new();
        let max_len = slots.iter().map(|s| s.inputs.len()).max().unwrap_or(0);
        // Slots by falling number of inputs: wave k steps the prefix of slots with more than k,
        // so a user with thousands of events in the batch costs a wave per event, not a pass
        // over every user per event.
        let mut by_length: Vec<usize> = (0..slots.len()).collect();
        by_length.sort_by_key(|&si| std::cmp::Reverse(slots[si].inputs.len()));
        let mut active = by_length.iter().take_while(|&&si| !slots[si].inputs.is_empty()).count();
        // With resident states, the stored vectors go to the device only for users it does not
        // hold already; each wave then sends features and slot numbers alone.
        let mut resident = self.resident.as_ref().map(|r| r.lock().unwrap_or_else(PoisonError::into_inner));
        let mut report = ResidentBatch::default();
        let device_slots = match resident.as_deref_mut() {
            Some(r) => r.admit(active, by_length[..active].iter().map(|&si| (slots[si].partition, slots[si].user.as_str(), slots[si].state.hidden.as_slice())), &mut report)?,
            None => None,
        };
        let resident_report = resident.is_some().then_some(report);
        let mut features: Vec<Features> = Vec::with_capacity(slots.len());
        let mut hidden: Vec<f32> = Vec::with_capacity(slots.len() * h);
        let mut wave_slots: Vec<usize> = Vec::with_capacity(slots.len());
        let mut scores: Vec<f32> = Vec::with_capacity(slots.len());
        let mut step_seconds: Vec<f64> = Vec::with_capacity(max_len);
        // (input, output, emission), turned into `Published` once the scored events are final.
        let mut published: Vec<(usize, usize, Emission)> = Vec::new();
        for wave in 0..max_len {
            features.clear();
            hidden.clear();
            wave_slots.clear();
            while active > 0 && slots[by_length[active - 1]].inputs.len() <= wave {
                active -= 1;
            }
            // A row's step does not depend on the rows beside it, and intents land by input
            // index: the order of a wave's rows changes nothing.
            for (rank, &si) in by_length[..active].iter().enumerate() {
                let slot = &mut slots[si];
                let input = slot.inputs[wave];
                let prepared = self.model.features().featurize(&mut slot.state.session, &events[input].event);
                match (&device_slots, resident.as_deref_mut()) {
                    (Some(on_device), Some(r)) => r.rows().push(ResidentRow { slot: on_device[rank], reset: prepared.reset_hidden, features: prepared.features }),
                    _ => {
                        if prepared.reset_hidden {
                            slot.state.hidden.fill(0.0);
                        }
                        hidden.extend_from_slice(&slot.state.hidden);
                    }
                }
                // Kept on both paths: the head's skip term reads them.
                features.push(prepared.features);
                wave_slots.push(si);
            }
            scores.clear();
            let stepping = std::time::Instant::now();
            match (&device_slots, resident.as_deref_mut()) {
                (Some(_), Some(r)) => scores.extend(r.step()?.iter().zip(&features).map(|(&logit, f)| self.model.probability(logit, f))),
                _ => {
                    let out = self.model.step(&features, &hidden)?;
                    for (k, &si) in wave_slots.iter().enumerate() {
                        slots[si].state.hidden.copy_from_slice(&out.hidden[k * h..(k + 1) * h]);
                    }
                    scores.extend_from_slice(&out.scores);
                }
            }
            step_seconds.push(stepping.elapsed().as_secs_f64());
            for (k, &si) in wave_slots.iter().enumerate() {
                let slot = &mut slots[si];
                let input = slot.inputs[wave];
                let session = &slot.state.session;
                // A session id is stored once per user and session, not per event.
                let session_id = match (&session.session_id, slot.session_id) {
                    (None, _) => None,
                    (Some(id), Some(i)) if session_ids[i as usize] == *id => Some(i),
                    (Some(id), _) => {
                        session_ids.push(id.clone());
                        slot.session_id = Some(session_ids.len() as u32 - 1);
                        slot.session_id
                    }
                };
                let reasons = if self.reasons { self.model.reasons(&features[k]) } else { Reasons::default() };
                scored[input] = Some(Scored {
                    input,
                    score: scores[k],
                    session_seq: session.session_seq,
                    session_events: session.events,
                    cart_count: session.cart_count,
                    cart_value: session.cart_value,
                    session_id,
                    reasons,
                });
                slot.state.last_score = Some(scores[k]);
                self.decide_outputs(&mut slot.state, input, events[input].event.kind, scores[k], &mut published);
            }
        }
        // The batch's new vectors come back once, to be written with its states.
        if let (Some(on_device), Some(r)) = (&device_slots, resident.as_deref_mut()) {
            r.settle(on_device, &mut hidden)?;
            for (&si, v) in by_length.iter().zip(hidden.chunks_exact(h)) {
                slots[si].state.hidden.copy_from_slice(v);
            }
        }
        drop(resident);
        // Each user's inputs rise, and so do its waves: sorted by input (stably, so outputs keep
        // their order), the published intents keep every user's event order.
        published.sort_by_key(|&(input, _, _)| input);
        let scored: Vec<Scored> = scored.into_iter().flatten().collect();
        let mut at = 0;
        let published = published
            .into_iter()
            .map(|(input, output, emission)| {
                while scored[at].input < input {
                    at += 1;
                }
                Published { scored: at, output, emission }
            })
            .collect();
        if self.fencing {
            for slot in &mut slots {
                // Inputs are in offset order per topic: the last of each topic moves its fence.
                for &input in &slot.inputs {
                    let source = &events[input].source;
                    slot.state.mark_applied(topics.id(&source.topic), source.offset);
                }
            }
        }
        Ok(BatchOutput {
            // Fenced events have no intent.
            scored,
            published,
            session_ids,
            emitted_at,
            model_version: version.to_string(),
            threshold: self.model.meta().threshold,
            inputs: events.len(),
            resident: resident_report,
            state_firsts: slots.iter().filter(|s| !s.inputs.is_empty()).map(|s| s.first).collect(),
            states: slots.into_iter().filter(|s| !s.inputs.is_empty()).map(|s| (s.partition, s.user, s.state)).collect(),
            reset_states,
            foreign_states,
            invalid_states,
            invalid_firsts,
            already_applied,
            waves: max_len,
            step_seconds,
            deferred: {
                deferred.sort_unstable();
                deferred
            },
        })
    }
}

impl IntentOperator {
    /// Decides for each policy output whether the score of the event at `input` is published,
    /// with the memory the output keeps in `state`.
    fn decide_outputs(&self, state: &mut UserState, input: usize, kind: EventType, score: f32, published: &mut Vec<(usize, usize, Emission)>) {
        for (o, (output, &id)) in self.outputs.iter().zip(&self.output_ids).enumerate() {
            if output.exclude_purchases && kind == EventType::Purchase {
                continue;
            }
            let emission = if output.policy.remembers() {
                let mut memory = state.output_memory(id);
                let Some(emission) = output.policy.decide(&mut memory, score) else { continue };
                state.remember(id, memory);
                emission
            } else {
                Emission { level: 0, previous: None }
            };
            published.push((input, o, emission));
        }
    }
}

/// [`topic_id`] of the few topic names of a batch, hashed once each.
#[derive(Default)]
struct TopicIds {
    known: Vec<(String, u32)>,
}

impl TopicIds {
    fn id(&mut self, topic: &str) -> u32 {
        if let Some((_, id)) = self.known.iter().find(|(t, _)| t == topic) {
            return *id;
        }
        let id = topic_id(topic);
        self.known.push((topic.to_string(), id));
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use intentflow_formats::generate::{generate, GeneratorConfig};
    use intentflow_model::{Device, StatePrecision};
    use intentflow_model::train::{train, TrainConfig};
    use intentflow_state::{StateStore, StoreOptions};
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use intentflow_schemas::SessionState;

    fn generated(users: usize, events: usize) -> Vec<Event> {
        generate(&GeneratorConfig { users, events, seed: 3, ..Default::default() }).into_iter().map(|g| g.event).collect()
    }

    /// A small GRU trained once per test process.
    fn model() -> IntentModel {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        small_model(&DIR, intentflow_model::Cell::Gru)
    }

    /// A small model of `cell`, trained once into `dir`.
    fn small_model(dir: &'static std::sync::OnceLock<tempfile::TempDir>, cell: intentflow_model::Cell) -> IntentModel {
        let dir = dir.get_or_init(|| {
            let cfg = TrainConfig { cells: vec![cell], hidden_dim: 16, members: 1, epochs: 1, ..TrainConfig::default() };
            let trained = train(&generated(300, 6_000), &cfg, &Device::Cpu, |_, _| {}).unwrap();
            let dir = tempfile::tempdir().unwrap();
            trained.save(dir.path()).unwrap();
            dir
        });
        IntentModel::load(dir.path(), &Device::Cpu).unwrap()
    }

    /// Events of topic `t` at their index as offset, each user in one of `partitions`.
    fn spread(events: &[Event], partitions: u32) -> Vec<PositionedEvent> {
        events
            .iter()
            .enumerate()
            .map(|(i, e)| PositionedEvent {
                source: SourcePosition { topic: "t".into(), partition: (e.user_id.bytes().map(u32::from).sum::<u32>() % partitions) as i32, offset: i as i64 },
                event: e.clone(),
            })
            .collect()
    }

    fn positioned(events: &[Event], topic: &str) -> Vec<PositionedEvent> {
        events.iter().enumerate().map(|(i, e)| PositionedEvent { source: SourcePosition { topic: topic.into(), partition: 0, offset: i as i64 }, event: e.clone() }).collect()
    }

    /// Policy outputs publish, over any batch cuts and with a wave cap, what each policy decides
    /// on each user's scores in order (purchases left out where asked), their memories survive
    /// in the stored states, and the published intents are the serde encoding of built ones.
    #[test]
    fn policy_outputs_publish_each_users_decisions_whatever_the_batches() {
        use crate::emit::{EmitMemory, EmitPolicy, PolicyOutput};
        let events = generated(200, 4_000);
        let positioned = spread(&events, 3);
        let outputs = vec![
            PolicyOutput { name: "alerts".into(), policy: EmitPolicy::Threshold { enter: 0.3, leave: 0.2 }, exclude_purchases: true, schema: IntentSchema::V1 },
            PolicyOutput { name: "moves".into(), policy: EmitPolicy::Delta { min_change: 0.05 }, exclude_purchases: false, schema: IntentSchema::V2 },
            PolicyOutput {
                name: "segments".into(),
                policy: EmitPolicy::Segments { cuts: vec![0.1, 0.3], names: vec!["cold".into(), "warm".into(), "hot".into()] },
                exclude_purchases: false,
                schema: IntentSchema::V1,
            },
            PolicyOutput { name: "no-purchases".into(), policy: EmitPolicy::Every, exclude_purchases: true, schema: IntentSchema::V2 },
        ];
        let op = IntentOperator::new(model()).with_outputs(outputs.clone()).unwrap().with_wave_cap(NonZeroUsize::new(3));
        // Per (output, user): the published scores and what the records say about them.
        type Streamed = BTreeMap<(usize, String), Vec<(f32, Option<f32>, Option<Crossing>, Option<String>)>>;
        let run = |cuts: &mut dyn FnMut() -> usize| -> (Streamed, BTreeMap<String, Vec<f32>>, StateStore, tempfile::TempDir) {
            let dir = tempfile::tempdir().unwrap();
            let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
            let (mut published, mut scores) = (Streamed::new(), BTreeMap::<String, Vec<f32>>::new());
            let (mut pending, mut next) = (Vec::<PositionedEvent>::new(), 0);
            while next < positioned.len() || !pending.is_empty() {
                let end = (next + cuts()).min(positioned.len());
                pending.extend_from_slice(&positioned[next..end]);
                next = end;
                let batch = std::mem::take(&mut pending);
                let out = op.process(&batch, &store, EmittedAt::EventTime).unwrap();
                for s in &out.scored {
                    scores.entry(batch[s.input].event.user_id.to_string()).or_default().push(s.score);
                }
                let mut buf = Vec::new();
                for p in &out.published {
                    let intent = out.published_intent(&batch, p, &outputs[p.output]);
                    buf.clear();
                    out.encode_published(&batch, p, &outputs[p.output], &mut buf);
                    assert_eq!(buf, serde_json::to_vec(&intent).unwrap());
                    assert_eq!(intent.v, outputs[p.output].schema.number());
                    let pl = intent.placement;
                    published.entry((p.output, intent.user_id.clone())).or_default().push((intent.score, pl.previous_score, pl.crossing, pl.segment));
                }
                store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
                pending = out.deferred.iter().map(|&i| batch[i].clone()).collect();
            }
            (published, scores, store, dir)
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (published, scores, store, _dir) = run(&mut || rng.random_range(1..500));
        let (whole, _, _, _dir2) = run(&mut || positioned.len());
        assert_eq!(published, whole, "the same intents whatever the batch cuts");

        // Each policy's own decisions on each user's scores in order.
        let states: BTreeMap<String, UserState> = store.users().unwrap().into_iter().map(|(_, u, s)| (u, s)).collect();
        let mut expected = Streamed::new();
        let mut counts = vec![0; outputs.len()];
        for (user, user_scores) in &scores {
            let kinds: Vec<EventType> = events.iter().filter(|e| e.user_id.as_str() == user).map(|e| e.kind).collect();
            for (o, output) in outputs.iter().enumerate() {
                let mut memory = EmitMemory::default();
                for (&score, &kind) in user_scores.iter().zip(&kinds) {
                    if output.exclude_purchases && kind == EventType::Purchase {
                        continue;
                    }
                    if let Some(e) = output.policy.decide(&mut memory, score) {
                        let (previous, crossing, segment) = placement(e, &output.policy);
                        expected.entry((o, user.clone())).or_default().push((score, previous, crossing, segment.map(str::to_string)));
                        counts[o] += 1;
                    }
                }
                let stored = states[user].output_memory(output.id());
                assert_eq!(stored, if output.policy.remembers() { memory } else { EmitMemory::default() }, "{user}: {}", output.name);
            }
        }
        assert_eq!(published, expected);
        // Every policy took part: alerts are rarer than moves, and every-but-purchases is every
        // event but the purchases.
        let purchases = events.iter().filter(|e| e.kind == EventType::Purchase).count();
        assert!(counts[0] > 0 && counts[0] < counts[1] && counts[2] > 0, "{counts:?}");
        assert_eq!(counts[3], events.len() - purchases);
        // An operator without these outputs forgets their memories of the users it touches.
        let later = PositionedEvent { source: SourcePosition { offset: positioned.len() as i64, ..positioned[0].source.clone() }, event: positioned[0].event.clone() };
        let out = IntentOperator::new(model()).process(std::slice::from_ref(&later), &store, EmittedAt::EventTime).unwrap();
        assert!(!states[later.event.user_id.as_str()].outputs.is_empty() && out.states[0].2.outputs.is_empty() && out.published.is_empty());
    }

    /// Streaming in waves over arbitrary batch cuts reproduces offline per-user scoring.
    #[test]
    fn waves_over_batches_equal_offline_sequences() {
        waves_equal_offline(model());
    }

    /// The same for an LSTM, whose state (`[h | c]`, twice the hidden size) goes through RocksDB.
    #[test]
    fn an_lstm_streams_in_waves_as_it_scores_offline() {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        let model = small_model(&DIR, intentflow_model::Cell::Lstm);
        assert_eq!((model.cell(), model.state_dim()), (intentflow_model::Cell::Lstm, 32));
        waves_equal_offline(model);
    }

    /// The same for a causal convolution, whose state is its output and partial sums.
    #[test]
    fn a_convolution_streams_in_waves_as_it_scores_offline() {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        let model = small_model(&DIR, intentflow_model::Cell::Cnn);
        assert_eq!((model.cell(), model.state_dim()), (intentflow_model::Cell::Cnn, 48));
        waves_equal_offline(model);
    }

    fn waves_equal_offline(model: IntentModel) {
        let events = generated(300, 6_000);
        let op = IntentOperator::new(model.clone());

        let state_dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(state_dir.path(), StoreOptions::default()).unwrap();
        let positioned = spread(&events, 4);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut streamed: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut start = 0;
        while start < positioned.len() {
            let end = (start + rng.random_range(1..700)).min(positioned.len());
            let out = op.process(&positioned[start..end], &store, EmittedAt::Now(0)).unwrap();
            assert_eq!(out.scored.len(), end - start);
            for (intent, input) in out.intents(&positioned[start..end]).zip(&positioned[start..end]) {
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
            assert_eq!(state.hidden.len(), model.state_dim());
            for (a, b) in state.hidden.iter().zip(&offline.hidden) {
                assert!((a - b).abs() <= 1e-5);
            }
        }
    }

    /// With a wave cap, a batch takes at most that many waves; a user's later events come back
    /// deferred and, given again ahead of newer records, are applied in order: every event is
    /// scored once, with the score and final state of an uncapped pass. A restart from the
    /// offsets a caller may commit (per partition, the first deferred event's, else one past the
    /// last) re-reads other users' applied events, which their fences skip.
    #[test]
    fn a_wave_cap_defers_later_events_and_changes_no_score() {
        let model = model();
        let events = spread(&generated(300, 6_000), 4);
        let uncapped_dir = tempfile::tempdir().unwrap();
        let uncapped = StateStore::open(uncapped_dir.path(), StoreOptions::default()).unwrap();
        let mut expected: BTreeMap<(i32, i64), f32> = BTreeMap::new();
        for chunk in events.chunks(500) {
            let out = IntentOperator::new(model.clone()).process(chunk, &uncapped, EmittedAt::Now(0)).unwrap();
            assert!(out.deferred.is_empty(), "no cap, nothing deferred");
            expected.extend(out.scored.iter().map(|s| ((chunk[s.input].source.partition, chunk[s.input].source.offset), s.score)));
            uncapped.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
        }

        let cap = NonZeroUsize::new(2).unwrap();
        let op = IntentOperator::new(model).with_wave_cap(Some(cap));
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        let mut scored: BTreeMap<(i32, i64), f32> = BTreeMap::new();
        let (mut carry, mut next, mut deferred_total): (Vec<PositionedEvent>, usize, usize) = (Vec::new(), 0, 0);
        let mut restarted = false;
        while next < events.len() || !carry.is_empty() {
            let take = 400.min(events.len() - next);
            let mut batch = std::mem::take(&mut carry);
            batch.extend_from_slice(&events[next..next + take]);
            next += take;
            let out = op.process(&batch, &store, EmittedAt::Now(0)).unwrap();
            assert!(out.waves <= cap.get(), "{} waves", out.waves);
            assert_eq!(out.scored.len() + out.deferred.len() + out.already_applied, batch.len());
            for s in &out.scored {
                let at = (batch[s.input].source.partition, batch[s.input].source.offset);
                assert!(scored.insert(at, s.score).is_none(), "event {at:?} scored twice");
            }
            deferred_total += out.deferred.len();
            carry = out.deferred.iter().map(|&i| batch[i].clone()).collect();
            store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
            if !restarted && next >= events.len() / 2 {
                // A crash after this commit: the in-memory carry is lost, and the partitions are
                // read again from what the caller committed.
                restarted = true;
                let first_deferred = |p: i32| carry.iter().filter(|c| c.source.partition == p).map(|c| c.source.offset).min();
                carry = events[..next].iter().filter(|e| first_deferred(e.source.partition).is_some_and(|d| e.source.offset >= d)).cloned().collect();
                assert!(carry.iter().any(|e| scored.contains_key(&(e.source.partition, e.source.offset))), "the restart re-reads applied events");
            }
        }
        assert!(deferred_total > 0, "the cap deferred events");
        assert_eq!(scored, expected, "the same scores for the same events, each once");
        assert_eq!(store.users().unwrap(), uncapped.users().unwrap(), "the same final states");
    }

    /// Scoring a batch's users in shards side by side changes nothing but time: over the same
    /// batches (with policy outputs, a wave cap, redelivered events and stored states that do
    /// not decode), one shard and three give the same intents byte for byte, in the same order,
    /// the same published intents, deferrals, fenced counts, states and broken states in order,
    /// and the same stored states.
    #[test]
    fn shards_change_no_intent_state_or_order() {
        use crate::emit::{EmitPolicy, PolicyOutput};
        let events = spread(&generated(300, 6_000), 4);
        let outputs = vec![
            PolicyOutput { name: "alerts".into(), policy: EmitPolicy::Threshold { enter: 0.3, leave: 0.2 }, exclude_purchases: true, schema: IntentSchema::V2 },
            PolicyOutput { name: "moves".into(), policy: EmitPolicy::Delta { min_change: 0.05 }, exclude_purchases: false, schema: IntentSchema::V1 },
        ];
        // Everything a batch hands its caller, as bytes and indices, and its states in order.
        type Seen = (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<usize>, usize, usize, Vec<(i32, String, UserState)>, Vec<(i32, String)>, bool);
        let run = |shards: usize| -> (Vec<Seen>, Vec<(i32, String, UserState)>) {
            let op = IntentOperator::new(model()).with_outputs(outputs.clone()).unwrap().with_wave_cap(NonZeroUsize::new(3)).with_shards(shards);
            let dir = tempfile::tempdir().unwrap();
            let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
            // Some users' stored states do not decode: they start fresh and come back to be
            // quarantined.
            let broken: Vec<(i32, &str)> = events.iter().step_by(997).map(|e| (e.source.partition, e.event.user_id.as_str())).collect();
            store.commit_encoded(broken.iter().map(|&(p, u)| (p, u, b"not a state".as_slice())), [], []).unwrap();
            let (mut seen, mut carry) = (Vec::new(), Vec::<PositionedEvent>::new());
            for (k, chunk) in events.chunks(1_500).enumerate() {
                let mut batch = std::mem::take(&mut carry);
                // Every other batch gets the one before it again, as after a crash.
                if k % 2 == 1 {
                    batch.extend_from_slice(&events[(k - 1) * 1_500..k * 1_500]);
                }
                batch.extend_from_slice(chunk);
                let out = op.process(&batch, &store, EmittedAt::Now(1_700_000_000_000)).unwrap();
                assert_eq!(out.step_seconds.len() > out.waves, shards > 1 && !out.scored.is_empty(), "each shard steps its own waves");
                let intents = out
                    .scored
                    .iter()
                    .map(|s| {
                        let mut buf = Vec::new();
                        out.encode_intent(&batch, s, &mut buf);
                        buf
                    })
                    .collect();
                let published = out
                    .published
                    .iter()
                    .map(|p| {
                        let mut buf = Vec::new();
                        out.encode_published(&batch, p, &outputs[p.output], &mut buf);
                        buf
                    })
                    .collect();
                let invalid = out.invalid_states.iter().map(|i| (i.partition, i.user.clone())).collect();
                let both_outputs = out.published.windows(2).any(|w| w[0].scored == w[1].scored);
                seen.push((intents, published, out.deferred.clone(), out.already_applied, out.waves, out.states.clone(), invalid, both_outputs));
                carry = out.deferred.iter().map(|&i| batch[i].clone()).collect();
                store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
            }
            (seen, store.users().unwrap())
        };
        let (one, one_states) = run(1);
        let (three, three_states) = run(3);
        assert!(one.iter().any(|s| !s.2.is_empty()) && one.iter().any(|s| s.3 > 0) && one.iter().all(|s| !s.1.is_empty()), "deferrals, redeliveries and published intents occur");
        assert!(one.iter().any(|s| s.6.len() > 1) && one.iter().any(|s| s.7), "several broken states in a batch, and events published to both outputs");
        assert_eq!(one.len(), three.len());
        for (k, (a, b)) in one.iter().zip(&three).enumerate() {
            assert!(a == b, "batch {k}: one shard and three differ");
        }
        assert_eq!(one_states, three_states, "the same stored states");
    }

    /// A redelivered event is below its user's fence: not applied again, no intent; the rest of
    /// a partly redelivered batch is applied.
    #[test]
    fn redelivered_events_are_fenced_off() {
        let events = positioned(&generated(20, 200), "events");
        let op = IntentOperator::new(model());
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        let commit = |out: &BatchOutput| store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
        let first = op.process(&events[..120], &store, EmittedAt::EventTime).unwrap();
        commit(&first);
        let before = store.users().unwrap();
        // The whole first batch again: nothing applied, nothing emitted, nothing to write.
        let again = op.process(&events[..120], &store, EmittedAt::EventTime).unwrap();
        assert_eq!((again.already_applied, again.scored.len(), again.states.len()), (120, 0, 0));
        // Its second half again with new events: only the new ones count.
        let overlap = op.process(&events[60..], &store, EmittedAt::EventTime).unwrap();
        assert_eq!((overlap.already_applied, overlap.scored.len()), (60, 80));
        assert!(overlap.intents(&events[60..]).all(|i| i.source.offset >= 120));
        commit(&overlap);
        // The same as one clean pass.
        let clean_dir = tempfile::tempdir().unwrap();
        let clean = StateStore::open(clean_dir.path(), StoreOptions::default()).unwrap();
        let out = op.process(&events, &clean, EmittedAt::EventTime).unwrap();
        clean.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
        assert_eq!(store.users().unwrap(), clean.users().unwrap());
        assert_ne!(store.users().unwrap(), before);
        // Another topic's offsets are fenced separately.
        let other = positioned(&generated(20, 200)[..10], "other-topic");
        assert_eq!(op.process(&other, &store, EmittedAt::EventTime).unwrap().already_applied, 0);
    }

    /// A stored state that does not decode, or belongs to another model, does not stop the
    /// batch: the user starts fresh (or, for another model, the policy refuses).
    #[test]
    fn unusable_and_foreign_states_start_fresh_or_are_refused() {
        let events = positioned(&generated(20, 200), "events");
        let user = events[0].event.user_id.clone();
        let mine: Vec<PositionedEvent> = events.iter().filter(|e| e.event.user_id == user).cloned().collect();
        let model = model();
        let fresh_scores = model.score_sequence(mine.iter().map(|e| &e.event)).unwrap().scores;
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();

        store.commit_encoded([(0, user.as_str(), b"\x03garbage".as_slice())], [], []).unwrap();
        let out = IntentOperator::new(model.clone()).process(&mine, &store, EmittedAt::EventTime).unwrap();
        assert_eq!(out.invalid_states.len(), 1);
        assert_eq!(out.invalid_states[0].bytes, b"\x03garbage");
        let close = |got: &BatchOutput| got.scored.len() == fresh_scores.len() && got.scored.iter().zip(&fresh_scores).all(|(i, s)| (i.score - s).abs() <= 1e-6);
        assert!(close(&out), "the user started fresh");

        let foreign = UserState { hidden: vec![0.9; model.state_dim()], model_version: "gru-other".into(), ..Default::default() };
        store.commit([(0, user.as_str(), &foreign)], [], []).unwrap();
        let err = IntentOperator::new(model.clone()).process(&mine, &store, EmittedAt::EventTime).unwrap_err();
        assert!(err.to_string().contains("built by model gru-other"), "{err}");
        let out = IntentOperator::new(model.clone()).with_model_policy(ModelPolicy::Reset).process(&mine, &store, EmittedAt::EventTime).unwrap();
        assert_eq!(out.foreign_states, 1);
        assert!(close(&out), "the user started fresh");

        // Migrated (a model reload): the session goes on, the hidden vector restarts from zero.
        let scratch_dir = tempfile::tempdir().unwrap();
        let scratch = StateStore::open(scratch_dir.path(), StoreOptions::default()).unwrap();
        let first = IntentOperator::new(model.clone()).process(&mine[..1], &scratch, EmittedAt::EventTime).unwrap();
        let before = first.states[0].2.clone();
        let old = UserState { hidden: vec![0.9; model.state_dim()], model_version: "gru-other".into(), ..before.clone() };
        store.commit([(0, user.as_str(), &old)], [], []).unwrap();
        let out = IntentOperator::new(model.clone()).with_model_policy(ModelPolicy::Migrate).process(&mine[1..2], &store, EmittedAt::EventTime).unwrap();
        assert_eq!(out.foreign_states, 1);
        let migrated = &out.states[0].2;
        assert_eq!(migrated.model_version, model.version());
        // The same as the user's own state with a zero hidden vector.
        let zero = UserState { hidden: vec![0.0; model.state_dim()], ..before };
        scratch.commit([(0, user.as_str(), &zero)], [], []).unwrap();
        let want = IntentOperator::new(model).process(&mine[1..2], &scratch, EmittedAt::EventTime).unwrap();
        assert_eq!(out.scored[0].score, want.scored[0].score);
        assert_eq!(migrated, &want.states[0].2, "session counters, fences and the restarted hidden vector");
    }

    /// Resident states (here on the CPU slab, which runs the GPU path's logic) give the stateless
    /// step's bits through evictions, batches with more users than slots, batches that were
    /// stepped but never committed, and states rewritten behind the slab's back.
    #[test]
    fn resident_states_give_the_stateless_steps_bits_through_evictions_aborts_and_outside_writes() {
        let events = generated(300, 6_000);
        let positioned = spread(&events, 3);
        let model = model();
        let plain = IntentOperator::new(model.clone());
        // 200 slots for 300 users: evictions; batches of at most 150 users: every batch fits.
        let resident = IntentOperator::new(model.clone()).with_resident_slots(200).unwrap();
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = StateStore::open(dir_a.path(), StoreOptions::default()).unwrap();
        let b = StateStore::open(dir_b.path(), StoreOptions::default()).unwrap();
        let commit = |store: &StateStore, out: &BatchOutput| store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (mut start, mut batches, mut aborted, mut rewritten) = (0, 0, 0, 0);
        let (mut held, mut evictions) = (0, 0);
        while start < positioned.len() {
            let end = (start + rng.random_range(1..150)).min(positioned.len());
            let batch = &positioned[start..end];
            let out_a = plain.process(batch, &a, EmittedAt::EventTime).unwrap();
            let out_b = resident.process(batch, &b, EmittedAt::EventTime).unwrap();
            let report = out_b.resident.unwrap();
            (held, evictions) = (report.held, evictions + report.evicted);
            let scores = |o: &BatchOutput| o.scored.iter().map(|i| (i.input, i.score.to_bits())).collect::<Vec<_>>();
            assert_eq!(scores(&out_a), scores(&out_b), "batch {batches}");
            assert_eq!(out_a.states, out_b.states, "batch {batches}");
            batches += 1;
            if rng.random_range(0..5) == 0 {
                // Stepped, never committed: the next pass redoes the batch from the stored states.
                aborted += 1;
                continue;
            }
            commit(&a, &out_a);
            commit(&b, &out_b);
            if rng.random_range(0..6) == 0 {
                // A state rewritten behind the slab (a restore, a reset): the slot must not be trusted.
                let (p, user, state) = &out_a.states[0];
                // Half the time a vector of another length: the next step starts from zero.
                let hidden = if rewritten % 2 == 0 { state.hidden.iter().map(|v| v * 0.5).collect() } else { vec![0.25; 3] };
                let rewound = UserState { hidden, ..state.clone() };
                for store in [&a, &b] {
                    store.commit([(*p, user.as_str(), &rewound)], [], []).unwrap();
                }
                rewritten += 1;
            }
            start = end;
        }
        assert_eq!(a.users().unwrap(), b.users().unwrap());
        assert_eq!(held, 200);
        // The slab's report: the next events of users it has just stepped load nobody.
        let shifted = |by: i64| -> Vec<PositionedEvent> {
            positioned.iter().step_by(150).map(|pe| PositionedEvent { source: SourcePosition { offset: pe.source.offset + by, ..pe.source.clone() }, ..pe.clone() }).collect()
        };
        let (later, latest) = (shifted(1_000_000), shifted(2_000_000));
        let first = resident.process(&later, &b, EmittedAt::EventTime).unwrap();
        commit(&b, &first);
        let again = resident.process(&latest, &b, EmittedAt::EventTime).unwrap();
        let users = again.states.len();
        assert!(users > 10 && again.scored.len() == latest.len(), "{users} users, {} of {} scored", again.scored.len(), latest.len());
        assert!(first.resident.unwrap().on_device && first.resident.unwrap().held == 200);
        assert_eq!(again.resident.map(|r| (r.on_device, r.loaded, r.evicted)), Some((true, 0, 0)), "{users} users, all resident");
        assert!(plain.process(&latest, &a, EmittedAt::EventTime).unwrap().resident.is_none());
        assert!(evictions > 0 && aborted > 0 && rewritten > 0, "evictions {evictions}, aborted {aborted}, rewritten {rewritten}");
        // A batch with more users than slots runs on the stateless step, with the same bits.
        let few = IntentOperator::new(model).with_resident_slots(4).unwrap();
        let dir_c = tempfile::tempdir().unwrap();
        let c = StateStore::open(dir_c.path(), StoreOptions::default()).unwrap();
        let (whole_a, whole_c) = (plain.process(&positioned, &c, EmittedAt::EventTime).unwrap(), few.process(&positioned, &c, EmittedAt::EventTime).unwrap());
        assert_eq!(whole_a.states, whole_c.states);
        assert_eq!(whole_a.scored.iter().map(|i| i.score.to_bits()).collect::<Vec<_>>(), whole_c.scored.iter().map(|i| i.score.to_bits()).collect::<Vec<_>>());
    }

    /// A slab whose `fail_at`-th step fails (counting from 1).
    struct Failing {
        inner: Box<dyn ResidentStates>,
        steps: usize,
        fail_at: usize,
    }

    impl ResidentStates for Failing {
        fn state_dim(&self) -> usize {
            self.inner.state_dim()
        }
        fn capacity(&self) -> usize {
            self.inner.capacity()
        }
        fn load(&mut self, slots: &[u32], hidden: &[f32]) -> Result<(), intentflow_model::ModelError> {
            self.inner.load(slots, hidden)
        }
        fn read(&mut self, slots: &[u32], out: &mut Vec<f32>) -> Result<(), intentflow_model::ModelError> {
            self.inner.read(slots, out)
        }
        fn step(&mut self, rows: &[ResidentRow], logits: &mut Vec<f32>) -> Result<(), intentflow_model::ModelError> {
            self.steps += 1;
            if self.steps == self.fail_at {
                // Half stepped, as a device that fails mid-launch may leave it.
                self.inner.step(&rows[..rows.len() / 2], logits)?;
                return Err(intentflow_model::ModelError::CudaUnavailable("injected failure".into()));
            }
            self.inner.step(rows, logits)
        }
    }

    /// A batch whose device step fails has no effect: the batch is redone and the rest of the
    /// stream gives the stateless operator's bits, including a batch with more users than
    /// slots before and after.
    #[test]
    fn a_failed_resident_step_leaves_nothing_behind() {
        let positioned = positioned(&generated(60, 1_500), "t");
        let model = model();
        let plain = IntentOperator::new(model.clone());
        let slab = Failing { inner: model.resident_states(40).unwrap(), steps: 0, fail_at: 7 };
        let resident = IntentOperator::new(model).with_resident_states(Box::new(slab));
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = StateStore::open(dir_a.path(), StoreOptions::default()).unwrap();
        let b = StateStore::open(dir_b.path(), StoreOptions::default()).unwrap();
        let commit = |store: &StateStore, out: &BatchOutput| store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
        // Batches of 30 events (under 40 users), one of 600 (more users than slots), then 30s.
        let mut cuts: Vec<usize> = (0..10).map(|i| i * 30).collect();
        cuts.extend((0..=30).map(|i| 900 + i * 20));
        cuts.push(positioned.len());
        let (mut failed, mut k) = (0, 0);
        while k + 1 < cuts.len() {
            let batch = &positioned[cuts[k]..cuts[k + 1]];
            let out_b = match resident.process(batch, &b, EmittedAt::EventTime) {
                Ok(out) => out,
                Err(e) => {
                    assert!(e.to_string().contains("injected failure"), "{e}");
                    failed += 1;
                    continue;
                }
            };
            let out_a = plain.process(batch, &a, EmittedAt::EventTime).unwrap();
            assert_eq!(out_a.states, out_b.states, "batch {k}");
            assert_eq!(out_a.scored.iter().map(|i| i.score.to_bits()).collect::<Vec<_>>(), out_b.scored.iter().map(|i| i.score.to_bits()).collect::<Vec<_>>());
            commit(&a, &out_a);
            commit(&b, &out_b);
            k += 1;
        }
        assert_eq!(failed, 1);
        assert_eq!(a.users().unwrap(), b.users().unwrap());
    }

    /// An intent written straight from its event and score is byte for byte the serde encoding
    /// of the intent built from them: strings that need escaping, no and repeated session ids,
    /// both kinds of `emitted_at`.
    #[test]
    fn intents_written_straight_are_the_serde_encoding_of_built_ones() {
        let mut events = positioned(&generated(30, 400), "events \"quoted\" \\ topic");
        for (i, pe) in events.iter_mut().enumerate() {
            match i % 4 {
                0 => pe.event.session_id = Some(format!("s-{}\u{7}\n\"é\"", i / 40).into()),
                1 => pe.event.event_id = Some(format!("evt \u{1f600} {i}").into()),
                2 => pe.event.user_id = format!("{}\t\\", pe.event.user_id).into(),
                _ if i % 7 == 5 => pe.event.session_id = None,
                _ => {}
            }
            pe.source.partition = (i % 3) as i32;
        }
        let model = model();
        // Each event's session id, found independently: every user's events through the
        // feature path in order.
        let mut sessions: HashMap<(i32, &str), SessionState> = HashMap::new();
        let (expected, expected_reasons): (Vec<Option<String>>, Vec<Reasons>) = events
            .iter()
            .map(|pe| {
                let session = sessions.entry((pe.source.partition, pe.event.user_id.as_str())).or_default();
                let prepared = model.features().featurize(session, &pe.event);
                (session.session_id.clone(), model.reasons(&prepared.features))
            })
            .unzip();
        assert!(expected.iter().any(Option::is_none) && expected.iter().filter(|s| s.is_some()).count() > 50);
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        let plain = IntentOperator::new(model.clone());
        let with_reasons = IntentOperator::new(model.clone()).with_reasons(true);
        for (op, stamp) in [(&plain, EmittedAt::EventTime), (&plain, EmittedAt::Now(1_900_000_000_123)), (&with_reasons, EmittedAt::EventTime)] {
            let out = op.process(&events, &store, stamp).unwrap();
            // Reasons only when asked for, and then they are the model's for the event's inputs.
            let given = out.scored.iter().filter(|s| !s.reasons.is_empty()).count();
            assert_eq!(given > 0, op.reasons, "{given} intents with reasons");
            if op.reasons {
                assert!(out.scored.iter().all(|s| s.reasons == expected_reasons[s.input]));
            }
            assert_eq!(out.scored.len(), events.len());
            for scored in &out.scored {
                assert_eq!(out.session_id(scored), expected[scored.input].as_deref(), "event {}", scored.input);
            }
            let mut straight = Vec::new();
            for (scored, built) in out.scored.iter().zip(out.intents(&events)) {
                straight.clear();
                out.encode_intent(&events, scored, &mut straight);
                assert_eq!(String::from_utf8(straight.clone()).unwrap(), String::from_utf8(crate::encode::encode_intent(&built)).unwrap());
            }
            // Schema v2 with the event's product, the session's cart and the model's decision.
            for (scored, built) in out.scored.iter().zip(out.intents_as(&events, IntentSchema::V2)) {
                straight.clear();
                out.encode_intent_as(&events, scored, IntentSchema::V2, &mut straight);
                assert_eq!(String::from_utf8(straight.clone()).unwrap(), String::from_utf8(crate::encode::encode_intent(&built)).unwrap());
                let ev = &events[scored.input].event;
                let d = &built.detail;
                assert_eq!((built.v, d.item_id.as_deref(), d.category.as_deref(), d.brand.as_deref(), d.price), (2, ev.item_id.as_deref(), ev.category.as_deref(), ev.brand.as_deref(), ev.price));
                assert_eq!((d.cart_count, d.cart_value, d.horizon.as_deref()), (Some(scored.cart_count), Some(scored.cart_value), Some("session")));
                let threshold = model.meta().threshold.expect("a trained model has a threshold");
                assert_eq!((d.decision, d.threshold), (Some(f64::from(scored.score) >= threshold), Some(threshold)));
                assert_eq!(serde_json::from_slice::<ScoredIntent>(&straight).unwrap(), built, "v2 reads back");
            }
        }
    }

    /// A model with f16 states: streaming over arbitrary batch cuts gives the offline scores
    /// bit for bit, and every stored hidden vector is encoded in f16 (2 bytes a value).
    #[test]
    fn a_model_with_f16_states_streams_its_offline_scores_and_stores_its_states_in_f16() {
        streams_offline_scores_and_stores_states_in(StatePrecision::F16, 1 << 3);
    }

    /// The same with int8 states: the stored hidden vectors are int8 blocks (a byte a value).
    #[test]
    fn a_model_with_int8_states_streams_its_offline_scores_and_stores_its_states_in_int8() {
        streams_offline_scores_and_stores_states_in(StatePrecision::Int8, 1 << 5);
    }

    /// Trains a small model keeping states in `precision`, streams its events in random batch
    /// cuts and checks the scores against the offline ones and each stored state's hidden flag
    /// (`flag`, in its second byte).
    fn streams_offline_scores_and_stores_states_in(precision: StatePrecision, flag: u8) {
        let events = generated(120, 2_500);
        // A hidden size whose state does not fill its last int8 block.
        let cfg = TrainConfig { hidden_dim: 6, members: 2, epochs: 1, state_precision: precision, ..TrainConfig::default() };
        let trained = train(&events, &cfg, &Device::Cpu, |_, _| {}).unwrap();
        let model_dir = tempfile::tempdir().unwrap();
        trained.save(model_dir.path()).unwrap();
        let model = IntentModel::load(model_dir.path(), &Device::Cpu).unwrap();
        assert_eq!(model.meta().state_precision, precision);
        let positioned = positioned(&events, "t");
        let op = IntentOperator::new(model.clone());
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), StoreOptions::default()).unwrap();
        let mut streamed: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut start = 0;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        while start < positioned.len() {
            let end = (start + rng.random_range(1..300)).min(positioned.len());
            let out = op.process(&positioned[start..end], &store, EmittedAt::EventTime).unwrap();
            for s in &out.scored {
                streamed.entry(positioned[start + s.input].event.user_id.to_string()).or_default().push(s.score.to_bits());
            }
            for (_, user, state) in &out.states {
                let bytes = state.encode();
                // Every scored user has a history and a latest score: version 8, version 4's
                // compact hidden vector followed by them.
                assert_eq!((bytes[0], bytes[1] & (1 << 3 | 1 << 5)), (8, flag), "version 8, hidden in {precision:?}");
                assert_eq!(state.last_score.map(f32::to_bits), streamed[user].last().copied(), "the latest score is kept");
            }
            store.commit(out.states.iter().map(|(p, u, s)| (*p, u.as_str(), s)), [], []).unwrap();
            start = end;
        }
        let mut by_user: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in &events {
            by_user.entry(&e.user_id).or_default().push(e);
        }
        for (user, evs) in by_user {
            let offline = model.score_sequence(evs.iter().copied()).unwrap();
            assert_eq!(streamed[user], offline.scores.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), "user {user}");
            let mut kept = offline.hidden.clone();
            precision.round(&mut kept);
            assert_eq!(kept.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), offline.hidden.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "user {user}: the state is in {precision:?}");
        }
    }
}
