//! Tokenising: words and character n-grams.
//!
//! - Chinese (any text with Han characters): jieba words, from one dictionary loaded lazily the
//!   first time it is needed and shared by the whole process ([`warm_up`] loads it ahead of
//!   time, which takes about a third of a second). Latin runs inside Chinese text come out as
//!   words, as in English.
//! - English and other scripts: a scanner for runs of letters and digits; an apostrophe between
//!   letters stays inside the word (`don't`), other punctuation separates. Snowball stemming is
//!   applied on request ([`stem_english`]).
//! - Character n-grams: [`char_ngrams`] over a run of characters (the Chinese way) and
//!   [`char_wb_ngrams`] within one word padded with a space on each side (the English way).
//!
//! Tokens borrow from the text they came from and carry byte offsets into it. Feed normalised
//! text (see [`crate::normalise`]) for lowercase, folded tokens.

use std::sync::LazyLock;

use jieba_rs::Jieba;
use rust_stemmers::{Algorithm, Stemmer};

use crate::language::is_han;

/// A word of a text, with its byte range in that text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    /// The word as it appears in the text.
    pub text: &'a str,
    /// Byte offset of the first byte.
    pub start: usize,
    /// Byte offset one past the last byte.
    pub end: usize,
}

static JIEBA: LazyLock<Jieba> = LazyLock::new(Jieba::new);
static ENGLISH_STEMMER: LazyLock<Stemmer> = LazyLock::new(|| Stemmer::create(Algorithm::English));

/// Loads the jieba dictionary now rather than on the first Chinese text.
pub fn warm_up() {
    LazyLock::force(&JIEBA);
    LazyLock::force(&ENGLISH_STEMMER);
}

/// Returns true when `text` has at least one Han character.
pub fn has_han(text: &str) -> bool {
    text.chars().any(is_han)
}

/// Returns the words of `text`: jieba words when it has Han characters, scanned words otherwise.
/// Whitespace and punctuation are never tokens.
pub fn words(text: &str) -> Vec<Token<'_>> {
    if has_han(text) {
        jieba_words(text)
    } else {
        scanned_words(text)
    }
}

/// Returns the jieba words of `text` (HMM on for unknown words), without whitespace or
/// punctuation.
pub fn jieba_words(text: &str) -> Vec<Token<'_>> {
    JIEBA
        .cut(text, true)
        .into_iter()
        .filter(|token| token.word.chars().any(char::is_alphanumeric))
        .map(|token| Token {
            text: token.word,
            start: token.byte_start,
            end: token.byte_end,
        })
        .collect()
}

/// Returns the runs of letters and digits in `text`; an apostrophe between two letters joins
/// them. Each Han character is a word of its own (use [`jieba_words`] for Chinese).
pub fn scanned_words(text: &str) -> Vec<Token<'_>> {
    let mut tokens = Vec::new();
    let mut start: Option<usize> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if is_han(c) {
            if let Some(s) = start.take() {
                tokens.push(Token {
                    text: &text[s..i],
                    start: s,
                    end: i,
                });
            }
            let end = i + c.len_utf8();
            tokens.push(Token {
                text: &text[i..end],
                start: i,
                end,
            });
        } else if c.is_alphanumeric() {
            start.get_or_insert(i);
        } else if is_apostrophe(c)
            && start.is_some()
            && text[..i]
                .chars()
                .next_back()
                .is_some_and(char::is_alphabetic)
            && chars.peek().is_some_and(|&(_, next)| next.is_alphabetic())
        {
            // inside a word such as "don't"
        } else if let Some(s) = start.take() {
            tokens.push(Token {
                text: &text[s..i],
                start: s,
                end: i,
            });
        }
    }
    if let Some(s) = start {
        tokens.push(Token {
            text: &text[s..],
            start: s,
            end: text.len(),
        });
    }
    tokens
}

fn is_apostrophe(c: char) -> bool {
    matches!(c, '\'' | '\u{2019}')
}

/// Returns the Snowball (Porter 2) stem of an English word; other words come back unchanged in
/// practice, since the stemmer only strips English suffixes.
pub fn stem_english(word: &str) -> std::borrow::Cow<'_, str> {
    ENGLISH_STEMMER.stem(word)
}

