//! `train tokenizer`: trains the SentencePiece text tokenizer (`models::tokenizer`, a Unigram
//! model, as Parti used) on the `ingest text` corpus and the captions of `ingest pairs` /
//! `vqgan encode` shards, or adopts a given tokenizer.json.
//!
//! Texts are streamed shard by shard: each shard's texts are normalised and split into words
//! (in parallel) and only the counts of distinct words are kept, which is also all the Unigram
//! trainer keeps. The words are handed to the trainer sorted, so the same corpus and config train
//! the same tokenizer.
//!
//! One file over 600 lines, on purpose: the corpus counting, the Unigram training around the
//! `tokenizers` trainer (its seeding and canonical ordering) and the stage that feeds them share
//! the config and the special-token rules, and read best top to bottom.

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use bytes::Bytes;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::normalizers::NFKC;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};
use tracing::{info, warn};

use manifests::shards::{CAPTION_KINDS, pairs, text, tokens};
use manifests::{Artifact, Location, Manifest, ShardSpec, StageRun, Upstream};
use models::TextTokenizer;
use models::tokenizer::{
    BOS, EOS, META_SPACE, SPECIAL_TOKENS, TOKENIZER_FILE, TOKENIZER_KIND, UNK, metaspace,
};

use crate::{Error, tool};

pub const STAGE: &str = "train.tokenizer";

fn tokenizer_error(context: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{context}: {e}"))
}

/// Presets that get the paper's 16k vocabulary (everything but `tiny`).
const FULL_PRESETS: [&str; 7] = ["small", "base", "paper", "350M", "750M", "3B", "20B"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// Pieces in the vocabulary, the five special tokens included. A corpus too small for it
    /// yields fewer (the manifest's `vocab_size` metric says how many).
    pub vocab_size: u32,
    /// Tokens per text after encoding (bos/eos included when added); longer texts are cut.
    pub max_length: usize,
    /// Longest piece, in characters.
    pub max_sentencepiece_length: usize,
    /// Share of pieces kept by each pruning round of the Unigram EM.
    pub shrinking_factor: f64,
    /// EM iterations between pruning rounds.
    pub em_sub_iterations: u32,
    /// Words (whitespace-separated runs) longer than this many characters are left out of
    /// training (as SentencePiece drops over-long sentences); they still encode.
    pub max_word_chars: usize,
    /// Wrap every encoded text in `<s> ... </s>`.
    pub add_bos_eos: bool,
    /// Texts (the first ones read) the `mean_tokens_per_text` and `unk_rate` metrics use.
    pub metric_sample: usize,
}

