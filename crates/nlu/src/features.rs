//! TF-IDF features over two blocks of terms, each L2-normalised on its own and then weighted:
//!
//! - words: jieba words for text with Han characters, scanned words otherwise (optionally
//!   Snowball-stemmed), as n-grams joined by a space;
//! - characters: n-grams over runs of Han characters, and word-bounded n-grams (the word padded
//!   with a space on each side) over everything else between spaces.
//!
//! The vocabulary keeps terms seen in at least `min_df` training texts (once there are enough
//! texts for that to mean something), sorted, so the same
//! texts and configuration always give the same feature indices. IDF is the smoothed
//! `ln((1 + n) / (1 + df)) + 1`; term frequency is `1 + ln(tf)` when sublinear.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use tandem_text::{char_ngrams, char_wb_ngrams, has_han, is_han, stem_english, words};

use crate::error::{NluError, NluResult};
use crate::hashing::FxHashMap;

/// An inclusive n-gram length range; `max == 0` switches the block off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NgramRange {
    /// Shortest n-gram.
    pub min: u8,
    /// Longest n-gram.
    pub max: u8,
}

impl NgramRange {
    /// Returns the range `min..=max`.
    pub const fn new(min: u8, max: u8) -> Self {
        Self { min, max }
    }

    /// Returns the empty range.
    pub const fn off() -> Self {
        Self { min: 0, max: 0 }
    }

    fn is_on(self) -> bool {
        self.min >= 1 && self.max >= self.min
    }
}

/// What the features of a text are made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// Word n-grams.
    pub word_ngrams: NgramRange,
    /// Stem English (non-Han) words before making word n-grams.
    pub stem_english: bool,
    /// Non-Han words shorter than this (in characters) are left out of the word block.
    pub min_latin_word_chars: u8,
    /// Word-bounded character n-grams of non-Han words.
    pub latin_char_ngrams: NgramRange,
    /// Character n-grams of runs of Han characters.
    pub han_char_ngrams: NgramRange,
    /// Use `1 + ln(tf)` instead of raw counts.
    pub sublinear_tf: bool,
    /// Terms seen in fewer training texts are not features…
    pub min_df: u32,
    /// …when there are at least this many training texts (small sets keep every term).
    pub min_df_from_texts: usize,
    /// Weight of the (unit-length) word block.
    pub word_weight: f32,
    /// Weight of the (unit-length) character block.
    pub char_weight: f32,
}

impl FeatureConfig {
    /// The configuration for intents: words 1–2, English character 2–5, Chinese character 1–3.
    pub fn intents() -> Self {
        Self {
            word_ngrams: NgramRange::new(1, 2),
            stem_english: true,
            min_latin_word_chars: 2,
            latin_char_ngrams: NgramRange::new(2, 5),
            han_char_ngrams: NgramRange::new(1, 3),
            sublinear_tf: true,
            min_df: 2,
            min_df_from_texts: 1000,
            word_weight: 1.0,
            char_weight: 1.0,
        }
    }

    /// The configuration for sentiment: the same blocks as for intents.
    pub fn sentiment() -> Self {
        Self::intents()
    }

    /// Checks the ranges and weights.
    pub fn validate(&self) -> NluResult<()> {
        let ranges = [
            self.word_ngrams,
            self.latin_char_ngrams,
            self.han_char_ngrams,
        ];
        if ranges
            .iter()
            .any(|r| r.max > 8 || (r.max > 0 && r.min == 0) || r.min > r.max)
        {
            return Err(NluError::InvalidArgument(
                "n-gram ranges must satisfy 1 <= min <= max <= 8 (or be off)".to_owned(),
            ));
        }
        if !ranges.iter().any(|r| r.is_on()) {
            return Err(NluError::InvalidArgument(
                "every feature block is off".to_owned(),
            ));
        }
        let weights = [self.word_weight, self.char_weight];
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(NluError::InvalidArgument(
                "block weights must be finite and >= 0".into(),
            ));
        }
        Ok(())
    }
}

/// Which block a term belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// A single word (a word 1-gram).
    Unigram,
    /// A word n-gram of two words or more.
    Word,
    Char,
}

