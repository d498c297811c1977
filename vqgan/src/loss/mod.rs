//! ViT-VQGAN's training objective: pixel terms (L2, L1, logit-Laplace), the perceptual term on
//! VGG-16 features ([`perceptual`]) and the adversarial term against a StyleGAN-style
//! discriminator ([`discriminator`]), each with its own weight; the codebook terms come from
//! the quantiser.

pub mod discriminator;
pub mod perceptual;

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::{relu, softplus};
use serde::{Deserialize, Serialize};

pub use discriminator::{Discriminator, DiscriminatorConfig};
pub use perceptual::Vgg16Features;

use crate::Error;

/// Which GAN objective the discriminator and the generator play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdversarialLoss {
    /// StyleGAN's logistic loss with the generator's non-saturating form.
    NonSaturating,
    /// Hinge loss (as in taming-transformers' VQGAN).
    Hinge,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Mean squared pixel error.
    pub l2_weight: f64,
    /// Mean absolute pixel error (0: off). Sharper edges than L2 alone.
    pub l1_weight: f64,
    /// Laplace likelihood of the pixels in logit space (DALL-E, ViT-VQGAN); needs the output
    /// sigmoid, so Parti's fine-tuned decoder (raw RGB) drops it.
    pub logit_laplace_weight: f64,
    /// VGG-16 feature distance; on only when a VGG-16 safetensors file is given.
    pub perceptual_weight: f64,
    /// Generator's adversarial term (0: no discriminator at all).
    pub adversarial_weight: f64,
    /// Step from which the discriminator trains and the adversarial term counts; before it the
    /// reconstructions are too poor for a critic to teach anything.
    pub adversarial_start: usize,
    pub adversarial_loss: AdversarialLoss,
    /// Discriminator width at full resolution, doubled per halving up to the maximum.
    pub discriminator_channels: usize,
    pub discriminator_max_channels: usize,
}

impl LossConfig {
    /// ViT-VQGAN's weights: L2 1.0, logit-Laplace 0.1, perceptual 0.1, adversarial 0.1.
    pub fn paper() -> LossConfig {
        LossConfig {
            l2_weight: 1.0,
            l1_weight: 0.0,
            logit_laplace_weight: 0.1,
            perceptual_weight: 0.1,
            adversarial_weight: 0.1,
            adversarial_start: 100_000,
            adversarial_loss: AdversarialLoss::NonSaturating,
            discriminator_channels: 128,
            discriminator_max_channels: 512,
        }
    }

    pub fn adversarial_at(&self, step: usize) -> bool {
        self.adversarial_weight > 0.0 && step >= self.adversarial_start
    }

    /// The discriminator for `image_size`, when the adversarial term is on.
    pub fn discriminator(&self, image_size: usize) -> Option<DiscriminatorConfig> {
        (self.adversarial_weight > 0.0).then(|| {
            DiscriminatorConfig::new(
                image_size,
                self.discriminator_channels,
                self.discriminator_max_channels,
            )
        })
    }

    /// Refuses settings that cannot work together.
    pub fn check(&self, output_sigmoid: bool) -> Result<(), Error> {
        if self.logit_laplace_weight > 0.0 && !output_sigmoid {
            return Err(Error::Usage(
                "loss.logit_laplace_weight needs the output sigmoid (set it to 0 for a raw-RGB decoder)"
                    .into(),
            ));
        }
        let weights = [
            self.l2_weight,
            self.l1_weight,
            self.logit_laplace_weight,
            self.perceptual_weight,
            self.adversarial_weight,
        ];
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(Error::Usage(format!(
                "loss weights must be finite and >= 0: {weights:?}"
            )));
        }
        Ok(())
    }
}

/// Pixels are clamped this far inside (0, 1) before the logit, so black and white stay finite.
const LOGIT_EPSILON: f64 = 1.0 / 512.0;

/// Negative log-likelihood (nats per value, unit scale) of `target` in [0, 1] under a Laplace
/// distribution in logit space centred on the decoder's pre-sigmoid output `logits`.
pub fn logit_laplace(logits: Tensor<4>, target: Tensor<4>) -> Tensor<1> {
    let x = target.clamp(LOGIT_EPSILON, 1.0 - LOGIT_EPSILON);
    let one_minus = x.clone().neg().add_scalar(1.0);
    let target_logit = (x.clone() / one_minus.clone()).log();
    // -log p = |logit(x) - mu| / b + log(2 b x (1 - x)), b = 1.
    ((target_logit - logits).abs() + (x * one_minus).mul_scalar(2.0).log()).mean()
}

