//! Scores a trained model, its baselines and its ensemble on one part of a time split, the
//! way `intentflow eval` reports them.
//!
//! The served model is run with [`IntentModel::step`], the very call the streaming operator makes, one
//! wave per event position over many sessions at once (a session starts from a zero hidden
//! vector, so sessions are independent). Labels, split and session rule are those recorded in
//! the model at training time.

use crate::eval::{self, Metrics, Scored};
use crate::train::{labelled_sessions, LabelHorizon, LabelledSession, Part, SplitSpec};
use crate::{Features, IntentModel, ModelError, StatePrecision, StepOutput};
use intentflow_schemas::Event;
use serde::{Deserialize, Serialize};

/// The metrics of one scorer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScorerMetrics {
    /// The served model by its cell (`gru` or `lstm`), a cell trained beside it (`lstm_candidate`,
    /// …), `logistic_regression`, `ensemble`, `gradient_boosting`, `base_rate` or `oracle`.
    pub name: String,
    /// What the scorer is.
    pub description: String,
    /// The metrics.
    pub metrics: Metrics,
}

/// Everything `intentflow eval` writes to `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// Version of the evaluated model.
    pub model_version: String,
    /// Which sessions were scored: `test`, `validation`, `train` or `all`.
    pub part: String,
    /// What the labels predict.
    pub label: LabelHorizon,
    /// The split the part was taken from.
    pub split: SplitSpec,
    /// Bootstrap replicates behind the intervals.
    pub bootstrap_reps: usize,
    /// One entry per scorer, the served model first.
    pub scorers: Vec<ScorerMetrics>,
    /// Paired bootstraps: the served model and the ensemble against the logistic regression, the
    /// served model against the boosted trees and against each candidate cell, on ROC-AUC and
    /// PR-AUC.
    #[serde(default)]
    pub comparisons: Vec<eval::Comparison>,
    /// Whether the served model's scores are the operator's streamed intents rather than stepped here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streamed: bool,
    /// The leave-one-signal-out check of the served model's reasons (none for a model without
    /// a skip connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasons: Option<ReasonCheck>,
    /// Precision the served model's states were rounded to between steps, if not the model's own
    /// (`intentflow eval --state-precision`).
    #[serde(default, skip_serializing_if = "StatePrecision::is_f32")]
    pub state_precision: StatePrecision,
}

impl Assessment {
    /// The metrics of scorer `name`.
    pub fn scorer(&self, name: &str) -> Option<&Metrics> {
        self.scorers.iter().find(|s| s.name == name).map(|s| &s.metrics)
    }
}

/// Calibrated scores of a model for every event of `sessions` (all events, labelled or not), per
/// session, with hidden states kept in `precision` between steps.
pub fn gru_scores(model: &IntentModel, sessions: &[LabelledSession], precision: StatePrecision) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut out: Vec<Vec<f32>> = sessions.iter().map(|s| Vec::with_capacity(s.features.len())).collect();
    walk(model, sessions, precision, |wave| {
        for (&(i, _), &score) in wave.rows.iter().zip(&wave.step.scores) {
            out[i].push(score);
        }
        Ok(())
    })?;
    Ok(out)
}

/// One wave of [`walk`]: event `t` of each session `i` in `rows`, as stepped.
struct Wave<'a> {
    /// `(session index, event index)` of each row.
    rows: &'a [(usize, usize)],
    /// The rows' normalised inputs.
    inputs: &'a [Features],
    /// The rows' hidden vectors before the step, row-major.
    before: &'a [f32],
    /// The step's output.
    step: &'a StepOutput,
}

