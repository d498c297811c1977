//! One optimizer step of the VQGAN stages: the generator's gradients over the micro-batches
//! (shared by the workers), the discriminator's update, and the step's loss as numbers for its
//! metrics line.

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::TensorData;
use burn::tensor::{Device, Int, Tensor};
use nn::distributed::Group;
use nn::fused::{Autocast, to_dtype};
use nn::training;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Error;
use crate::config::TrainConfig;
use crate::eval::psnr_db;
use crate::loss::{GeneratorLoss, Objective, WithCritic};

/// A step's loss as numbers, for its metrics line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LossNumbers {
    pub(crate) total: f64,
    pub(crate) mse: f64,
    /// The codebook terms (stage 1).
    codebook: Option<f64>,
    terms: Vec<(String, f64)>,
}

impl LossNumbers {
    fn of(loss: &GeneratorLoss, codebook: Option<&Tensor<1>>) -> LossNumbers {
        LossNumbers {
            total: loss.total.clone().into_scalar::<f32>() as f64,
            mse: loss.mse.clone().into_scalar::<f32>() as f64,
            codebook: codebook.map(|c| c.clone().into_scalar::<f32>() as f64),
            terms: loss
                .numbers()
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
        }
    }

    /// The mean over a step's micro-batches (of equal size but perhaps the last).
    fn mean(parts: &[&LossNumbers]) -> LossNumbers {
        let n = parts.len().max(1) as f64;
        let mean =
            |value: &dyn Fn(&LossNumbers) -> f64| parts.iter().map(|p| value(p)).sum::<f64>() / n;
        let first = parts.first().map(|p| (*p).clone()).unwrap_or_default();
        LossNumbers {
            total: mean(&|p| p.total),
            mse: mean(&|p| p.mse),
            codebook: first.codebook.map(|_| mean(&|p| p.codebook.unwrap_or(0.0))),
            terms: first
                .terms
                .iter()
                .enumerate()
                .map(|(i, (name, _))| {
                    let value = mean(&|p| p.terms.get(i).map_or(0.0, |t| t.1));
                    (name.clone(), value)
                })
                .collect(),
        }
    }
}

/// One metrics line: step, rate, every loss term, and what the caller adds.
pub(crate) fn step_line(
    step: usize,
    learning_rate: f64,
    loss: &LossNumbers,
    critic_loss: Option<f32>,
    extra: Value,
) -> Value {
    let mut line = json!({"step": step, "learning_rate": learning_rate,
        "loss": loss.total, "mse": loss.mse, "psnr_db": psnr_db(loss.mse)});
    if let (Value::Object(map), Value::Object(extra)) = (&mut line, extra) {
        map.extend(
            loss.terms
                .iter()
                .map(|(name, value)| (name.clone(), json!(value))),
        );
        if let Some(codebook) = loss.codebook {
            map.insert("vq_loss".into(), json!(codebook));
        }
        map.extend(extra);
        if let Some(d) = critic_loss {
            map.insert("discriminator".into(), json!(d));
        }
    }
    line
}

/// What a model makes of one micro-batch: its images, their logits and, in stage 1, the
/// codebook loss and the codes chosen.
pub(crate) struct Forward {
    pub(crate) images: Tensor<4>,
    pub(crate) logits: Tensor<4>,
    pub(crate) codebook: Option<(Tensor<1>, Tensor<2, Int>)>,
}

/// What one micro-batch hands back besides its gradients.
pub(crate) struct MicroBatch {
    /// Its loss as numbers, on a logged step.
    pub(crate) numbers: Option<LossNumbers>,
    /// The codes it chose (stage 1).
    pub(crate) indices: Option<Tensor<2, Int>>,
    /// Its reconstructions, detached, when the discriminator trains this step.
    pub(crate) images: Option<Tensor<4>>,
}