/// Returns the words of the normalised `text` that word n-grams are made of: Han words as they
/// are, other words long enough and stemmed when configured.
fn feature_words<'a>(config: &FeatureConfig, text: &'a str) -> Vec<Cow<'a, str>> {
    let han = has_han(text);
    words(text)
        .into_iter()
        .filter_map(|token| {
            let is_han_word = han && token.text.chars().any(is_han);
            if is_han_word {
                Some(Cow::Borrowed(token.text))
            } else if token.text.chars().count() < usize::from(config.min_latin_word_chars) {
                None
            } else if config.stem_english {
                Some(stem_english(token.text))
            } else {
                Some(Cow::Borrowed(token.text))
            }
        })
        .collect()
}

/// Calls `visit` with every term of the normalised `text`, repeated as often as it occurs.
fn visit_terms(config: &FeatureConfig, text: &str, mut visit: impl FnMut(Block, &str)) {
    if config.word_ngrams.is_on() {
        let kept = feature_words(config, text);
        let (min, max) = (
            usize::from(config.word_ngrams.min),
            usize::from(config.word_ngrams.max),
        );
        let mut joined = String::new();
        for first in 0..kept.len() {
            for n in min..=max {
                if first + n > kept.len() {
                    break;
                }
                if n == 1 {
                    visit(Block::Unigram, &kept[first]);
                } else {
                    joined.clear();
                    for (i, word) in kept[first..first + n].iter().enumerate() {
                        if i > 0 {
                            joined.push(' ');
                        }
                        joined.push_str(word);
                    }
                    visit(Block::Word, &joined);
                }
            }
        }
    }
    let han_range = config.han_char_ngrams;
    let latin_range = config.latin_char_ngrams;
    if !han_range.is_on() && !latin_range.is_on() {
        return;
    }
    for chunk in text.split(' ').filter(|chunk| !chunk.is_empty()) {
        let mut run_start = 0;
        let mut run_is_han = None;
        for (i, c) in chunk.char_indices().chain([(chunk.len(), ' ')]) {
            let this_is_han = i < chunk.len() && is_han(c);
            if run_is_han.is_some_and(|was| was != this_is_han) || i == chunk.len() {
                let run = &chunk[run_start..i];
                match run_is_han {
                    Some(true) if han_range.is_on() => char_ngrams(
                        run,
                        usize::from(han_range.min),
                        usize::from(han_range.max),
                        |gram| visit(Block::Char, gram),
                    ),
                    Some(false) if latin_range.is_on() => char_wb_ngrams(
                        run,
                        usize::from(latin_range.min),
                        usize::from(latin_range.max),
                        |gram| visit(Block::Char, gram),
                    ),
                    _ => {}
                }
                run_start = i;
            }
            run_is_han = Some(this_is_han);
        }
    }
}

/// A sparse vector: sorted, distinct indices and their values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseVector {
    /// Feature indices, ascending.
    pub indices: Vec<u32>,
    /// The value of each index.
    pub values: Vec<f32>,
}

/// Rows of sparse vectors stored one after another.
#[derive(Debug, Clone, Default)]
pub struct SparseMatrix {
    offsets: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f32>,
}

