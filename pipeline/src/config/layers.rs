//! The layers of a configuration, lowest first: the defaults, the TOML file (`--config`), the
//! environment (`INTENTFLOW_…`), the command-line flags. [`figment`] merges and extracts them,
//! so an error names the layer a bad value came from; [`Secrets`] keeps secret values out of
//! everything printed or logged, parse errors included.
//!
//! Environment variables: `INTENTFLOW_` and the key in capitals (`INTENTFLOW_BROKERS`,
//! `INTENTFLOW_MAX_BATCH_RECORDS`); nested keys are joined by `__`. A librdkafka property of
//! `[kafka.common]`, `[kafka.consumer]` or `[kafka.producer]` is
//! `INTENTFLOW_KAFKA__<SECTION>__<PROPERTY>` with the property's dots written as `_`
//! (`INTENTFLOW_KAFKA__COMMON__SASL_PASSWORD` is `[kafka.common] "sasl.password"`). Values
//! take the key's type: whole numbers, `true`/`false`, and for lists a comma-separated string
//! (`INTENTFLOW_INPUT_TOPICS=clicks,carts`).

use super::{ConfigError, RunConfig};
use figment::providers::Serialized;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;
use std::path::Path;

/// Prefix of the environment variables of the configuration.
pub const ENV_PREFIX: &str = "INTENTFLOW_";
/// Separator of nested keys in environment variable names.
pub const ENV_SEPARATOR: &str = "__";
/// What secret values are replaced with when shown.
pub const REDACTED: &str = "***";

/// `INTENTFLOW_…` variables that are not configuration keys: the CLI's own (`--log`,
/// `--log-format`) and those of the project's scripts, demo and tests (docs/configuration.md
/// lists them). They are passed over without a warning.
const NOT_CONFIG_KEYS: &[&str] =
    &["LOG", "LOG_FORMAT", "KAFKA_DIR", "SKIP_LOG", "BIN", "SHARED_DATA", "CACHE", "TEST_BROKERS", "SEED", "TRAIN_ARGS", "QUALITY_DIR"];
/// Prefixes of such variables (`INTENTFLOW_DEMO_DATA`, `INTENTFLOW_DEMO_PACE_SECONDS`, …).
const NOT_CONFIG_PREFIXES: &[&str] = &["DEMO_"];

/// `properties` with the values of secret ones ([`is_secret`]) replaced by [`REDACTED`].
pub fn redacted(properties: &std::collections::BTreeMap<String, String>) -> std::collections::BTreeMap<String, String> {
    properties.iter().map(|(k, v)| (k.clone(), if is_secret(k) { REDACTED.to_string() } else { v.clone() })).collect()
}

/// Whether a librdkafka property (or any key) holds a secret: passwords, pass phrases, client
/// secrets, private keys, tokens and the OAUTHBEARER config that may hold one.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('_', ".");
    ["password", "secret", "passphrase", "private.key", "ssl.key.pem", "oauthbearer.config", "token"].iter().any(|w| key.contains(w))
}

/// The `INTENTFLOW_…` environment variables, taken once (tests build their own).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: Vec<(String, String)>,
}

impl Environment {
    /// This process's `INTENTFLOW_…` variables.
    pub fn process() -> Environment {
        Environment::from_pairs(std::env::vars())
    }