/// The model's gradients for the batch `x`, split into the config's micro-batches and shared
/// by the workers ([`training::micro_batch_gradients`]); `forward(replica, worker, images)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step_gradients<M>(
    trainee: &WithCritic<M>,
    workers: &[Device],
    group: &Group,
    objectives: &[Objective],
    config: &TrainConfig,
    step: usize,
    x: Tensor<4>,
    logged: bool,
    forward: &(impl Fn(&WithCritic<M>, usize, Tensor<4>) -> Forward + Sync),
) -> Result<(GradientsParams, Vec<MicroBatch>), Error>
where
    M: Module + Sync,
    WithCritic<M>: Module + Sync,
{
    let pieces = x.chunk(config.accumulation.max(1), 0);
    let parts = pieces.len() as f64;
    let (grads, micro) = training::micro_batch_gradients(
        trainee,
        workers,
        group,
        pieces.len(),
        |replica, worker, index| {
            // The backward pass too: Burn's composed backward ops (the convolutions') meet the
            // bf16 tensors autocast made and need it to cast their f32 operands the same way.
            let _autocast = Autocast::begin(config.precision, group.device())?;
            let x = pieces[index].clone().to_device(&workers[worker]);
            let out = forward(replica, worker, x.clone());
            // The losses take the model's outputs in the images' f32, as PyTorch's autocast runs
            // them (bf16 only under `precision = "bf16"`).
            let (images, logits) = (
                to_dtype(out.images, x.dtype()),
                to_dtype(out.logits, x.dtype()),
            );
            let critic = replica.critic_at(&config.loss, step);
            let mut loss = objectives[worker].generator(images.clone(), logits, x, critic);
            let (codebook_loss, indices) = out.codebook.unzip();
            if let Some(codebook_loss) = &codebook_loss {
                // The codebook terms belong to the total the log reports, as before the objective.
                loss.total = loss.total + codebook_loss.clone();
            }
            let grads = GradientsParams::from_grads(
                loss.total.clone().div_scalar(parts).backward(),
                &replica.model,
            );
            let micro = MicroBatch {
                numbers: logged.then(|| LossNumbers::of(&loss, codebook_loss.as_ref())),
                indices,
                images: critic.map(|_| images.detach()),
            };
            Ok::<_, Error>((grads, micro))
        },
    )?;
    if group.world_size() == 1 {
        return Ok((grads, micro.into_iter().map(|(_, micro)| micro).collect()));
    }
    // Every rank needs every micro-batch's codes (code usage and restarts) and reconstructions
    // (the discriminator's step), so all ranks update the same way.
    let mut portable = Vec::with_capacity(micro.len());
    for (index, micro) in micro {
        portable.push((index, PortableMicroBatch::of(micro)?));
    }
    let device = &workers[0];
    let micro = group
        .gather_in_order(portable)?
        .into_iter()
        .map(|micro| micro.on(device))
        .collect();
    Ok((grads, micro))
}

/// A [`MicroBatch`] as plain numbers, to send to the other ranks.
#[derive(Serialize, Deserialize)]
struct PortableMicroBatch {
    numbers: Option<LossNumbers>,
    indices: Option<(Vec<usize>, Vec<i64>)>,
    images: Option<(Vec<usize>, Vec<f32>)>,
}

impl PortableMicroBatch {
    fn of(micro: MicroBatch) -> Result<PortableMicroBatch, Error> {
        let unreadable = |e| Error::Data(format!("a micro-batch's tensor: {e:?}"));
        let indices = match micro.indices {
            None => None,
            Some(indices) => {
                let dims = indices.dims().to_vec();
                let values = indices.into_data_as::<i64>().try_into_vec::<i64>();
                Some((dims, values.map_err(unreadable)?))
            }
        };
        let images = match micro.images {
            None => None,
            Some(images) => {
                let dims = images.dims().to_vec();
                let values = images.into_data_as::<f32>().try_into_vec::<f32>();
                Some((dims, values.map_err(unreadable)?))
            }
        };
        Ok(PortableMicroBatch {
            numbers: micro.numbers,
            indices,
            images,
        })
    }

    fn on(self, device: &Device) -> MicroBatch {
        MicroBatch {
            numbers: self.numbers,
            indices: self
                .indices
                .map(|(dims, values)| Tensor::from_data(TensorData::new(values, dims), device)),
            images: self
                .images
                .map(|(dims, values)| Tensor::from_data(TensorData::new(values, dims), device)),
        }
    }
}

/// The discriminator's step on the batch `real` and the micro-batches' (detached)
/// reconstructions, when the adversarial term counts this step; returns its loss for the log.
#[allow(clippy::too_many_arguments)]
pub(crate) fn critic_update<M>(
    objective: &Objective,
    config: &TrainConfig,
    optimizer: &mut ModuleOptimizer,
    trainee: WithCritic<M>,
    real: Tensor<4>,
    micro: &[MicroBatch],
    learning_rate: f64,
    step: usize,
    device: &Device,
) -> (WithCritic<M>, Option<f32>)
where
    WithCritic<M>: Module,
{
    let fakes: Vec<Tensor<4>> = micro
        .iter()
        .filter_map(|m| m.images.clone())
        .map(|images| images.to_device(device))
        .collect();
    if fakes.is_empty() {
        return (trainee, None);
    }
    let Some(critic) = trainee.critic_at(&objective.config, step) else {
        return (trainee, None);
    };
    let loss = objective.discriminator(critic, real, Tensor::cat(fakes, 0));
    let grads = GradientsParams::from_grads(loss.backward(), critic);
    let grads = config.grad_clip.apply(config.grad_clip_norm, critic, grads);
    let trainee = optimizer.step(learning_rate, trainee, grads);
    (trainee, Some(loss.into_scalar::<f32>()))
}

pub(crate) fn mean_numbers(micro: &[MicroBatch]) -> LossNumbers {
    let parts: Vec<&LossNumbers> = micro.iter().filter_map(|m| m.numbers.as_ref()).collect();
    LossNumbers::mean(&parts)
}