impl TokenizerConfig {
    /// `tiny` (a 1000-piece vocabulary for the embedded synthetic corpus) or one of `small`,
    /// `base`, `paper`, `350M`, `750M`, `3B`, `20B` (Parti's 16k SentencePiece vocabulary).
    pub fn preset(name: &str) -> Result<TokenizerConfig, Error> {
        let paper = TokenizerConfig {
            vocab_size: 16_000,
            max_length: 128,
            max_sentencepiece_length: 16,
            shrinking_factor: 0.75,
            em_sub_iterations: 2,
            max_word_chars: 1000,
            add_bos_eos: false,
            metric_sample: 10_000,
        };
        match name {
            "tiny" => Ok(TokenizerConfig {
                vocab_size: 1000,
                metric_sample: 2000,
                ..paper
            }),
            name if FULL_PRESETS.contains(&name) => Ok(paper),
            other => Err(Error::Usage(format!(
                "unknown preset '{other}' (tiny, {})",
                FULL_PRESETS.join(", ")
            ))),
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        let min_length = if self.add_bos_eos { 3 } else { 1 };
        let problem = if self.max_length < min_length {
            Some(format!(
                "max_length {} is too small (at least {min_length})",
                self.max_length
            ))
        } else if (self.vocab_size as usize) <= SPECIAL_TOKENS.len() {
            Some(format!(
                "vocab_size {} leaves no room beside the {} special tokens",
                self.vocab_size,
                SPECIAL_TOKENS.len()
            ))
        } else if self.max_sentencepiece_length == 0 {
            Some("max_sentencepiece_length must be at least 1".to_string())
        } else if !(self.shrinking_factor > 0.0 && self.shrinking_factor < 1.0) {
            Some(format!(
                "shrinking_factor {} must be between 0 and 1 (exclusive)",
                self.shrinking_factor
            ))
        } else if self.em_sub_iterations == 0 {
            Some("em_sub_iterations must be at least 1".to_string())
        } else if self.max_word_chars == 0 {
            Some("max_word_chars must be at least 1".to_string())
        } else {
            None
        };
        match problem {
            Some(problem) => Err(Error::Usage(format!("tokenizer config: {problem}"))),
            None => Ok(()),
        }
    }
}

/// post-processing or none.
fn apply_settings(tokenizer: &mut Tokenizer, config: &TokenizerConfig) -> Result<(), Error> {
    tokenizer
        .with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: config.max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(tokenizer_error("setting truncation"))?;
    tokenizer.with_padding(None);
    if config.add_bos_eos {
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| Error::Data(format!("the tokenizer has no '{token}' token")))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let template = TemplateProcessing::builder()
            .try_single(format!("{BOS} $A {EOS}"))
            .map_err(|e| Error::Tokenizer(format!("bos/eos template: {e}")))?
            .special_tokens(vec![(BOS, bos), (EOS, eos)])
            .build()
            .map_err(|e| Error::Tokenizer(format!("bos/eos template: {e}")))?;
        tokenizer.with_post_processor(Some(template));
    } else {
        tokenizer.with_post_processor(None::<TemplateProcessing>);
    }
    Ok(())
}

fn special_tokens() -> Vec<AddedToken> {
    SPECIAL_TOKENS
        .iter()
        .map(|token| AddedToken::from(*token, true))
        .collect()
}

/// What training saw and how the result encodes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingReport {
    /// Pieces of the trained tokenizer (special tokens included).
    pub vocab_size: usize,
    /// Non-empty texts read.
    pub documents: u64,
    /// Their characters (before normalisation).
    pub characters: u64,
    /// Distinct words the trainer saw.
    pub words: usize,
    /// Occurrences of words longer than `max_word_chars`, left out of training.
    pub skipped_words: u64,
    pub mean_tokens_per_text: f64,
    pub unk_rate: f64,
}

/// Word counts of a corpus, filled one batch of texts (a shard) at a time: the texts themselves
/// are not kept, only their distinct words with counts and the first texts for the metrics.
pub struct Corpus {
    words: HashMap<String, u32>,
    documents: u64,
    characters: u64,
    skipped_words: u64,
    sample: Vec<String>,
    metric_sample: usize,
    max_word_chars: usize,
    count_words: bool,
}

#[derive(Default)]
struct Counts {
    words: HashMap<String, u32>,
    skipped: u64,
}

impl Counts {
    fn merge(mut self, other: Counts) -> Counts {
        let (mut big, small) = if self.words.len() >= other.words.len() {
            (std::mem::take(&mut self.words), other.words)
        } else {
            (other.words, std::mem::take(&mut self.words))
        };
        for (word, count) in small {
            let slot = big.entry(word).or_insert(0);
            *slot = slot.saturating_add(count);
        }
        Counts {
            words: big,
            skipped: self.skipped + other.skipped,
        }
    }
}

impl Corpus {
    pub fn new(config: &TokenizerConfig) -> Corpus {
        Corpus {
            words: HashMap::new(),
            documents: 0,
            characters: 0,
            skipped_words: 0,
            sample: Vec::new(),
            metric_sample: config.metric_sample,
            max_word_chars: config.max_word_chars,
            count_words: true,
        }
    }

    /// Keeps only the document counts and the metric sample (for evaluating a given tokenizer).
    fn sample_only(config: &TokenizerConfig) -> Corpus {
        Corpus {
            count_words: false,
            ..Corpus::new(config)
        }
    }

    /// Non-empty texts added so far.
    pub fn documents(&self) -> u64 {
        self.documents
    }

