//! What every parti training loop shares: learning-rate schedules, per-step randomness that
//! makes resumed runs exact, and checkpoint snapshots (Burn records, never pickles).
//!
//! Exact resume rests on three things: the model record keeps each parameter's id (burnpack
//! does, safetensors does not), so the optimizer state (keyed by id) finds its parameters; the
//! optimizer record carries every moment; and the data order and any sampling noise of step `s`
//! depend only on `(seed, s)`, so nothing about the random stream has to be saved.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::{Bytes, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use manifests::StageRun;

use crate::distributed::{DistributedError, Group};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint: {0}")]
    Record(String),
    /// Weights that hold NaN or infinite values: a diverged run is not saved over its last good
    /// checkpoint, nor published.
    #[error(
        "{count} of the model's parameter tensors hold NaN or infinite values {when}: training \
         diverged (a lower learning rate may help); nothing was written, the last checkpoint is kept"
    )]
    NotFinite { count: usize, when: String },
    #[error(transparent)]
    Storage(#[from] manifests::Error),
}

/// The deliberate stop of `--stop-after`: the run saved a checkpoint and ends here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "stopped after step {step} as asked (--stop-after); the same command resumes from its checkpoint"
)]
pub struct Paused {
    pub step: usize,
}

/// Warm-up, then cosine decay (ViT-VQGAN) or exponential decay (Parti) to a final rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Peak rate, reached after `warmup_steps`.
    pub learning_rate: f64,
    pub final_learning_rate: f64,
    pub warmup_steps: usize,
    /// "cosine" or "exponential".
    #[serde(default = "cosine")]
    pub decay: String,
}

fn cosine() -> String {
    "cosine".into()
}

impl Schedule {
    pub fn cosine(learning_rate: f64, final_learning_rate: f64, warmup_steps: usize) -> Schedule {
        Schedule {
            learning_rate,
            final_learning_rate,
            warmup_steps,
            decay: cosine(),
        }
    }

    /// The rate at `step` of a run of `total_steps`.
    pub fn at(&self, step: usize, total_steps: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let (peak, last) = (self.learning_rate, self.final_learning_rate);
        if self.decay == "exponential" && peak > 0.0 && last > 0.0 {
            peak * (last / peak).powf(progress)
        } else {
            let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            last + (peak - last) * cosine
        }
    }
}

/// The random stream of one step: depends only on the run's seed and the step.
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64 + 1);
    rng
}

/// Rows per micro-batch when a step's `batch_size` rows are split into `accumulation`
/// micro-batches; an error unless both are positive and the split is even (each micro-batch's
/// gradient is weighed the same, so uneven ones would not give the batch's mean).
pub fn micro_batch_size(batch_size: usize, accumulation: usize) -> Result<usize, crate::Error> {
    if batch_size == 0 || accumulation == 0 || !batch_size.is_multiple_of(accumulation) {
        return Err(crate::Error::Usage(format!(
            "batch_size {batch_size} must be a positive multiple of accumulation {accumulation} \
             (micro-batches of equal size)"
        )));
    }
    Ok(batch_size / accumulation)
}

/// Seeds `device`'s generator for part `part` (a micro-batch, or a rank's rows) of step `step`.
/// Dropout draws its masks from that generator; seeded once at the start, a resumed run would
/// draw the masks of its first steps again. Seeded per part, the masks depend only on
/// `(seed, step, part)`. The generator is the process's, so a run with dropout samples its parts
/// one at a time ([`dropout_workers`]).
pub fn seed_dropout(device: &Device, seed: u64, step: usize, part: usize) {
    use rand::RngCore;
    // Apart from `step_rng`'s streams (stream 0 is never a step's).
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(0);
    rng.set_word_pos(2 * (((step as u128) << 20) | part as u128));
    device.seed(rng.next_u64());
}

/// The most workers a step may share its micro-batches among: one when `dropout` draws masks
/// (from the process's one generator, which [`seed_dropout`] seeds per micro-batch), else
/// `micro_batches`.
pub fn dropout_workers(dropout: f64, micro_batches: usize) -> usize {
    if dropout > 0.0 { 1 } else { micro_batches }
}

