//! Data-parallel training across processes and machines on PyTorch's c10d: one process per
//! device, launched by torchrun, Slurm or a Kubernetes Indexed Job / JobSet.
//!
//! Each rank computes the micro-batches `index % world_size == rank` of every optimizer step
//! (a step's micro-batches are numbered globally, so the ranks together compute exactly what one
//! process would), sums their gradients, and all-reduces the sum in buckets; every rank then
//! takes the same optimizer step. Rank 0 alone writes checkpoints, artifacts and the manifest.
//! A checkpoint holds the global step and data position, so a job can resume with another
//! world size.
//!
//! The runtime is c10d's (`TCPStore` rendezvous; `ProcessGroupGloo` on CPU, `ProcessGroupNCCL`
//! on GPUs), reached through `csrc/c10d.cpp` in the `tch` build (NCCL through the library `make
//! nccl` builds from `csrc/nccl.cpp` on a machine with CUDA); the `flex` build trains in one
//! process and says so when a launcher asks for more.

use std::time::Duration;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use manifests::{Manifest, StageRun};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(feature = "tch")]
mod c10d;

/// `--distributed`: join the process group a launcher describes when it has several processes
/// (`auto`), ignore its variables and train in this process alone (`off`), or join a process
/// group even as a job of one (`on`: the collectives run as they would with more ranks, which
/// is how NCCL is checked on a machine with one GPU; without launcher variables, a group of one
/// at 127.0.0.1:`MASTER_PORT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DistributedMode {
    #[default]
    Auto,
    Off,
    On,
}

#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    #[error("launcher variable {variable}={value:?}: {why}")]
    Launch {
        variable: String,
        value: String,
        why: String,
    },
    #[error(
        "{launcher} launched {world_size} processes, but this build trains in one: build with \
         --features nn/tch (c10d comes with libtorch), or pass --distributed off"
    )]
    NeedsTch {
        launcher: &'static str,
        world_size: usize,
    },
    #[error("rank {rank}: joining the process group at {address}: {message}")]
    Join {
        rank: usize,
        address: String,
        message: String,
    },
    #[error("rank {rank}: lost {} during {operation} ({message})", describe_lost(.lost))]
    PeerLost {
        rank: usize,
        lost: Vec<usize>,
        operation: String,
        message: String,
    },
    #[error("rank {rank}: {operation} failed: {message}")]
    Collective {
        rank: usize,
        operation: String,
        message: String,
    },
}

fn describe_lost(lost: &[usize]) -> String {
    let ranks: Vec<String> = lost
        .iter()
        .map(|rank| {
            if *rank == 0 {
                "rank 0 (the rendezvous store's host)".to_string()
            } else {
                format!("rank {rank}")
            }
        })
        .collect();
    ranks.join(", ")
}

/// Where this process sits in a job, as its launcher's environment says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes of this machine: which GPU it takes.
    pub local_rank: usize,
    /// Rank 0's address, where the rendezvous store listens.
    pub master_addr: String,
    pub master_port: u16,
    /// Whose variables these were: torchrun, slurm or kubernetes.
    pub launcher: &'static str,
}

const DEFAULT_PORT: u16 = 29500;

