//! `train tokenizer`: a trained tokenizer round-trips ASCII, accented Latin, CJK and emoji text
//! (after NFKC), keeps its special ids fixed, truncates and pads as asked; the stage end to end on
//! the embedded synthetic corpus, including skipping an unchanged rerun and `--from-file`.

use std::path::Path;
use std::process::Command;

use manifests::Upstream;
use models::TextTokenizer;
use train::tokenizer::{TokenizerConfig, train_on_texts};

const SAMPLES: [&str; 6] = [
    "a red circle at the top left",
    "the quick brown fox jumps over the lazy dog",
    "café naïve résumé",
    "東京の天気",
    "🙂🚀",
    "ｆｕｌｌｗｉｄｔｈ ﬁne",
];

/// The samples among some filler, repeated so the trainer sees them often.
fn corpus() -> Vec<String> {
    let filler = [
        "a blue square at the bottom right",
        "two green triangles in the middle",
        "a large yellow circle next to a small red square",
        "the weather in tokyo is fine today",
        "a naïve café serves a résumé of the day",
        "東京の天気は晴れです",
        "rockets 🚀 and smiles 🙂 everywhere",
    ];
    let mut texts = Vec::new();
    for round in 0..20 {
        for (i, text) in SAMPLES.iter().chain(filler.iter()).enumerate() {
            texts.push(format!(
                "{text} {}",
                ["", "again", "once more"][(round + i) % 3]
            ));
        }
    }
    texts
}

fn config(vocab_size: u32) -> TokenizerConfig {
    TokenizerConfig {
        vocab_size,
        ..TokenizerConfig::preset("tiny").unwrap()
    }
}

fn trained(config: &TokenizerConfig) -> TextTokenizer {
    train_on_texts(&corpus(), config).unwrap().0
}

fn round_trip(tokenizer: &TextTokenizer, text: &str) -> String {
    let ids = tokenizer.encode(text).unwrap();
    assert!(!ids.is_empty(), "{text:?} encodes to nothing");
    tokenizer.decode(&ids).unwrap()
}

#[test]
fn decode_of_encode_gives_back_the_nfkc_text() {
    let (tokenizer, report) = train_on_texts(&corpus(), &config(300)).unwrap();
    assert!(
        report.vocab_size > 50 && report.vocab_size <= 300,
        "{report:?}"
    );
    assert_eq!(report.documents, corpus().len() as u64);
    assert_eq!(report.unk_rate, 0.0, "{report:?}");
    assert!(report.mean_tokens_per_text > 1.0, "{report:?}");
    for text in &SAMPLES[..5] {
        assert_eq!(round_trip(&tokenizer, text), *text);
    }
    // NFKC: full-width letters and the fi ligature become plain ASCII; a combining accent
    // composes.
    assert_eq!(round_trip(&tokenizer, SAMPLES[5]), "fullwidth fine");
    assert_eq!(round_trip(&tokenizer, "cafe\u{301}"), "café");
    assert_eq!(tokenizer.normalize("ｆｕｌｌ").unwrap(), "full");
    // Unknown characters become <unk>, without a panic.
    let ids = tokenizer.encode("a ж circle").unwrap();
    assert!(ids.contains(&tokenizer.unk_id()), "{ids:?}");
    let text = tokenizer.decode(&ids).unwrap();
    assert!(text.contains("<unk>") && text.contains("circle"), "{text}");
    // Ids outside the vocabulary are an error, not a panic.
    assert!(tokenizer.decode(&[u32::MAX]).is_err());
}

#[test]
fn special_ids_are_fixed_and_truncation_and_padding_work() {
    let tokenizer = trained(&TokenizerConfig {
        max_length: 16,
        ..config(300)
    });
    assert_eq!(
        [
            tokenizer.pad_id(),
            tokenizer.unk_id(),
            tokenizer.bos_id(),
            tokenizer.eos_id(),
            tokenizer.mask_id()
        ],
        [0, 1, 2, 3, 4]
    );
    assert_eq!(tokenizer.max_length(), 16);
    let long = "a red circle at the top left ".repeat(20);
    assert_eq!(tokenizer.encode(&long).unwrap().len(), 16);
    let short = tokenizer.encode("a red circle").unwrap();
    assert!(short.len() < 16 && !short.contains(&tokenizer.bos_id()));

    let (ids, mask) = tokenizer
        .encode_batch_padded(&["a red circle", &long], 20)
        .unwrap();
    assert_eq!((ids.len(), mask.len()), (40, 40));
    assert_eq!(&ids[..short.len()], short.as_slice());
    assert!(ids[short.len()..20].iter().all(|id| *id == 0));
    assert!(mask[..short.len()].iter().all(|m| *m));
    assert!(mask[short.len()..20].iter().all(|m| !*m));
    // The long text is cut at max_length (16), then padded to 20.
    assert!(mask[20..36].iter().all(|m| *m) && mask[36..].iter().all(|m| !*m));
    assert!(ids[36..].iter().all(|id| *id == 0));

    // max_length survives a trip through tokenizer.json.
    let reloaded = TextTokenizer::from_bytes(tokenizer.to_json().unwrap().as_bytes()).unwrap();
    assert_eq!(reloaded.max_length(), 16);
    assert_eq!(
        reloaded.encode(&long).unwrap(),
        tokenizer.encode(&long).unwrap()
    );

    // With add_bos_eos the text is wrapped, and still cut to max_length.
    let wrapped = trained(&TokenizerConfig {
        max_length: 16,
        add_bos_eos: true,
        ..config(300)
    });
    let ids = wrapped.encode("a red circle").unwrap();
    assert_eq!((ids[0], ids[ids.len() - 1]), (2, 3));
    assert_eq!(wrapped.decode(&ids).unwrap(), "a red circle");
    let ids = wrapped.encode(&long).unwrap();
    assert_eq!(ids.len(), 16);
    assert_eq!((ids[0], ids[15]), (2, 3));
}