/// Which norm a stage's `grad_clip_norm` bounds: its config key `grad_clip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradClip {
    /// Each parameter's gradient on its own (Burn's norm clipping), what the presets were tuned
    /// with.
    #[default]
    PerTensor,
    /// All gradients as one vector, `torch.nn.utils.clip_grad_norm_`'s norm (and Parti's):
    /// when it is above the bound, every gradient is scaled by the same factor, which keeps the
    /// update's direction.
    Global,
}

impl GradClip {
    /// An error unless `max_norm` (the config's `grad_clip_norm`) is above 0: a bound of 0
    /// zeroes every gradient and a negative one reverses them.
    pub fn check(max_norm: f32) -> Result<(), crate::Error> {
        if max_norm > 0.0 {
            Ok(())
        } else {
            Err(crate::Error::Usage(format!(
                "grad_clip_norm {max_norm} must be above 0"
            )))
        }
    }

    /// Whether this is the default (configs leave the key out then, keeping their identity).
    pub fn is_per_tensor(&self) -> bool {
        *self == GradClip::PerTensor
    }

    /// The bound the optimizer applies tensor by tensor: `max_norm` per tensor, none when the
    /// clipping is global ([`GradClip::apply`] does it before the optimizer's step).
    pub fn per_tensor(self, max_norm: f32) -> Option<f32> {
        self.is_per_tensor().then_some(max_norm)
    }

    /// `grads` (of `model`'s parameters) for the optimizer's step: when global, scaled by
    /// `min(1, max_norm / (norm + 1e-6))` with `norm` over all of them, computed in f32 on the
    /// device without reading it back; as they are when per tensor (the optimizer clips).
    pub fn apply<M: Module>(
        self,
        max_norm: f32,
        model: &M,
        grads: GradientsParams,
    ) -> GradientsParams {
        if self.is_per_tensor() {
            return grads;
        }
        let Some(squares) = squared_gradient_norm(model, &grads) else {
            return grads;
        };
        // clip_grad_norm_'s factor, epsilon included.
        let norm = squares.sqrt().add_scalar(1e-6);
        let factor = Tensor::<1>::full([1], max_norm, &norm.device())
            .div(norm)
            .clamp_max(1.0);
        struct Scale {
            grads: GradientsParams,
            factor: Tensor<1>,
        }
        impl ModuleVisitor for Scale {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(grad) = self.grads.remove::<D>(param.id) {
                    let factor = self.factor.clone().cast(grad.dtype()).reshape([1; D]);
                    self.grads.register::<D>(param.id, grad * factor);
                }
            }
        }
        let mut scale = Scale { grads, factor };
        model.visit(&mut scale);
        scale.grads
    }
}

/// The sum of squares of every gradient of `model`'s parameters in `grads` (in f32, in the
/// parameters' order), as a one-element tensor; `None` when there is no gradient.
pub fn squared_gradient_norm<M: Module>(model: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
    struct Sum<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Sum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.get::<D>(param.id) {
                let squares = grad.cast(burn::tensor::FloatDType::F32).square().sum();
                self.total = Some(match self.total.take() {
                    Some(total) => total + squares,
                    None => squares,
                });
            }
        }
    }
    let mut sum = Sum { grads, total: None };
    model.visit(&mut sum);
    sum.total
}