    /// Normalises and splits `texts` into words (in parallel) and adds their counts.
    pub fn add<S: AsRef<str> + Sync>(&mut self, texts: &[S]) -> Result<(), Error> {
        for text in texts {
            let text = text.as_ref();
            if text.trim().is_empty() {
                continue;
            }
            self.documents += 1;
            self.characters += text.chars().count() as u64;
            if self.sample.len() < self.metric_sample {
                self.sample.push(text.to_string());
            }
        }
        if !self.count_words {
            return Ok(());
        }
        let normalizer = NFKC;
        let pre_tokenizer = metaspace();
        let max_word_chars = self.max_word_chars;
        let counts = texts
            .par_iter()
            .filter(|text| !text.as_ref().trim().is_empty())
            .try_fold(Counts::default, |mut counts, text| {
                let mut normalized = NormalizedString::from(text.as_ref());
                normalizer
                    .normalize(&mut normalized)
                    .map_err(tokenizer_error("normalising"))?;
                let mut words = PreTokenizedString::from(normalized);
                pre_tokenizer
                    .pre_tokenize(&mut words)
                    .map_err(tokenizer_error("splitting words"))?;
                for (word, _, _) in words.get_splits(OffsetReferential::Original, OffsetType::Byte)
                {
                    if word.chars().count() > max_word_chars {
                        counts.skipped += 1;
                        continue;
                    }
                    let slot = counts.words.entry(word.to_string()).or_insert(0);
                    *slot = slot.saturating_add(1);
                }
                Ok::<_, Error>(counts)
            })
            .try_reduce(Counts::default, |a, b| Ok(a.merge(b)))?;
        let merged = Counts {
            words: std::mem::take(&mut self.words),
            skipped: self.skipped_words,
        }
        .merge(counts);
        self.words = merged.words;
        self.skipped_words = merged.skipped;
        Ok(())
    }

    /// Trains the Unigram model on the words counted so far.
    pub fn train(self, config: &TokenizerConfig) -> Result<(TextTokenizer, TrainingReport), Error> {
        config.validate()?;
        if self.documents == 0 {
            return Err(Error::Data("no texts to train the tokenizer on".into()));
        }
        if self.words.is_empty() {
            return Err(Error::Data(format!(
                "the {} texts hold no word of at most {} characters (max_word_chars)",
                self.documents, self.max_word_chars
            )));
        }
        let mut counted: Vec<(String, u32)> = self.words.into_iter().collect();
        counted.sort_unstable();
        let words = counted.len();
        let characters: HashSet<char> = counted.iter().flat_map(|(w, _)| w.chars()).collect();
        let sentences = seed_visible(counted);
        // Every character is a piece, and the trainer overshoots the size when the characters
        // and special tokens alone fill it: one more piece at least.
        let needed = characters.len() + SPECIAL_TOKENS.len() + 1;
        if (config.vocab_size as usize) < needed {
            return Err(Error::Usage(format!(
                "vocab_size {} is too small for this corpus: its {} distinct characters and the {} special tokens need more than {} pieces",
                config.vocab_size,
                characters.len(),
                SPECIAL_TOKENS.len(),
                needed - 1
            )));
        }
        let trainer = UnigramTrainer::builder()
            .show_progress(false)
            .vocab_size(config.vocab_size)
            .n_sub_iterations(config.em_sub_iterations)
            .shrinking_factor(config.shrinking_factor)
            .special_tokens(special_tokens())
            .unk_token(Some(UNK.to_string()))
            .max_piece_length(config.max_sentencepiece_length)
            .build()
            .map_err(|e| Error::Tokenizer(format!("Unigram trainer settings: {e}")))?;
        info!(
            "training a Unigram model of {} pieces on {words} distinct words from {} texts",
            config.vocab_size, self.documents
        );
        let mut model = Unigram::default();
        // The trainer panics on some inputs (e.g. a NaN likelihood); report it as an error.
        catch_unwind(AssertUnwindSafe(|| trainer.do_train(sentences, &mut model)))
            .map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".to_string());
                Error::Tokenizer(format!("the Unigram trainer failed: {message}"))
            })?
            .map_err(tokenizer_error("the Unigram trainer failed"))?;
        let model = canonical(&model)?;

        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(NFKC))
            .with_pre_tokenizer(Some(metaspace()))
            .with_decoder(Some(metaspace()));
        inner.add_special_tokens(&special_tokens());
        apply_settings(&mut inner, config)?;
        let tokenizer = TextTokenizer::from_tokenizer("the trained tokenizer", inner)?;
        let ids = [
            tokenizer.pad_id(),
            tokenizer.unk_id(),
            tokenizer.bos_id(),
            tokenizer.eos_id(),
            tokenizer.mask_id(),
        ];
        if ids != [0, 1, 2, 3, 4] {
            return Err(Error::Tokenizer(format!(
                "the trained special tokens have ids {ids:?}, expected 0..5"
            )));
        }
        let vocab_size = tokenizer.vocab_size();
        if vocab_size < config.vocab_size as usize {
            warn!(
                "the corpus supports {vocab_size} pieces, fewer than the {} asked for",
                config.vocab_size
            );
        }
        if self.skipped_words > 0 {
            warn!(
                "{} words longer than {} characters were left out of training",
                self.skipped_words, self.max_word_chars
            );
        }
        let (mean_tokens_per_text, unk_rate) = tokenizer.sample_metrics(&self.sample)?;
        let report = TrainingReport {
            vocab_size,
            documents: self.documents,
            characters: self.characters,
            words,
            skipped_words: self.skipped_words,
            mean_tokens_per_text,
            unk_rate,
        };
        Ok((tokenizer, report))
    }
}

