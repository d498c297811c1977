//! The text encoder and the seq2seq model on their own: masking, objectives that learn,
//! information flow in the decoder (causal and conv-shaped), encoder padding, the CFG null
//! condition, the KV cache, and the paper's parameter counts.

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Bool, Device, Distribution, Int, Tensor};
use models::parti::{LayerMasks, PartiConfig, conv_allowed, token_loss};
use models::text_encoder::{
    ContrastiveConfig, FIRST_ORDINARY_ID, ImageTowerConfig, SpecialIds, TextEncoderConfig,
    mask_tokens, mlm_loss,
};
use nn::backend;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

fn ints(values: &[i32], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::<1, Int>::from_data(values, device).reshape(shape)
}

fn no_padding(shape: [usize; 2], device: &Device) -> Tensor<2, Bool> {
    Tensor::<1, Bool>::from_data(vec![false; shape[0] * shape[1]].as_slice(), device).reshape(shape)
}

#[test]
fn masking_follows_bert_proportions_and_spares_special_tokens() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (vocab, mask_id) = (1000usize, 4u32);
    let (mut ordinary, mut selected, mut masked, mut random, mut kept) = (0, 0, 0, 0, 0);
    for _ in 0..2000 {
        // Specials (pad, bos, eos) mixed in: they must never be selected.
        let ids: Vec<u32> = (0..40)
            .map(|i| {
                if i % 10 == 0 {
                    i % 4
                } else {
                    5 + (i * 37) % 900
                }
            })
            .collect();
        let m = mask_tokens(&ids, 0.15, vocab, SpecialIds::TRAINED, &mut rng);
        for (i, &id) in ids.iter().enumerate() {
            if id < FIRST_ORDINARY_ID {
                assert_eq!(m.target[i], None);
                assert_eq!(m.input[i], ids[i]);
                continue;
            }
            ordinary += 1;
            if let Some(t) = m.target[i] {
                assert_eq!(t, ids[i]);
                selected += 1;
                if m.input[i] == mask_id {
                    masked += 1;
                } else if m.input[i] == ids[i] {
                    kept += 1;
                } else {
                    assert!(m.input[i] >= FIRST_ORDINARY_ID && (m.input[i] as usize) < vocab);
                    random += 1;
                }
            } else {
                assert_eq!(m.input[i], ids[i]);
            }
        }
    }
    let rate = selected as f64 / ordinary as f64;
    assert!((rate - 0.15).abs() < 0.01, "selected {rate}");
    let share = |n: i32| n as f64 / selected as f64;
    assert!((share(masked) - 0.8).abs() < 0.02, "mask {}", share(masked));
    // A random replacement can land on the original token (1 in ~1000): within tolerance.
    assert!(
        (share(random) - 0.1).abs() < 0.02,
        "random {}",
        share(random)
    );
    assert!((share(kept) - 0.1).abs() < 0.02, "kept {}", share(kept));
}

/// An adopted tokenizer keeps its own ids and gets the specials it lacked appended: masking
/// goes by the tokenizer's special ids, not by where `train tokenizer` puts them.
#[test]
fn masking_spares_special_tokens_wherever_the_tokenizer_keeps_them() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let vocab = 40usize;
    let special = SpecialIds {
        pad: 35,
        unk: 36,
        bos: 37,
        eos: 38,
        mask: 39,
    };
    // Every id once per sequence: ordinary pieces 0..35 (0..=4 among them), specials 35..40.
    let ids: Vec<u32> = (0..vocab as u32).collect();
    let mut selected_low = 0;
    for _ in 0..500 {
        let m = mask_tokens(&ids, 0.3, vocab, special, &mut rng);
        for (i, &id) in ids.iter().enumerate() {
            if special.contains(id) {
                assert_eq!(m.target[i], None, "special id {id} selected");
                assert_eq!(m.input[i], id);
            } else if m.target[i].is_some() {
                selected_low += usize::from(id < FIRST_ORDINARY_ID);
                let input = m.input[i];
                assert!(
                    input == special.mask || input == id || !special.contains(input),
                    "id {id} replaced by the special id {input}"
                );
            }
        }
    }
    assert!(selected_low > 0, "ordinary ids 0..=4 were never selected");
}

