//! What must hold of a model config read from a file (a stage's `model.json`) before a model
//! is built from it: a width of zero divides by zero, a width no model has allocates without
//! bound, and a size that is no multiple of another trips an assertion deep in `init`. Each is
//! an error naming the field here instead; then the parameters the config describes must fit
//! in its weights file.

use manifests::Upstream;

use crate::Error;
use crate::parti::PartiConfig;
use crate::text_encoder::{ContrastiveConfig, ImageTowerConfig, TextEncoderConfig};
use crate::vqgan::{VitConfig, VitVqganConfig};

/// The widest size a config may name (the 20B Parti's widest is 16 384) and the most layers:
/// far above any model, low enough that counting the parameters of any config within them
/// cannot overflow.
const MAX_WIDTH: usize = 1 << 18;
const MAX_LAYERS: usize = 1 << 12;
const MAX_VOCABULARY: usize = 1 << 24;

/// The problems found in one config, each naming its field.
#[derive(Default)]
struct Sizes {
    problems: Vec<String>,
}

impl Sizes {
    fn within(&mut self, name: &str, value: usize, least: usize, most: usize) -> &mut Sizes {
        if !(least..=most).contains(&value) {
            self.problems
                .push(format!("{name} is {value}, not within {least}..={most}"));
        }
        self
    }

    /// A width or a side: at least 1.
    fn width(&mut self, name: &str, value: usize) -> &mut Sizes {
        self.within(name, value, 1, MAX_WIDTH)
    }

    /// Codes are stored as 16-bit ids.
    fn codebook(&mut self, name: &str, value: usize) -> &mut Sizes {
        self.within(name, value, 2, 1 << 16)
    }

    fn same(&mut self, name: &str, value: usize, other: &str, expected: usize) -> &mut Sizes {
        if value != expected {
            self.problems
                .push(format!("{name} ({value}) is not {other} ({expected})"));
        }
        self
    }

    /// A dropout rate: Burn refuses any outside [0, 1).
    fn rate(&mut self, name: &str, value: f64) -> &mut Sizes {
        if !(0.0..1.0).contains(&value) {
            self.problems
                .push(format!("{name} is {value}, not within [0, 1)"));
        }
        self
    }

    /// A count that may be zero (layers, convolutions, a window).
    fn count(&mut self, name: &str, value: usize) -> &mut Sizes {
        if value > MAX_LAYERS {
            self.problems
                .push(format!("{name} is {value}, more than {MAX_LAYERS}"));
        }
        self
    }

    fn multiple(&mut self, name: &str, value: usize, of: &str, divisor: usize) -> &mut Sizes {
        if divisor > 0 && !value.is_multiple_of(divisor) {
            self.problems.push(format!(
                "{name} ({value}) is not a multiple of {of} ({divisor})"
            ));
        }
        self
    }

    /// A transformer stack's widths, its heads dividing its width.
    fn stack(
        &mut self,
        prefix: &str,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        d_mlp: usize,
    ) -> &mut Sizes {
        let (width, heads) = (format!("{prefix}d_model"), format!("{prefix}n_heads"));
        self.width(&width, d_model)
            .count(&format!("{prefix}n_layers"), n_layers)
            .width(&heads, n_heads)
            .width(&format!("{prefix}d_mlp"), d_mlp)
            .multiple(&width, d_model, &heads, n_heads)
    }

    /// A picture's side, cut into whole patches.
    fn picture(&mut self, prefix: &str, image_size: usize, patch_size: usize) -> &mut Sizes {
        let (side, patch) = (format!("{prefix}image_size"), format!("{prefix}patch_size"));
        self.width(&side, image_size)
            .width(&patch, patch_size)
            .multiple(&side, image_size, &patch, patch_size)
    }

    fn vit(&mut self, prefix: &str, config: &VitConfig) -> &mut Sizes {
        let VitConfig {
            d_model,
            n_layers,
            n_heads,
            d_mlp,
            local_convs,
        } = *config;
        self.stack(prefix, d_model, n_layers, n_heads, d_mlp)
            .count(&format!("{prefix}local_convs"), local_convs)
    }