impl SparseMatrix {
    /// Returns an empty matrix.
    pub fn new() -> Self {
        Self {
            offsets: vec![0],
            indices: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn push(&mut self, row: &SparseVector) {
        self.indices.extend_from_slice(&row.indices);
        self.values.extend_from_slice(&row.values);
        self.offsets.push(self.indices.len());
    }

    /// Returns the number of rows.
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Returns row `i` as (indices, values).
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let range = self.offsets[i]..self.offsets[i + 1];
        (&self.indices[range.clone()], &self.values[range])
    }

    /// Returns a matrix made of the given rows, in that order.
    pub fn select(&self, rows: &[usize]) -> Self {
        let mut out = Self::new();
        for &i in rows {
            let (indices, values) = self.row(i);
            out.indices.extend_from_slice(indices);
            out.values.extend_from_slice(values);
            out.offsets.push(out.indices.len());
        }
        out
    }

    /// Returns the number of stored values.
    pub fn stored(&self) -> usize {
        self.indices.len()
    }
}

/// A fitted TF-IDF vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredVectoriser", into = "StoredVectoriser")]
pub struct Vectoriser {
    config: FeatureConfig,
    word_terms: FxHashMap<String, u32>,
    char_terms: FxHashMap<String, u32>,
    idf: Vec<f32>,
}

/// The stored form: terms in index order, so the maps need not be serialised.
#[derive(Serialize, Deserialize)]
struct StoredVectoriser {
    config: FeatureConfig,
    word_terms: Vec<String>,
    char_terms: Vec<String>,
    idf: Vec<f32>,
}

impl From<StoredVectoriser> for Vectoriser {
    fn from(stored: StoredVectoriser) -> Self {
        let offset = stored.word_terms.len() as u32;
        let word_terms = stored.word_terms.into_iter().zip(0..).collect();
        let char_terms = stored.char_terms.into_iter().zip(offset..).collect();
        Self {
            config: stored.config,
            word_terms,
            char_terms,
            idf: stored.idf,
        }
    }
}

impl From<Vectoriser> for StoredVectoriser {
    fn from(vectoriser: Vectoriser) -> Self {
        fn in_index_order(terms: FxHashMap<String, u32>) -> Vec<String> {
            let mut pairs: Vec<(String, u32)> = terms.into_iter().collect();
            pairs.sort_unstable_by_key(|(_, index)| *index);
            pairs.into_iter().map(|(term, _)| term).collect()
        }
        Self {
            config: vectoriser.config,
            word_terms: in_index_order(vectoriser.word_terms),
            char_terms: in_index_order(vectoriser.char_terms),
            idf: vectoriser.idf,
        }
    }
}

impl Vectoriser {
    /// Learns the vocabulary and IDF from normalised training texts.
    pub fn fit(config: FeatureConfig, texts: &[&str]) -> NluResult<Self> {
        config.validate()?;
        // term -> (document frequency, last document that counted it)
        let mut word_df: FxHashMap<String, (u32, u32)> = FxHashMap::default();
        let mut char_df: FxHashMap<String, (u32, u32)> = FxHashMap::default();
        for (doc, text) in (0_u32..).zip(texts) {
            visit_terms(&config, text, |block, term| {
                let table = match block {
                    Block::Unigram | Block::Word => &mut word_df,
                    Block::Char => &mut char_df,
                };
                match table.get_mut(term) {
                    Some((df, last)) => {
                        if *last != doc {
                            *df += 1;
                            *last = doc;
                        }
                    }
                    None => {
                        table.insert(term.to_owned(), (1, doc));
                    }
                }
            });
        }
        let n = texts.len() as f32;
        let min_df = if texts.len() >= config.min_df_from_texts {
            config.min_df.max(1)
        } else {
            1
        };
        let mut idf = Vec::new();
        let mut index_terms = |table: FxHashMap<String, (u32, u32)>| {
            let mut kept: Vec<(String, u32)> = table
                .into_iter()
                .filter(|(_, (df, _))| *df >= min_df)
                .map(|(term, (df, _))| (term, df))
                .collect();
            kept.sort_unstable();
            let mut terms = FxHashMap::default();
            terms.reserve(kept.len());
            for (term, df) in kept {
                terms.insert(term, idf.len() as u32);
                idf.push(((1.0 + n) / (1.0 + df as f32)).ln() + 1.0);
            }
            terms
        };
        let word_terms = index_terms(word_df);
        let char_terms = index_terms(char_df);
        if idf.is_empty() {
            return Err(NluError::InvalidTrainingSet(
                "the texts produce no features (are they empty?)".to_owned(),
            ));
        }
        Ok(Self {
            config,
            word_terms,
            char_terms,
            idf,
        })
    }

    /// Checks a vectoriser read from storage: every term has an IDF, and every IDF is finite.
    pub(crate) fn check(&self) -> NluResult<()> {
        self.config.validate()?;
        if self.word_terms.len() + self.char_terms.len() != self.idf.len() {
            return Err(NluError::InvalidModel(
                "vocabulary and IDF sizes differ".to_owned(),
            ));
        }
        if self.idf.iter().any(|v| !v.is_finite()) {
            return Err(NluError::InvalidModel(
                "IDF values must be finite".to_owned(),
            ));
        }
        Ok(())
    }

    /// Returns the configuration.
    pub fn config(&self) -> &FeatureConfig {
        &self.config
    }

    /// Returns the number of features.
    pub fn dimension(&self) -> usize {
        self.idf.len()
    }

    /// Writes the features of a normalised text into `out`.
    pub fn transform_into(&self, text: &str, out: &mut SparseVector) {
        self.transform_with_coverage(text, out);
    }

