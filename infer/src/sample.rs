//! Autoregressive sampling over the image grid: KV cache, classifier-free guidance with both
//! streams in one batch, temperature / top-k / top-p, reranking with the contrastive pair, and
//! decoding to pixels with the VQGAN.

use burn::tensor::{Bool, Device, Int, Tensor};
use manifests::Upstream;
use models::{
    Contrastive, Parti, PartiConfig, SuperResConfig, SuperResolution, TextEncoder, TextTokenizer,
    VitVqgan, VitVqganConfig,
};
pub use models::{SamplingConfig, SamplingSettings};
use rand::Rng;

use crate::Error;

/// Draws one token from `logits` after temperature, top-k and top-p.
///
/// Only top-p needs the candidates in order, so only it sorts them: without filters every token
/// is a candidate in index order, and top-k selects its candidates in linear time (a sort of
/// every row's logits at every step is a visible share of a batched decode on the CPU:
/// BENCHMARKS.md, "Serving").
pub fn sample_token(logits: &[f32], config: &SamplingConfig, rng: &mut impl Rng) -> usize {
    let temperature = config.temperature as f32;
    let filtered = (config.top_k > 0 && config.top_k < logits.len()) || config.top_p < 1.0;
    if !filtered {
        // Every token a candidate, in index order: no list of candidates to build.
        let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits
            .iter()
            .map(|&logit| weight(logit, best, temperature))
            .collect();
        return draw(&weights, rng).unwrap_or_else(|| most_likely(logits, 0..logits.len()));
    }
    let descending = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    let mut candidates: Vec<usize> = (0..logits.len()).collect();
    if config.top_k > 0 && config.top_k < candidates.len() {
        candidates.select_nth_unstable_by(config.top_k - 1, descending);
        candidates.truncate(config.top_k);
    }
    if config.top_p < 1.0 {
        candidates.sort_by(descending);
    }
    let best = candidates
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut weights: Vec<f64> = candidates
        .iter()
        .map(|&i| weight(logits[i], best, temperature))
        .collect();
    if config.top_p < 1.0 {
        let total: f64 = weights.iter().sum();
        let mut cumulative = 0.0;
        let cut = weights
            .iter()
            .position(|w| {
                cumulative += w / total;
                cumulative >= config.top_p
            })
            .map_or(weights.len(), |rank| rank + 1);
        weights.truncate(cut);
        candidates.truncate(cut);
    }
    match draw(&weights, rng) {
        Some(chosen) => candidates[chosen],
        None => most_likely(logits, candidates.iter().copied()),
    }
}

/// The candidate with the largest logit: what a draw falls back on when no candidate has any
/// weight (a row of NaN or infinite logits), so such a row still gets its most likely token
/// rather than token 0.
fn most_likely(logits: &[f32], candidates: impl Iterator<Item = usize>) -> usize {
    candidates
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap_or(0)
}

/// The unnormalised probability of `logit` at `temperature`, `best` the largest logit.
fn weight(logit: f32, best: f32, temperature: f32) -> f64 {
    let exponent = (logit - best) / temperature;
    // `exp` of anything below about -103.97 rounds to exactly 0 in f32, so skipping it changes
    // no weight; at low temperatures most of a codebook's tokens are that far below the best,
    // and the exponentials were a visible share of a batched decode on the CPU.
    if exponent < -104.0 {
        0.0
    } else {
        f64::from(exponent.exp())
    }
}

/// The position a uniform draw lands on in `weights`; `None` when no weight is positive.
fn draw(weights: &[f64], rng: &mut impl Rng) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    let mut last_possible = None;
    for (position, &weight) in weights.iter().enumerate() {
        if weight > 0.0 {
            last_possible = Some(position);
        }
        draw -= weight;
        if draw <= 0.0 && weight > 0.0 {
            return Some(position);
        }
    }
    // Rounding left a sliver of the draw: the last token that had any weight.
    last_possible
}

/// An error naming `uri` when `tokenizer`'s ids or lengths do not fit the text encoder
/// configured by `encoder` (one trained with another tokenizer): such prompts would index past
/// its embeddings.
fn fits_tokenizer(
    tokenizer: &TextTokenizer,
    encoder: &models::TextEncoderConfig,
    uri: &str,
) -> Result<(), Error> {
    if tokenizer.vocab_size() > encoder.vocab_size || tokenizer.max_length() > encoder.max_length {
        return Err(Error::Data(format!(
            "{uri}: its text encoder takes {} token ids and {} tokens, the tokenizer makes {} \
             ids and up to {} tokens (trained with another tokenizer?)",
            encoder.vocab_size,
            encoder.max_length,
            tokenizer.vocab_size(),
            tokenizer.max_length()
        )));
    }
    Ok(())
}

