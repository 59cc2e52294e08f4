//! Text processing shared by dialog, knowledge and feedback: normalisation, language
//! identification and tokenising (jieba words and character n-grams for Chinese, words with
//! optional Snowball stemming and word-bounded character n-grams for English). It grows with the
//! services that use it; it never depends on a service.
//!
//! Modules:
//! - `normalise`: [`normalise`] (NFKC, lowercase, no control characters, collapsed whitespace)
//!   and [`normalise_with_offsets`], which keeps the map back to the source text.
//! - `language`: [`detect_language`] by script, for Chinese, English and other.
//! - `token`: [`words`], [`jieba_words`], [`scanned_words`], [`stem_english`], [`char_ngrams`],
//!   [`char_wb_ngrams`]; one jieba dictionary per process, loaded on first use or by
//!   [`warm_up`].
//!
//! Boundaries: pure functions over `&str`; no I/O, no clock, no configuration.

mod language;
mod normalise;
mod token;

pub use language::{Language, LanguageGuess, detect_language, is_han};
pub use normalise::{Normalised, normalise, normalise_with_offsets};
pub use token::{
    Token, char_ngrams, char_wb_ngrams, has_han, jieba_words, scanned_words, stem_english, warm_up,
    words,
};
