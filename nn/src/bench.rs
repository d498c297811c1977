//! Timing for the `bench` subcommands, and the PyTorch peer they are compared with in the same
//! run (`bench/torch_models.py`). Benchmarks, not tests: nothing here asserts a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::kind::Basic;
use burn::tensor::{Device, Tensor};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("running the PyTorch peer {script} with {python}: {message}")]
    Peer {
        python: String,
        script: String,
        message: String,
    },
}

/// Milliseconds per step: the median of `rounds` timed steps after one untimed warm-up step
/// (allocator, optimizer state), the way the PyTorch peer times itself.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub ms_per_step: f64,
    pub rounds_ms: Vec<f64>,
}

impl Timing {
    fn from_rounds(rounds_ms: Vec<f64>) -> Self {
        let mut sorted = rounds_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let ms_per_step = match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[middle],
            _ => (sorted[middle - 1] + sorted[middle]) / 2.0,
        };
        Timing {
            ms_per_step,
            rounds_ms,
        }
    }
}

/// The share of a step's batch one worker's micro-batch is, and where that worker runs.
pub struct Share<'a> {
    pub device: &'a Device,
    pub part: usize,
    pub parts: usize,
}

impl Share<'_> {
    /// This share of a batch-first tensor, on the worker's device.
    pub fn of<const D: usize, K: Basic>(&self, batch: &Tensor<D, K>) -> Tensor<D, K> {
        batch
            .clone()
            .chunk(self.parts, 0)
            .swap_remove(self.part)
            .to_device(self.device)
    }
}

/// Times train steps of `model` as training runs them: the batch split into one micro-batch per
/// worker ([`crate::training::micro_batch_gradients`]), `loss(replica, share)` forward and
/// backward on each, then one `optimizer` step at a fixed learning rate.
/// `args.precision` covers each forward and backward pass, as in training.
pub fn time_train_steps<M: Module + Sync>(
    mut model: M,
    optimizer: &mut ModuleOptimizer,
    args: &TrainStepArgs,
    workers: &[Device],
    loss: impl Fn(&M, Share) -> Tensor<1> + Sync,
) -> Result<Timing, crate::Error> {
    let rounds = args.rounds;
    let parts = workers.len().max(1);
    let mut rounds_ms = Vec::with_capacity(rounds.max(1));
    let last = rounds.max(1);
    for round in 0..=last {
        let profiler = match &args.profile {
            Some(path) if round == last => Some(Profiler::start(path, &args.device)?),
            _ => None,
        };
        let started = Instant::now();
        let step = crate::training::micro_batch_gradients(
            &model,
            workers,
            &crate::distributed::Group::single("cpu"),
            parts,
            |replica, worker, part| {
                let share = Share {
                    device: &workers[worker],
                    part,
                    parts,
                };
                let _autocast = crate::fused::Autocast::begin(args.precision, &args.device)?;
                let loss = loss(replica, share).div_scalar(parts as f64);
                let grads = GradientsParams::from_grads(loss.backward(), replica);
                Ok::<_, crate::Error>((grads, ()))
            },
        );
        let (grads, _) = step?;
        model = optimizer.step(1e-4, model, grads);
        // The GPU's queue drained, so the clock covers the step (as the peer synchronises).
        sync(workers);
        if round > 0 {
            rounds_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        if let Some(profiler) = profiler {
            profiler.save()?;
        }
    }
    Ok(Timing::from_rounds(rounds_ms))
}

/// libtorch's profiler recording one step (`--profile`).
struct Profiler<'a> {
    #[cfg_attr(not(feature = "tch"), allow(dead_code))]
    path: &'a Path,
}

#[cfg(feature = "tch")]
unsafe extern "C" {
    fn parti_profiler_start(
        cuda: std::ffi::c_int,
        error: *mut std::ffi::c_char,
        capacity: usize,
    ) -> std::ffi::c_int;
    fn parti_profiler_stop(
        path: *const std::ffi::c_char,
        error: *mut std::ffi::c_char,
        capacity: usize,
    ) -> std::ffi::c_int;
}