/// An error when `top_k` asks for more tokens than the codebook has (0 keeps them all).
pub fn top_k_fits(top_k: usize, codebook_size: usize) -> Result<(), Error> {
    if top_k > codebook_size {
        return Err(Error::Usage(format!(
            "top_k {top_k} is more than the codebook's {codebook_size} tokens (0 keeps them all)"
        )));
    }
    Ok(())
}

/// Everything sampling needs, loaded from manifests.
pub struct Generator {
    pub parti: Parti,
    pub parti_config: PartiConfig,
    pub tokenizer: TextTokenizer,
    pub vqgan: VitVqgan,
    pub vqgan_config: VitVqganConfig,
    pub reranker: Option<(TextEncoder, Contrastive)>,
    pub device: Device,
    /// The transformer's preset (`config.model` of its manifest), e.g. `tiny`.
    pub name: String,
    /// The settings the transformer's manifest recommends.
    pub recommended: SamplingSettings,
    /// Manifest URI -> digest of every model used, for the records next to the images.
    pub provenance: Vec<(String, String)>,
    /// The super-resolution model that enlarges kept pictures, when one was loaded.
    pub upscaler: Option<Upscaler>,
    /// The VQGAN's identity (its config and weights, [`manifests::Manifest::identity`]), to
    /// tell whether an upscaler learned its pictures.
    vqgan_identity: String,
}

/// A `vqgan superres` model, loaded to enlarge the tokenizer's pictures.
pub struct Upscaler {
    pub model: SuperResolution,
    pub config: SuperResConfig,
    /// Its manifest's URI.
    pub uri: String,
}

/// The upstream input named `name` of a manifest (e.g. the tokenizer of `train parti`).
pub fn input_of(stage: &Upstream, name: &str) -> Option<String> {
    stage
        .manifest
        .inputs
        .iter()
        .find(|i| i.name == name)
        .map(|i| i.uri.clone())
}

impl Generator {
    /// `parti`: a `train parti` manifest. The tokenizer, text encoder (for reranking) and VQGAN
    /// are found through its inputs unless given.
    pub fn load(
        parti_uri: &str,
        vqgan_uri: Option<&str>,
        text_encoder_uri: Option<&str>,
        device: &str,
    ) -> Result<Generator, Error> {
        let device = nn::backend::device(device).map_err(|e| Error::Usage(e.to_string()))?;
        let (parti_stage, parti_digest) = Upstream::read(parti_uri)?;
        let mut provenance = vec![(parti_stage.location.uri(), parti_digest)];
        let (parti_config, parti) = models::load_parti(&parti_stage, &device)?;
        let name = parti_stage
            .manifest
            .config
            .get("model")
            .and_then(|name| name.as_str())
            .unwrap_or("parti")
            .to_string();
        let recommended = SamplingSettings::from_manifest(&parti_stage)?;
        let tokenizer_uri = input_of(&parti_stage, "tokenizer").ok_or_else(|| {
            Error::Data(format!(
                "{parti_uri}: its manifest names no tokenizer input"
            ))
        })?;
        let (tokenizer_stage, digest) = Upstream::read(&tokenizer_uri)?;
        provenance.push((tokenizer_stage.location.uri(), digest));
        let tokenizer = TextTokenizer::from_manifest(&tokenizer_stage)?;
        fits_tokenizer(&tokenizer, &parti_config.encoder, parti_uri)?;
        let vqgan_uri = match vqgan_uri {
            Some(uri) => uri.to_string(),
            None => {
                let tokens = input_of(&parti_stage, "tokens").ok_or_else(|| {
                    Error::Data(format!("{parti_uri}: no tokens input; pass --vqgan"))
                })?;
                let (tokens_stage, _) = Upstream::read(&tokens)?;
                input_of(&tokens_stage, "vqgan")
                    .ok_or_else(|| Error::Data(format!("{tokens}: no vqgan input; pass --vqgan")))?
            }
        };
        let (vqgan_stage, digest) = Upstream::read(&vqgan_uri)?;
        provenance.push((vqgan_stage.location.uri(), digest));
        let vqgan_identity = vqgan_stage.manifest.identity();
        let (vqgan_config, vqgan) = models::load_vqgan(&vqgan_stage, &device)?;
        if vqgan_config.grid() != parti_config.grid
            || vqgan_config.quantizer.codebook_size != parti_config.codebook_size
        {
            return Err(Error::Data(format!(
                "{vqgan_uri}: grid {} / codebook {} do not match the transformer's {} / {}",
                vqgan_config.grid(),
                vqgan_config.quantizer.codebook_size,
                parti_config.grid,
                parti_config.codebook_size
            )));
        }
        let text_encoder_uri = text_encoder_uri
            .map(str::to_string)
            .or_else(|| input_of(&parti_stage, "text_encoder"));
        let reranker = match text_encoder_uri {
            Some(uri) => {
                let (stage, digest) = Upstream::read(&uri)?;
                provenance.push((stage.location.uri(), digest));
                let (configs, encoder, contrastive) = models::load_text_encoder(&stage, &device)?;
                fits_tokenizer(&tokenizer, &configs.text_encoder, &uri)?;
                Some((encoder, contrastive))
            }
            None => None,
        };
        let generator = Generator {
            parti,
            parti_config,
            tokenizer,
            vqgan,
            vqgan_config,
            reranker,
            device,
            name,
            recommended,
            provenance,
            upscaler: None,
            vqgan_identity,
        };
        // Found now rather than after a whole round of sampling.
        generator.reranker_sees_the_vqgans_pictures()?;
        Ok(generator)
    }

