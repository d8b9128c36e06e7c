//! `intentflow eval`: a model against its baselines on its held-out sessions.

use super::{read_input, InputArgs};
use intentflow_schemas::Limits;
use anyhow::{Context, Result};
use clap::Args;
use intentflow_model::assess::{assess_at, Assessment, GruScores};
use intentflow_schemas::{Event, ScoredIntent};
use std::collections::HashMap;
use intentflow_model::StatePrecision;
use intentflow_model::train::Part;
use intentflow_model::{DeviceKind, IntentModel};
use std::path::PathBuf;

/// `intentflow eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// The model to evaluate.
    #[arg(long)]
    pub model_dir: PathBuf,
    #[command(flatten)]
    pub input: InputArgs,
    /// Which sessions of the model's recorded time split to score: `test` (held out by
    /// training on the same input) or `all` (for a different input).
    #[arg(long, value_enum, default_value = "test")]
    pub part: PartArg,
    /// Where to write metrics.json and report.html (default: the model directory).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Bootstrap replicates for the 95 % intervals.
    #[arg(long, default_value_t = 500)]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the GRU's hidden states in this precision between steps: `f16`, `bf16` or `int8`
    /// measure what storing states in 2 or about 1.1 bytes a value would cost (what `intentflow train
    /// --state-precision` makes the served model do). metrics.json records it; write it
    /// elsewhere with --out-dir to keep the model's own metrics.
    #[arg(long, value_enum, default_value = "f32")]
    pub state_precision: PrecisionArg,
    /// Score the GRU row with the intents an operator streamed for the same events (JSONL as
    /// `intentflow tail --json` prints them, or a Parquet intent file) instead of stepping the
    /// model here: the model measured from outside. Each user's intents are matched to the
    /// user's events in input order.
    #[arg(long, conflicts_with = "state_precision")]
    pub intents: Option<PathBuf>,
}

/// `--state-precision` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// 32-bit floats, as served.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit integers in blocks of 8 values that share a power-of-two scale.
    Int8,
}

/// `--part` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PartArg {
    /// The latest sessions, held out by training.
    Test,
    /// The validation sessions.
    Validation,
    /// The training sessions.
    Train,
    /// Every session.
    All,
}

impl From<PrecisionArg> for StatePrecision {
    fn from(p: PrecisionArg) -> StatePrecision {
        match p {
            PrecisionArg::F32 => StatePrecision::F32,
            PrecisionArg::F16 => StatePrecision::F16,
            PrecisionArg::Bf16 => StatePrecision::Bf16,
            PrecisionArg::Int8 => StatePrecision::Int8,
        }
    }
}

/// Prints the comparison table of an assessment.
fn print_table(a: &Assessment) {
    let f = |v: Option<f64>| v.map_or("   n/a".to_string(), |a| format!("{a:.4}"));
    let ci = |c: Option<intentflow_model::eval::Interval>| c.map_or(String::new(), |c| format!(" [{:.3}, {:.3}]", c.lo, c.hi));
    println!("{:<20} {:>24} {:>24} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6}", "scorer", "ROC-AUC [95% CI]", "PR-AUC [95% CI]", "logloss", "Brier", "ECE", "P", "R", "F1");
    for s in &a.scorers {
        let m = &s.metrics;
        println!(
            "{:<20} {:>24} {:>24} {:>8.4} {:>8.4} {:>7.4} {:>6.3} {:>6.3} {:>6.3}",
            s.name,
            format!("{}{}", f(m.roc_auc), ci(m.roc_auc_ci)),
            format!("{}{}", f(m.pr_auc), ci(m.pr_auc_ci)),
            m.log_loss,
            m.brier,
            m.ece,
            m.at_threshold.precision,
            m.at_threshold.recall,
            m.at_threshold.f1
        );
    }
    println!();
    println!("{:<20} {:>10} {:>10} {:>10}   (share of positive events among the highest scores)", "lift: scorer", "top 1%", "top 5%", "top 10%");
    for s in &a.scorers {
        let cells: Vec<String> = s.metrics.lift.iter().map(|r| format!("{:.3} ×{:.1}", r.captured, r.lift)).collect();
        println!("{:<20} {:>10} {:>10} {:>10}", s.name, cells.first().map_or("", String::as_str), cells.get(1).map_or("", String::as_str), cells.get(2).map_or("", String::as_str));
    }
    if !a.comparisons.is_empty() {
        println!();
        println!("paired session bootstrap ({} replicates):", a.bootstrap_reps);
    }
    for c in &a.comparisons {
        println!(
            "  {:<8} − {:<20} {:<8} {:>+8} {:>20}  P({} better) {}",
            c.a,
            c.b,
            c.metric,
            c.difference.map_or("n/a".into(), |d| format!("{d:+.4}")),
            ci(c.interval),
            c.a,
            c.probability_a_better.map_or("n/a".into(), |p| format!("{p:.3}"))
        );
    }
    if let Some(r) = &a.reasons {
        let share = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{:.1} %", v * 100.0));
        println!();
        println!(
            "reasons: {} of {} labelled events carry some ({} in all); left out one at a time, {} of them lower the score, and the first is the strongest signal for {} of the events",
            r.with_reasons,
            r.events,
            r.reasons,
            share(r.confirmed),
            share(r.top_agrees)
        );
    }
}