impl<'a> Profiler<'a> {
    fn start(path: &'a Path, device: &str) -> Result<Self, crate::Error> {
        #[cfg(feature = "tch")]
        {
            let cuda = crate::backend::cuda_index(device)
                .map_err(|e| crate::Error::Usage(e.to_string()))?
                .is_some();
            crate::csrc::checked(|error, capacity| unsafe {
                parti_profiler_start(std::ffi::c_int::from(cuda), error, capacity)
            })
            .map_err(|e| crate::Error::Usage(format!("starting libtorch's profiler: {e}")))?;
            Ok(Profiler { path })
        }
        #[cfg(not(feature = "tch"))]
        {
            let _ = (path, device);
            Err(crate::Error::Usage(
                "--profile records with libtorch's profiler: build with --features nn/tch".into(),
            ))
        }
    }

    fn save(self) -> Result<(), crate::Error> {
        #[cfg(feature = "tch")]
        {
            let failed = |e: String| {
                crate::Error::Usage(format!("writing the trace {}: {e}", self.path.display()))
            };
            let path = std::ffi::CString::new(self.path.to_string_lossy().as_bytes())
                .map_err(|e| failed(e.to_string()))?;
            crate::csrc::checked(|error, capacity| unsafe {
                parti_profiler_stop(path.as_ptr(), error, capacity)
            })
            .map_err(failed)?;
            tracing::info!("trace of the last step: {}", self.path.display());
        }
        Ok(())
    }
}

/// Waits until `devices` have finished the work queued on them: reading one value back from
/// each does it on every backend (a CPU's work is already done).
fn sync(devices: &[Device]) {
    for device in devices {
        let one = Tensor::<1>::zeros([1], device);
        let _ = one.into_data();
    }
}

/// `bench/torch_models.py` run by a Python that has PyTorch (`make bench-venv` makes one).
#[derive(Debug, Clone)]
pub struct TorchPeer {
    pub python: PathBuf,
    pub script: PathBuf,
    /// PyTorch's name of the device the peer runs on: ours, so a GPU run is compared with
    /// PyTorch on the same GPU.
    pub device: String,
}

impl TorchPeer {
    /// A peer on the device of our `--device` value (`cpu`, `cuda`, `cuda:N`, or a list of
    /// training devices, of which the first counts).
    pub fn new(python: &Path, script: &Path, device: &str) -> Self {
        Self {
            python: python.to_path_buf(),
            script: script.to_path_buf(),
            device: torch_device(device),
        }
    }

    /// Runs one measurement and returns the JSON object the script prints.
    pub fn run(&self, args: &[String]) -> Result<serde_json::Value, BenchError> {
        let failed = |message: String| BenchError::Peer {
            python: self.python.display().to_string(),
            script: self.script.display().to_string(),
            message,
        };
        let output = Command::new(&self.python)
            .arg(&self.script)
            .args(args)
            .args(["--device", &self.device])
            .output()
            .map_err(|e| failed(e.to_string()))?;
        if !output.status.success() {
            return Err(failed(String::from_utf8_lossy(&output.stderr).into_owned()));
        }
        serde_json::from_slice(&output.stdout)
            .map_err(|e| failed(format!("it printed no JSON object: {e}")))
    }

    /// Like [`TorchPeer::run`] for a timed train step: the peer's median milliseconds per step.
    pub fn ms_per_step(&self, args: &[String]) -> Result<(f64, serde_json::Value), BenchError> {
        let report = self.run(args)?;
        let ms = report["ms_per_step"]
            .as_f64()
            .ok_or_else(|| BenchError::Peer {
                python: self.python.display().to_string(),
                script: self.script.display().to_string(),
                message: format!("no ms_per_step in {report}"),
            })?;
        Ok((ms, report))
    }
}

