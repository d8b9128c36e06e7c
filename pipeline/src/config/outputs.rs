//! `[[output]]`: topics beside `output_topic`, each publishing users' intents under its own emit
//! policy (`docs/configuration.md`, "Outputs and emit policies").

use super::ConfigError;
use intentflow_operators::emit::{EmitPolicy, PolicyOutput};
use intentflow_schemas::IntentSchema;
use serde::{Deserialize, Serialize};

/// When an output publishes, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Every scored event.
    Every,
    /// When the score moved by at least `min_change` since the output's last for the user.
    Delta,
    /// When the score reaches `enter` from below, and falls below `leave` from above.
    Threshold,
    /// When the user's segment (by `cuts`) changes.
    Segments,
}

impl PolicyKind {
    /// The name in configurations.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Every => "every",
            PolicyKind::Delta => "delta",
            PolicyKind::Threshold => "threshold",
            PolicyKind::Segments => "segments",
        }
    }
}

/// One `[[output]]` of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// The topic (created with the input's partition count if missing).
    pub topic: String,
    /// When it publishes.
    pub policy: PolicyKind,
    /// `delta`: the smallest change published (0 < min_change ≤ 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_change: Option<f32>,
    /// `threshold`: the score at which a user enters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enter: Option<f32>,
    /// `threshold`: the score below which an entered user leaves; `enter` when not given (no
    /// hysteresis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave: Option<f32>,
    /// `segments`: strictly ascending cut-offs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cuts: Vec<f32>,
    /// `segments`: the segments' names, one more than `cuts`; `cold`, `warm`, `hot` for two
    /// cut-offs, `cold`, `hot` for one, `segment-0`… otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<String>,
    /// Leave purchase events out: they are not published and do not move the output's memory.
    #[serde(default)]
    pub exclude_purchases: bool,
    /// The schema of its intents: 1 or 2 (`docs/schemas.md`).
    #[serde(default)]
    pub schema: IntentSchema,
}

impl OutputConfig {
    /// The operator's view of this output: its checked policy.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for a parameter the policy lacks, one it does not take, or
    /// values that cannot work.
    pub fn policy_output(&self) -> Result<PolicyOutput, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("[[output]] `{}`: {m}", self.topic)));
        let given: Vec<&str> = [
            ("min_change", self.min_change.is_some()),
            ("enter", self.enter.is_some()),
            ("leave", self.leave.is_some()),
            ("cuts", !self.cuts.is_empty()),
            ("segments", !self.segments.is_empty()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let takes: &[&str] = match self.policy {
            PolicyKind::Every => &[],
            PolicyKind::Delta => &["min_change"],
            PolicyKind::Threshold => &["enter", "leave"],
            PolicyKind::Segments => &["cuts", "segments"],
        };
        if let Some(extra) = given.iter().find(|k| !takes.contains(k)) {
            return bad(format!("policy \"{}\" takes no `{extra}`", self.policy.name()));
        }
        let policy = match self.policy {
            PolicyKind::Every => EmitPolicy::Every,
            PolicyKind::Delta => match self.min_change {
                Some(min_change) => EmitPolicy::Delta { min_change },
                None => return bad("policy \"delta\" needs `min_change`".into()),
            },
            PolicyKind::Threshold => match self.enter {
                Some(enter) => EmitPolicy::Threshold { enter, leave: self.leave.unwrap_or(enter) },
                None => return bad("policy \"threshold\" needs `enter`".into()),
            },
            PolicyKind::Segments => {
                let names = if self.segments.is_empty() { default_segment_names(self.cuts.len()) } else { self.segments.clone() };
                EmitPolicy::Segments { cuts: self.cuts.clone(), names }
            }
        };
        if let Err(e) = policy.validate() {
            return bad(e.reason.to_string());
        }
        Ok(PolicyOutput { name: self.topic.clone(), policy, exclude_purchases: self.exclude_purchases, schema: self.schema })
    }
}

