//! The ViT-VQGAN: patches -> ViT encoder -> factorised codes -> ViT decoder -> patches.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Int, Tensor};
use nn::fused::{self, gelu, layer_norm, linear};
use nn::{LearnedPositions, LearnedPositionsConfig, TransformerBlock, TransformerBlockConfig};
use serde::{Deserialize, Serialize};

pub mod quantize;

use quantize::{Quantized, Quantizer, QuantizerConfig};

pub use quantize::CodeUsage;

/// One ViT stack (the encoder or the decoder). Plain serde rather than a Burn `Config`, so a
/// field added later can default when an older run's config is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_mlp: usize,
    /// Residual 3x3 convolutions over the token grid ahead of the blocks (decoder only; the
    /// paper's ViT-VQGAN has none). They let each patch decode from its neighbours' codes: the
    /// tiny tokenizer's squares lose their corners without them (docs/tiny-eval.md).
    #[serde(default)]
    pub local_convs: usize,
}

impl VitConfig {
    pub fn new(d_model: usize, n_layers: usize, n_heads: usize, d_mlp: usize) -> Self {
        VitConfig {
            d_model,
            n_layers,
            n_heads,
            d_mlp,
            local_convs: 0,
        }
    }

    /// Trains in minutes on 2 CPU cores.
    pub fn tiny() -> Self {
        Self::new(128, 2, 4, 256)
    }
    /// The CI-sized stand-in for Parti's larger fine-tuned decoder: twice the tiny depth at
    /// its width, so it can start from the stage-1 decoder (`warm_start`).
    pub fn tiny_large() -> Self {
        Self::new(128, 4, 4, 256)
    }
    /// ViT-VQGAN Small: 8 blocks, 8 heads, 512, MLP 2048.
    pub fn small() -> Self {
        Self::new(512, 8, 8, 2048)
    }
    /// ViT-VQGAN Base: 12 blocks, 12 heads, 768, MLP 3072.
    pub fn base() -> Self {
        Self::new(768, 12, 12, 3072)
    }
    /// ViT-VQGAN Large (Parti's fine-tuned decoder): 32 blocks, 16 heads, 1280, MLP 5120.
    pub fn large() -> Self {
        Self::new(1280, 32, 16, 5120)
    }

    fn block(&self) -> TransformerBlockConfig {
        TransformerBlockConfig::new(self.d_model, self.n_heads, self.d_mlp)
    }

    /// Zero-initialised, so a new one starts as the identity: training begins from the plain
    /// ViT and a grown decoder begins exactly where the trained one was.
    fn local_conv(&self, device: &Device) -> Conv2d {
        Conv2dConfig::new([self.d_model, self.d_model], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .with_initializer(Initializer::Zeros)
            .init(device)
    }

    /// Parameters of the transformer stack, its local convolutions and its final norm.
    pub fn num_params(&self) -> usize {
        self.n_layers * self.block().num_params()
            + self.local_convs * (9 * self.d_model * self.d_model + self.d_model)
            + 2 * self.d_model
    }
}

#[derive(Config, Debug, PartialEq)]
pub struct VitVqganConfig {
    pub image_size: usize,
    #[config(default = 8)]
    pub patch_size: usize,
    pub encoder: VitConfig,
    pub decoder: VitConfig,
    pub quantizer: QuantizerConfig,
    /// Squash the output into [0, 1] with a sigmoid. Parti drops it when fine-tuning the
    /// decoder (raw [0, 1] RGB fixes pixelation).
    #[config(default = true)]
    pub output_sigmoid: bool,
}

impl VitVqganConfig {
    /// 64 px, patch 8 -> 8x8 tokens, codebook 512.
    pub fn tiny() -> Self {
        Self::new(
            64,
            VitConfig::tiny(),
            VitConfig::tiny(),
            QuantizerConfig::new(512),
        )
    }
    /// 256 px, patch 8 -> 32x32 = 1024 tokens, codebook 8192, Small encoder and decoder.
    pub fn small() -> Self {
        Self::new(
            256,
            VitConfig::small(),
            VitConfig::small(),
            QuantizerConfig::new(8192),
        )
    }
    pub fn base() -> Self {
        Self::new(
            256,
            VitConfig::base(),
            VitConfig::base(),
            QuantizerConfig::new(8192),
        )
    }

    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    fn patch_values(&self) -> usize {
        self.patch_size * self.patch_size * 3
    }

    pub fn encoder_params(&self) -> usize {
        let (d, c, tokens) = (
            self.encoder.d_model,
            self.quantizer.code_dim,
            self.grid().pow(2),
        );
        self.patch_values() * d + d + tokens * d + self.encoder.num_params() + d * c + c
    }

    pub fn decoder_params(&self) -> usize {
        let (d, c, tokens) = (
            self.decoder.d_model,
            self.quantizer.code_dim,
            self.grid().pow(2),
        );
        c * d
            + d
            + tokens * d
            + self.decoder.num_params()
            + d * self.patch_values()
            + self.patch_values()
    }

    /// Parameters, computed from the shapes alone (no memory needed for the Large decoder).
    pub fn num_params(&self) -> usize {
        self.encoder_params() + self.quantizer.num_params() + self.decoder_params()
    }