/// Compares our timing of a train step with the peer's `what` (`vqgan-step`, `parti-step`) on
/// the same preset, batch and rounds; without a peer, only ours is reported.
pub fn compare_train_step(
    ours: &Timing,
    args: &TrainStepArgs,
    what: &str,
    batch: usize,
    work: String,
) -> Result<Comparison, BenchError> {
    let torch = match args.peer.peer(&args.device) {
        Some(peer) => Some(
            peer.ms_per_step(&[
                what.into(),
                "--preset".into(),
                args.preset.clone(),
                "--batch".into(),
                batch.to_string(),
                "--rounds".into(),
                args.rounds.to_string(),
                "--precision".into(),
                if args.precision.is_f32() {
                    "f32"
                } else {
                    "bf16"
                }
                .into(),
                "--profile".into(),
                args.profile
                    .as_ref()
                    .map(|path| format!("{}.torch.json", path.display()))
                    .unwrap_or_default(),
            ])?,
        ),
        None => None,
    };
    Ok(Comparison::new(work, ours, torch))
}

/// One line of a side-by-side table: ours against the peer, and the ratio of times
/// (below 1: we are faster).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub work: String,
    pub backend: &'static str,
    pub ours_ms: f64,
    pub torch_ms: Option<f64>,
    /// ours_ms / torch_ms.
    pub time_ratio: Option<f64>,
    pub torch: Option<serde_json::Value>,
    /// Where the model's FLOPs per step are counted ([`Comparison::with_model_flops`]).
    pub utilisation: Option<Utilisation>,
}

/// Model FLOPs utilisation: the FLOPs a step's model needs (counted from its shapes) over the
/// measured step time, against the device's peak.
#[derive(Debug, Clone, Serialize)]
pub struct Utilisation {
    pub model_tflop_per_step: f64,
    pub ours_tflops: f64,
    pub torch_tflops: Option<f64>,
    /// `--peak-tflops`: the device's peak for the precision measured.
    pub peak_tflops: Option<f64>,
    pub ours_mfu: Option<f64>,
    pub torch_mfu: Option<f64>,
}

impl Comparison {
    pub fn new(
        work: impl Into<String>,
        ours: &Timing,
        peer: Option<(f64, serde_json::Value)>,
    ) -> Self {
        let (torch_ms, torch) = match peer {
            Some((ms, report)) => (Some(ms), Some(report)),
            None => (None, None),
        };
        Self {
            work: work.into(),
            backend: crate::backend::backend_name(),
            ours_ms: ours.ms_per_step,
            torch_ms,
            time_ratio: torch_ms.map(|t| ours.ms_per_step / t),
            torch,
            utilisation: None,
        }
    }

    /// Adds model FLOPs utilisation for a step of `flops` against `peak_tflops`.
    pub fn with_model_flops(mut self, flops: f64, peak_tflops: Option<f64>) -> Self {
        let tflops = |ms: f64| flops / (ms / 1000.0) / 1e12;
        let ours_tflops = tflops(self.ours_ms);
        let torch_tflops = self.torch_ms.map(tflops);
        self.utilisation = Some(Utilisation {
            model_tflop_per_step: flops / 1e12,
            ours_tflops,
            torch_tflops,
            peak_tflops,
            ours_mfu: peak_tflops.map(|peak| ours_tflops / peak),
            torch_mfu: peak_tflops.zip(torch_tflops).map(|(peak, t)| t / peak),
        });
        self
    }

    /// Prints the comparison as JSON, then as one line for people.
    pub fn report(&self) {
        match serde_json::to_string(self) {
            Ok(json) => println!("{json}"),
            Err(e) => tracing::warn!("benchmark report not serialisable: {e}"),
        }
        println!("{}", self.line());
    }