#[test]
fn mlm_and_contrastive_losses_fall_on_small_data() {
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 3);
    let config = TextEncoderConfig::new(60, 16, 32, 1, 2, 64);
    let mut encoder_head = (
        config.init(&device),
        burn::nn::LinearConfig::new(32, 60).init(&device),
    );
    let mut optimizer = AdamWConfig::new().init();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // Two kinds of sequence, each the same every time: the unmasked tokens tell which kind,
    // and positions tell which token is missing.
    let sequences: Vec<Vec<u32>> = (0..8)
        .map(|s| (0..12).map(|i| 5 + ((s % 2) * 20 + i * 3) as u32).collect())
        .collect();
    let mut losses = Vec::new();
    for _ in 0..200 {
        let masked: Vec<_> = sequences
            .iter()
            .map(|s| mask_tokens(s, 0.3, 60, SpecialIds::TRAINED, &mut rng))
            .collect();
        let input: Vec<i32> = masked
            .iter()
            .flat_map(|m| m.input.iter().map(|&t| t as i32))
            .collect();
        let targets: Vec<i32> = masked
            .iter()
            .flat_map(|m| m.target.iter().map(|t| t.unwrap_or(0) as i32))
            .collect();
        let weights: Vec<f32> = masked
            .iter()
            .flat_map(|m| m.target.iter().map(|t| f32::from(u8::from(t.is_some()))))
            .collect();
        let shape = [8, 12];
        let logits = encoder_head.1.forward(
            encoder_head
                .0
                .forward(ints(&input, shape, &device), no_padding(shape, &device)),
        );
        let (loss, _) = mlm_loss(
            logits,
            ints(&targets, shape, &device),
            Tensor::<1>::from_floats(weights.as_slice(), &device).reshape(shape),
        );
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &encoder_head);
        encoder_head = optimizer.step(3e-3, encoder_head, grads);
    }
    let (first, last) = (
        losses[..5].iter().sum::<f32>(),
        losses[195..].iter().sum::<f32>(),
    );
    assert!(last < 0.25 * first, "MLM loss {first} -> {last}");

    // Contrastive: four captions, four distinct pictures.
    let contrastive_config =
        ContrastiveConfig::new(32, ImageTowerConfig::new(16, 16, 1, 2, 32), 16);
    let mut model = (config.init(&device), contrastive_config.init(&device));
    let mut optimizer = AdamWConfig::new().init();
    let images = Tensor::<4>::random([4, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
    let captions: Vec<i32> = (0..4)
        .flat_map(|c| (0..6).map(move |i| 5 + c * 6 + i))
        .collect();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let shape = [4, 6];
        let padding = no_padding(shape, &device);
        let text = model.1.embed_text(
            model
                .0
                .forward(ints(&captions, shape, &device), padding.clone()),
            padding,
        );
        let pictures = model.1.embed_images(images.clone());
        let loss = model.1.loss(text, pictures);
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(3e-3, model, grads);
    }
    assert!(
        losses[39] < 0.5 * losses[0],
        "contrastive loss {} -> {}",
        losses[0],
        losses[39]
    );
}

fn tiny_parti(layers: usize, window: usize, full_every: usize) -> PartiConfig {
    PartiConfig::new(
        TextEncoderConfig::new(30, 8, 16, 1, 2, 32),
        4,
        12,
        16,
        layers,
        2,
        32,
    )
    .with_conv_window(window)
    .with_full_attention_every(full_every)
}

#[test]
fn no_information_flows_from_later_tokens_or_from_outside_the_conv_window() {
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 5);
    // One conv layer (window 3 on a 4x4 grid), then one full causal layer.
    for (layers, full_every) in [(1usize, 0usize), (2, 2)] {
        let config = tiny_parti(layers, 3, full_every);
        let model = config.init(&device);
        let n = config.tokens();
        let x =
            Tensor::<3>::random([1, n, 16], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let masks = LayerMasks::new(config.grid, config.conv_window, &device);
        for query in [0usize, 5, 9, 15] {
            // A fresh forward per query: a backward pass consumes its graph.
            let text = ints(&[5, 6, 7], [1, 3], &device);
            let condition = model.condition(text, no_padding([1, 3], &device), None);
            let logits = model.forward_embedded(x.clone(), &condition, &masks);
            let output = logits.slice([0..1, query..query + 1, 0..12]).sum();
            let grads = output.backward();
            let g = floats(x.grad(&grads).unwrap());
            for key in 0..n {
                let norm: f32 = g[key * 16..(key + 1) * 16].iter().map(|v| v.abs()).sum();
                let may_flow = if layers == 1 {
                    conv_allowed(query, key, config.grid, 3)
                } else {
                    key <= query
                };
                if !may_flow {
                    assert_eq!(norm, 0.0, "layers {layers}: {query} <- {key}");
                } else if key == query || (layers == 1 && key == 0) {
                    assert!(
                        norm > 0.0,
                        "layers {layers}: {query} <- {key} carries nothing"
                    );
                }
            }
        }
    }
}

