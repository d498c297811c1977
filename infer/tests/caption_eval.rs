//! The caption evaluation measures something: on the shapes data, with the tiny preset's
//! models, a trained transformer reads far above one that was only initialised (one step at the
//! start of warm-up), while both are scored by the same text encoder against the same real
//! pictures.

use infer::EvalConfig;
use infer::sample::SamplingConfig;

#[test]
fn the_caption_evaluation_ranks_a_trained_model_above_an_untrained_one() {
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path();
    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_infer"));
    // Enough training for the transformer to draw the right colour most of the time (about two
    // minutes on 2 cores), not to reach the preset's figures.
    let stages: Vec<String> = vec![
        "ingest synth --out D/synth --images 400 --documents 100".into(),
        "ingest pairs --preset tiny --input D/synth/pairs --out D/pairs".into(),
        "ingest text --input D/synth/text --out D/text".into(),
        "train tokenizer --text D/text --captions D/pairs --out D/tokenizer".into(),
        "vqgan train --pairs D/pairs --out D/vqgan --steps 400 --batch-size 8".into(),
        "vqgan encode --vqgan D/vqgan --pairs D/pairs --out D/tokens".into(),
        "train text-encoder --tokenizer D/tokenizer --text D/text --pairs D/pairs \
         --out D/text-encoder --steps 150 --batch-size 16"
            .into(),
        "train parti --tokens D/tokens --tokenizer D/tokenizer --text-encoder D/text-encoder \
         --out D/parti --steps 1200 --batch-size 8"
            .into(),
        "train parti --tokens D/tokens --tokenizer D/tokenizer --text-encoder D/text-encoder \
         --out D/untrained --steps 1 --batch-size 8"
            .into(),
    ];
    manifests::testing::run_stages(&bin, dir, &stages);
    let config = EvalConfig {
        prompts: 8,
        captions: 32,
        sampling: SamplingConfig {
            temperature: 0.1,
            guidance_scale: 1.1,
            samples: 2,
            ..SamplingConfig::default()
        },
    };
    let captions = |parti: &str| {
        let out = dir.join(format!("eval-{parti}"));
        let manifest = infer::evaluate(
            &config,
            dir.join(parti).to_str().unwrap(),
            None,
            out.to_str().unwrap(),
            "cpu",
            false,
        )
        .unwrap();
        manifest.metrics["captions"].clone()
    };
    let (trained, untrained) = (captions("parti"), captions("untrained"));
    let read =
        |metrics: &serde_json::Value, side: &str, name: &str| metrics[side][name].as_f64().unwrap();
    // The same captions and real pictures on both sides.
    assert_eq!(trained["captions"], untrained["captions"]);
    assert_eq!(trained["real"], untrained["real"]);
    assert!(
        read(&trained, "generated", "similarity")
            > read(&untrained, "generated", "similarity") + 0.2,
        "trained {trained}\nuntrained {untrained}"
    );
    assert!(
        read(&trained, "generated", "retrieval_top1")
            > read(&untrained, "generated", "retrieval_top1"),
        "trained {trained}\nuntrained {untrained}"
    );
    // The scorer itself tells real pictures' captions apart well above chance.
    assert!(
        read(&trained, "real", "retrieval_top1") > 3.0 * trained["chance_top1"].as_f64().unwrap(),
        "{trained}"
    );

    // A reranker trained with another tokenizer (texts cut at 16 tokens, where the
    // transformer's tokenizer makes up to 128) is refused when the generator loads, naming it;
    // it used to load, and the first long prompt panicked past its position table.
    manifests::testing::run_stages(
        &bin,
        dir,
        &[
            "train tokenizer --text D/text --captions D/pairs --out D/short-tokenizer \
             --max-length 16",
            "train text-encoder --tokenizer D/short-tokenizer --text D/text --pairs D/pairs \
             --out D/short-text-encoder --steps 1 --batch-size 4",
        ],
    );
    let short = dir.join("short-text-encoder");
    let refused = infer::sample::Generator::load(
        dir.join("parti").to_str().unwrap(),
        None,
        Some(short.to_str().unwrap()),
        "cpu",
    )
    .err()
    .expect("a text encoder of another tokenizer was accepted")
    .to_string();
    assert!(
        refused.contains("short-text-encoder") && refused.contains("16 tokens"),
        "{refused}"
    );
}