    /// Loads the super-resolution model of a `vqgan superres` manifest to enlarge kept
    /// pictures ([`Generator::upscale`]); it must take this VQGAN's picture size. One trained
    /// on another tokenizer's pictures is loaded with a warning: it learned to undo that
    /// tokenizer's artefacts, not this one's.
    pub fn with_upscaler(mut self, superres_uri: &str) -> Result<Generator, Error> {
        let (stage, digest) = Upstream::read(superres_uri)?;
        // Checked before the weights are read or the model built.
        let config = models::superres_config(&stage)?;
        let size = self.vqgan_config.image_size;
        if config.input_size != size {
            return Err(Error::Usage(format!(
                "{superres_uri}: the super-resolution model enlarges {} px pictures, the VQGAN \
                 makes {size} px",
                config.input_size
            )));
        }
        let trained_on = stage.manifest.inputs.iter().find(|i| i.name == "vqgan");
        if let Some(vqgan) = trained_on.filter(|vqgan| vqgan.digest != self.vqgan_identity) {
            tracing::warn!(
                "{superres_uri}: the super-resolution model learned to enlarge the pictures of \
                 {}, another tokenizer than the one decoding here: expect less detail",
                vqgan.uri
            );
        }
        let model = models::load_superres(&stage, &config, &self.device)?;
        self.provenance.push((stage.location.uri(), digest));
        self.upscaler = Some(Upscaler {
            model,
            config,
            uri: stage.location.uri(),
        });
        Ok(self)
    }

    /// Side of the pictures [`Generator::upscale`] makes (the VQGAN's without an upscaler).
    pub fn upscaled_size(&self) -> usize {
        self.upscaler
            .as_ref()
            .map_or(self.vqgan_config.image_size, |u| u.config.output_size())
    }

    /// `images` (channel-first pixels at the VQGAN's size) enlarged by the super-resolution
    /// model, clamped to [0, 1]; an error without one. On flex split across the CPU's cores.
    pub fn upscale(&self, images: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, Error> {
        let Some(upscaler) = &self.upscaler else {
            return Err(Error::Usage(
                "no super-resolution model loaded (infer --upscale SUPERRES_MANIFEST)".into(),
            ));
        };
        let size = upscaler.config.output_size();
        across_cores(images, |part| {
            let mut enlarged = Vec::with_capacity(part.len());
            // A few at a time: the enlarged activations of a whole round would be large.
            for chunk in part.chunks(UPSCALE_BATCH) {
                let pixels = upscaler
                    .model
                    .forward(self.pixel_batch(chunk))
                    .clamp(0.0, 1.0);
                let values = read_floats(pixels, "enlarged pictures")?;
                enlarged.extend(values.chunks(3 * size * size).map(<[f32]>::to_vec));
            }
            Ok(enlarged)
        })
    }

    fn text(&self, prompts: &[&str]) -> Result<(Tensor<2, Int>, Tensor<2, Bool>), Error> {
        let encoded: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.tokenizer.encode(p))
            .collect::<Result<_, _>>()?;
        let rows: Vec<&[u32]> = encoded.iter().map(|r| r.as_slice()).collect();
        Ok(models::text_encoder::pad_batch(
            &rows,
            self.tokenizer.pad_id(),
            self.tokenizer.max_length(),
            &self.device,
        ))
    }