    /// Writes the features of a normalised text into `out`, and returns its coverage as
    /// [`Self::coverage_where`] does with every feature known, in the same pass.
    pub fn transform_with_coverage(&self, text: &str, out: &mut SparseVector) -> (f32, f32) {
        out.indices.clear();
        out.values.clear();
        // (known, seen) single words and character n-grams
        let mut word_counts = (0_usize, 0_usize);
        let mut gram_counts = (0_usize, 0_usize);
        visit_terms(&self.config, text, |block, term| {
            let (table, counts) = match block {
                Block::Unigram => (&self.word_terms, Some(&mut word_counts)),
                Block::Word => (&self.word_terms, None),
                Block::Char => (&self.char_terms, Some(&mut gram_counts)),
            };
            let found = table.get(term);
            if let Some(counts) = counts {
                counts.0 += usize::from(found.is_some());
                counts.1 += 1;
            }
            if let Some(&index) = found {
                out.indices.push(index);
            }
        });
        out.indices.sort_unstable();
        // Collapse repeats into counts, in place.
        let mut write = 0;
        let mut read = 0;
        while read < out.indices.len() {
            let index = out.indices[read];
            let mut count = 0_u32;
            while read < out.indices.len() && out.indices[read] == index {
                count += 1;
                read += 1;
            }
            let tf = if self.config.sublinear_tf {
                1.0 + (count as f32).ln()
            } else {
                count as f32
            };
            out.indices[write] = index;
            out.values.push(tf * self.idf[index as usize]);
            write += 1;
        }
        out.indices.truncate(write);
        // Normalise each block; word indices come before character indices.
        let split = out
            .indices
            .partition_point(|&i| (i as usize) < self.word_terms.len());
        let (words, chars) = out.values.split_at_mut(split);
        for (block, weight) in [
            (words, self.config.word_weight),
            (chars, self.config.char_weight),
        ] {
            let norm = block.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                let scale = weight / norm;
                block.iter_mut().for_each(|v| *v *= scale);
            }
        }
        let share = |(known, seen): (usize, usize)| {
            if seen == 0 {
                0.0
            } else {
                known as f32 / seen as f32
            }
        };
        let word_share = if !self.config.word_ngrams.is_on() || self.config.word_ngrams.min > 1 {
            1.0
        } else {
            share(word_counts)
        };
        let char_share =
            if !self.config.latin_char_ngrams.is_on() && !self.config.han_char_ngrams.is_on() {
                1.0
            } else {
                share(gram_counts)
            };
        (word_share, char_share)
    }

    /// Returns the share of the words of a normalised text that are in the vocabulary (0 for a
    /// text without words, 1 when word features are off).
    pub fn word_coverage(&self, text: &str) -> f32 {
        if !self.config.word_ngrams.is_on() || self.config.word_ngrams.min > 1 {
            return 1.0;
        }
        let words = feature_words(&self.config, text);
        if words.is_empty() {
            return 0.0;
        }
        let known = words
            .iter()
            .filter(|w| self.word_terms.contains_key(w.as_ref()))
            .count();
        known as f32 / words.len() as f32
    }

    /// Returns the share of the words and the share of the character n-grams of a normalised
    /// text that are in the vocabulary and accepted by `known` (a filter on feature indices).
    /// As in [`Self::word_coverage`], a share is 0 for a text without words or n-grams, and 1
    /// when the block is off.
    pub fn coverage_where(&self, text: &str, known: impl Fn(u32) -> bool) -> (f32, f32) {
        let share = |k: usize, n: usize| if n == 0 { 0.0 } else { k as f32 / n as f32 };
        let word_share = if !self.config.word_ngrams.is_on() || self.config.word_ngrams.min > 1 {
            1.0
        } else {
            let words = feature_words(&self.config, text);
            let known_words = words
                .iter()
                .filter(|w| self.word_terms.get(w.as_ref()).is_some_and(|&i| known(i)))
                .count();
            share(known_words, words.len())
        };
        if !self.config.latin_char_ngrams.is_on() && !self.config.han_char_ngrams.is_on() {
            return (word_share, 1.0);
        }
        let (mut grams, mut known_grams) = (0_usize, 0_usize);
        let config = FeatureConfig {
            word_ngrams: NgramRange::off(),
            ..self.config.clone()
        };
        visit_terms(&config, text, |_, term| {
            grams += 1;
            if self.char_terms.get(term).is_some_and(|&i| known(i)) {
                known_grams += 1;
            }
        });
        (word_share, share(known_grams, grams))
    }

