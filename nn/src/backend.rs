//! The backend, chosen once by cargo feature: `flex` (Burn's pure-Rust CPU backend, default)
//! or `tch` (libtorch, CPU and CUDA). With both enabled, `tch` wins: asking for it is deliberate.

use burn::tensor::Device;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device '{0}': use cpu, cuda or cuda:N")]
    Unknown(String),
    #[error("device '{0}' needs the libtorch backend: build with --features tch")]
    NeedsTch(String),
    #[error(
        "device '{spec}': libtorch sees {visible} CUDA device(s); a CUDA build of libtorch \
         (LIBTORCH, see the README) and a visible GPU are needed"
    )]
    NoCuda { spec: String, visible: usize },
    #[error(
        "device '{0}': training on several GPUs runs one process per GPU: launch with \
         `torchrun --nproc-per-node N --no-python ...` and `--device cuda` (README, \
         \"Training across processes and machines\")"
    )]
    OneProcessPerGpu(String),
}

/// The backend this build uses.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "tch") { "tch" } else { "flex" }
}

/// A device for inference from a `--device` value: `cpu`, `cuda` or `cuda:N`.
pub fn device(spec: &str) -> Result<Device, DeviceError> {
    match cuda_index(spec)? {
        None => Ok(cpu_device()),
        Some(index) => cuda_device(index, &spec.trim().to_ascii_lowercase()),
    }
}

/// The GPU a `--device` value names (`None`: the CPU), without asking whether it exists.
pub fn cuda_index(spec: &str) -> Result<Option<usize>, DeviceError> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(None),
        "cuda" | "gpu" => Ok(Some(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Ok(Some(index)),
            _ => Err(DeviceError::Unknown(spec)),
        },
    }
}

/// The same device with gradients recorded, for training.
pub fn training_device(spec: &str) -> Result<Device, DeviceError> {
    Ok(device(spec)?.autodiff())
}

/// Training devices from a comma-separated list (`cpu,cpu`: threads sharing one machine's
/// cores); the first holds the model between steps. Several GPUs are several processes
/// (the `distributed` module), never a list.
pub fn training_devices(spec: &str) -> Result<Vec<Device>, DeviceError> {
    if spec.contains(',')
        && spec
            .split(',')
            .any(|one| cuda_index(one).ok().flatten().is_some())
    {
        return Err(DeviceError::OneProcessPerGpu(spec.to_string()));
    }
    spec.split(',')
        .map(|one| training_device(one.trim()))
        .collect()
}

/// The workers that share a training step's `micro_batches`: each device of `spec`,
/// `per_device` times. Left unset, a lone `cpu` on `flex` gets one worker per core (at most one
/// per micro-batch): flex runs most kernels of the tiny presets' sizes on one thread, so a
/// replica per core is what puts the other cores to work, and libtorch, which threads its own
/// kernels, and GPUs get one each. The worker count changes speed only, never the result.
pub fn training_workers(
    spec: &str,
    per_device: Option<usize>,
    micro_batches: usize,
) -> Result<Vec<Device>, DeviceError> {
    let devices = training_devices(spec)?;
    let per_device = per_device.unwrap_or_else(|| {
        let lone_cpu = devices.len() == 1 && spec.trim().eq_ignore_ascii_case("cpu");
        if lone_cpu && !cfg!(feature = "tch") {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            cores.min(micro_batches)
        } else {
            1
        }
    });
    let workers: Vec<Device> = devices
        .iter()
        .flat_map(|device| std::iter::repeat_n(device.clone(), per_device.max(1)))
        .collect();
    tracing::info!(
        "{} worker(s) share each step's {micro_batches} micro-batch(es)",
        workers.len()
    );
    Ok(workers)
}

// burn-tch is deprecated upstream in favour of CubeCL backends, yet it is the backend the user
// asked for and the fastest we measured on CPU; 0.22 is pinned so it stays.
#[cfg(feature = "tch")]
#[allow(deprecated)]
fn cpu_device() -> Device {
    Device::libtorch()
}

#[cfg(not(feature = "tch"))]
fn cpu_device() -> Device {
    Device::flex()
}

/// burn-tch panics on first use of a GPU libtorch does not have (a CPU libtorch has none), so
/// the count is checked up front.
#[cfg(feature = "tch")]
#[allow(deprecated)]
fn cuda_device(index: usize, spec: &str) -> Result<Device, DeviceError> {
    let visible = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    if index >= visible {
        return Err(DeviceError::NoCuda {
            spec: spec.to_string(),
            visible,
        });
    }
    Ok(Device::libtorch_cuda(index))
}

#[cfg(not(feature = "tch"))]
fn cuda_device(_index: usize, spec: &str) -> Result<Device, DeviceError> {
    Err(DeviceError::NeedsTch(spec.to_string()))
}

static RNG_OWNER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Seeds the device's random generator and holds it until the guard drops. Burn's generator is
/// process-wide, so two threads that seed and draw (parallel tests, a server beside a trainer)
/// would otherwise interleave their draws and neither would reproduce.
pub fn seed_exclusively(device: &Device, seed: u64) -> std::sync::MutexGuard<'static, ()> {
    let guard = RNG_OWNER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    guard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_without_a_visible_gpu_is_an_error_not_a_panic() {
        #[cfg(feature = "tch")]
        if tch::Cuda::device_count() > 0 {
            return;
        }
        for spec in ["cuda", "cuda:1", "gpu"] {
            let error = device(spec).err().map(|e| e.to_string());
            let message = error.unwrap_or_else(|| panic!("'{spec}' gave a device without a GPU"));
            assert!(message.contains(spec), "{message}");
        }
        assert!(matches!(device("tpu"), Err(DeviceError::Unknown(_))));
        let list = training_devices("cuda:0,cuda:1")
            .err()
            .map(|e| e.to_string());
        assert!(list.is_some_and(|m| m.contains("torchrun")));
    }
}