    /// Token grids for every prompt, `samples` each (prompt-major), all rows in one batch;
    /// sample `k` of every prompt draws from random stream `k` of `config.seed`, so a prompt's
    /// images do not depend on the prompts beside it (`generate`, `eval` and `serve` agree).
    pub fn sample_tokens(
        &self,
        prompts: &[&str],
        config: &SamplingConfig,
    ) -> Result<Vec<Vec<u16>>, Error> {
        config.validate()?;
        let rows: Vec<Row> = prompts
            .iter()
            .flat_map(|&prompt| {
                (0..config.samples).map(move |stream| Row {
                    prompt,
                    settings: config,
                    stream,
                })
            })
            .collect();
        self.sample_rows(&rows, config.use_cache)
    }

    /// Token grids for `rows`, decoded together whatever their settings: each row
    /// has its own guidance, temperature, top-k/top-p and random stream, so a row's tokens do
    /// not depend on the rows beside it. Guided rows add an unconditional stream each.
    /// `use_cache: false` recomputes the whole prefix every step (for comparison).
    ///
    /// On flex the rows are split across the CPU's cores ([`across_cores`]); a row's tokens do
    /// not depend on the rows beside it, so the split changes no token.
    pub fn sample_rows(&self, rows: &[Row], use_cache: bool) -> Result<Vec<Vec<u16>>, Error> {
        across_cores(rows, |part| self.sample_batch(part, use_cache))
    }

    /// [`Generator::sample_rows`] as one batch.
    fn sample_batch(&self, rows: &[Row], use_cache: bool) -> Result<Vec<Vec<u16>>, Error> {
        let batch = rows.len();
        if batch == 0 {
            return Ok(Vec::new());
        }
        for row in rows {
            row.settings.validate()?;
            top_k_fits(row.settings.top_k, self.parti_config.codebook_size)?;
        }
        // Conditional rows first, then the guided rows again with the null condition.
        let guided: Vec<usize> = (0..batch)
            .filter(|&row| rows[row].settings.guided())
            .collect();
        let mut unconditional = vec![None; batch];
        for (offset, &row) in guided.iter().enumerate() {
            unconditional[row] = Some(batch + offset);
        }
        let mut prompts: Vec<&str> = rows.iter().map(|row| row.prompt).collect();
        prompts.extend(guided.iter().map(|&row| rows[row].prompt));
        let streams = prompts.len();
        let (ids, padding) = self.text(&prompts)?;
        let drop = (!guided.is_empty()).then(|| {
            let drop: Vec<bool> = (0..streams).map(|stream| stream >= batch).collect();
            Tensor::<1, Bool>::from_data(drop.as_slice(), &self.device)
        });
        let condition = self.parti.condition(ids, padding, drop);
        let masks = self.parti.masks(&self.device);
        let n = self.parti.tokens();
        let vocab = self.parti_config.codebook_size;
        let mut state = self.parti.start(&condition);
        let mut grids = vec![Vec::with_capacity(n); batch];
        let mut inputs: Vec<i32> = vec![self.parti.bos_id() as i32; streams];
        let mut history: Vec<Vec<i32>> = vec![vec![self.parti.bos_id() as i32]; streams];
        let mut rngs: Vec<_> = rows
            .iter()
            .map(|row| nn::training::step_rng(row.settings.seed, row.stream))
            .collect();
        let mut guided_logits = vec![0f32; vocab];
        for _ in 0..n {
            let logits = if use_cache {
                let input = Tensor::<1, Int>::from_data(inputs.as_slice(), &self.device)
                    .reshape([streams, 1]);
                self.parti.step(input, &mut state, &masks)
            } else {
                let len = history[0].len();
                let flat: Vec<i32> = history.iter().flatten().copied().collect();
                let prefix = Tensor::<1, Int>::from_data(flat.as_slice(), &self.device)
                    .reshape([streams, len]);
                self.parti.last_logits_uncached(prefix, &condition, &masks)
            };
            let values = read_floats(logits, "logits")?;
            for (row, grid) in grids.iter_mut().enumerate() {
                let settings = rows[row].settings;
                let conditional = &values[row * vocab..(row + 1) * vocab];
                let logits = match unconditional[row] {
                    Some(stream) => {
                        let scale = settings.guidance_scale as f32;
                        let null = &values[stream * vocab..(stream + 1) * vocab];
                        for ((out, &c), &u) in guided_logits.iter_mut().zip(conditional).zip(null) {
                            *out = u + (c - u) * scale;
                        }
                        guided_logits.as_slice()
                    }
                    None => conditional,
                };
                let token = sample_token(logits, settings, &mut rngs[row]);
                grid.push(token as u16);
                inputs[row] = token as i32;
                if let Some(stream) = unconditional[row] {
                    inputs[stream] = token as i32;
                }
            }
            for (stream, past) in history.iter_mut().enumerate() {
                past.push(inputs[stream]);
            }
        }
        Ok(grids)
    }