/// The discriminator's loss on real and generated logits.
pub fn discriminator_loss(kind: AdversarialLoss, real: Tensor<1>, fake: Tensor<1>) -> Tensor<1> {
    match kind {
        AdversarialLoss::NonSaturating => {
            softplus(real.neg(), 1.0).mean() + softplus(fake, 1.0).mean()
        }
        AdversarialLoss::Hinge => {
            relu(real.neg().add_scalar(1.0)).mean() + relu(fake.add_scalar(1.0)).mean()
        }
    }
}

/// The generator's adversarial loss on the logits of its own outputs.
pub fn generator_loss(kind: AdversarialLoss, fake: Tensor<1>) -> Tensor<1> {
    match kind {
        AdversarialLoss::NonSaturating => softplus(fake.neg(), 1.0).mean(),
        AdversarialLoss::Hinge => fake.neg().mean(),
    }
}

/// One step's generator loss, its parts (for the log) and the MSE (for PSNR).
pub struct GeneratorLoss {
    pub total: Tensor<1>,
    pub mse: Tensor<1>,
    pub terms: Vec<(&'static str, Tensor<1>)>,
}

impl GeneratorLoss {
    /// The terms as numbers, for a metrics line.
    pub fn numbers(&self) -> Vec<(&'static str, f64)> {
        self.terms
            .iter()
            .map(|(name, t)| (*name, t.clone().into_scalar::<f32>() as f64))
            .collect()
    }
}

/// The whole objective of one run: the weights, and VGG-16 when the perceptual term is on.
pub struct Objective {
    pub config: LossConfig,
    pub perceptual: Option<Vgg16Features>,
}

impl Objective {
    /// Every weighted term the decoder (and through it the encoder) trains on. `output` is the
    /// image, `logits` the decoder's output before the sigmoid; `critic` is the discriminator
    /// when the adversarial term counts at this step.
    pub fn generator(
        &self,
        output: Tensor<4>,
        logits: Tensor<4>,
        target: Tensor<4>,
        critic: Option<&Discriminator>,
    ) -> GeneratorLoss {
        let c = &self.config;
        let error = output.clone() - target.clone();
        let mse = error.clone().powi_scalar(2).mean();
        let mut terms = vec![("l2", mse.clone())];
        let mut total = mse.clone().mul_scalar(c.l2_weight);
        // Under bf16 autocast the networks' terms (perceptual, adversarial) come out bf16; each
        // joins the total in the pixel terms' f32, as PyTorch's sum would promote it.
        let dtype = total.dtype();
        let mut add = |name: &'static str, weight: f64, term: Tensor<1>| {
            let term = nn::fused::to_dtype(term, dtype);
            total = total.clone() + term.clone().mul_scalar(weight);
            terms.push((name, term));
        };
        if c.l1_weight > 0.0 {
            add("l1", c.l1_weight, error.abs().mean());
        }
        if c.logit_laplace_weight > 0.0 {
            add(
                "logit_laplace",
                c.logit_laplace_weight,
                logit_laplace(logits, target.clone()),
            );
        }
        if let (Some(vgg), true) = (&self.perceptual, c.perceptual_weight > 0.0) {
            add(
                "perceptual",
                c.perceptual_weight,
                vgg.distance(output.clone(), target),
            );
        }
        if let Some(critic) = critic {
            add(
                "adversarial",
                c.adversarial_weight,
                // The critic's logits (bf16 under autocast) into the loss in f32.
                generator_loss(
                    c.adversarial_loss,
                    nn::fused::to_dtype(critic.forward(output), dtype),
                ),
            );
        }
        GeneratorLoss { total, mse, terms }
    }

    /// The discriminator's loss on real images and (detached) reconstructions.
    pub fn discriminator(
        &self,
        critic: &Discriminator,
        real: Tensor<4>,
        fake: Tensor<4>,
    ) -> Tensor<1> {
        discriminator_loss(
            self.config.adversarial_loss,
            critic.forward(real),
            critic.forward(fake.detach()),
        )
    }
}

/// A trained module and, when the adversarial term is on, its discriminator: checkpointed
/// together (one record, one optimizer state), so a resumed GAN run is exact too.
#[derive(Module, Debug)]
pub struct WithCritic<M> {
    pub model: M,
    pub critic: Option<Discriminator>,
}

impl<M> WithCritic<M> {
    /// The discriminator when the adversarial term counts at `step`.
    pub fn critic_at(&self, loss: &LossConfig, step: usize) -> Option<&Discriminator> {
        self.critic.as_ref().filter(|_| loss.adversarial_at(step))
    }
}