/// The trainer seeds its pieces with the substrings that are followed by different characters
/// in the concatenation of its distinct words (each word once, then a boundary): a whole word
/// qualifies only when it also starts a longer word, so on a small corpus most words never
/// become pieces, however frequent. SentencePiece seeds from raw sentences, where a word met
/// twice is followed by different words. A zero-count entry `word▁` beside every word met at
/// least twice gives the seeds that view; as the EM and the pruning weigh every entry by its
/// count, the entries change nothing else (beyond the time to segment them).
fn seed_visible(words: Vec<(String, u32)>) -> Vec<(String, u32)> {
    let mut sentences = Vec::with_capacity(words.len() * 2);
    for (word, count) in words {
        if count >= 2 {
            sentences.push((format!("{word}{META_SPACE}"), 0));
        }
        sentences.push((word, count));
    }
    sentences
}

/// The trained model with its pieces in a reproducible order. The trainer's last step walks a
/// hash set (seeded per process) of the corpus characters: characters the EM dropped get the
/// lowest score plus 0.0001 per character in that walk's order, and equal scores are left in it.
/// Here those characters get the same scores in character order, and pieces are sorted by score,
/// then text, so one corpus and config give the same tokenizer.json (up to the float sums of the
/// EM's parallel E-step, which rayon may group differently on another number of threads).
fn canonical(model: &Unigram) -> Result<Unigram, Error> {
    let vocab: Vec<(String, f64)> = model.iter().cloned().collect();
    let specials = SPECIAL_TOKENS.len().min(vocab.len());
    let (special, pieces) = vocab.split_at(specials);
    let mut pieces = pieces.to_vec();
    let lowest = pieces
        .iter()
        .map(|(_, score)| *score)
        .filter(|score| score.is_finite())
        .fold(f64::INFINITY, f64::min);
    if lowest.is_finite() {
        // The characters on the trainer's penalty ladder (lowest + k * 0.0001, accumulated as it
        // does), with any piece that happens to share one of those scores: which character got
        // which rung depends on the walk's order, the set of characters and scores does not.
        let (mut penalty, mut ladder) = (0.0f64, Vec::new());
        loop {
            let score = lowest + penalty;
            let rung: Vec<usize> = (0..pieces.len())
                .filter(|i| pieces[*i].1 == score && pieces[*i].0.chars().count() == 1)
                .collect();
            if rung.is_empty() {
                break;
            }
            ladder.extend(rung);
            penalty += 0.0001;
        }
        let mut scores: Vec<f64> = ladder.iter().map(|i| pieces[*i].1).collect();
        scores.sort_by(f64::total_cmp);
        let mut characters: Vec<String> = ladder.iter().map(|i| pieces[*i].0.clone()).collect();
        characters.sort();
        let rescored: HashMap<String, f64> = characters.into_iter().zip(scores).collect();
        for (piece, score) in &mut pieces {
            if let Some(new) = rescored.get(piece) {
                *score = *new;
            }
        }
    }
    pieces.sort_by(|(a, x), (b, y)| y.total_cmp(x).then_with(|| a.cmp(b)));
    let vocab: Vec<(String, f64)> = special.iter().cloned().chain(pieces).collect();
    let unk = SPECIAL_TOKENS.iter().position(|t| *t == UNK);
    Unigram::from(vocab, unk, false).map_err(tokenizer_error("rebuilding the Unigram model"))
}

