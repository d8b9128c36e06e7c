//! `intentflow config`: check a configuration file and print the defaults.

use crate::config::{layers, Environment, RunConfig};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Flags of `intentflow config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: ConfigAction,
}

/// `intentflow config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Check a TOML config file as `intentflow run --config FILE` would read it (with the
    /// `INTENTFLOW_…` environment over it) and print the effective configuration, secrets
    /// redacted; exit 1 naming the problem otherwise.
    Check {
        /// The TOML file.
        file: PathBuf,
        /// Check the file alone, without the environment's `INTENTFLOW_…` variables.
        #[arg(long)]
        no_env: bool,
    },
    /// Print every key with its default as TOML (a starting point that passes `check`).
    PrintDefaults,
}

/// Runs `intentflow config`.
///
/// # Errors
///
/// An unreadable or invalid configuration (the message names the layer and key).
pub fn config_cmd(args: &ConfigArgs) -> Result<()> {
    match &args.action {
        ConfigAction::Check { file, no_env } => {
            let env = if *no_env { Environment::none() } else { Environment::process() };
            let cfg = layers::load(Some(file), &env, None::<()>)?;
            cfg.validate()?;
            let layers = if *no_env { "defaults < file" } else { "defaults < file < environment" };
            print!("# {}: valid ({layers}); the effective configuration, secrets redacted:\n{}", file.display(), cfg.to_redacted_toml());
        }
        ConfigAction::PrintDefaults => {
            print!("# intentflow configuration defaults (docs/configuration.md)\n{}", RunConfig::default().to_redacted_toml());
        }
    }
    Ok(())
}