    pub fn init(&self, device: &Device) -> VitVqgan {
        assert!(
            self.image_size.is_multiple_of(self.patch_size),
            "image size must be a multiple of the patch size"
        );
        let tokens = self.grid() * self.grid();
        let stack = |vit: &VitConfig| -> Vec<TransformerBlock> {
            (0..vit.n_layers)
                .map(|_| vit.block().init(device))
                .collect()
        };
        VitVqgan {
            encoder: VitEncoder {
                patch_embedding: LinearConfig::new(self.patch_values(), self.encoder.d_model)
                    .init(device),
                positions: LearnedPositionsConfig::new(tokens, self.encoder.d_model).init(device),
                blocks: stack(&self.encoder),
                norm: LayerNormConfig::new(self.encoder.d_model).init(device),
                to_codes: LinearConfig::new(self.encoder.d_model, self.quantizer.code_dim)
                    .init(device),
            },
            quantizer: self.quantizer.init(device),
            decoder: self.decoder_init(device),
            patch_size: self.patch_size,
            grid: self.grid(),
            output_sigmoid: self.output_sigmoid,
        }
    }

    /// A decoder for this config, e.g. the larger one Parti fine-tunes after freezing stage 1.
    pub fn decoder_init(&self, device: &Device) -> VitDecoder {
        let tokens = self.grid() * self.grid();
        VitDecoder {
            from_codes: LinearConfig::new(self.quantizer.code_dim, self.decoder.d_model)
                .init(device),
            positions: LearnedPositionsConfig::new(tokens, self.decoder.d_model).init(device),
            blocks: (0..self.decoder.n_layers)
                .map(|_| self.decoder.block().init(device))
                .collect(),
            local: (0..self.decoder.local_convs)
                .map(|_| self.decoder.local_conv(device))
                .collect(),
            norm: LayerNormConfig::new(self.decoder.d_model).init(device),
            to_pixels: LinearConfig::new(self.decoder.d_model, self.patch_values()).init(device),
        }
    }
}

impl VitVqganConfig {
    /// This config's decoder started from `trained`, a decoder of the same width and local
    /// convolutions and no more blocks (configured as `trained_config`): its layers copied and
    /// the extra blocks appended as identities, so it begins exactly where `trained` is and
    /// only has to improve on it.
    pub fn decoder_grown_from(
        &self,
        trained_config: &VitConfig,
        trained: VitDecoder,
        device: &Device,
    ) -> Result<VitDecoder, crate::Error> {
        let (want, have) = (&self.decoder, trained_config);
        if (want.d_model, want.n_heads, want.d_mlp) != (have.d_model, have.n_heads, have.d_mlp)
            || want.n_layers < have.n_layers
            || want.local_convs != have.local_convs
            || trained.blocks.len() != have.n_layers
            || trained.local.len() != have.local_convs
        {
            return Err(crate::Error::Usage(format!(
                "a decoder ({want:?}) can start from a trained one ({have:?}) only with the same \
                 width, heads, MLP and local convolutions and at least as many blocks"
            )));
        }
        let mut decoder = trained;
        decoder
            .blocks
            .extend((have.n_layers..want.n_layers).map(|_| want.block().init_identity(device)));
        Ok(decoder)
    }
}

#[derive(Module, Debug)]
pub struct VitEncoder {
    pub patch_embedding: Linear,
    pub positions: LearnedPositions,
    pub blocks: Vec<TransformerBlock>,
    pub norm: LayerNorm,
    /// The factorisation: a projection to the low-dimensional lookup space.
    pub to_codes: Linear,
}

#[derive(Module, Debug)]
pub struct VitDecoder {
    pub from_codes: Linear,
    pub positions: LearnedPositions,
    pub blocks: Vec<TransformerBlock>,
    pub local: Vec<Conv2d>,
    pub norm: LayerNorm,
    pub to_pixels: Linear,
}

#[derive(Module, Debug)]
pub struct VitVqgan {
    pub encoder: VitEncoder,
    pub quantizer: Quantizer,
    pub decoder: VitDecoder,
    pub patch_size: usize,
    pub grid: usize,
    pub output_sigmoid: bool,
}

/// Output of a full pass.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    /// `[batch, 3, size, size]`
    pub images: Tensor<4>,
    /// The decoder's output before the sigmoid (the images themselves without one).
    pub logits: Tensor<4>,
    pub quantized: Quantized,
}

impl VitEncoder {
    /// `[batch, tokens, patch values]` -> unquantised codes `[batch, tokens, code_dim]`.
    pub fn forward(&self, patches: Tensor<3>) -> Tensor<3> {
        let mut x = self
            .positions
            .forward(linear(&self.patch_embedding, patches), 0);
        for block in &self.blocks {
            x = block.forward(x, None, None);
        }
        linear(&self.to_codes, layer_norm(&self.norm, x))
    }
}