    pub fn line(&self) -> String {
        let mut line = self.timing_line();
        if let Some(u) = &self.utilisation {
            line += &format!(
                "; {:.3} TFLOP/step: ours {:.1} TFLOP/s",
                u.model_tflop_per_step, u.ours_tflops
            );
            if let Some(mfu) = u.ours_mfu {
                line += &format!(" (MFU {:.1}%)", 100.0 * mfu);
            }
            if let Some(torch) = u.torch_tflops {
                line += &format!(", PyTorch {torch:.1} TFLOP/s");
            }
            if let Some(mfu) = u.torch_mfu {
                line += &format!(" (MFU {:.1}%)", 100.0 * mfu);
            }
        }
        line
    }

    fn timing_line(&self) -> String {
        match (self.torch_ms, self.time_ratio) {
            (Some(torch), Some(ratio)) => format!(
                "{}: ours ({}) {:.1} ms/step, PyTorch {:.1} ms/step, ours/PyTorch {:.2}x the time",
                self.work, self.backend, self.ours_ms, torch, ratio
            ),
            _ => format!(
                "{}: ours ({}) {:.1} ms/step (no PyTorch peer: pass --python)",
                self.work, self.backend, self.ours_ms
            ),
        }
    }
}

/// `--python` and `--peer-script` of every `bench` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct PeerArgs {
    /// A Python with PyTorch (`make bench-venv`: bench/.venv/bin/python); without it only our
    /// side is measured.
    #[arg(long)]
    pub python: Option<PathBuf>,
    #[arg(long, default_value = "bench/torch_models.py")]
    pub peer_script: PathBuf,
}

/// The arguments of `vqgan bench` and `train bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainStepArgs {
    /// Which shapes (the subcommand's help lists them).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Batch size (default: the one the subcommand's help names).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed steps, after one untimed warm-up step; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, or bf16 autocast (tch; the peer runs under `torch.autocast` then).
    #[arg(long, value_enum, default_value_t)]
    pub precision: crate::fused::Precision,
    /// The device's peak TFLOP/s at this precision, for model FLOPs utilisation where the
    /// subcommand counts its model's FLOPs (`train bench`).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Writes a Chrome trace of the last timed step here (tch: libtorch's profiler, every op
    /// and GPU kernel; the peer writes PATH.torch.json with torch.profiler);
    /// `bench/trace_summary.py` sums the kernels by kind.
    #[arg(long, value_name = "PATH")]
    pub profile: Option<PathBuf>,
    /// Workers per device, each taking an equal share of the batch, as training runs (default:
    /// one per core on flex's CPU, else one).
    #[arg(long)]
    pub workers: Option<usize>,
    #[command(flatten)]
    pub peer: PeerArgs,
}

impl TrainStepArgs {
    /// The workers for a batch of `batch`.
    pub fn workers(&self, batch: usize) -> Result<Vec<Device>, crate::backend::DeviceError> {
        crate::backend::training_workers(&self.device, self.workers, batch)
    }
}

impl PeerArgs {
    /// The peer, on the device our side of the benchmark runs on.
    pub fn peer(&self, device: &str) -> Option<TorchPeer> {
        self.python
            .as_deref()
            .map(|python| TorchPeer::new(python, &self.peer_script, device))
    }
}

/// PyTorch's spelling of a `--device` value (of its first device, for a training list). A value
/// our side refuses never reaches the peer, so it falls back to the CPU.
fn torch_device(spec: &str) -> String {
    let first = spec.split(',').next().unwrap_or("cpu");
    match crate::backend::cuda_index(first) {
        Ok(Some(index)) => format!("cuda:{index}"),
        _ => "cpu".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::torch_device;

    #[test]
    fn the_peer_runs_on_our_device() {
        assert_eq!(torch_device("cpu"), "cpu");
        assert_eq!(torch_device("CUDA"), "cuda:0");
        assert_eq!(torch_device("gpu"), "cuda:0");
        assert_eq!(torch_device("cuda:1"), "cuda:1");
        assert_eq!(torch_device("cuda:1, cuda:0"), "cuda:1");
    }
}