#[test]
fn encoder_padding_is_masked_and_the_null_condition_replaces_the_caption() {
    let device = backend::device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 6);
    let config = tiny_parti(2, 3, 2);
    let model = config.init(&device);
    let targets = ints(
        &(0..16).map(|i| i % 12).collect::<Vec<_>>(),
        [1, 16],
        &device,
    );
    // The same caption, padded to 3 and to 6 with arbitrary ids under the padding.
    let short = model.condition(
        ints(&[5, 6, 7], [1, 3], &device),
        no_padding([1, 3], &device),
        None,
    );
    let padding =
        Tensor::<1, Bool>::from_data([false, false, false, true, true, true].as_slice(), &device)
            .reshape([1, 6]);
    let long = model.condition(ints(&[5, 6, 7, 20, 21, 29], [1, 6], &device), padding, None);
    let (a, b) = (
        floats(model.forward(targets.clone(), &short)),
        floats(model.forward(targets.clone(), &long)),
    );
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "padding changed the logits by {max_diff}");

    // Dropped rows ignore their caption entirely: two different captions, both dropped, give
    // the logits of the unconditional stream.
    let drop = Tensor::<1, Bool>::from_data([true, true].as_slice(), &device);
    let two = model.condition(
        ints(&[5, 6, 7, 9, 9, 9], [2, 3], &device),
        no_padding([2, 3], &device),
        Some(drop),
    );
    let targets2 = Tensor::cat(vec![targets.clone(), targets.clone()], 0);
    let dropped = floats(model.forward(targets2.clone(), &two));
    let unconditional = floats(model.forward(targets2, &model.null(2, &device)));
    let max_diff = dropped
        .iter()
        .zip(&unconditional)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "dropped captions still matter: {max_diff}");
}

#[test]
fn kv_cached_logits_equal_a_full_recompute_at_every_step() {
    let device = backend::device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 8);
    let config = tiny_parti(3, 3, 3);
    let model = config.init(&device);
    let condition = model.condition(
        ints(&[5, 6, 7, 8, 9, 10], [2, 3], &device),
        no_padding([2, 3], &device),
        None,
    );
    let targets = ints(
        &(0..32).map(|i| (i * 5) % 12).collect::<Vec<_>>(),
        [2, 16],
        &device,
    );
    let full = floats(model.forward(targets.clone(), &condition));
    let masks = model.masks(&device);
    let mut state = model.start(&condition);
    let inputs = floats(model.shift_right(targets).float());
    for position in 0..16 {
        let input: Vec<i32> = (0..2)
            .map(|row| inputs[row * 16 + position] as i32)
            .collect();
        let logits = floats(model.step(ints(&input, [2, 1], &device), &mut state, &masks));
        for row in 0..2 {
            for v in 0..12 {
                let expected = full[(row * 16 + position) * 12 + v];
                let got = logits[row * 12 + v];
                assert!(
                    (expected - got).abs() < 1e-4,
                    "step {position} row {row}: {expected} vs {got}"
                );
            }
        }
    }
}

#[test]
fn seq2seq_loss_falls_on_a_small_token_set() {
    let device = backend::training_device("cpu").unwrap();
    let _seeded = backend::seed_exclusively(&device, 10);
    let config = tiny_parti(2, 3, 2);
    let mut model = config.init(&device);
    let mut optimizer = AdamWConfig::new().init();
    // Two captions, each always with its own image.
    let text = ints(&[5, 6, 7, 8, 9, 10], [2, 3], &device);
    let targets = ints(
        &(0..32)
            .map(|i| if i < 16 { i % 3 } else { 6 + i % 5 })
            .collect::<Vec<_>>(),
        [2, 16],
        &device,
    );
    let mut losses = Vec::new();
    for _ in 0..60 {
        let condition = model.condition(text.clone(), no_padding([2, 3], &device), None);
        let loss = token_loss(model.forward(targets.clone(), &condition), targets.clone());
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(3e-3, model, grads);
    }
    assert!(
        losses[59] < 0.2 * losses[0],
        "{} -> {}",
        losses[0],
        losses[59]
    );
}

#[test]
fn presets_match_the_paper_parameter_counts() {
    for (name, paper) in [("350M", 350e6), ("750M", 750e6), ("3B", 3e9), ("20B", 20e9)] {
        let config = PartiConfig::preset(name, 16000, 128, 32, 8192).unwrap();
        let counted = config.transformer_params() as f64;
        assert!(
            (counted / paper - 1.0).abs() < 0.05,
            "{name}: {counted} vs {paper}"
        );
        assert!(config.num_params() > config.transformer_params());
    }
    let device = backend::device("cpu").unwrap();
    let tiny = PartiConfig::preset("tiny", 1000, 128, 8, 512).unwrap();
    assert_eq!(tiny.init(&device).num_params(), tiny.num_params());
    // The contrastive pair's count, which a loaded config is checked against its weights with.
    let contrastive = models::text_encoder::ContrastiveConfig::new(
        48,
        models::text_encoder::ImageTowerConfig::new(32, 24, 2, 4, 40).with_patch_size(4),
        16,
    );
    assert_eq!(
        contrastive.init(&device).num_params(),
        contrastive.num_params()
    );
}