/// How many of `model`'s parameter tensors hold a NaN or an infinite value (a sum per tensor,
/// read back: checkpoints and publications read every weight anyway).
pub fn non_finite_parameters<M: Module>(model: &M) -> usize {
    struct Count(usize);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.val().sum().into_scalar::<f32>().is_finite() {
                self.0 += 1;
            }
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// An error when `model` holds non-finite weights ([`non_finite_parameters`]); `when` says
/// at which point, for the message.
pub fn require_finite<M: Module>(
    model: &M,
    when: impl FnOnce() -> String,
) -> Result<(), CheckpointError> {
    match non_finite_parameters(model) {
        0 => Ok(()),
        count => Err(CheckpointError::NotFinite {
            count,
            when: when(),
        }),
    }
}

/// A model and its optimizer as bytes: burnpack records for both.
pub struct Snapshot {
    pub model: Bytes,
    pub optimizer: Bytes,
}

pub fn snapshot<M: Module>(
    model: &M,
    optimizer: &ModuleOptimizer,
) -> Result<Snapshot, CheckpointError> {
    let mut store = BurnpackStore::from_bytes(None);
    model
        .save_into(&mut store)
        .map_err(|e| CheckpointError::Record(format!("saving the model: {e}")))?;
    let model_bytes = store
        .get_bytes()
        .map_err(|e| CheckpointError::Record(format!("saving the model: {e}")))?;
    let optimizer_bytes = optimizer
        .to_record()
        .into_bytes()
        .map_err(|e| CheckpointError::Record(format!("saving the optimizer: {e:?}")))?;
    Ok(Snapshot {
        model: model_bytes,
        optimizer: optimizer_bytes,
    })
}

/// Loads a [`snapshot`] into a freshly initialised model of the same config and its optimizer.
pub fn restore<M: Module>(
    mut model: M,
    optimizer: ModuleOptimizer,
    snapshot: Snapshot,
) -> Result<(M, ModuleOptimizer), CheckpointError> {
    let mut store = BurnpackStore::from_bytes(Some(snapshot.model));
    model
        .load_from(&mut store)
        .map_err(|e| CheckpointError::Record(format!("loading the model: {e}")))?;
    let record = OptimizerRecord::from_bytes(snapshot.optimizer)
        .map_err(|e| CheckpointError::Record(format!("loading the optimizer: {e:?}")))?;
    Ok((model, optimizer.load_record(record)))
}

/// Saves model, optimizer and the loop's own `state` (step, logs, bookkeeping) as one checkpoint
/// of `run` (in its work folder, keyed by config and inputs; see [`StageRun::save_checkpoint`]).
pub fn save_checkpoint<M: Module, S: Serialize>(
    run: &StageRun,
    step: usize,
    model: &M,
    optimizer: &ModuleOptimizer,
    state: &S,
) -> Result<(), CheckpointError> {
    require_finite(model, || format!("after step {step}"))?;
    let snapshot = snapshot(model, optimizer)?;
    let state = serde_json::to_vec(state)
        .map_err(|e| CheckpointError::Record(format!("saving the state: {e}")))?;
    run.save_checkpoint(
        step,
        vec![
            ("model.bpk", bytes::Bytes::from(snapshot.model.to_vec())),
            (
                "optimizer.bpk",
                bytes::Bytes::from(snapshot.optimizer.to_vec()),
            ),
            ("state.json", bytes::Bytes::from(state)),
        ],
    )?;
    Ok(())
}

/// The model, optimizer and state of the last checkpoint of this exact run (same config and
/// inputs), or the fresh ones given when there is none. Every rank of `group` must resume from
/// the same step: a rank that could not see the leader's checkpoint (storage that is not shared)
/// would otherwise train another model beside the others. On a fresh start the leader says
/// which checkpoints of other runs it leaves alone.
pub fn resume<M: Module, S: DeserializeOwned>(
    run: &StageRun,
    group: &Group,
    model: M,
    optimizer: ModuleOptimizer,
    fresh: S,
) -> Result<(M, ModuleOptimizer, S), crate::Error> {
    let checkpoint = run.load_checkpoint().map_err(CheckpointError::from)?;
    let step = checkpoint.as_ref().map_or(0, |checkpoint| checkpoint.step);
    group.agree("resumed step", step as u64)?;
    let Some(manifests::stage::Checkpoint { step, files }) = checkpoint else {
        if group.is_leader() {
            warn_of_other_checkpoints(run);
        }
        return Ok((model, optimizer, fresh));
    };
    let file = |name: &str| {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, bytes)| bytes.to_vec())
            .ok_or_else(|| CheckpointError::Record(format!("step {step}: no {name}")))
    };
    let state: S = serde_json::from_slice(&file("state.json")?)
        .map_err(|e| CheckpointError::Record(format!("step {step}: state.json: {e}")))?;
    let snapshot = Snapshot {
        model: Bytes::from_bytes_vec(file("model.bpk")?),
        optimizer: Bytes::from_bytes_vec(file("optimizer.bpk")?),
    };
    let (model, optimizer) = restore(model, optimizer, snapshot)?;
    info!("resuming from the checkpoint of step {step}");
    Ok((model, optimizer, state))
}