/// Calls `emit` with every character n-gram of `text` whose length is in `min..=max`, in order
/// of position, then length.
pub fn char_ngrams(text: &str, min: usize, max: usize, mut emit: impl FnMut(&str)) {
    if min == 0 || max < min {
        return;
    }
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let chars = bounds.len() - 1;
    for first in 0..chars {
        for n in min..=max {
            if first + n > chars {
                break;
            }
            emit(&text[bounds[first]..bounds[first + n]]);
        }
    }
}

/// Calls `emit` with the character n-grams (length `min..=max`) of `word` padded with one space
/// on each side. A padded word shorter than `n` is emitted whole, once per such `n`.
pub fn char_wb_ngrams(word: &str, min: usize, max: usize, mut emit: impl FnMut(&str)) {
    if min == 0 || max < min || word.is_empty() {
        return;
    }
    let mut padded = String::with_capacity(word.len() + 2);
    padded.push(' ');
    padded.push_str(word);
    padded.push(' ');
    let bounds: Vec<usize> = padded
        .char_indices()
        .map(|(i, _)| i)
        .chain([padded.len()])
        .collect();
    let chars = bounds.len() - 1;
    for n in min..=max {
        if n >= chars {
            emit(&padded);
            continue;
        }
        for first in 0..=chars - n {
            emit(&padded[bounds[first]..bounds[first + n]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts<'a>(tokens: &[Token<'a>]) -> Vec<&'a str> {
        tokens.iter().map(|t| t.text).collect()
    }

    #[test]
    fn scans_english_words_with_inner_apostrophes() {
        let text = "i don't know, 'quoted' card-holder's e-mail 42x";
        let tokens = scanned_words(text);
        assert_eq!(
            texts(&tokens),
            [
                "i", "don't", "know", "quoted", "card", "holder's", "e", "mail", "42x"
            ]
        );
        for token in &tokens {
            assert_eq!(&text[token.start..token.end], token.text);
        }
        assert!(scanned_words("  ... !!").is_empty());
    }

    #[test]
    fn cuts_chinese_with_jieba_and_keeps_offsets() {
        let text = "我的快递三天了还没到,能帮我查一下物流吗?";
        let tokens = words(text);
        let words = texts(&tokens);
        assert!(words.contains(&"快递"), "{words:?}");
        assert!(words.contains(&"物流"), "{words:?}");
        assert!(!words.iter().any(|w| w.contains(',') || w.contains('?')));
        for token in &tokens {
            assert_eq!(&text[token.start..token.end], token.text);
        }
    }

    #[test]
    fn keeps_latin_runs_inside_chinese_text() {
        let tokens = words("我的iphone订单123456没到");
        let words = texts(&tokens);
        assert!(words.contains(&"iphone"), "{words:?}");
        assert!(words.contains(&"123456"), "{words:?}");
    }

    #[test]
    fn splits_han_characters_when_scanning() {
        assert_eq!(texts(&scanned_words("ok退款ok")), ["ok", "退", "款", "ok"]);
    }

    #[test]
    fn stems_english_words() {
        assert_eq!(stem_english("arrived"), "arriv");
        assert_eq!(stem_english("cards"), "card");
        assert_eq!(stem_english("charging"), "charg");
    }

    #[test]
    fn produces_character_ngrams() {
        let mut grams = Vec::new();
        char_ngrams("退款了", 1, 2, |g| grams.push(g.to_owned()));
        assert_eq!(grams, ["退", "退款", "款", "款了", "了"]);
        let mut none = Vec::new();
        char_ngrams("ab", 3, 2, |g| none.push(g.to_owned()));
        assert!(none.is_empty());
    }

    #[test]
    fn produces_word_bounded_character_ngrams() {
        let mut grams = Vec::new();
        char_wb_ngrams("ab", 2, 5, |g| grams.push(g.to_owned()));
        assert_eq!(grams, [" a", "ab", "b ", " ab", "ab ", " ab ", " ab "]);
    }
}