/// Steps every session's events in waves (event `t` of many sessions per call, each session from
/// a zero hidden vector, hidden states rounded to `precision` between steps) and shows each wave
/// to `on_wave`.
fn walk(model: &IntentModel, sessions: &[LabelledSession], precision: StatePrecision, mut on_wave: impl FnMut(Wave<'_>) -> Result<(), ModelError>) -> Result<(), ModelError> {
    let h = model.state_dim();
    for (c, chunk) in sessions.chunks(1024).enumerate() {
        let mut hidden = vec![0f32; chunk.len() * h];
        let longest = chunk.iter().map(|s| s.features.len()).max().unwrap_or(0);
        for t in 0..longest {
            let live: Vec<usize> = (0..chunk.len()).filter(|&i| chunk[i].features.len() > t).collect();
            let inputs: Vec<_> = live.iter().map(|&i| model.features().normalize(&chunk[i].features[t])).collect();
            let state: Vec<f32> = live.iter().flat_map(|&i| hidden[i * h..(i + 1) * h].iter().copied()).collect();
            let step = model.step(&inputs, &state)?;
            for (k, &i) in live.iter().enumerate() {
                hidden[i * h..(i + 1) * h].copy_from_slice(&step.hidden[k * h..(k + 1) * h]);
                precision.round(&mut hidden[i * h..(i + 1) * h]);
            }
            let rows: Vec<(usize, usize)> = live.iter().map(|&i| (c * 1024 + i, t)).collect();
            on_wave(Wave { rows: &rows, inputs: &inputs, before: &state, step: &step })?;
        }
    }
    Ok(())
}

/// How the reasons an intent would carry ([`IntentModel::reasons`]) hold up when each signal is
/// left out: the signal's feature set to its training mean (0 after normalisation) in the
/// event's own step, everything before unchanged, and the score computed again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReasonCheck {
    /// Labelled events checked.
    pub events: usize,
    /// Events that got at least one reason.
    pub with_reasons: usize,
    /// Reasons given in all.
    pub reasons: usize,
    /// Share of the reasons whose signal, left out, lowers the score.
    pub confirmed: Option<f64>,
    /// Share of the events with reasons whose first reason is, of the signals that could be
    /// reasons (above their mean, with a positive weight), the one that lowers the score most
    /// when left out.
    pub top_agrees: Option<f64>,
}

/// [`ReasonCheck`] over the labelled events of `sessions`.
///
/// # Errors
///
/// Candle errors of the model's steps.
pub fn check_reasons(model: &IntentModel, sessions: &[LabelledSession]) -> Result<ReasonCheck, ModelError> {
    let slots = crate::features::skip_slots();
    let h = model.state_dim();
    let skip = model.params().skip_values()?;
    let mut check = ReasonCheck { events: 0, with_reasons: 0, reasons: 0, confirmed: None, top_agrees: None };
    let (mut confirmed, mut top_agrees) = (0usize, 0usize);
    walk(model, sessions, StatePrecision::F32, |wave| {
        // Every labelled row with reasons, stepped again once per signal left out.
        let (mut inputs, mut before, mut asked) = (Vec::new(), Vec::new(), Vec::new());
        for (k, &(i, t)) in wave.rows.iter().enumerate() {
            if sessions[i].mask[t] == 0.0 {
                continue;
            }
            check.events += 1;
            let reasons = model.reasons(&wave.inputs[k]);
            if reasons.is_empty() {
                continue;
            }
            for &slot in &slots {
                let mut without = wave.inputs[k];
                without.dense[slot] = 0.0;
                inputs.push(without);
                before.extend_from_slice(&wave.before[k * h..(k + 1) * h]);
            }
            let eligible: Vec<bool> = slots.iter().map(|&slot| wave.inputs[k].dense[slot] > 0.0 && skip.get(slot).is_some_and(|w| *w > 0.0)).collect();
            asked.push((wave.step.scores[k], reasons, eligible));
        }
        if asked.is_empty() {
            return Ok(());
        }
        let left_out = model.step(&inputs, &before)?;
        for (n, (score, reasons, eligible)) in asked.iter().enumerate() {
            let drops: Vec<f32> = left_out.scores[n * slots.len()..(n + 1) * slots.len()].iter().map(|s| score - s).collect();
            check.with_reasons += 1;
            check.reasons += reasons.indices().len();
            confirmed += reasons.indices().iter().filter(|&&r| drops[usize::from(r)] > 0.0).count();
            let strongest = drops.iter().enumerate().filter(|(j, _)| eligible[*j]).max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(j, _)| j);
            top_agrees += usize::from(strongest == Some(usize::from(reasons.indices()[0])));
        }
        Ok(())
    })?;
    check.confirmed = (check.reasons > 0).then(|| confirmed as f64 / check.reasons as f64);
    check.top_agrees = (check.with_reasons > 0).then(|| top_agrees as f64 / check.with_reasons as f64);
    Ok(check)
}

/// Scores `part` of `events` with the model, its baselines, its ensemble, and — when given —
/// the generator's latent intent per input event (`oracle[i]` belongs to `events[i]`).
///
/// # Errors
///
/// [`ModelError::Invalid`] when the model carries no baselines (not trained by this
/// project) or the part has no labelled events; candle errors otherwise.
pub fn assess(model: &IntentModel, events: &[Event], oracle: Option<&[f64]>, part: Part, reps: usize, seed: u64) -> Result<Assessment, ModelError> {
    assess_at(model, &[], events, oracle, part, reps, seed, GruScores::Stepped(StatePrecision::F32))
}