    fn text_encoder(&mut self, prefix: &str, config: &TextEncoderConfig) -> &mut Sizes {
        let c = config;
        // An adopted SentencePiece model may bring any vocabulary; the weights bound it.
        self.within(
            &format!("{prefix}vocab_size"),
            c.vocab_size,
            1,
            MAX_VOCABULARY,
        )
        .width(&format!("{prefix}max_length"), c.max_length)
        .stack(prefix, c.d_model, c.n_layers, c.n_heads, c.d_mlp)
        .rate(&format!("{prefix}dropout"), c.dropout)
    }

    fn image_tower(&mut self, config: &ImageTowerConfig) -> &mut Sizes {
        let (c, prefix) = (config, "image_tower.");
        self.picture(prefix, c.image_size, c.patch_size)
            .stack(prefix, c.d_model, c.n_layers, c.n_heads, c.d_mlp)
    }

    fn finish(self, stage: &Upstream) -> Result<(), Error> {
        match self.problems.is_empty() {
            true => Ok(()),
            false => Err(Error::Data(format!(
                "{}: its model config cannot be built: {}",
                stage.location.uri(),
                self.problems.join("; ")
            ))),
        }
    }
}

pub(crate) fn vqgan(stage: &Upstream, config: &VitVqganConfig) -> Result<(), Error> {
    let mut sizes = Sizes::default();
    sizes
        .picture("", config.image_size, config.patch_size)
        .vit("encoder.", &config.encoder)
        .vit("decoder.", &config.decoder)
        .codebook("quantizer.codebook_size", config.quantizer.codebook_size)
        .width("quantizer.code_dim", config.quantizer.code_dim);
    sizes.finish(stage)
}

pub(crate) fn text_encoder(
    stage: &Upstream,
    text_encoder: &TextEncoderConfig,
    contrastive: &ContrastiveConfig,
) -> Result<(), Error> {
    let mut sizes = Sizes::default();
    sizes
        .text_encoder("text_encoder.", text_encoder)
        .same(
            "contrastive.text_d_model",
            contrastive.text_d_model,
            "text_encoder.d_model",
            text_encoder.d_model,
        )
        .width("contrastive.projection_dim", contrastive.projection_dim)
        .image_tower(&contrastive.image_tower);
    sizes.finish(stage)
}

pub(crate) fn parti(stage: &Upstream, config: &PartiConfig) -> Result<(), Error> {
    let c = config;
    let mut sizes = Sizes::default();
    sizes
        .text_encoder("encoder.", &c.encoder)
        // Sampling builds masks of grid^4 entries: 256 (2048 px pictures at 8 px patches) is
        // 4 G of them.
        .within("grid", c.grid, 1, 256)
        .codebook("codebook_size", c.codebook_size)
        .stack("", c.d_model, c.n_layers, c.n_heads, c.d_mlp)
        .rate("dropout", c.dropout)
        .count("conv_window", c.conv_window)
        .count("full_attention_every", c.full_attention_every);
    sizes.finish(stage)
}

/// The parameters a config describes must fit in its weights file of `kind` at 2 bytes each
/// (the narrowest a checkpoint stores), by the file's own size as well as the manifest's
/// record of it: a config naming sizes its weights do not have is refused before the model is
/// allocated, rather than after.
pub(crate) fn fits_weights(stage: &Upstream, kind: &str, parameters: u64) -> Result<(), Error> {
    let weights = stage.artifact_of_kind(kind)?;
    let bytes = weights.bytes.min(stage.artifact_location(weights)?.size()?);
    if parameters.saturating_mul(2) > bytes {
        return Err(Error::Data(format!(
            "{}: its config describes {parameters} parameters, more than its {bytes}-byte \
             '{kind}' weights hold",
            stage.location.uri()
        )));
    }
    Ok(())
}
