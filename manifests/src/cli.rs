//! Command-line pieces every stage binary shares, so `--out`, `--preset`, `--config`, `--force`,
//! `--seed` and the batch-job flags mean the same everywhere.

use crate::Error;
use crate::manifest::ShardSpec;

/// Options every stage command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct StageArgs {
    /// Output folder or bucket prefix (local path, file://, s3://, gs://, az://). The manifest
    /// is written to OUT/manifest.json, after every artifact.
    #[arg(long, value_name = "URI")]
    pub out: String,
    /// Named preset the config starts from (e.g. tiny).
    #[arg(long)]
    pub preset: Option<String>,
    /// TOML file (any location) layered over the preset; command-line values override it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<String>,
    /// Rerun even when the manifest says inputs and config are unchanged.
    #[arg(long)]
    pub force: bool,
    /// Random seed; runs with the same seed, config and inputs produce the same artifacts.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl StageArgs {
    /// An error for `--seed` given to `stage`, which draws nothing at random: its output
    /// depends only on its inputs and config, and a seed it ignored would look like one it used.
    pub fn refuse_seed(&self, stage: &str) -> Result<(), Error> {
        match self.seed {
            None => Ok(()),
            Some(_) => Err(Error::Usage(format!(
                "--seed: {stage} draws nothing at random (its output depends only on its input \
                 and config); leave --seed out"
            ))),
        }
    }

    /// An error for `--preset` given to `stage`, which has no presets (`settings` says what it
    /// takes instead).
    pub fn refuse_preset(&self, stage: &str, settings: &str) -> Result<(), Error> {
        match &self.preset {
            None => Ok(()),
            Some(preset) => Err(Error::Usage(format!(
                "--preset {preset}: {stage} has no presets ({settings})"
            ))),
        }
    }
}

/// Which slice of the input this process handles, for cloud batch arrays.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct JobArgs {
    /// This job's index in a batch array. Defaults to JOB_COMPLETION_INDEX (Kubernetes),
    /// AWS_BATCH_JOB_ARRAY_INDEX or CLOUD_RUN_TASK_INDEX when set.
    #[arg(long)]
    pub shard_index: Option<u32>,
    /// Number of jobs in the array. Defaults to CLOUD_RUN_TASK_COUNT when set, else 1.
    #[arg(long)]
    pub num_shards: Option<u32>,
}

const INDEX_VARIABLES: [&str; 4] = [
    "JOB_COMPLETION_INDEX",
    "AWS_BATCH_JOB_ARRAY_INDEX",
    "CLOUD_RUN_TASK_INDEX",
    "BATCH_TASK_INDEX",
];

/// Where schedulers put the number of jobs (Cloud Run and Google Cloud Batch; Kubernetes and
/// AWS Batch do not, so pass `--num-shards` there).
const COUNT_VARIABLES: [&str; 2] = ["CLOUD_RUN_TASK_COUNT", "BATCH_TASK_COUNT"];

/// A clap value parser for a finite number. `inf` and `NaN` cannot live in JSON: they would
/// reach a config as null, which means "not given", and leave the preset's value in force
/// without a word.
pub fn finite_f64(value: &str) -> Result<f64, String> {
    let number: f64 = value.trim().parse().map_err(|e| format!("{e}"))?;
    if number.is_finite() {
        Ok(number)
    } else {
        Err(format!("'{value}' is not a finite number"))
    }
}

impl JobArgs {
    pub fn shard(&self) -> Result<ShardSpec, Error> {
        self.shard_with(|name| std::env::var(name).ok())
    }

    /// `env` looks up an environment variable (a parameter so tests need not mutate the
    /// process environment).
    pub fn shard_with(&self, env: impl Fn(&str) -> Option<String>) -> Result<ShardSpec, Error> {
        let parse = |name: &str, value: String| {
            value.trim().parse::<u32>().map_err(|_| {
                Error::Usage(format!("{name}={value:?} is not a non-negative integer"))
            })
        };
        // The first of `names` the environment sets, parsed.
        let first_set = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| env(name).map(|v| (*name, v)))
                .map(|(name, value)| parse(name, value))
                .transpose()
        };
        let index = match self.shard_index {
            Some(index) => Some(index),
            None => first_set(&INDEX_VARIABLES)?,
        };
        let count = match self.num_shards {
            Some(count) => Some(count),
            None => first_set(&COUNT_VARIABLES)?,
        };
        match (index, count) {
            (None, None) => Ok(ShardSpec::single()),
            (Some(_), None) => Err(Error::Usage(
                "a job index is set but not the number of jobs: pass --num-shards".into(),
            )),
            // Every job of the array would take slice 0 and write the same part manifest.
            (None, Some(count)) if count > 1 => Err(Error::Usage(format!(
                "{count} jobs but no job index: pass --shard-index, or set one of {}",
                INDEX_VARIABLES.join(", ")
            ))),
            (index, Some(count)) => {
                let index = index.unwrap_or(0);
                if count == 0 || index >= count {
                    return Err(Error::Usage(format!(
                        "job index {index} is outside 0..{count} (--shard-index must be below --num-shards)"
                    )));
                }
                Ok(ShardSpec { index, count })
            }
        }
    }
}

/// A stage binary's `main`: logging on, run, and on failure the whole error chain on stderr
/// and exit status 2 (1 is kept for "checked and found bad", as `manifests verify` uses it).
pub fn run_main(run: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    init_logging();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Logs go to stderr; `RUST_LOG` filters them (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_index_comes_from_the_batch_environment() {
        let env = |name: &str| match name {
            "AWS_BATCH_JOB_ARRAY_INDEX" => Some("3".to_string()),
            _ => None,
        };
        let args = JobArgs {
            shard_index: None,
            num_shards: Some(8),
        };
        assert_eq!(
            args.shard_with(env).unwrap(),
            ShardSpec { index: 3, count: 8 }
        );
        let missing_count = JobArgs::default().shard_with(env).unwrap_err().to_string();
        assert!(missing_count.contains("--num-shards"), "{missing_count}");
        assert_eq!(
            JobArgs::default().shard_with(|_| None).unwrap(),
            ShardSpec::single()
        );
        let out_of_range = JobArgs {
            shard_index: Some(8),
            num_shards: Some(8),
        };
        assert!(out_of_range.shard_with(|_| None).is_err());
        // A job count without an index would give every job slice 0.
        let count_only = JobArgs {
            shard_index: None,
            num_shards: Some(4),
        };
        let no_index = count_only.shard_with(|_| None).unwrap_err().to_string();
        assert!(no_index.contains("no job index"), "{no_index}");
        let google_batch = |name: &str| match name {
            "BATCH_TASK_INDEX" => Some("2".to_string()),
            "BATCH_TASK_COUNT" => Some("4".to_string()),
            _ => None,
        };
        assert_eq!(
            JobArgs::default().shard_with(google_batch).unwrap(),
            ShardSpec { index: 2, count: 4 }
        );
        let one = JobArgs {
            shard_index: None,
            num_shards: Some(1),
        };
        assert_eq!(one.shard_with(|_| None).unwrap(), ShardSpec::single());
    }
}