/// The launch described by environment variables (`var` reads one), or `None` for a single
/// process. torchrun's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT` come first
/// (they also serve Kubernetes manifests that set them); then Slurm's `SLURM_PROCID`,
/// `SLURM_NTASKS`, `SLURM_LOCALID` with the first host of `SLURM_JOB_NODELIST` as master; then a
/// Kubernetes Indexed Job's `JOB_COMPLETION_INDEX` as the rank, with `WORLD_SIZE` and
/// `MASTER_ADDR` from the job's spec.
pub fn launch_from(
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<Launch>, DistributedError> {
    Ok(launch_described(var)?.filter(|launch| launch.world_size > 1))
}

/// [`launch_from`] for `--distributed on`: a job of one joins a group too, and without launcher
/// variables this process is that job, its store at 127.0.0.1:`MASTER_PORT`.
pub fn launch_from_forced(
    var: impl Fn(&str) -> Option<String>,
) -> Result<Launch, DistributedError> {
    if let Some(launch) = launch_described(&var)? {
        return Ok(launch);
    }
    Ok(Launch {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: LOOPBACK.into(),
        master_port: master_port(&var)?,
        launcher: "none",
    })
}

const LOOPBACK: &str = "127.0.0.1";

fn master_port(var: impl Fn(&str) -> Option<String>) -> Result<u16, DistributedError> {
    match var("MASTER_PORT") {
        None => Ok(DEFAULT_PORT),
        Some(value) => value
            .trim()
            .parse::<u16>()
            .map_err(|_| DistributedError::Launch {
                variable: "MASTER_PORT".into(),
                value,
                why: "not a TCP port".into(),
            }),
    }
}

/// The launch the variables describe, a job of one included.
fn launch_described(
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<Launch>, DistributedError> {
    let number = |name: &str| -> Result<Option<usize>, DistributedError> {
        let Some(value) = var(name) else {
            return Ok(None);
        };
        value
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| DistributedError::Launch {
                variable: name.into(),
                value: value.clone(),
                why: "not a whole number".into(),
            })
    };
    let (launcher, rank, world_size, local_rank_variable) =
        if let (Some(rank), Some(world_size)) = (number("RANK")?, number("WORLD_SIZE")?) {
            ("torchrun", rank, world_size, "LOCAL_RANK")
        } else if let (Some(rank), Some(world_size)) =
            (number("SLURM_PROCID")?, number("SLURM_NTASKS")?)
        {
            ("slurm", rank, world_size, "SLURM_LOCALID")
        } else if let Some(rank) = number("JOB_COMPLETION_INDEX")? {
            let world_size = number("WORLD_SIZE")?.ok_or_else(|| DistributedError::Launch {
                variable: "WORLD_SIZE".into(),
                value: String::new(),
                why: "an Indexed Job sets JOB_COMPLETION_INDEX; its spec must set WORLD_SIZE \
                      (its completions) too"
                    .into(),
            })?;
            ("kubernetes", rank, world_size, "LOCAL_RANK")
        } else {
            return Ok(None);
        };
    if world_size == 0 {
        return Err(DistributedError::Launch {
            variable: "WORLD_SIZE".into(),
            value: "0".into(),
            why: "a job has at least one process".into(),
        });
    }
    let master_addr = match var("MASTER_ADDR").filter(|address| !address.trim().is_empty()) {
        Some(address) => address,
        // A job of one is its own rendezvous.
        None if world_size == 1 => LOOPBACK.to_string(),
        // Slurm names the job's nodes; rank 0 runs on the first.
        None if launcher == "slurm" => {
            let list = var("SLURM_JOB_NODELIST")
                .or_else(|| var("SLURM_NODELIST"))
                .unwrap_or_default();
            first_slurm_host(&list).ok_or_else(|| DistributedError::Launch {
                variable: "SLURM_JOB_NODELIST".into(),
                value: list.clone(),
                why: "no host in it; set MASTER_ADDR".into(),
            })?
        }
        None => {
            return Err(DistributedError::Launch {
                variable: "MASTER_ADDR".into(),
                value: String::new(),
                why: format!("{launcher} runs need it (rank 0's address)"),
            });
        }
    };
    let launch = Launch {
        rank,
        world_size,
        local_rank: number(local_rank_variable)?.unwrap_or(0),
        master_addr,
        master_port: master_port(&var)?,
        launcher,
    };
    if launch.rank >= launch.world_size {
        return Err(DistributedError::Launch {
            variable: "RANK".into(),
            value: launch.rank.to_string(),
            why: format!("not below the world size {}", launch.world_size),
        });
    }
    Ok(Some(launch))
}

/// The job a launcher describes, unless `mode` is off (`None`: a lone process).
pub fn launched(mode: DistributedMode) -> Result<Option<Launch>, DistributedError> {
    let var = |name: &str| std::env::var(name).ok();
    match mode {
        DistributedMode::Off => Ok(None),
        DistributedMode::Auto => launch_from(var),
        DistributedMode::On => launch_from_forced(var).map(Some),
    }
}

/// The first host of a Slurm node list: `gpu[03-05,09],cpu1` -> `gpu03`.
pub fn first_slurm_host(list: &str) -> Option<String> {
    let list = list.trim();
    let first_end = {
        let mut depth = 0;
        list.char_indices()
            .find(|&(_, c)| {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ => {}
                }
                c == ',' && depth == 0
            })
            .map_or(list.len(), |(index, _)| index)
    };
    let first = &list[..first_end];
    let host = match first.split_once('[') {
        None => first.to_string(),
        Some((prefix, ranges)) => {
            let start = ranges
                .trim_end_matches(']')
                .split([',', '-'])
                .next()
                .unwrap_or_default();
            format!("{prefix}{start}")
        }
    };
    (!host.is_empty()).then_some(host)
}

