#![allow(deprecated)] // burn-tch: see nn::backend for why it stays.
//! The c10d process group of the `tch` build: `csrc/c10d.cpp` behind a safe handle, and the
//! bucketed gradient all-reduce on the `tch::Tensor`s inside burn-tch's tensors (on the rank's
//! GPU with NCCL, where they already are).

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use burn::backend::LibTorch;
use burn::backend::libtorch::TchTensor;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use super::{DistributedError, Launch};
use crate::csrc::checked;

unsafe extern "C" {
    fn parti_c10d_join(
        host: *const c_char,
        port: u16,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        interface: *const c_char,
        cuda_device: c_int,
        nccl_library: *const c_char,
        out: *mut *mut c_void,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
    fn parti_c10d_free(group: *mut c_void);
    fn parti_c10d_all_reduce_sum(
        group: *mut c_void,
        tensor: *mut c_void,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
    fn parti_c10d_all_gather(
        group: *mut c_void,
        output: *mut c_void,
        input: *mut c_void,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
    fn parti_c10d_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
    fn parti_c10d_barrier(group: *mut c_void, error: *mut c_char, capacity: usize) -> c_int;
    fn parti_c10d_store_set(
        group: *mut c_void,
        key: *const c_char,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
    fn parti_c10d_store_check(
        group: *mut c_void,
        key: *const c_char,
        present: *mut c_int,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
}

/// How long survivors of a failed collective wait for each other to check in, to tell which
/// ranks are gone.
const ROLL_CALL: Duration = Duration::from_secs(3);

/// A joined c10d process group (TCPStore rendezvous + Gloo on CPU, NCCL on a GPU).
pub(super) struct ProcessGroup {
    handle: *mut c_void,
    rank: usize,
    world_size: usize,
    /// Where the group's own small tensors (flags, lengths, bytes) live: NCCL reduces only
    /// tensors on its GPU.
    device: tch::Device,
    /// Failed collectives so far: each roll call after one uses keys of its own.
    failures: AtomicUsize,
}

// c10d's process group and store are thread-safe C++ objects (PyTorch calls them from any
// thread); the handle is only ever freed by Drop.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Joins with Gloo, or with NCCL on GPU `cuda` (this rank's).
    pub(super) fn join(
        launch: &Launch,
        timeout: Duration,
        cuda: Option<usize>,
    ) -> Result<ProcessGroup, DistributedError> {
        let address = format!("{}:{}", launch.master_addr, launch.master_port);
        let join_error = |message: String| DistributedError::Join {
            rank: launch.rank,
            address: address.clone(),
            message,
        };
        let host = CString::new(launch.master_addr.as_str())
            .map_err(|_| join_error("MASTER_ADDR holds a NUL byte".into()))?;
        // Gloo's interface, as PyTorch reads it; unset: the address the host name resolves to.
        let interface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        let interface = CString::new(interface)
            .map_err(|_| join_error("GLOO_SOCKET_IFNAME holds a NUL byte".into()))?;
        let rank = c_int::try_from(launch.rank).map_err(|e| join_error(e.to_string()))?;
        let world = c_int::try_from(launch.world_size).map_err(|e| join_error(e.to_string()))?;
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let cuda_device = match cuda {
            None => -1,
            Some(index) => c_int::try_from(index).map_err(|e| join_error(e.to_string()))?,
        };
        let library = nccl_library();
        if cuda.is_some() {
            tracing::info!("NCCL from {}", library.display());
        }
        let library = CString::new(library.to_string_lossy().as_bytes())
            .map_err(|_| join_error("the NCCL library's path holds a NUL byte".into()))?;
        let mut handle = std::ptr::null_mut();
        checked(|error, capacity| unsafe {
            parti_c10d_join(
                host.as_ptr(),
                launch.master_port,
                rank,
                world,
                timeout_ms,
                interface.as_ptr(),
                cuda_device,
                library.as_ptr(),
                &mut handle,
                error,
                capacity,
            )
        })
        .map_err(join_error)?;
        Ok(ProcessGroup {
            handle,
            rank: launch.rank,
            world_size: launch.world_size,
            device: cuda.map_or(tch::Device::Cpu, tch::Device::Cuda),
            failures: AtomicUsize::new(0),
        })
    }

    /// A copy of `values` on the group's device.
    fn scratch<T: tch::kind::Element>(&self, values: &[T]) -> tch::Tensor {
        tch::Tensor::from_slice(values).to_device(self.device)
    }

    fn zeros(&self, shape: [i64; 2], kind: tch::Kind) -> tch::Tensor {
        tch::Tensor::zeros(shape, (kind, self.device))
    }

    pub(super) fn all_reduce_sum(
        &self,
        tensor: &mut tch::Tensor,
        operation: &str,
    ) -> Result<(), DistributedError> {
        let pointer = tensor.as_mut_ptr().cast();
        self.collective(operation, |error, capacity| unsafe {
            parti_c10d_all_reduce_sum(self.handle, pointer, error, capacity)
        })
    }

    /// Every rank's `bytes`, by rank.
    pub(super) fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, DistributedError> {
        let world = self.world_size as i64;
        let mut length = self.scratch(&[bytes.len() as i64]);
        let mut lengths = self.zeros([world, 1], tch::Kind::Int64);
        self.all_gather(&mut lengths, &mut length, "gather of lengths")?;
        let lengths: Vec<i64> = Vec::<i64>::try_from(&on_cpu(&lengths))
            .map_err(|e| self.failed("gather of lengths", e))?;
        let longest = lengths.iter().copied().max().unwrap_or(0).max(1);
        let mut padded = bytes.to_vec();
        padded.resize(longest as usize, 0);
        let mut mine = self.scratch(&padded);
        let mut all = self.zeros([world, longest], tch::Kind::Uint8);
        self.all_gather(&mut all, &mut mine, "gather")?;
        let all: Vec<u8> =
            Vec::<u8>::try_from(&on_cpu(&all)).map_err(|e| self.failed("gather", e))?;
        Ok(all
            .chunks(longest as usize)
            .zip(lengths)
            .map(|(row, length)| row[..length.max(0) as usize].to_vec())
            .collect())
    }

    fn all_gather(
        &self,
        output: &mut tch::Tensor,
        input: &mut tch::Tensor,
        operation: &str,
    ) -> Result<(), DistributedError> {
        let (output, input) = (output.as_mut_ptr().cast(), input.as_mut_ptr().cast());
        self.collective(operation, |error, capacity| unsafe {
            parti_c10d_all_gather(self.handle, output, input, error, capacity)
        })
    }

    pub(super) fn broadcast_flag(&self, value: bool) -> Result<bool, DistributedError> {
        let mut flag = self.scratch(&[i64::from(value)]);
        let pointer = flag.as_mut_ptr().cast();
        self.collective("broadcast", |error, capacity| unsafe {
            parti_c10d_broadcast(self.handle, pointer, 0, error, capacity)
        })?;
        Ok(on_cpu(&flag).int64_value(&[0]) != 0)
    }

    pub(super) fn barrier(&self) -> Result<(), DistributedError> {
        self.collective("barrier", |error, capacity| unsafe {
            parti_c10d_barrier(self.handle, error, capacity)
        })
    }

    fn failed(&self, operation: &str, error: impl std::fmt::Display) -> DistributedError {
        DistributedError::Collective {
            rank: self.rank,
            operation: operation.into(),
            message: error.to_string(),
        }
    }

    /// Runs one collective; on failure, finds out which ranks are gone.
    fn collective(
        &self,
        operation: &str,
        body: impl FnOnce(*mut c_char, usize) -> c_int,
    ) -> Result<(), DistributedError> {
        checked(body).map_err(|message| self.diagnose(operation, message))
    }

    /// After a failed collective: every survivor checks in at the rendezvous store and waits
    /// [`ROLL_CALL`] for the others; the ranks that never check in are the lost ones. When the
    /// store itself is unreachable, rank 0 (its host) is gone.
    fn diagnose(&self, operation: &str, message: String) -> DistributedError {
        let round = self.failures.fetch_add(1, Ordering::SeqCst);
        let key = |rank: usize| format!("parti/roll-call/{round}/{rank}");
        let lost = |lost: Vec<usize>| DistributedError::PeerLost {
            rank: self.rank,
            lost,
            operation: operation.into(),
            message: message.clone(),
        };
        let Ok(mine) = CString::new(key(self.rank)) else {
            return self.failed(operation, &message);
        };
        let here = checked(|error, capacity| unsafe {
            parti_c10d_store_set(self.handle, mine.as_ptr(), error, capacity)
        });
        if here.is_err() {
            return lost(vec![0]);
        }
        let deadline = Instant::now() + ROLL_CALL;
        loop {
            let mut missing = Vec::new();
            for rank in (0..self.world_size).filter(|&rank| rank != self.rank) {
                let Ok(theirs) = CString::new(key(rank)) else {
                    continue;
                };
                let mut present: c_int = 0;
                let checked_in = checked(|error, capacity| unsafe {
                    parti_c10d_store_check(
                        self.handle,
                        theirs.as_ptr(),
                        &mut present,
                        error,
                        capacity,
                    )
                });
                if checked_in.is_err() {
                    return lost(vec![0]);
                }
                if present == 0 {
                    missing.push(rank);
                }
            }
            if missing.is_empty() {
                return self.failed(operation, &message);
            }
            if Instant::now() >= deadline {
                return lost(missing);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A tensor's values on the CPU, flat, for reading into a `Vec`.
fn on_cpu(tensor: &tch::Tensor) -> tch::Tensor {
    tensor.flatten(0, -1).to_device(tch::Device::Cpu)
}

/// The NCCL library (`make nccl`): `PARTI_NCCL_LIBRARY`, else `libparti_nccl.so` beside this
/// binary.
fn nccl_library() -> std::path::PathBuf {
    const NAME: &str = "libparti_nccl.so";
    if let Some(path) = std::env::var_os("PARTI_NCCL_LIBRARY") {
        return path.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|folder| folder.join(NAME)))
        .unwrap_or_else(|| NAME.into())
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // After a failure c10d's worker threads may still wait on a lost peer, and its
        // destructor would join them; the process is about to exit with the error anyway.
        if self.failures.load(Ordering::SeqCst) == 0 {
            unsafe { parti_c10d_free(self.handle) };
        }
    }
}

/// Gradient elements per all-reduce: PyTorch DDP's default bucket (25 MB of f32).
const BUCKET_ELEMENTS: i64 = 25 * 1024 * 1024 / 4;

/// The parameters of a module in field order (the same on every rank), with each one's
/// gradient taken out of `grads` as a flat libtorch tensor.
struct TakeGradients<'a> {
    grads: &'a mut GradientsParams,
    taken: Vec<(ParamId, Vec<i64>, Option<tch::Tensor>)>,
    error: Option<String>,
}

impl ModuleVisitor for TakeGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let dims = param.val().dims().iter().map(|&d| d as i64).collect();
        let grad = match self.grads.remove::<D>(param.id) {
            None => None,
            Some(grad) => match grad.try_into_primitive::<LibTorch>() {
                Ok(grad) => Some(grad.tensor.flatten(0, -1)),
                Err(e) => {
                    self.error.get_or_insert(format!("{e:?}"));
                    None
                }
            },
        };
        self.taken.push((param.id, dims, grad));
    }
}

/// Puts reduced gradients back, each with its parameter's rank.
struct PutGradients<'a> {
    grads: &'a mut GradientsParams,
    reduced: HashMap<ParamId, tch::Tensor>,
}

impl ModuleVisitor for PutGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(reduced) = self.reduced.remove(&param.id) {
            let tensor = Tensor::<D>::from_primitive::<LibTorch>(TchTensor::new(reduced));
            self.grads.register::<D>(param.id, tensor);
        }
    }
}