/// Says which checkpoints of other runs (another config or other inputs) a run that starts from
/// step 0 leaves alone, and why: the commonest surprise of a resume is a setting changed by
/// accident. Listing is best effort; a storage error only loses the warning.
fn warn_of_other_checkpoints(run: &StageRun) {
    let others = match run.other_checkpoints() {
        Ok(others) => others,
        Err(e) => {
            debug!("looking for other runs' checkpoints: {e}");
            return;
        }
    };
    for other in others {
        let why = match &other.differences {
            None => "an earlier version wrote it, without its config".to_string(),
            Some(differences) if differences.is_empty() => {
                "its recorded config and inputs are this run's (another version's identity)"
                    .to_string()
            }
            Some(differences) => differences.join("; "),
        };
        warn!(
            "starting from step 0, not from the checkpoint of step {} in {} (another run: {why}); \
             rerun with that run's config and inputs to resume it, or delete the folder",
            other.step, other.folder
        );
    }
}

/// When a training loop checkpoints: every `every` steps (0: never) before the end, and at
/// `stop_after` (a deliberate stop, e.g. before a batch job's time limit).
#[derive(Debug, Clone, Copy)]
pub struct Checkpointing {
    pub every: usize,
    pub total_steps: usize,
    pub stop_after: Option<usize>,
    /// Whether this process writes them: rank 0 of a job, or a lone process.
    pub writes: bool,
}

impl Checkpointing {
    pub fn new(every: usize, total_steps: usize, stop_after: Option<usize>) -> Checkpointing {
        Checkpointing {
            every,
            total_steps,
            stop_after,
            writes: true,
        }
    }

    /// Only `group`'s leader writes; the others stop where it stops.
    pub fn written_by_leader_of(self, group: &Group) -> Checkpointing {
        Checkpointing {
            writes: group.is_leader(),
            ..self
        }
    }

    /// After `done` steps: saves a checkpoint when one is due; [`Paused`] when the run must
    /// stop here (asked to, and not finished).
    pub fn after_step<M: Module, S: Serialize>(
        &self,
        run: &StageRun,
        done: usize,
        model: &M,
        optimizer: &ModuleOptimizer,
        state: &S,
    ) -> Result<(), crate::Error> {
        let stop = self.stop_after == Some(done);
        let scheduled =
            self.every > 0 && done.is_multiple_of(self.every) && done < self.total_steps;
        if (stop || scheduled) && self.writes {
            save_checkpoint(run, done, model, optimizer, state)?;
        }
        if stop && done < self.total_steps {
            return Err(Paused { step: done }.into());
        }
        Ok(())
    }
}

/// `module` as safetensors bytes whose header is written in a fixed order. Burn keeps the
/// file's metadata in a hash map, so two saves of the same weights would otherwise differ in
/// their header (and digest) from process to process.
pub fn save_safetensors<M: ModuleSnapshot>(module: &M) -> Result<Vec<u8>, CheckpointError> {
    let mut store = burn::store::SafetensorsStore::from_bytes(None);
    module
        .save_into(&mut store)
        .map_err(|e| CheckpointError::Record(format!("saving weights: {e}")))?;
    let bytes = store
        .get_bytes()
        .map_err(|e| CheckpointError::Record(format!("saving weights: {e}")))?;
    canonical_safetensors(&bytes)
}