    /// The `INTENTFLOW_…` variables among `pairs`.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Environment {
        let vars = pairs.into_iter().map(|(k, v)| (k.into(), v.into())).filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        Environment { vars }
    }

    /// No variables: the file alone (`intentflow config check --no-env`).
    pub fn none() -> Environment {
        Environment::default()
    }

    /// The values of secret librdkafka properties set here.
    fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().filter(|(k, _)| k.to_ascii_uppercase().starts_with("INTENTFLOW_KAFKA__") && is_secret(k)).map(|(_, v)| v.as_str())
    }

    /// The variables as figment data: each value parsed as its key's type in the defaults.
    fn dict(&self) -> Result<Dict, figment::Error> {
        let defaults = Value::serialize(RunConfig::default())?.into_dict().expect("RunConfig serializes to a map");
        let mut dict = Dict::new();
        let mut kafka: Dict = Dict::new();
        for (name, raw) in &self.vars {
            let key = name[ENV_PREFIX.len()..].to_ascii_lowercase();
            if let Some(rest) = key.strip_prefix(&format!("kafka{ENV_SEPARATOR}")) {
                let (section, property) = rest.split_once(ENV_SEPARATOR).unwrap_or((rest, ""));
                if !["common", "consumer", "producer"].contains(&section) || property.is_empty() {
                    return Err(format!("environment variable {name}: expected INTENTFLOW_KAFKA__COMMON|CONSUMER|PRODUCER__<PROPERTY>").into());
                }
                let table = kafka.entry(section.to_string()).or_insert_with(|| Dict::new().into());
                if let Value::Dict(_, table) = table {
                    table.insert(property.replace('_', "."), raw.clone().into());
                }
                continue;
            }
            match defaults.get(&key) {
                Some(_) if key == "output" => {
                    return Err(format!("environment variable {name}: [[output]]s are set in the config file only (docs/configuration.md)").into());
                }
                Some(default) => {
                    dict.insert(key, typed(name, raw, default)?);
                }
                None if NOT_CONFIG_KEYS.contains(&&name[ENV_PREFIX.len()..]) || NOT_CONFIG_PREFIXES.iter().any(|p| name[ENV_PREFIX.len()..].starts_with(p)) => {}
                // Kubernetes puts `<SERVICE>_PORT…` and `<SERVICE>_SERVICE_…` in every pod's
                // environment for each service, `INTENTFLOW_…` ones for a service named so.
                None if key.starts_with("port") || key.starts_with("service_") => {}
                None => tracing::warn!(variable = %name, "ignored: INTENTFLOW_ prefix but not a configuration key (docs/configuration.md)"),
            }
        }
        if !kafka.is_empty() {
            dict.insert("kafka".into(), kafka.into());
        }
        Ok(dict)
    }
}

/// `raw` as the type of `default` (a string, a whole number, a boolean or a list of strings).
fn typed(name: &str, raw: &str, default: &Value) -> Result<Value, figment::Error> {
    let bad = |what: &str| figment::Error::from(format!("environment variable {name} = {raw:?}: expected {what}"));
    Ok(match default {
        Value::Num(..) => raw.trim().parse::<u64>().map_err(|_| bad("a whole number"))?.into(),
        Value::Bool(..) => match raw.trim() {
            "true" | "1" => true.into(),
            "false" | "0" => false.into(),
            _ => return Err(bad("true or false")),
        },
        Value::Array(..) => raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect::<Vec<_>>().into(),
        _ => raw.into(),
    })
}

impl Provider for Environment {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable(s)").interpolater(|_, keys| {
            let name = keys.iter().map(|k| k.replace('.', "_")).collect::<Vec<_>>().join(ENV_SEPARATOR);
            format!("{ENV_PREFIX}{}", name.to_ascii_uppercase())
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict()?))
    }
}

/// The `--config` file as a layer: its table, parsed by [`load`], named as the file.
struct TomlFile<'a> {
    path: &'a Path,
    table: toml::Table,
}

impl Provider for TomlFile<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", self.path)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(&self.table).data()
    }
}

/// Command-line flags as a layer: the flags given (unset ones serialize to nothing).
struct Flags<T>(T);

impl<T: Serialize> Provider for Flags<T> {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag(s)").interpolater(|_, keys| match keys.join(".").as_str() {
            // The one flag not named as its key: `--input-topic`, repeated.
            "input_topics" => "--input-topic".to_string(),
            key => format!("--{}", key.replace('_', "-")),
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(&self.0).data()
    }
}

/// Secret values that must not be shown: those of secret keys in the file and the environment.
#[derive(Debug, Default)]
pub struct Secrets {
    values: Vec<String>,
}

impl Secrets {
    /// The secrets of a TOML text and of the environment. `parsed` is the text's table when it
    /// parses: every value under a secret key is taken from it, at any depth (inline tables and
    /// multi-line strings included). The text is also read loosely, `key = value` fragment by
    /// fragment, so a file that does not parse has its secrets found too.
    pub fn of(toml_text: Option<&str>, parsed: Option<&toml::Table>, env: &Environment) -> Secrets {
        let mut values: Vec<String> = env.secret_values().map(String::from).collect();
        if let Some(table) = parsed {
            secret_values_in(table, &mut values);
        }
        for line in toml_text.unwrap_or("").lines() {
            for (key, value) in fragments(line) {
                if is_secret(key) {
                    let value = value.trim().trim_end_matches('}').trim();
                    values.push(value.to_string());
                    values.push(value.trim_matches(|c| c == '"' || c == '\'').to_string());
                }
            }
        }
        values.retain(|v| !v.is_empty());
        // Longest first, so that a secret containing another is replaced whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Secrets { values }
    }