/// This process's place in a training job: its rank among `world_size` processes, and the
/// c10d process group joining them (none for a job of one).
pub struct Group {
    rank: usize,
    world_size: usize,
    device: String,
    #[cfg(feature = "tch")]
    c10d: Option<c10d::ProcessGroup>,
}

impl Group {
    /// A job of one process on `device`.
    pub fn single(device: &str) -> Group {
        Group {
            rank: 0,
            world_size: 1,
            device: device.to_string(),
            #[cfg(feature = "tch")]
            c10d: None,
        }
    }

    /// Joins the job the environment describes (unless `mode` is off), waiting up to `timeout`
    /// for the others at the rendezvous and in every collective. `device` is the `--device`
    /// value; `cuda` becomes this rank's GPU, `cuda:LOCAL_RANK`.
    pub fn join(
        mode: DistributedMode,
        device: &str,
        timeout: Duration,
    ) -> Result<Group, DistributedError> {
        match launched(mode)? {
            None => Ok(Group::single(device)),
            Some(launch) => Group::join_launch(&launch, device, timeout),
        }
    }

    #[cfg(feature = "tch")]
    fn join_launch(
        launch: &Launch,
        device: &str,
        timeout: Duration,
    ) -> Result<Group, DistributedError> {
        let spec = device.trim().to_ascii_lowercase();
        let device = if spec == "cuda" || spec == "gpu" {
            format!("cuda:{}", launch.local_rank)
        } else {
            device.to_string()
        };
        tracing::info!(
            "rank {} of {} ({}), rendezvous at {}:{}, device {device}",
            launch.rank,
            launch.world_size,
            launch.launcher,
            launch.master_addr,
            launch.master_port
        );
        let address = format!("{}:{}", launch.master_addr, launch.master_port);
        let unusable = |e: crate::backend::DeviceError| DistributedError::Join {
            rank: launch.rank,
            address: address.clone(),
            message: e.to_string(),
        };
        // The device is checked before the rendezvous: a missing GPU is this rank's error, not
        // a peer's hang.
        crate::backend::device(&device).map_err(unusable)?;
        let cuda = crate::backend::cuda_index(&device).map_err(unusable)?;
        let c10d = c10d::ProcessGroup::join(launch, timeout, cuda)?;
        Ok(Group {
            rank: launch.rank,
            world_size: launch.world_size,
            device,
            c10d: Some(c10d),
        })
    }