    /// Returns the features of a normalised text.
    pub fn transform(&self, text: &str) -> SparseVector {
        let mut out = SparseVector::default();
        self.transform_into(text, &mut out);
        out
    }

    /// Returns the features of many normalised texts.
    pub fn transform_all(&self, texts: &[&str]) -> SparseMatrix {
        let mut matrix = SparseMatrix::new();
        let mut row = SparseVector::default();
        for text in texts {
            self.transform_into(text, &mut row);
            matrix.push(&row);
        }
        matrix
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(config: &FeatureConfig, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        visit_terms(config, text, |_, term| out.push(term.to_owned()));
        out
    }

    #[test]
    fn makes_english_word_and_character_terms() {
        let config = FeatureConfig {
            latin_char_ngrams: NgramRange::new(3, 3),
            ..FeatureConfig::intents()
        };
        let terms = terms(&config, "cards arrived a");
        assert!(terms.contains(&"card".to_owned()), "{terms:?}");
        assert!(terms.contains(&"card arriv".to_owned()), "{terms:?}");
        assert!(
            !terms.contains(&"a".to_owned()),
            "single letters are dropped: {terms:?}"
        );
        assert!(terms.contains(&" ca".to_owned()));
        assert!(terms.contains(&" a ".to_owned()));
    }

    #[test]
    fn makes_chinese_word_and_character_terms() {
        let terms = terms(&FeatureConfig::intents(), "我要退款!!");
        assert!(terms.contains(&"退款".to_owned()), "{terms:?}");
        assert!(terms.contains(&"要退款".to_owned()), "{terms:?}");
        assert!(terms.contains(&"退".to_owned()), "{terms:?}");
        assert!(terms.contains(&" !!".to_owned()), "{terms:?}");
    }

    #[test]
    fn normalises_each_block_to_its_weight() {
        let config = FeatureConfig {
            char_weight: 0.5,
            ..FeatureConfig::intents()
        };
        let vectoriser =
            Vectoriser::fit(config, &["my card is lost", "card arrived", "lost again"]).unwrap();
        let row = vectoriser.transform("lost card card");
        assert!(row.indices.windows(2).all(|w| w[0] < w[1]));
        let split = row
            .indices
            .partition_point(|&i| (i as usize) < vectoriser.word_terms.len());
        let norm = |values: &[f32]| values.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm(&row.values[..split]) - 1.0).abs() < 1e-5);
        assert!((norm(&row.values[split..]) - 0.5).abs() < 1e-5);
        assert!(vectoriser.transform("zzz qqq").indices.len() < 3);
        assert!((vectoriser.word_coverage("lost card zzz qqq") - 0.5).abs() < 1e-6);
        assert_eq!(vectoriser.word_coverage("!!"), 0.0);
        for text in ["lost card zzz qqq", "!!", "card", "退款 card"] {
            let mut out = SparseVector::default();
            let coverage = vectoriser.transform_with_coverage(text, &mut out);
            assert_eq!(out, vectoriser.transform(text));
            assert_eq!(
                coverage,
                vectoriser.coverage_where(text, |_| true),
                "{text}"
            );
            assert_eq!(coverage.0, vectoriser.word_coverage(text), "{text}");
        }
        let (words, chars) = vectoriser.coverage_where("lost card", |_| false);
        assert_eq!((words, chars), (0.0, 0.0));
    }

    #[test]
    fn keeps_frequent_terms_only_and_in_a_stable_order() {
        let texts = ["refund please", "refund now", "hello"];
        let config = FeatureConfig {
            min_df: 2,
            min_df_from_texts: 0,
            ..FeatureConfig::intents()
        };
        let vectoriser = Vectoriser::fit(config.clone(), &texts).unwrap();
        assert!(vectoriser.word_terms.contains_key("refund"));
        assert!(!vectoriser.word_terms.contains_key("hello"));
        assert_eq!(vectoriser, Vectoriser::fit(config, &texts).unwrap());
    }

    #[test]
    fn rejects_configurations_without_features() {
        let config = FeatureConfig {
            word_ngrams: NgramRange::off(),
            latin_char_ngrams: NgramRange::off(),
            han_char_ngrams: NgramRange::off(),
            ..FeatureConfig::intents()
        };
        assert!(Vectoriser::fit(config, &["x"]).is_err());
        assert!(Vectoriser::fit(FeatureConfig::intents(), &["", " "]).is_err());
    }
}