    /// `text` with every line that assigns a secret key cut after that key's `=`, and every
    /// secret value replaced by [`REDACTED`].
    pub fn scrub(&self, text: &str) -> String {
        let lines: Vec<String> = text
            .lines()
            .map(|line| match fragments(line).find(|(key, _)| is_secret(key)) {
                Some((key, _)) => {
                    let cut = key.as_ptr() as usize - line.as_ptr() as usize + key.len();
                    format!("{}= \"{REDACTED}\"", &line[..cut])
                }
                None => line.to_string(),
            })
            .collect();
        let mut out = lines.join("\n");
        for v in &self.values {
            out = replace_whole(&out, v, REDACTED);
        }
        out
    }
}

/// `text` with each occurrence of `needle` that is not part of a longer word replaced by `with`
/// (a secret `x` hides `"x"`, not the x of `expected`).
fn replace_whole(text: &str, needle: &str, with: &str) -> String {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(needle) {
        let end = at + needle.len();
        let inside = word(rest[..at].chars().next_back()) && word(needle.chars().next()) || word(rest[end..].chars().next()) && word(needle.chars().next_back());
        out.push_str(&rest[..at]);
        out.push_str(if inside { needle } else { with });
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The `key = value` fragments of one TOML line, read loosely: `a = 1`, and each pair of an
/// inline table (`common = { "sasl.password" = "x", b = 2 }` gives `common`, `"sasl.password"`
/// and `b`). A value runs to the next `,` or the end of the line.
fn fragments(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split([',', '{']).filter_map(|part| part.split_once('='))
}

/// Pushes onto `out` every value under a secret key in `table`, at any depth.
fn secret_values_in(table: &toml::Table, out: &mut Vec<String>) {
    fn all(value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::String(s) => out.extend(s.lines().map(String::from).chain([s.clone()])),
            toml::Value::Table(t) => t.values().for_each(|v| all(v, out)),
            toml::Value::Array(a) => a.iter().for_each(|v| all(v, out)),
            other => out.push(other.to_string()),
        }
    }
    for (key, value) in table {
        match value {
            _ if is_secret(key) => all(value, out),
            toml::Value::Table(t) => secret_values_in(t, out),
            toml::Value::Array(a) => a.iter().filter_map(toml::Value::as_table).for_each(|t| secret_values_in(t, out)),
            _ => {}
        }
    }
}

/// Merges defaults < `file` < `env` < `flags` and extracts the configuration (not yet
/// validated); errors name the layer and have secrets scrubbed.
///
/// # Errors
///
/// [`ConfigError::Read`] for an unreadable file, [`ConfigError::Load`] for a value that does
/// not parse, an unknown key or a wrong type.
pub fn load<F: Serialize>(file: Option<&Path>, env: &Environment, flags: Option<F>) -> Result<RunConfig, ConfigError> {
    let text = match file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?),
        None => None,
    };
    // Parsed here, once, and merged as a table: the parser's own message quotes the lines
    // around an error, which may hold a secret the loose reading missed (a multi-line string),
    // so a syntax error says where, not what.
    let parsed = text.as_deref().map(str::parse::<toml::Table>);
    let secrets = Secrets::of(text.as_deref(), parsed.as_ref().and_then(|p| p.as_ref().ok()), env);
    let mut figment = Figment::from(Serialized::defaults(RunConfig::default()));
    if let (Some(path), Some(text), Some(parsed)) = (file, &text, parsed) {
        let table = parsed.map_err(|e| {
            let at = e.span().map(|s| {
                let line_start = text[..s.start].rfind('\n').map_or(0, |i| i + 1);
                format!(" at line {}, column {}", text[..s.start].matches('\n').count() + 1, text[line_start..s.start].chars().count() + 1)
            });
            ConfigError::Load(format!("{}: TOML parse error{}: {}", path.display(), at.unwrap_or_default(), secrets.scrub(e.message().trim())))
        })?;
        figment = figment.merge(TomlFile { path, table });
    }
    figment = figment.merge(env.clone());
    if let Some(flags) = flags {
        figment = figment.merge(Flags(flags));
    }
    // Keys are named without figment's profile ("default.").
    figment.extract().map_err(|e| ConfigError::Load(secrets.scrub(&e.to_string().replace("for key \"default.", "for key \""))))
}