/// Reads intents from JSONL (one per line) or, for a `.parquet` name, a Parquet intent file.
fn read_intents(path: &std::path::Path) -> Result<Vec<ScoredIntent>> {
    if path.extension().is_some_and(|e| e == "parquet") {
        return Ok(intentflow_formats::columnar::read_intents(path)?);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: not a scored intent", path.display(), n + 1)))
        .collect()
}

/// Each event's streamed score: a user's intents, in the order given, belong to the user's
/// events in input order (the operator keeps each user's order, and one intent per event).
/// A user with more or fewer intents than events, an intent whose event time, type or id is not
/// its event's, or one scored by another model than `model`, is an error naming them.
fn streamed_scores(events: &[Event], intents: &[ScoredIntent], model: &str) -> Result<Vec<f32>> {
    if let Some(other) = intents.iter().find(|i| i.model_version != model) {
        anyhow::bail!("an intent of user {} was scored by model {}, not by the model evaluated ({model})", other.user_id, other.model_version);
    }
    let mut by_user: HashMap<&str, std::collections::VecDeque<&ScoredIntent>> = HashMap::new();
    for i in intents {
        by_user.entry(i.user_id.as_str()).or_default().push_back(i);
    }
    let mut scores = Vec::with_capacity(events.len());
    for (k, e) in events.iter().enumerate() {
        let Some(i) = by_user.get_mut(e.user_id.as_str()).and_then(|q| q.pop_front()) else {
            anyhow::bail!("event {k} of user {} has no intent: were all events streamed, and the intents all read?", e.user_id);
        };
        if i.event_type != e.kind || i.event_ts != intentflow_schemas::format_ts_ms(e.ts) || i.event_id.as_deref() != e.event_id.as_deref() {
            anyhow::bail!("user {}: intent for a {} at {} does not match event {k}, a {} at {}", e.user_id, i.event_type, i.event_ts, e.kind, intentflow_schemas::format_ts_ms(e.ts));
        }
        scores.push(i.score);
    }
    if let Some((user, left)) = by_user.iter().find(|(_, q)| !q.is_empty()) {
        anyhow::bail!("user {user} has {} intents more than events", left.len());
    }
    Ok(scores)
}

/// Evaluates a model, its baselines and ensemble; writes metrics.json and report.html.
///
/// # Errors
///
/// File failures, a model without baselines, or an input part without labelled events.
pub fn eval_cmd(args: &EvalArgs) -> Result<()> {
    let model = IntentModel::load(&args.model_dir, &DeviceKind::Cpu.open()?)?;
    let imported = read_input(&args.input, Limits::default())?;
    let part = match args.part {
        PartArg::Test => Part::Test,
        PartArg::Validation => Part::Validation,
        PartArg::Train => Part::Train,
        PartArg::All => Part::All,
    };
    let intents = args.intents.as_deref().map(read_intents).transpose()?;
    let streamed = intents.as_deref().map(|intents| streamed_scores(&imported.events, intents, model.version())).transpose()?;
    let gru = match &streamed {
        Some(scores) => GruScores::Streamed(scores),
        None => GruScores::Stepped(args.state_precision.into()),
    };
    // The cells trained beside the served one (`train --arch auto`), scored the same way.
    let candidates = intentflow_model::candidate_dirs(&args.model_dir)
        .iter()
        .map(|dir| IntentModel::load(dir, &DeviceKind::Cpu.open()?).with_context(|| format!("candidate model {}", dir.display())))
        .collect::<Result<Vec<_>>>()?;
    let a = assess_at(&model, &candidates, &imported.events, imported.latent_intent.as_deref(), part, args.bootstrap, args.seed, gru)?;
    let out = args.out_dir.clone().unwrap_or_else(|| args.model_dir.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let metrics_path = out.join("metrics.json");
    std::fs::write(&metrics_path, serde_json::to_vec_pretty(&a)?).with_context(|| format!("writing {}", metrics_path.display()))?;
    let report_path = out.join("report.html");
    let html = intentflow_model::report::render_html(&a, &args.input.input.display().to_string());
    std::fs::write(&report_path, html).with_context(|| format!("writing {}", report_path.display()))?;
    if let Some(m) = a.scorers.first().map(|s| &s.metrics) {
        println!(
            "model {}{} on {} ({} part): {} labelled events in {} sessions, positive rate {:.4}",
            a.model_version,
            match (a.streamed, a.state_precision.is_f32()) {
                (true, _) => " as streamed (its scores from the operator's intents)".to_string(),
                (false, true) => String::new(),
                (false, false) => format!(" with hidden states rounded to {:?}", a.state_precision),
            },
            args.input.input.display(),
            a.part,
            m.events,
            m.sessions,
            m.base_rate
        );
    }
    print_table(&a);
    if let Some(intents) = &intents {
        // The model's F1-maximising threshold from validation (0.5 for models without one).
        let threshold = model.meta().threshold.unwrap_or(0.5);
        // The test part of the model's split: the latest sessions by start, never trained on.
        let test = model.meta().training.as_ref().map_or(0.3, |t| t.split.test_fraction);
        let (all, later) = super::anticipation::anticipation(intents, threshold, test);
        println!();
        println!("anticipation, every streamed session: {all}");
        println!("  the latest {:.0} % of sessions by start (the test part, never trained on): {later}", test * 100.0);
    }
    eprintln!("wrote {} and {}", metrics_path.display(), report_path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use intentflow_schemas::{EventType, SourcePosition};

    fn event(user: &str, ts: i64, kind: EventType) -> Event {
        Event { user_id: user.into(), ts, kind, event_id: None, session_id: None, item_id: None, category: None, category_id: None, brand: None, price: None, quantity: None }
    }

    fn intent(e: &Event, score: f32, model: &str) -> ScoredIntent {
        ScoredIntent {
            v: 1,
            user_id: e.user_id.to_string(),
            score,
            event_ts: intentflow_schemas::format_ts_ms(e.ts),
            event_type: e.kind,
            event_id: e.event_id.as_deref().map(str::to_string),
            session_id: None,
            session_seq: 0,
            session_events: 1,
            model_version: model.into(),
            source: SourcePosition { topic: "t".into(), partition: 0, offset: 0 },
            emitted_at: String::new(),
            reasons: Vec::new(),
            detail: Default::default(),
            placement: Default::default(),
        }
    }

    #[test]
    fn streamed_intents_join_their_users_events_in_order_or_say_why_not() {
        let events = [event("a", 1_000, EventType::View), event("b", 1_500, EventType::View), event("a", 2_000, EventType::AddToCart)];
        // Users interleave differently on the output topic; each user's order is what counts.
        let intents = [intent(&events[1], 0.2, "m"), intent(&events[0], 0.1, "m"), intent(&events[2], 0.3, "m")];
        assert_eq!(streamed_scores(&events, &intents, "m").unwrap(), [0.1, 0.2, 0.3]);
        let err = |intents: &[ScoredIntent]| streamed_scores(&events, intents, "m").unwrap_err().to_string();
        assert!(err(&intents[..2]).contains("has no intent"));
        assert!(err(&[intents[0].clone(), intents[2].clone(), intents[1].clone()]).contains("does not match event"), "a user's intents out of order");
        assert!(err(&[intents[0].clone(), intents[1].clone(), intents[2].clone(), intents[2].clone()]).contains("more than events"));
        assert!(err(&[intent(&events[1], 0.2, "other"), intents[1].clone(), intents[2].clone()]).contains("scored by model other"));
    }
}