/// Trains a tokenizer on texts in memory (one batch; see [`Corpus`] for streaming).
pub fn train_on_texts<S: AsRef<str> + Sync>(
    texts: &[S],
    config: &TokenizerConfig,
) -> Result<(TextTokenizer, TrainingReport), Error> {
    config.validate()?;
    let mut corpus = Corpus::new(config);
    corpus.add(texts)?;
    corpus.train(config)
}

/// A user-given tokenizer.json made a parti tokenizer: its model, normaliser, pre-tokenizer
/// and decoder are kept; special tokens it lacks are appended to the vocabulary; truncation,
/// padding and bos/eos follow `config`.
pub fn adopt(name: &str, bytes: &[u8], config: &TokenizerConfig) -> Result<TextTokenizer, Error> {
    config.validate()?;
    let mut inner = Tokenizer::from_bytes(bytes)
        .map_err(|e| Error::Data(format!("{name}: not a tokenizers tokenizer.json: {e}")))?;
    let missing: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .filter(|token| inner.token_to_id(token).is_none())
        .map(|token| AddedToken::from(*token, true))
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|t| t.content.as_str()).collect();
        warn!(
            "{name}: adding the special tokens it lacks ({}) at the end of its vocabulary",
            names.join(" ")
        );
        inner.add_special_tokens(&missing);
    }
    apply_settings(&mut inner, config)?;
    TextTokenizer::from_tokenizer(name, inner)
}

/// Where `train tokenizer` reads from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `ingest text` manifests (or their folders).
    pub text: Vec<String>,
    /// `ingest pairs` or `vqgan encode` manifests: their `caption` columns.
    pub captions: Vec<String>,
    /// A tokenizer.json to adopt instead of training; the texts, if any, are only measured.
    pub from_file: Option<String>,
}

fn input_name(base: &str, index: usize) -> String {
    if index == 0 {
        base.to_string()
    } else {
        format!("{base}.{}", index + 1)
    }
}

/// The texts of one shard: a text shard's documents, a pairs or token shard's captions.
fn shard_texts(stage: &Upstream, artifact: &Artifact) -> Result<Vec<String>, Error> {
    Ok(match artifact.kind.as_str() {
        text::KIND => text::read(stage, artifact)?
            .into_iter()
            .map(|row| row.text)
            .collect(),
        pairs::KIND => pairs::read(stage, artifact)?
            .into_iter()
            .map(|row| row.caption)
            .collect(),
        tokens::KIND => tokens::read(stage, artifact)?
            .into_iter()
            .map(|row| row.caption)
            .collect(),
        other => {
            return Err(Error::Data(format!(
                "{}: '{other}' shards hold no text",
                stage.location.uri()
            )));
        }
    })
}

/// Adds the texts of every `kinds` shard of `stage` to `corpus`, shard by shard.
fn read_texts(
    corpus: &mut Corpus,
    stage: &Upstream,
    flag: &str,
    kinds: &[&str],
) -> Result<(), Error> {
    let shards: Vec<_> = kinds
        .iter()
        .flat_map(|kind| stage.artifacts_of_kind(kind))
        .collect();
    if shards.is_empty() {
        return Err(Error::Data(format!(
            "{}: {flag} needs a manifest with {} shards; this one (stage '{}') has none",
            stage.location.uri(),
            kinds.join(" or "),
            stage.manifest.stage
        )));
    }
    for artifact in shards {
        corpus.add(&shard_texts(stage, artifact)?)?;
    }
    Ok(())
}