pub(super) fn reduce_gradients<M: Module>(
    c10d: &ProcessGroup,
    model: &M,
    mut grads: GradientsParams,
) -> Result<GradientsParams, DistributedError> {
    const OPERATION: &str = "gradient all-reduce";
    let mut take = TakeGradients {
        grads: &mut grads,
        taken: Vec::new(),
        error: None,
    };
    model.visit(&mut take);
    let TakeGradients { taken, error, .. } = take;
    if let Some(error) = error {
        return Err(c10d.failed(OPERATION, format!("a gradient not on libtorch: {error}")));
    }
    let options = taken
        .iter()
        .find_map(|(_, _, grad)| grad.as_ref().map(|grad| (grad.kind(), grad.device())))
        .unwrap_or((tch::Kind::Float, c10d.device));
    // Which parameters have a gradient anywhere: a rank's micro-batches may miss a parameter
    // (the unconditional embedding when none of its rows was dropped) that another reaches.
    let held: Vec<f32> = taken
        .iter()
        .map(|(_, _, grad)| if grad.is_some() { 1.0 } else { 0.0 })
        .collect();
    let mut held = c10d.scratch(&held);
    c10d.all_reduce_sum(&mut held, OPERATION)?;
    let held = Vec::<f32>::try_from(&on_cpu(&held)).map_err(|e| c10d.failed(OPERATION, e))?;

    let mut reduced = HashMap::new();
    let mut bucket: Vec<(ParamId, Vec<i64>, tch::Tensor)> = Vec::new();
    let mut flush = |bucket: &mut Vec<(ParamId, Vec<i64>, tch::Tensor)>| {
        if bucket.is_empty() {
            return Ok(());
        }
        let parts: Vec<&tch::Tensor> = bucket.iter().map(|(_, _, grad)| grad).collect();
        let mut flat = tch::Tensor::cat(&parts, 0);
        c10d.all_reduce_sum(&mut flat, OPERATION)?;
        let sizes: Vec<i64> = bucket
            .iter()
            .map(|(_, _, grad)| grad.numel() as i64)
            .collect();
        for ((id, dims, _), piece) in bucket.drain(..).zip(flat.split_with_sizes(&sizes, 0)) {
            reduced.insert(id, piece.view(dims.as_slice()));
        }
        Ok::<(), DistributedError>(())
    };
    let mut elements = 0;
    for ((id, dims, grad), held) in taken.into_iter().zip(held) {
        if held == 0.0 {
            continue;
        }
        let grad =
            grad.unwrap_or_else(|| tch::Tensor::zeros([dims.iter().product::<i64>()], options));
        elements += grad.numel() as i64;
        bucket.push((id, dims, grad));
        if elements >= BUCKET_ELEMENTS {
            flush(&mut bucket)?;
            elements = 0;
        }
    }
    flush(&mut bucket)?;
    model.visit(&mut PutGradients {
        grads: &mut grads,
        reduced,
    });
    Ok(grads)
}