    /// Pixels (channel-first, [0, 1]) of token grids.
    pub fn decode(&self, grids: &[Vec<u16>]) -> Result<Vec<Vec<f32>>, Error> {
        models::vqgan::decode_tokens(&self.vqgan, grids, &self.device)
    }

    /// Unit-length contrastive embeddings of `prompts`, `[prompts, dim]`; `None` without a
    /// text encoder manifest (no reranker).
    pub fn text_embeddings(&self, prompts: &[&str]) -> Result<Option<Tensor<2>>, Error> {
        let Some((encoder, contrastive)) = &self.reranker else {
            return Ok(None);
        };
        let (ids, padding) = self.text(prompts)?;
        Ok(Some(contrastive.embed_text(
            encoder.forward(ids, padding.clone()),
            padding,
        )))
    }

    /// Unit-length contrastive embeddings of `images: [n, 3, size, size]` (pixels in [0, 1]),
    /// `[n, dim]`; `None` without a reranker.
    pub fn image_embeddings(&self, images: Tensor<4>) -> Result<Option<Tensor<2>>, Error> {
        let Some((_, contrastive)) = &self.reranker else {
            return Ok(None);
        };
        self.reranker_sees_the_vqgans_pictures()?;
        Ok(Some(contrastive.embed_images(images)))
    }

    /// An error when the reranker's image tower takes pictures of another size than the
    /// VQGAN makes.
    fn reranker_sees_the_vqgans_pictures(&self) -> Result<(), Error> {
        let Some((_, contrastive)) = &self.reranker else {
            return Ok(());
        };
        let size = self.vqgan_config.image_size;
        let wanted = contrastive.image_tower.positions.embedding.dims()[0];
        let tower_size = (wanted as f64).sqrt() as usize * contrastive.image_tower.patch_size;
        if tower_size != size {
            return Err(Error::Data(format!(
                "the reranker sees {tower_size} px images, the VQGAN makes {size} px"
            )));
        }
        Ok(())
    }

    /// Channel-first pixels of `images` as one `[n, 3, size, size]` batch.
    pub fn pixel_batch(&self, images: &[Vec<f32>]) -> Tensor<4> {
        let size = self.vqgan_config.image_size;
        let flat: Vec<f32> = images.iter().flatten().copied().collect();
        Tensor::<1>::from_floats(flat.as_slice(), &self.device).reshape([
            images.len(),
            3,
            size,
            size,
        ])
    }

    /// Contrastive scores of `images` (channel-first pixels), image `i` against
    /// `prompts[owners[i]]`: higher is a better match. `None` without a text encoder manifest.
    /// One text-tower and one image-tower call for all of them.
    pub fn scores(
        &self,
        prompts: &[&str],
        images: &[Vec<f32>],
        owners: &[usize],
    ) -> Result<Option<Vec<f64>>, Error> {
        if images.is_empty() {
            return Ok(self.reranker.as_ref().map(|_| Vec::new()));
        }
        let (Some(text), Some(pictures)) = (
            self.text_embeddings(prompts)?,
            self.image_embeddings(self.pixel_batch(images))?,
        ) else {
            return Ok(None);
        };
        // [images, prompts]: each image's similarity to every prompt; it keeps its owner's.
        let similarity = read_floats(pictures.matmul(text.transpose()), "scores")?;
        Ok(Some(
            owners
                .iter()
                .enumerate()
                .map(|(image, &owner)| f64::from(similarity[image * prompts.len() + owner]))
                .collect(),
        ))
    }

    /// Samples, decodes and reranks: per prompt, the kept images (best first) with scores.
    pub fn generate(
        &self,
        prompts: &[&str],
        config: &SamplingConfig,
    ) -> Result<Vec<PromptImages>, Error> {
        let grids = self.sample_tokens(prompts, config)?;
        let sampled = prompts
            .iter()
            .zip(grids.chunks(config.samples))
            .map(|(&prompt, tokens)| Sampled {
                prompt,
                config,
                tokens: tokens.to_vec(),
            })
            .collect::<Vec<_>>();
        self.finish(&sampled)
    }