    #[cfg(not(feature = "tch"))]
    fn join_launch(
        launch: &Launch,
        _device: &str,
        _timeout: Duration,
    ) -> Result<Group, DistributedError> {
        Err(DistributedError::NeedsTch {
            launcher: launch.launcher,
            world_size: launch.world_size,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank 0: the one process that writes.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// This rank's `--device`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Whether micro-batch `index` of a step is this rank's to compute.
    pub fn owns(&self, index: usize) -> bool {
        index % self.world_size == self.rank
    }

    /// The sum over all ranks of each rank's `grads` of `model`'s parameters, in buckets. A
    /// parameter some rank has no gradient for (none of its micro-batches reached it) counts
    /// as zero there; one no rank has a gradient for stays without one, as in one process.
    pub fn all_reduce_gradients<M: Module>(
        &self,
        model: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams, DistributedError> {
        #[cfg(feature = "tch")]
        if let Some(c10d) = &self.c10d {
            return c10d::reduce_gradients(c10d, model, grads);
        }
        let _ = model;
        Ok(grads)
    }

    /// An error naming the first rank whose `value` differs from this rank's: ranks that
    /// resumed from different steps (one could not see the checkpoint the leader wrote, on
    /// storage that is not shared) would sum gradients of different models without a word.
    pub fn agree(&self, what: &str, value: u64) -> Result<(), DistributedError> {
        if self.world_size == 1 {
            return Ok(());
        }
        let values: Vec<u64> = self.gather_in_order(vec![(self.rank, value)])?;
        match values
            .iter()
            .enumerate()
            .find(|&(_, &other)| other != value)
        {
            None => Ok(()),
            Some((rank, other)) => Err(self.failed(
                "agreement",
                format!(
                    "rank {rank} has {what} {other}, rank {} has {value} (do all ranks read the \
                     same output folder, on shared storage?)",
                    self.rank
                ),
            )),
        }
    }

    /// Every rank's `(index, item)` pairs, from all ranks, in index order (each rank's
    /// micro-batch reports, say, put back in the order one process would have them).
    pub fn gather_in_order<T: Serialize + DeserializeOwned>(
        &self,
        local: Vec<(usize, T)>,
    ) -> Result<Vec<T>, DistributedError> {
        #[cfg(feature = "tch")]
        if let Some(c10d) = &self.c10d {
            // CBOR, not JSON: floats must come back bit for bit.
            let mut bytes = Vec::new();
            ciborium::into_writer(&local, &mut bytes).map_err(|e| self.failed("gather", e))?;
            let mut all: Vec<(usize, T)> = Vec::new();
            for rank_bytes in c10d.all_gather_bytes(&bytes)? {
                let part: Vec<(usize, T)> = ciborium::from_reader(rank_bytes.as_slice())
                    .map_err(|e| self.failed("gather", e))?;
                all.extend(part);
            }
            all.sort_by_key(|(index, _)| *index);
            return Ok(all.into_iter().map(|(_, item)| item).collect());
        }
        let mut local = local;
        local.sort_by_key(|(index, _)| *index);
        Ok(local.into_iter().map(|(_, item)| item).collect())
    }

    /// The whole batch from each rank's `rows` (`[rows it owns, columns]`, row counts may
    /// differ), in batch order: the others' as constants on `device`, ours with their graph, so
    /// a loss over the whole batch sends gradients into this rank's rows only (open_clip's
    /// gather of embeddings).
    pub fn whole_batch(
        &self,
        rows: Tensor<2>,
        device: &Device,
    ) -> Result<Tensor<2>, DistributedError> {
        if self.world_size == 1 {
            return Ok(rows);
        }
        let [count, columns] = rows.dims();
        let values = rows
            .clone()
            .detach()
            .into_data_as::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| self.failed("gather of rows", format!("{e:?}")))?;
        let gathered: Vec<(usize, Vec<f32>)> =
            self.gather_in_order(vec![(self.rank, (count, values))])?;
        // A peer with another config (another width) or another batch would otherwise panic
        // here or index past the batch below: an error naming it instead. Rank r owns batch
        // rows r, r + world, ..., so the counts are those of one batch dealt in turn.
        let total: usize = gathered.iter().map(|(count, _)| count).sum();
        for (rank, (count, values)) in gathered.iter().enumerate() {
            let dealt = total.saturating_sub(rank).div_ceil(self.world_size);
            if values.len() != count * columns || *count != dealt {
                return Err(self.failed(
                    "gather of rows",
                    format!(
                        "rank {rank} sent {} values in {count} rows where this rank expected \
                         {dealt} rows of {columns} (do all ranks run the same config?)",
                        values.len()
                    ),
                ));
            }
        }
        let blocks: Vec<Tensor<2>> = gathered
            .into_iter()
            .enumerate()
            .map(|(rank, (count, values))| {
                if rank == self.rank {
                    rows.clone()
                } else {
                    Tensor::from_data(TensorData::new(values, [count, columns]), device)
                }
            })
            .collect();
        // Rank r's j-th row is batch row r + j * world_size.
        let mut starts = Vec::with_capacity(blocks.len());
        let mut batch = 0;
        for block in &blocks {
            starts.push(batch);
            batch += block.dims()[0];
        }
        let order: Vec<i64> = (0..batch)
            .map(|row| (starts[row % self.world_size] + row / self.world_size) as i64)
            .collect();
        let order = Tensor::<1, burn::tensor::Int>::from_data(order.as_slice(), device);
        Ok(Tensor::cat(blocks, 0).select(0, order))
    }

    /// Rank 0's `value` on every rank (a decision only the leader may take, such as whether
    /// the stage is already up to date).
    pub fn leader_decides(&self, value: bool) -> Result<bool, DistributedError> {
        #[cfg(feature = "tch")]
        if let Some(c10d) = &self.c10d {
            return c10d.broadcast_flag(value);
        }
        Ok(value)
    }

    /// [`StageRun::begin`] for a job: rank 0 decides whether the stage is up to date (and
    /// withdraws a stale manifest); when it is, every rank returns the finished manifest.
    pub fn begin(&self, run: &StageRun, force: bool) -> Result<Option<Manifest>, crate::Error> {
        let existing = if self.is_leader() {
            run.begin(force)?
        } else {
            None
        };
        if !self.leader_decides(existing.is_some())? {
            return Ok(None);
        }
        match existing {
            Some(manifest) => Ok(Some(manifest)),
            None => Ok(Some(Manifest::read(&run.manifest_location())?.0)),
        }
    }

    /// The end of a follower's run: waits for rank 0 to publish, then reads its manifest.
    pub fn leader_published(&self, run: &StageRun) -> Result<Manifest, crate::Error> {
        self.barrier()?;
        Ok(Manifest::read(&run.manifest_location())?.0)
    }

    /// Waits until every rank is here.
    pub fn barrier(&self) -> Result<(), DistributedError> {
        #[cfg(feature = "tch")]
        if let Some(c10d) = &self.c10d {
            return c10d.barrier();
        }
        Ok(())
    }

    #[cfg_attr(not(feature = "tch"), allow(dead_code))]
    fn failed(&self, operation: &str, error: impl std::fmt::Display) -> DistributedError {
        DistributedError::Collective {
            rank: self.rank,
            operation: operation.into(),
            message: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        }
    }

    #[test]
    fn torchrun_variables_describe_the_launch() {
        let launch = launch_from(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29511"),
        ]));
        assert_eq!(
            launch.ok().flatten(),
            Some(Launch {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                master_addr: "node0".into(),
                master_port: 29511,
                launcher: "torchrun",
            })
        );
    }

    #[test]
    fn slurm_variables_take_the_first_node_as_master() {
        let launch = launch_from(env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[003-006,009],login1"),
        ]))
        .ok()
        .flatten();
        let launch = launch.unwrap_or_else(|| panic!("no launch from Slurm's variables"));
        assert_eq!(
            (launch.rank, launch.world_size, launch.local_rank),
            (5, 16, 1)
        );
        assert_eq!(launch.master_addr, "gpu003");
        assert_eq!(launch.master_port, DEFAULT_PORT);
        assert_eq!(first_slurm_host("a1,b2").as_deref(), Some("a1"));
        assert_eq!(first_slurm_host(""), None);
    }

    #[test]
    fn an_indexed_job_needs_its_world_size_and_master() {
        let launch = launch_from(env(&[
            ("JOB_COMPLETION_INDEX", "2"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "train-0.train"),
        ]))
        .ok()
        .flatten();
        assert_eq!(
            launch.map(|l| (l.rank, l.launcher)),
            Some((2, "kubernetes"))
        );
        let missing = launch_from(env(&[("JOB_COMPLETION_INDEX", "2"), ("MASTER_ADDR", "m")]));
        let message = missing.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("WORLD_SIZE"), "{message}");
    }

    #[test]
    fn one_process_or_bad_variables() {
        assert_eq!(launch_from(env(&[])).ok().flatten(), None);
        let one = launch_from(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]));
        assert_eq!(one.ok().flatten(), None);
        for (pairs, named) in [
            (
                &[("RANK", "x"), ("WORLD_SIZE", "2")][..],
                "RANK=\"x\": not a whole number",
            ),
            (
                &[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")][..],
                "RANK",
            ),
            (&[("RANK", "0"), ("WORLD_SIZE", "2")][..], "MASTER_ADDR"),
            (
                &[
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "http"),
                ][..],
                "MASTER_PORT",
            ),
        ] {
            let message = launch_from(env(pairs))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(message.contains(named), "{pairs:?}: {message}");
        }
    }

    #[test]
    fn distributed_on_joins_a_group_of_one() {
        let alone = launch_from_forced(env(&[("MASTER_PORT", "29600")])).ok();
        assert_eq!(
            alone,
            Some(Launch {
                rank: 0,
                world_size: 1,
                local_rank: 0,
                master_addr: "127.0.0.1".into(),
                master_port: 29600,
                launcher: "none",
            })
        );
        // torchrun --nproc-per-node 1: a group of one under `on`, none under `auto`.
        let one = [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")];
        let forced = launch_from_forced(env(&one)).ok();
        assert_eq!(
            forced.map(|l| (l.world_size, l.launcher)),
            Some((1, "torchrun"))
        );
        assert_eq!(launch_from(env(&one)).ok().flatten(), None);
        let none = launch_from_forced(env(&[("RANK", "0"), ("WORLD_SIZE", "0")]));
        let message = none.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("WORLD_SIZE"), "{message}");
    }

    #[test]
    fn a_single_group_owns_every_micro_batch_and_reduces_nothing() {
        let group = Group::single("cpu");
        assert!((0..5).all(|index| group.owns(index)));
        assert!(group.is_leader());
        let gathered = group.gather_in_order(vec![(1, "b".to_string()), (0, "a".to_string())]);
        assert_eq!(gathered.ok(), Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(group.leader_decides(true).ok(), Some(true));
    }
}
