//! What every training stage (`vqgan train`, `vqgan finetune-decoder`, `train text-encoder`,
//! `train parti`) takes on its command line, so the flags mean the same everywhere.

use std::time::Duration;

use clap::Args;
use manifests::cli::StageArgs;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::distributed::{DistributedError, DistributedMode, Group};

/// Flags shared by every training command (flattened into each).
#[derive(Args, Debug, Clone)]
pub struct TrainingArgs {
    #[command(flatten)]
    pub stage: StageArgs,
    /// cpu, cuda or cuda:N (CUDA needs the tch backend).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, value_parser = manifests::cli::finite_f64)]
    pub learning_rate: Option<f64>,
    /// Steps between checkpoints (the config's `checkpoint_every`; 0: only `--stop-after`'s).
    /// Not part of the run's identity: a killed run resumes under another interval.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Stop after this many steps with a checkpoint (e.g. before a batch job's time limit);
    /// the same command later resumes exactly where it stopped.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Workers per device sharing each step's micro-batches (`accumulation` in the config);
    /// default: one per core on flex's CPU, else one. Changes speed, never the result.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Join the job a launcher describes (torchrun's RANK/WORLD_SIZE/MASTER_ADDR, Slurm's
    /// SLURM_PROCID/SLURM_NTASKS, a Kubernetes Indexed Job's JOB_COMPLETION_INDEX), one
    /// process per device (needs the tch backend; Gloo on CPUs, NCCL on GPUs); `off` trains in
    /// this process alone; `on` joins a process group even as a job of one.
    #[arg(long, value_enum, default_value_t = DistributedMode::Auto)]
    pub distributed: DistributedMode,
    /// Seconds to wait for the other processes at the rendezvous and in each collective.
    #[arg(long, default_value_t = 1800)]
    pub distributed_timeout: u64,
}

/// How a training stage runs, as opposed to what it computes (its config).
#[derive(Debug, Clone)]
pub struct TrainingOptions {
    pub out: String,
    pub device: String,
    /// Workers per device sharing each step's micro-batches (`None`: one per core on flex's
    /// CPU, else one); speed only, the result is the same.
    pub workers: Option<usize>,
    pub force: bool,
    /// Stop (with a checkpoint) once this many steps are done, as a time-limited batch job
    /// would be stopped; the same command later resumes. `None`: run to the end.
    pub stop_after: Option<usize>,
    pub distributed: DistributedMode,
    /// How long to wait for the other processes of a job.
    pub distributed_timeout: Duration,
}

impl TrainingOptions {
    /// Options for a run into `out` on the CPU: one worker per core, no stop, in this process
    /// alone whatever the environment says (the command line's `--distributed` defaults to
    /// `auto`; a library caller opts in).
    pub fn new(out: &str) -> TrainingOptions {
        TrainingOptions {
            out: out.to_string(),
            device: "cpu".into(),
            workers: None,
            force: false,
            stop_after: None,
            distributed: DistributedMode::Off,
            distributed_timeout: Duration::from_secs(1800),
        }
    }

    /// This process's place in the job the environment describes (alone unless launched as
    /// one of several), and so its device.
    pub fn join(&self) -> Result<Group, DistributedError> {
        Group::join(self.distributed, &self.device, self.distributed_timeout)
    }
}

impl TrainingArgs {
    /// The config keys these flags override (unset ones leave the preset's value).
    pub fn overrides(&self) -> Value {
        json!({"steps": self.steps, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "seed": self.stage.seed,
            "checkpoint_every": self.checkpoint_every})
    }

    pub fn options(&self) -> TrainingOptions {
        TrainingOptions {
            out: self.stage.out.clone(),
            device: self.device.clone(),
            workers: self.workers,
            force: self.stage.force,
            stop_after: self.stop_after,
            distributed: self.distributed,
            distributed_timeout: Duration::from_secs(self.distributed_timeout),
        }
    }

    /// `--preset`, `tiny` when not given.
    pub fn preset(&self) -> &str {
        self.stage.preset.as_deref().unwrap_or("tiny")
    }

    /// The stage's config: `preset`, then the `--config` file, then these flags.
    pub fn config<C: Serialize + DeserializeOwned>(
        &self,
        preset: &C,
    ) -> Result<C, manifests::Error> {
        manifests::config::layered(preset, self.stage.config.as_deref(), self.overrides())
    }
}