fn canonical_safetensors(bytes: &[u8]) -> Result<Vec<u8>, CheckpointError> {
    let malformed = |why: &str| CheckpointError::Record(format!("saved weights: {why}"));
    let (length, rest) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| malformed("no header length"))?;
    let length = usize::try_from(u64::from_le_bytes(*length))
        .map_err(|_| malformed("header length out of range"))?;
    if length > rest.len() {
        return Err(malformed("header longer than the file"));
    }
    let (header, data) = rest.split_at(length);
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| malformed(&e.to_string()))?;
    if let Some(metadata) = header.get_mut("__metadata__") {
        let sorted: BTreeMap<String, serde_json::Value> =
            serde_json::from_value(metadata.take()).map_err(|e| malformed(&e.to_string()))?;
        *metadata = serde_json::to_value(sorted).map_err(|e| malformed(&e.to_string()))?;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| malformed(&e.to_string()))?;
    // The format aligns the data to 8 bytes by padding the header with spaces.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    Ok(out)
}

/// Loads safetensors `bytes` into `module`, which must match them exactly (no tensor missing,
/// none mismatched); `name` says which file in errors.
pub fn load_safetensors<M: ModuleSnapshot>(
    module: &mut M,
    bytes: &[u8],
    name: &str,
) -> Result<(), CheckpointError> {
    let result = module
        .load_from(&mut burn::store::SafetensorsStore::from_bytes(Some(
            bytes.to_vec(),
        )))
        .map_err(|e| CheckpointError::Record(format!("{name}: {e}")))?;
    if !result.missing.is_empty() || !result.errors.is_empty() {
        return Err(CheckpointError::Record(format!(
            "{name}: weights do not match the config (missing {:?}, errors {:?})",
            result.missing, result.errors
        )));
    }
    Ok(())
}

/// Initialises every lazily initialised parameter now, in field order. Burn draws a
/// parameter's initial values on first use; replicas forked onto several devices and used from
/// several threads would otherwise race for the generator, and the model would depend on the
/// thread schedule.
pub fn materialize<M: Module>(model: &M) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            drop(param.val());
        }
    }
    model.visit(&mut Touch);
}

/// The gradients of one optimizer step split into `micro_batches`, computed by `workers`
/// (data parallelism on one machine: a thread per worker, each on its own replica of `model`
/// forked onto its device, taking micro-batches in turn) and summed on the first worker's device
/// in micro-batch order, so a step comes out bit for bit the same however many workers share
/// it. In a job of several processes (`group`), this rank computes only the micro-batches it
/// [owns](Group::owns) and the sums are all-reduced, so every rank ends with the step's
/// gradients. `micro_step(replica, worker, index)` runs micro-batch `index` on
/// `workers[worker]` and returns its gradients (scaled as they are to be summed) and a report;
/// this rank's reports come back with their micro-batch index, in order
/// ([`Group::gather_in_order`] collects everyone's). The first error stops the step; a
/// worker's panic is resumed here.
pub fn micro_batch_gradients<M, R, E, F>(
    model: &M,
    workers: &[Device],
    group: &Group,
    micro_batches: usize,
    micro_step: F,
) -> Result<(GradientsParams, Vec<(usize, R)>), E>
where
    M: Module + Sync,
    R: Send,
    E: Send + From<DistributedError>,
    F: Fn(&M, usize, usize) -> Result<(GradientsParams, R), E> + Sync,
{
    let owned: Vec<usize> = (0..micro_batches)
        .filter(|&index| group.owns(index))
        .collect();
    let (grads, reports) = local_gradients(model, workers, &owned, micro_step)?;
    let grads = group.all_reduce_gradients(model, grads)?;
    Ok((grads, owned.into_iter().zip(reports).collect()))
}