impl VitDecoder {
    /// `[batch, tokens, d]` through the residual convolutions over the square token grid.
    fn mix_neighbours(&self, x: Tensor<3>) -> Tensor<3> {
        if self.local.is_empty() {
            return x;
        }
        let [batch, tokens, d] = x.dims();
        let grid = (tokens as f64).sqrt() as usize;
        let mut map = x.swap_dims(1, 2).reshape([batch, d, grid, grid]);
        for conv in &self.local {
            map = fused::add(map.clone(), gelu(conv.forward(map)));
        }
        map.reshape([batch, d, tokens]).swap_dims(1, 2)
    }

    /// Codes `[batch, tokens, code_dim]` -> patch values `[batch, tokens, patch values]`.
    ///
    /// The codes are unit vectors; scaled by sqrt(code_dim) their components are ~1, like the
    /// other inputs of the stack. Unscaled, the tiny model learned several times slower.
    pub fn forward(&self, codes: Tensor<3>) -> Tensor<3> {
        let scale = (codes.dims()[2] as f64).sqrt();
        let mut x = self
            .positions
            .forward(linear(&self.from_codes, codes.mul_scalar(scale)), 0);
        // Ahead of the blocks, so they can sharpen what the neighbours contributed (after
        // them, measured: triangles came out blurred and read as circles more often).
        x = self.mix_neighbours(x);
        for block in &self.blocks {
            x = block.forward(x, None, None);
        }
        linear(&self.to_pixels, layer_norm(&self.norm, x))
    }
}

impl VitVqgan {
    /// `[batch, 3, H, W]` -> `[batch, tokens, p*p*3]`, tokens in raster order.
    pub fn patchify(&self, images: Tensor<4>) -> Tensor<3> {
        nn::vision::patchify(images, self.patch_size)
    }

    pub fn unpatchify(&self, patches: Tensor<3>) -> Tensor<4> {
        nn::vision::unpatchify(patches, self.patch_size, self.grid)
    }

    /// Decoder output -> images (through the sigmoid when the config keeps it).
    pub fn patches_to_image(&self, patches: Tensor<3>) -> Tensor<4> {
        self.output(patches).0
    }

    /// Decoder output -> (images, logits): the logits are the output before the sigmoid.
    pub fn output(&self, patches: Tensor<3>) -> (Tensor<4>, Tensor<4>) {
        let logits = self.unpatchify(patches);
        if self.output_sigmoid {
            (sigmoid(logits.clone()), logits)
        } else {
            (logits.clone(), logits)
        }
    }

    /// Images in [0, 1] -> unquantised codes `[batch, tokens, code_dim]`. Pixels are centred to
    /// [-1, 1] first: on mostly mid-gray pictures, [0, 1] inputs make every patch embedding
    /// nearly the same vector, so every patch starts on the same code.
    pub fn encode_continuous(&self, images: Tensor<4>) -> Tensor<3> {
        self.encoder
            .forward(self.patchify(images).mul_scalar(2.0).sub_scalar(1.0))
    }

    /// Images in [0, 1] -> reconstruction and the quantiser's outputs.
    pub fn forward(&self, images: Tensor<4>) -> Reconstruction {
        let z = self.encode_continuous(images);
        let quantized = self.quantizer.forward(z);
        let (images, logits) = self.output(self.decoder.forward(quantized.codes.clone()));
        Reconstruction {
            images,
            logits,
            quantized,
        }
    }

    /// Images -> token grid `[batch, grid * grid]`.
    pub fn encode(&self, images: Tensor<4>) -> Tensor<2, Int> {
        self.quantizer.lookup(self.encode_continuous(images))
    }

    /// Token grid -> images.
    pub fn decode(&self, indices: Tensor<2, Int>) -> Tensor<4> {
        self.patches_to_image(self.decoder.forward(self.quantizer.embed(indices)))
    }
}

/// Token grids -> channel-first `[3, size, size]` pixels in [0, 1], one list per grid.
pub fn decode_tokens(
    model: &VitVqgan,
    tokens: &[Vec<u16>],
    device: &Device,
) -> Result<Vec<Vec<f32>>, crate::Error> {
    let per_grid = model.grid * model.grid;
    let codebook = model.quantizer.codebook_size();
    let mut flat = Vec::with_capacity(tokens.len() * per_grid);
    for (i, grid) in tokens.iter().enumerate() {
        if grid.len() != per_grid {
            return Err(crate::Error::Data(format!(
                "token list {i} has {} tokens, the model's grid needs {per_grid}",
                grid.len()
            )));
        }
        if let Some(bad) = grid.iter().find(|t| usize::from(**t) >= codebook) {
            return Err(crate::Error::Data(format!(
                "token list {i}: token {bad} is outside the codebook of {codebook}"
            )));
        }
        flat.extend(grid.iter().map(|t| i32::from(*t)));
    }
    if tokens.is_empty() {
        return Ok(Vec::new());
    }
    let indices =
        Tensor::<1, Int>::from_data(flat.as_slice(), device).reshape([tokens.len(), per_grid]);
    let images = nn::images::floats(model.decode(indices).clamp(0.0, 1.0))?;
    let per_image = images.len() / tokens.len();
    Ok(images.chunks(per_image).map(|c| c.to_vec()).collect())
}