    /// Each prompt's sampled grids decoded, scored by the reranker against its own prompt and
    /// ordered best first. All prompts share one decode and one reranker call (the per-call cost
    /// dominates small batches on the CPU); a prompt's ranking involves only its own grids.
    ///
    /// On flex the prompts are split across the CPU's cores as in [`Generator::sample_rows`].
    pub fn finish(&self, sampled: &[Sampled]) -> Result<Vec<PromptImages>, Error> {
        across_cores(sampled, |part| self.finish_together(part))
    }

    fn finish_together(&self, sampled: &[Sampled]) -> Result<Vec<PromptImages>, Error> {
        let grids: Vec<Vec<u16>> = sampled
            .iter()
            .flat_map(|prompt| prompt.tokens.iter().cloned())
            .collect();
        let owners: Vec<usize> = sampled
            .iter()
            .enumerate()
            .flat_map(|(owner, prompt)| std::iter::repeat_n(owner, prompt.tokens.len()))
            .collect();
        let prompts: Vec<&str> = sampled.iter().map(|prompt| prompt.prompt).collect();
        let mut images = self.decode(&grids)?.into_iter();
        let mut scores = self
            .scores(&prompts, images.as_slice(), &owners)?
            .map(Vec::into_iter);
        Ok(sampled
            .iter()
            .map(|prompt| {
                let count = prompt.tokens.len();
                let images: Vec<Vec<f32>> = images.by_ref().take(count).collect();
                let scores: Option<Vec<f64>> = scores
                    .as_mut()
                    .map(|all| all.by_ref().take(count).collect());
                let mut order: Vec<usize> = (0..count).collect();
                if let Some(scores) = &scores {
                    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
                }
                PromptImages {
                    prompt: prompt.prompt.to_string(),
                    kept: order.into_iter().take(prompt.config.keep).collect(),
                    scores,
                    tokens: prompt.tokens.clone(),
                    images,
                }
            })
            .collect())
    }
}

/// Pictures the super-resolution model enlarges in one call.
const UPSCALE_BATCH: usize = 4;

/// The values of `tensor`, row-major; `what` names them in an error.
pub fn read_floats<const D: usize>(tensor: Tensor<D>, what: &str) -> Result<Vec<f32>, Error> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| Error::Data(format!("reading {what}: {e:?}")))
}

/// `work` over contiguous parts of `items`, results in order. On flex one part per core, each on
/// its own thread: flex runs the tiny presets' matrix products on one thread, so one batch would
/// leave the other cores idle. Elsewhere one part (libtorch threads its own kernels, and a GPU
/// wants one large batch). Callers only split work whose items do not depend on each other.
fn across_cores<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(&[T]) -> Result<Vec<R>, Error> + Sync,
) -> Result<Vec<R>, Error> {
    let cores = if nn::backend::backend_name() == "flex" {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        1
    };
    let parts = cores.min(items.len());
    if parts <= 1 {
        return work(items);
    }
    let work = &work;
    let results: Vec<Result<Vec<R>, Error>> = std::thread::scope(|scope| {
        let running: Vec<_> = items
            .chunks(items.len().div_ceil(parts))
            .map(|part| scope.spawn(move || work(part)))
            .collect();
        running
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Err(Error::Data("an inference thread panicked".into())))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(items.len());
    for part in results {
        all.extend(part?);
    }
    Ok(all)
}

/// One prompt's sampled token grids, to be decoded and reranked ([`Generator::finish`]).
#[derive(Debug, Clone)]
pub struct Sampled<'a> {
    pub prompt: &'a str,
    pub config: &'a SamplingConfig,
    pub tokens: Vec<Vec<u16>>,
}

/// One row of a batched decode ([`Generator::sample_rows`]).
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub prompt: &'a str,
    pub settings: &'a SamplingConfig,
    /// Which random stream of `settings.seed` the row draws from (a request's sample index).
    pub stream: usize,
}

/// One prompt's samples; `kept` indexes `images` best first.
#[derive(Debug, Clone)]
pub struct PromptImages {
    pub prompt: String,
    pub images: Vec<Vec<f32>>,
    pub tokens: Vec<Vec<u16>>,
    pub scores: Option<Vec<f64>>,
    pub kept: Vec<usize>,
}