/// [`micro_batch_gradients`] of this process: micro-batches `owned`, summed in that order.
fn local_gradients<M, R, E, F>(
    model: &M,
    workers: &[Device],
    owned: &[usize],
    micro_step: F,
) -> Result<(GradientsParams, Vec<R>), E>
where
    M: Module + Sync,
    R: Send,
    E: Send,
    F: Fn(&M, usize, usize) -> Result<(GradientsParams, R), E> + Sync,
{
    let mut accumulator = GradientsAccumulator::<M>::new();
    let mut reports = Vec::with_capacity(owned.len());
    let Some(main) = workers.first() else {
        return Ok((accumulator.grads(), reports));
    };
    if workers.len() == 1 {
        for &index in owned {
            let (grads, report) = micro_step(model, 0, index)?;
            let grads = crate::fused::grads_in_parameter_dtype(model, grads);
            accumulator.accumulate(model, grads);
            reports.push(report);
        }
        return Ok((accumulator.grads(), reports));
    }
    let replicas: Vec<M> = workers
        .iter()
        .map(|device| model.clone().fork(device))
        .collect();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let handles: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(worker, replica)| {
                let sender = sender.clone();
                let micro_step = &micro_step;
                scope.spawn(move || {
                    for position in (worker..owned.len()).step_by(workers.len()) {
                        let result = micro_step(replica, worker, owned[position]);
                        let failed = result.is_err();
                        // A closed channel means the step already failed elsewhere.
                        if sender.send((position, result)).is_err() || failed {
                            return;
                        }
                    }
                })
            })
            .collect();
        drop(sender);
        let mut arrived = BTreeMap::new();
        let mut summed = || {
            for (position, result) in &receiver {
                arrived.insert(position, result);
                while let Some(result) = arrived.remove(&reports.len()) {
                    let (grads, report) = result?;
                    let grads = crate::fused::grads_in_parameter_dtype(model, grads);
                    accumulator.accumulate(model, grads.to_device(main, model));
                    reports.push(report);
                }
            }
            Ok(())
        };
        let outcome = summed();
        drop(receiver);
        for handle in handles {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        outcome
    })?;
    Ok((accumulator.grads(), reports))
}

/// The end of a training stage: its artifacts written one by one (before the manifest, as
/// every stage does), then the manifest with the stage's metrics and what every training stage
/// reports beside them (`backend`, `seconds`).
pub struct Publication<'a> {
    run: &'a StageRun,
    started: std::time::Instant,
    artifacts: Vec<manifests::Artifact>,
}

impl<'a> Publication<'a> {
    pub fn new(run: &'a StageRun, started: std::time::Instant) -> Publication<'a> {
        Publication {
            run,
            started,
            artifacts: Vec::new(),
        }
    }

    /// Any file (a picture, a log).
    pub fn file(&mut self, name: &str, kind: &str, bytes: Vec<u8>) -> Result<(), crate::Error> {
        let artifact = self
            .run
            .write_artifact(name, kind, bytes::Bytes::from(bytes), None)?;
        self.artifacts.push(artifact);
        Ok(())
    }

    /// `module`'s weights as safetensors (header in a fixed order, so equal weights give equal
    /// digests); an error, and nothing written, when any weight is NaN or infinite.
    pub fn weights<M: Module + ModuleSnapshot>(
        &mut self,
        name: &str,
        kind: &str,
        module: &M,
    ) -> Result<(), crate::Error> {
        require_finite(module, || format!("at the end, in {name}"))?;
        self.file(name, kind, save_safetensors(module)?)
    }

    /// A config as pretty JSON.
    pub fn config<C: Serialize>(
        &mut self,
        name: &str,
        kind: &str,
        config: &C,
    ) -> Result<(), crate::Error> {
        let json = serde_json::to_vec_pretty(config)
            .map_err(|e| crate::Error::Data(format!("{name}: {e}")))?;
        self.file(name, kind, json)
    }

    /// The metrics log (`metrics.jsonl`, one JSON line per logged step).
    pub fn log(&mut self, log: String) -> Result<(), crate::Error> {
        self.file("metrics.jsonl", "metrics/jsonl", log.into_bytes())
    }

    /// Writes the manifest: `metrics` plus the backend, the seconds since the start and the
    /// job's world size; then lets `group`'s other ranks, waiting in
    /// [`Group::leader_published`], read it.
    pub fn publish(
        self,
        group: &Group,
        mut metrics: serde_json::Map<String, serde_json::Value>,
    ) -> Result<manifests::Manifest, crate::Error> {
        metrics.insert(
            "backend".into(),
            serde_json::json!(crate::backend::backend_name()),
        );
        metrics.insert(
            "seconds".into(),
            serde_json::json!(self.started.elapsed().as_secs_f64()),
        );
        metrics.insert("world_size".into(), serde_json::json!(group.world_size()));
        let manifest = self.run.publish(self.artifacts, metrics)?;
        group.barrier()?;
        Ok(manifest)
    }
}