/// `train tokenizer`: trains (or adopts `--from-file`) the tokenizer and publishes
/// `tokenizer.json` with its metrics. Skips itself when config and inputs are unchanged.
pub fn train_tokenizer(
    config: &TokenizerConfig,
    sources: &Sources,
    out: &str,
    force: bool,
) -> Result<Manifest, Error> {
    let started = Instant::now();
    config.validate()?;
    if sources.from_file.is_none() && sources.text.is_empty() && sources.captions.is_empty() {
        return Err(Error::Usage(
            "nothing to train on: give --text (an `ingest text` manifest) and/or --captions (an `ingest pairs` or `vqgan encode` manifest), or --from-file tokenizer.json".into(),
        ));
    }
    let mut run = StageRun::new(STAGE, tool(), out, config, ShardSpec::single())?;
    let given = match &sources.from_file {
        Some(uri) => {
            let location = Location::parse(uri)?;
            let bytes = location.get()?;
            run.source_bytes("tokenizer", &location.uri(), &bytes)?;
            Some((location.uri(), bytes))
        }
        None => None,
    };
    let mut texts = Vec::new();
    for (i, uri) in sources.text.iter().enumerate() {
        texts.push(run.upstream(&input_name("text", i), uri)?);
    }
    let mut captions = Vec::new();
    for (i, uri) in sources.captions.iter().enumerate() {
        captions.push(run.upstream(&input_name("captions", i), uri)?);
    }
    if let Some(existing) = run.begin(force)? {
        return Ok(existing);
    }

    let mut corpus = if given.is_some() {
        Corpus::sample_only(config)
    } else {
        Corpus::new(config)
    };
    for stage in &texts {
        read_texts(&mut corpus, stage, "--text", &[text::KIND])?;
    }
    for stage in &captions {
        read_texts(&mut corpus, stage, "--captions", &CAPTION_KINDS)?;
    }
    let mut metrics = Map::new();
    let tokenizer = match given {
        Some((uri, bytes)) => {
            let tokenizer = adopt(&uri, &bytes, config)?;
            metrics.insert("vocab_size".into(), json!(tokenizer.vocab_size()));
            metrics.insert("documents".into(), json!(corpus.documents));
            metrics.insert("characters".into(), json!(corpus.characters));
            if !corpus.sample.is_empty() {
                let (mean, unk_rate) = tokenizer.sample_metrics(&corpus.sample)?;
                metrics.insert("mean_tokens_per_text".into(), json!(mean));
                metrics.insert("unk_rate".into(), json!(unk_rate));
            }
            info!("adopted {uri} ({} pieces)", tokenizer.vocab_size());
            tokenizer
        }
        None => {
            if corpus.documents == 0 {
                return Err(Error::Data(format!(
                    "the inputs ({}) hold no non-empty text",
                    sources
                        .text
                        .iter()
                        .chain(&sources.captions)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let (tokenizer, report) = corpus.train(config)?;
            metrics.insert("vocab_size".into(), json!(report.vocab_size));
            metrics.insert("documents".into(), json!(report.documents));
            metrics.insert("characters".into(), json!(report.characters));
            metrics.insert("words".into(), json!(report.words));
            metrics.insert("skipped_words".into(), json!(report.skipped_words));
            metrics.insert(
                "mean_tokens_per_text".into(),
                json!(report.mean_tokens_per_text),
            );
            metrics.insert("unk_rate".into(), json!(report.unk_rate));
            tokenizer
        }
    };
    let json = tokenizer.to_json()?;
    let artifacts = vec![run.write_artifact(
        TOKENIZER_FILE,
        TOKENIZER_KIND,
        Bytes::from(json.into_bytes()),
        None,
    )?];
    metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
    Ok(run.publish(artifacts, metrics)?)
}