#[test]
fn the_same_corpus_trains_the_same_tokenizer() {
    let a = trained(&config(300)).to_json().unwrap();
    let b = trained(&config(300)).to_json().unwrap();
    assert!(a == b, "two trainings on one corpus differ");
}

#[test]
fn bad_configs_and_files_are_clear_errors() {
    let err = train_on_texts(&corpus(), &config(20))
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab_size 20"), "{err}");
    let empty: [&str; 2] = ["", "  "];
    let err = train_on_texts(&empty, &config(300))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no texts"), "{err}");
    let err = TokenizerConfig::preset("huge").unwrap_err().to_string();
    assert!(
        err.contains("huge") && err.contains("tiny") && err.contains("350M"),
        "{err}"
    );
    assert_eq!(TokenizerConfig::preset("350M").unwrap().vocab_size, 16_000);
    let err = TextTokenizer::from_bytes(b"{not json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

fn run(binary: &Path, args: &[&str]) -> String {
    let (code, text) = manifests::testing::output_of(binary, args);
    assert_eq!(code, 0, "{} {args:?}: {text}", binary.display());
    text
}

#[test]
fn the_stage_trains_on_ingest_manifests_skips_reruns_and_adopts_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let train = Path::new(env!("CARGO_BIN_EXE_train"));
    // 30 documents hold only ~54 distinct words (~90 pieces); 300 give the corpus room for
    // more than 100.
    let steps = manifests::testing::few_step_pipeline(40, 300);
    let bin = manifests::testing::bin_dir(env!("CARGO_BIN_EXE_train"));
    manifests::testing::run_stages(&bin, dir.path(), &steps[..3]);

    // No input at all is a usage error.
    let output = Command::new(train)
        .args(["tokenizer", "--out", &path("nothing")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("--text") && err.contains("--captions"),
        "{err}"
    );
    // It draws nothing at random: a seed is refused, not ignored.
    let output = Command::new(train)
        .args(["tokenizer", "--text", &path("text"), "--seed", "3"])
        .args(["--out", &path("seeded")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--seed"), "{err}");

    let args = [
        "tokenizer",
        "--preset",
        "tiny",
        "--text",
        &path("text"),
        "--captions",
        &path("pairs"),
        "--out",
        &path("tok"),
    ];
    run(train, &args);
    let (stage, _) = Upstream::read(&path("tok")).unwrap();
    let metrics = &stage.manifest.metrics;
    let vocab_size = metrics["vocab_size"].as_u64().unwrap();
    assert!(vocab_size > 100 && vocab_size <= 1000, "{metrics:?}");
    assert!(metrics["unk_rate"].as_f64().unwrap() < 0.01, "{metrics:?}");
    assert!(metrics["documents"].as_u64().unwrap() >= 300, "{metrics:?}");
    assert!(metrics["mean_tokens_per_text"].as_f64().unwrap() > 1.0);
    let inputs: Vec<_> = stage.manifest.inputs.iter().map(|i| &i.name).collect();
    assert_eq!(inputs, ["text", "captions"]);
    assert!(stage.manifest.verify(&stage.location, true).is_empty());

    let tokenizer = TextTokenizer::from_manifest(&stage).unwrap();
    assert_eq!(tokenizer.vocab_size() as u64, vocab_size);
    let caption = "a red circle at the top left";
    let ids = tokenizer.encode(caption).unwrap();
    assert!(!ids.contains(&tokenizer.unk_id()), "{ids:?}");
    assert_eq!(tokenizer.decode(&ids).unwrap(), caption);

    let again = run(train, &args);
    assert!(again.contains("up to date"), "{again}");

    let file = dir.path().join("tok").join("tokenizer.json");
    let adopted_args = [
        "tokenizer",
        "--from-file",
        file.to_str().unwrap(),
        "--out",
        &path("adopted"),
    ];
    run(train, &adopted_args);
    let (adopted, _) = Upstream::read(&path("adopted")).unwrap();
    assert_eq!(adopted.manifest.inputs[0].kind, "source");
    assert_eq!(
        adopted.manifest.inputs[0].files[0].digest,
        manifests::digest_bytes(&std::fs::read(&file).unwrap())
    );
    let adopted = TextTokenizer::from_manifest(&adopted).unwrap();
    assert_eq!(adopted.vocab_size(), tokenizer.vocab_size());
    for text in [caption, "two green triangles", "東京の天気 🙂"] {
        assert_eq!(
            adopted.encode(text).unwrap(),
            tokenizer.encode(text).unwrap()
        );
    }
}

#[test]
fn a_foreign_tokenizer_is_adopted_with_the_special_tokens_it_lacks() {
    // A word-level tokenizer.json without parti's special tokens and without truncation.
    let foreign = r#"{
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2},
                  "unk_token": "[UNK]"}
    }"#;
    let err = TextTokenizer::from_bytes(foreign.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(err.contains("<pad>"), "{err}");
    let config = TokenizerConfig {
        max_length: 2,
        ..config(300)
    };
    let adopted = train::tokenizer::adopt("foreign.json", foreign.as_bytes(), &config).unwrap();
    assert_eq!(adopted.vocab_size(), 8);
    assert_eq!(adopted.pad_id(), 3);
    assert_eq!(adopted.mask_id(), 7);
    assert_eq!(adopted.max_length(), 2);
    assert_eq!(adopted.encode("hello world hello").unwrap(), [0, 1]);
    let (ids, mask) = adopted.encode_batch_padded(&["world"], 3).unwrap();
    assert_eq!((ids, mask), (vec![1, 3, 3], vec![true, false, false]));
}