/// Where [`assess_at`] takes the served model's scores from.
#[derive(Debug, Clone, Copy)]
pub enum GruScores<'a> {
    /// Stepped here with [`IntentModel::step`], hidden states kept in this precision between
    /// steps.
    Stepped(StatePrecision),
    /// What the operator streamed: `streamed[i]` is the score of `events[i]` (the intents of a
    /// run over the same events, joined to them).
    Streamed(&'a [f32]),
}

/// [`assess`] with the served model's scores taken from `gru`: stepped with hidden states kept in
/// a given precision (what storing states in f16, bf16 or int8 would cost in quality), or streamed by
/// the operator (the model measured from outside, as a user would); and with `candidates`, the
/// cells trained beside it ([`crate::candidate_dirs`]), scored and compared with it.
///
/// # Errors
///
/// As [`assess`]; [`ModelError::Invalid`] for a candidate whose features or labels are not the
/// model's.
#[allow(clippy::too_many_arguments)]
pub fn assess_at(
    model: &IntentModel,
    candidates: &[IntentModel],
    events: &[Event],
    oracle: Option<&[f64]>,
    part: Part,
    reps: usize,
    seed: u64,
    gru: GruScores<'_>,
) -> Result<Assessment, ModelError> {
    let meta = model.meta();
    let baselines = meta.baselines.as_ref().ok_or_else(|| ModelError::Invalid("model.json has no baselines: train the model with `intentflow train`".into()))?;
    let (label, split) = meta.training.as_ref().map_or((LabelHorizon::Session, SplitSpec::default()), |t| (t.label, t.split));
    let sessions = labelled_sessions(events, model.features(), label);
    let chosen = split.part(&sessions, part);
    let (gru_all, precision, streamed) = match gru {
        GruScores::Stepped(precision) => (gru_scores(model, chosen, precision)?, precision, false),
        GruScores::Streamed(scores) => {
            if scores.len() != events.len() {
                return Err(ModelError::Invalid(format!("{} streamed scores for {} events", scores.len(), events.len())));
            }
            (chosen.iter().map(|s| s.events.iter().map(|&i| scores[i]).collect()).collect(), StatePrecision::F32, true)
        }
    };

    let labelled = |all: &[Vec<f32>]| -> Vec<f32> { chosen.iter().zip(all).flat_map(|(s, g)| (0..s.mask.len()).filter(|&j| s.mask[j] > 0.0).map(|j| g[j])).collect() };
    let mut beside = Vec::new();
    for candidate in candidates {
        let trained_on = |m: &IntentModel| m.meta().training.as_ref().map(|t| (t.label, t.split));
        if candidate.features() != model.features() || trained_on(candidate) != trained_on(model) {
            return Err(ModelError::Invalid(format!("candidate {} was trained on other features, labels or splits than {}", candidate.version(), model.version())));
        }
        beside.push((candidate, labelled(&gru_scores(candidate, chosen, StatePrecision::F32)?)));
    }
    let served = model.cell().name();
    let gru_description = if streamed {
        format!("the served {served} model's scores as the operator streamed them (joined from its intents)")
    } else {
        format!("the served {served} model's calibrated score, as the operator emits it")
    };
    let (mut gru, mut lr, mut ens, mut gb, mut truth) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut labels, mut groups, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    for (k, (s, g)) in chosen.iter().zip(&gru_all).enumerate() {
        for j in (0..s.mask.len()).filter(|&j| s.mask[j] > 0.0) {
            let l = baselines.logistic_score(&s.aggregates[j]);
            gru.push(g[j]);
            lr.push(l);
            ens.push(baselines.ensemble_score(g[j], l));
            if let Some(trees) = &baselines.boosting {
                gb.push(trees.predict(&s.aggregates[j]) as f32);
            }
            if let Some(o) = oracle {
                truth.push(o[s.events[j]] as f32);
            }
            labels.push(s.labels[j] > 0.5);
            groups.push(k);
            seen.push(j as u32 + 1);
        }
    }
    if labels.is_empty() {
        if part == Part::Test && split.test_fraction == 0.0 {
            return Err(ModelError::Invalid(
                "this model was trained with --test-fraction 0: it holds out no test sessions of its input. Evaluate it on a later file of \
                 your own (--part all), or see its validation part (--part validation)"
                    .into(),
            ));
        }
        return Err(ModelError::Invalid(format!("the {part:?} part of this input has no labelled events")));
    }
    let base = vec![baselines.base_rate as f32; labels.len()];
    let scored = |scores: &[f32], threshold: f64, seed_offset: u64| {
        eval::evaluate(Scored { scores, labels: &labels, sessions: &groups, seen: &seen }, threshold, reps, seed + seed_offset)
    };
    let mut scorers = vec![
        ScorerMetrics {
            name: served.into(),
            description: gru_description,
            metrics: scored(&gru, meta.threshold.unwrap_or(0.5), 0),
        },
        ScorerMetrics {
            name: "logistic_regression".into(),
            description: "logistic regression on session aggregates so far".into(),
            metrics: scored(&lr, baselines.logistic_threshold, 1),
        },
        ScorerMetrics {
            name: "ensemble".into(),
            description: format!("the served {served} model + logistic regression, stacked on validation"),
            metrics: scored(&ens, baselines.ensemble_threshold, 2),
        },
    ];
    let candidate_names: Vec<String> = beside.iter().map(|(c, _)| format!("{}_candidate", c.cell())).collect();
    for ((candidate, scores), name) in beside.iter().zip(&candidate_names) {
        scorers.push(ScorerMetrics {
            name: name.clone(),
            description: format!("the {} trained beside the served model and not served: not better on validation beyond doubt ({})", candidate.cell(), candidate.version()),
            metrics: scored(scores, candidate.meta().threshold.unwrap_or(0.5), 7),
        });
    }
    if baselines.boosting.is_some() {
        scorers.push(ScorerMetrics {
            name: "gradient_boosting".into(),
            description: "gradient-boosted trees on the same aggregates".into(),
            metrics: scored(&gb, baselines.boosting_threshold, 5),
        });
    }
    scorers.extend([
        ScorerMetrics {
            name: "base_rate".into(),
            description: "the training split's positive rate for every event".into(),
            metrics: scored(&base, baselines.base_rate, 3),
        },
    ]);
    if oracle.is_some() {
        let threshold = eval::best_f1_threshold(&truth, &labels);
        scorers.push(ScorerMetrics {
            name: "oracle".into(),
            description: "the generator's latent purchase propensity (threshold chosen in-sample)".into(),
            metrics: scored(&truth, threshold, 4),
        });
    }
    let mut comparisons = Vec::new();
    let mut pairs = vec![(served, &gru, "logistic_regression", &lr), ("ensemble", &ens, "logistic_regression", &lr)];
    if !gb.is_empty() {
        pairs.push((served, &gru, "gradient_boosting", &gb));
    }
    for ((_, scores), name) in beside.iter().zip(&candidate_names) {
        pairs.push((served, &gru, name.as_str(), scores));
    }
    for (a, a_scores, b, b_scores) in pairs {
        for metric in [("roc_auc", eval::roc_auc as fn(&[f32], &[bool]) -> Option<f64>), ("pr_auc", eval::pr_auc)] {
            comparisons.push(eval::paired_bootstrap((a, b), (a_scores, b_scores), &labels, &groups, reps, seed + 6, metric));
        }
    }
    let reasons = if model.params().skip_weight.is_some() { Some(check_reasons(model, chosen)?) } else { None };
    Ok(Assessment { model_version: meta.version.clone(), part: part.as_str().into(), label, split, bootstrap_reps: reps, scorers, comparisons, reasons, streamed, state_precision: precision })
}

#[cfg(test)]
mod tests {
    use crate::StatePrecision;

    #[test]
    fn states_round_to_nearest_in_the_chosen_precision() {
        let third = 1.0f32 / 3.0;
        let mut v = [third, -0.0, 1.0, 65_504.0, 1e-9];
        StatePrecision::F32.round(&mut v);
        assert_eq!(v, [third, -0.0, 1.0, 65_504.0, 1e-9]);
        let mut h = v;
        StatePrecision::F16.round(&mut h);
        // 1/3 in f16 is 0x3555 = 0.333251953125; 1e-9 is below f16's smallest subnormal.
        assert_eq!(h, [0.333_251_95, -0.0, 1.0, 65_504.0, 0.0]);
        let mut b = v;
        StatePrecision::Bf16.round(&mut b);
        // bf16 keeps f32's range but 8 mantissa bits: 1/3 is 0x3EAB = 0.333984375.
        assert_eq!(b[0], 0.333_984_38);
        assert!(b[4] > 0.0 && (b[4] - 1e-9).abs() < 1e-11);
    }
}