/// `cold`, `warm`, `hot` for two cut-offs, `cold`, `hot` for one, `segment-0`… otherwise.
fn default_segment_names(cuts: usize) -> Vec<String> {
    match cuts {
        1 => vec!["cold".into(), "hot".into()],
        2 => vec!["cold".into(), "warm".into(), "hot".into()],
        n => (0..=n).map(|i| format!("segment-{i}")).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(toml: &str) -> Result<PolicyOutput, ConfigError> {
        let config: OutputConfig = toml::from_str(toml).unwrap();
        config.policy_output()
    }

    #[test]
    fn each_policy_takes_its_parameters() {
        assert_eq!(
            output("topic = \"all\"\npolicy = \"every\"\nexclude_purchases = true\nschema = 2\n").unwrap(),
            PolicyOutput { name: "all".into(), policy: EmitPolicy::Every, exclude_purchases: true, schema: IntentSchema::V2 }
        );
        assert_eq!(output("topic = \"d\"\npolicy = \"delta\"\nmin_change = 0.1\n").unwrap().policy, EmitPolicy::Delta { min_change: 0.1 });
        assert_eq!(output("topic = \"a\"\npolicy = \"threshold\"\nenter = 0.6\nleave = 0.5\n").unwrap().policy, EmitPolicy::Threshold { enter: 0.6, leave: 0.5 });
        assert_eq!(output("topic = \"a\"\npolicy = \"threshold\"\nenter = 0.6\n").unwrap().policy, EmitPolicy::Threshold { enter: 0.6, leave: 0.6 });
        let names = |p: PolicyOutput| match p.policy {
            EmitPolicy::Segments { names, .. } => names,
            other => panic!("{other:?}"),
        };
        assert_eq!(names(output("topic = \"s\"\npolicy = \"segments\"\ncuts = [0.2, 0.6]\n").unwrap()), ["cold", "warm", "hot"]);
        assert_eq!(names(output("topic = \"s\"\npolicy = \"segments\"\ncuts = [0.1, 0.2, 0.3]\n").unwrap())[3], "segment-3");
        assert_eq!(names(output("topic = \"s\"\npolicy = \"segments\"\ncuts = [0.5]\nsegments = [\"browsing\", \"buying\"]\n").unwrap()), ["browsing", "buying"]);
    }

    #[test]
    fn missing_foreign_and_impossible_parameters_are_named() {
        for (toml, says) in [
            ("topic = \"d\"\npolicy = \"delta\"\n", "needs `min_change`"),
            ("topic = \"a\"\npolicy = \"threshold\"\nleave = 0.5\n", "needs `enter`"),
            ("topic = \"a\"\npolicy = \"every\"\nenter = 0.5\n", "takes no `enter`"),
            ("topic = \"d\"\npolicy = \"delta\"\nmin_change = 0.1\ncuts = [0.5]\n", "takes no `cuts`"),
            ("topic = \"a\"\npolicy = \"threshold\"\nenter = 0.5\nleave = 0.6\n", "leave must not exceed enter"),
            ("topic = \"s\"\npolicy = \"segments\"\ncuts = [0.6, 0.2]\n", "strictly ascending"),
            ("topic = \"s\"\npolicy = \"segments\"\ncuts = [0.5]\nsegments = [\"a\", \"b\", \"c\"]\n", "one segment name more"),
        ] {
            let err = output(toml).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("[[output]] `"), "{toml}: {err}");
        }
        assert!(toml::from_str::<OutputConfig>("topic = \"a\"\npolicy = \"sometimes\"\n").is_err());
        assert!(toml::from_str::<OutputConfig>("topic = \"a\"\npolicy = \"every\"\nschema = 3\n").is_err());
        assert!(toml::from_str::<OutputConfig>("topic = \"a\"\npolicy = \"every\"\nenterr = 0.5\n").is_err(), "unknown keys are refused");
    }
}
