//! The mixed Chinese/English analyser used for indexing and for queries.
//!
//! Text is split into runs by character class:
//! - a run of Han ideographs is segmented by jieba in search mode with HMM, so `订单号` yields
//!   `订单`, `单号` and `订单号`, and a query for either the word or a sub-word matches;
//! - a run of letters and digits (any script, full-width forms folded to ASCII) is one token,
//!   lowercased; a purely alphabetic token with Latin letters is Snowball-stemmed (English), and a
//!   token mixing letters and digits (`iphone15`) also yields its letter and digit parts;
//! - everything else (spaces, punctuation, symbols, control characters) separates tokens and is
//!   dropped.
//!
//! An apostrophe between two letters joins them and is removed (`don't` → `dont`,
//! `customer's` → `customers` → `custom`), so possessives and contractions do not leave one-letter
//! fragments behind. Tokens longer than [`MAX_TOKEN_BYTES`] (hashes, URLs run together) are dropped.
//!
//! Offsets always refer to the original text, so snippets highlight the characters the user wrote
//! even when the indexed form differs (full-width, upper case, stemmed).

use std::sync::LazyLock;

use jieba_rs::Jieba;
use tantivy::tokenizer::{TextAnalyzer, Token, TokenStream, Tokenizer};

/// Name under which the analyser is registered in every index this crate opens.
pub const ANALYZER_NAME: &str = "tandem_mixed";

/// Longest token kept, in bytes; longer ones are noise for customer-service text.
pub const MAX_TOKEN_BYTES: usize = 64;

/// The jieba dictionary takes a few hundred milliseconds to load, so it is built once per process.
static JIEBA: LazyLock<Jieba> = LazyLock::new(Jieba::new);

static STEMMER: LazyLock<frostem::Stemmer> =
    LazyLock::new(|| frostem::Stemmer::new(frostem::Algorithm::English));

/// Loads the segmentation dictionary now instead of on the first document or query.
pub fn warm_up() {
    LazyLock::force(&JIEBA);
}

/// Returns the analyser as a tantivy [`TextAnalyzer`], ready to be registered under
/// [`ANALYZER_NAME`].
pub fn mixed_analyzer() -> TextAnalyzer {
    TextAnalyzer::from(MixedTokenizer::default())
}

/// Returns the indexed form of every token of `text`, in order, duplicates included.
pub fn analyze(text: &str) -> Vec<String> {
    let mut tokenizer = MixedTokenizer::default();
    let mut stream = tokenizer.token_stream(text);
    let mut out = Vec::new();
    while let Some(token) = stream.next() {
        out.push(token.text.clone());
    }
    out
}

/// The tantivy tokenizer behind [`mixed_analyzer`]; it keeps its token buffer between calls.
#[derive(Clone, Debug, Default)]
pub struct MixedTokenizer {
    tokens: Vec<Token>,
}

/// Stream over the tokens that [`MixedTokenizer`] computed for one text.
///
/// Slot 0 of the buffer is a placeholder, so `token()` is defined before the first `advance()`.
pub struct MixedTokenStream<'a> {
    tokens: &'a mut [Token],
    current: usize,
}

impl Tokenizer for MixedTokenizer {
    type TokenStream<'a> = MixedTokenStream<'a>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> MixedTokenStream<'a> {
        self.tokens.clear();
        self.tokens.push(Token::default());
        segment(text, &mut self.tokens);
        MixedTokenStream {
            tokens: &mut self.tokens,
            current: 0,
        }
    }
}

impl TokenStream for MixedTokenStream<'_> {
    fn advance(&mut self) -> bool {
        if self.current + 1 < self.tokens.len() {
            self.current += 1;
            true
        } else {
            false
        }
    }

    fn token(&self) -> &Token {
        &self.tokens[self.current]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.current]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Han,
    Word,
    Separator,
}

fn classify(c: char) -> Class {
    if is_han(c) {
        Class::Han
    } else if c.is_alphanumeric() {
        Class::Word
    } else {
        Class::Separator
    }
}

fn is_han(c: char) -> bool {
    matches!(c,
        '\u{3400}'..='\u{4DBF}'
        | '\u{4E00}'..='\u{9FFF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2FA1F}'
        | '\u{30000}'..='\u{3134F}')
}

fn is_apostrophe(c: char) -> bool {
    c == '\'' || c == '\u{2019}'
}

/// Appends the tokens of `text` to `out`, numbering positions from the current length.
fn segment(text: &str, out: &mut Vec<Token>) {
    let mut chars = text.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        match classify(c) {
            Class::Separator => {
                chars.next();
            }
            Class::Han => {
                let mut end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if classify(c) != Class::Han {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                push_han_run(text, start, end, out);
            }
            Class::Word => {
                let mut end = start;
                let mut previous_is_letter = false;
                while let Some(&(i, c)) = chars.peek() {
                    let class = classify(c);
                    if class == Class::Word {
                        previous_is_letter = c.is_alphabetic();
                        end = i + c.len_utf8();
                        chars.next();
                        continue;
                    }
                    // An apostrophe joins two letters: look one character past it.
                    if is_apostrophe(c) && previous_is_letter {
                        let after = text[i + c.len_utf8()..].chars().next();
                        if after.is_some_and(|a| a.is_alphabetic() && !is_han(a)) {
                            chars.next();
                            continue;
                        }
                    }
                    break;
                }
                push_word_run(&text[start..end], start, out);
            }
        }
    }
}

fn push_han_run(text: &str, start: usize, end: usize, out: &mut Vec<Token>) {
    let run = &text[start..end];
    for word in JIEBA.cut_for_search(run, true) {
        if word.word.len() > MAX_TOKEN_BYTES {
            continue;
        }
        push_token(
            out,
            word.word.to_owned(),
            start + word.byte_start,
            start + word.byte_end,
        );
    }
}

/// Folds full-width ASCII forms (`Ａ`, `１`) to ASCII and lowercases.
fn fold_word(run: &str) -> String {
    let mut folded = String::with_capacity(run.len());
    for c in run.chars() {
        if is_apostrophe(c) {
            continue;
        }
        let c = match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            _ => c,
        };
        folded.extend(c.to_lowercase());
    }
    folded
}

fn push_word_run(run: &str, offset: usize, out: &mut Vec<Token>) {
    let folded = fold_word(run);
    if folded.is_empty() || folded.len() > MAX_TOKEN_BYTES {
        return;
    }
    let end = offset + run.len();
    let has_digit = folded.chars().any(|c| c.is_numeric());
    let has_letter = folded.chars().any(|c| c.is_alphabetic());
    if !has_digit {
        let text = if folded.chars().any(|c| c.is_ascii_alphabetic()) {
            STEMMER.stem(&folded).into_owned()
        } else {
            folded
        };
        push_token(out, text, offset, end);
        return;
    }
    if !has_letter {
        push_token(out, folded, offset, end);
        return;
    }
    // Mixed letters and digits: the whole token, then each letter or digit part, so that
    // `iPhone15` matches `iphone15`, `iphone 15` and `15`. Parts map back to the original text
    // through the character boundaries of `run`, which `fold_word` keeps one to one except for
    // dropped apostrophes; those only sit between letters, so they never split a part.
    push_token(out, folded, offset, end);
    let mut part_start: Option<(usize, bool)> = None;
    let mut boundaries: Vec<(usize, usize, bool)> = Vec::new();
    for (i, c) in run.char_indices() {
        if is_apostrophe(c) {
            continue;
        }
        let is_digit = c.is_numeric();
        match part_start {
            Some((_, digit)) if digit == is_digit => {}
            Some((s, digit)) => {
                boundaries.push((s, i, digit));
                part_start = Some((i, is_digit));
            }
            None => part_start = Some((i, is_digit)),
        }
    }
    if let Some((s, digit)) = part_start {
        boundaries.push((s, run.len(), digit));
    }
    for (s, e, digit) in boundaries {
        let part = fold_word(&run[s..e]);
        let text = if !digit && part.chars().any(|c| c.is_ascii_alphabetic()) {
            STEMMER.stem(&part).into_owned()
        } else {
            part
        };
        push_token(out, text, offset + s, offset + e);
    }
}

fn push_token(out: &mut Vec<Token>, text: String, offset_from: usize, offset_to: usize) {
    // Slot 0 is the placeholder, so the first real token gets position 0.
    let position = out.len().saturating_sub(1);
    out.push(Token {
        offset_from,
        offset_to,
        position,
        text,
        position_length: 1,
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tokens_with_offsets(text: &str) -> Vec<(String, String)> {
        let mut tokenizer = MixedTokenizer::default();
        let mut stream = tokenizer.token_stream(text);
        let mut out = Vec::new();
        while let Some(token) = stream.next() {
            out.push((
                token.text.clone(),
                text[token.offset_from..token.offset_to].to_owned(),
            ));
        }
        out
    }

    #[test]
    fn chinese_is_cut_in_search_mode() {
        let tokens = analyze("我要退货退款，订单号123456");
        for expected in ["退货", "退款", "订单", "单号", "订单号", "123456"] {
            assert!(
                tokens.iter().any(|t| t == expected),
                "{expected} missing in {tokens:?}"
            );
        }
        assert!(
            !tokens.iter().any(|t| t == "，"),
            "punctuation kept: {tokens:?}"
        );
    }

    #[test]
    fn chinese_offsets_point_at_the_original_characters() {
        for (text, original) in tokens_with_offsets("如何修改登录密码？") {
            assert_eq!(text, original);
        }
    }

    #[test]
    fn english_is_lowercased_and_stemmed() {
        assert_eq!(
            analyze("Refunds, REFUNDED and refunding!"),
            ["refund", "refund", "and", "refund"]
        );
        assert_eq!(
            analyze("Cancelling my subscriptions"),
            ["cancel", "my", "subscript"]
        );
    }

    #[test]
    fn apostrophes_inside_words_are_joined() {
        assert_eq!(analyze("customer's order"), analyze("customers orders"));
        assert_eq!(analyze("don't"), ["dont"]);
        assert_eq!(analyze("'quoted'"), ["quot"]);
    }

    #[test]
    fn digits_are_kept_and_mixed_tokens_yield_their_parts() {
        assert_eq!(
            analyze("order 00123 at 3.5"),
            ["order", "00123", "at", "3", "5"]
        );
        let tokens = analyze("iPhone15 Pro");
        assert_eq!(tokens, ["iphone15", "iphon", "15", "pro"]);
        let spaced = analyze("iphone 15");
        assert!(
            spaced.iter().all(|t| tokens.contains(t)),
            "{spaced:?} vs {tokens:?}"
        );
    }

    #[test]
    fn full_width_forms_fold_to_ascii_with_original_offsets() {
        let tokens = tokens_with_offsets("ＶＩＰ会员１２３");
        assert_eq!(tokens[0], ("vip".to_owned(), "ＶＩＰ".to_owned()));
        assert!(
            tokens.contains(&("会员".to_owned(), "会员".to_owned())),
            "{tokens:?}"
        );
        assert!(
            tokens.contains(&("123".to_owned(), "１２３".to_owned())),
            "{tokens:?}"
        );
    }

    #[test]
    fn mixed_text_splits_at_script_changes() {
        let tokens = analyze("怎么重置WiFi密码? How do I reset the Wi-Fi password");
        for expected in ["重置", "wifi", "密码", "reset", "wi", "fi", "password"] {
            assert!(
                tokens.iter().any(|t| t == expected),
                "{expected} missing in {tokens:?}"
            );
        }
    }

    #[test]
    fn query_operators_and_control_characters_are_dropped() {
        assert_eq!(
            analyze("title:refund AND (\"password\"~2 OR reset^3)* \u{0}\u{7}"),
            ["titl", "refund", "and", "password", "2", "or", "reset", "3"]
        );
        assert!(analyze("!!! *** ~~~ ::: ()").is_empty());
    }

    #[test]
    fn overlong_tokens_are_dropped() {
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(analyze(&long).is_empty());
        assert_eq!(analyze(&format!("{long} ok")), ["ok"]);
    }

    #[test]
    fn positions_increase_from_zero() {
        let mut tokenizer = MixedTokenizer::default();
        let mut stream = tokenizer.token_stream("reset 密码 now");
        let mut positions = Vec::new();
        while let Some(token) = stream.next() {
            positions.push(token.position);
        }
        assert_eq!(positions, (0..positions.len()).collect::<Vec<_>>());
    }

    #[test]
    fn tokenizer_is_reusable_across_texts() {
        let mut tokenizer = MixedTokenizer::default();
        let mut first = tokenizer.token_stream("first text");
        while first.advance() {}
        let mut second = tokenizer.token_stream("退款");
        assert!(second.advance());
        assert_eq!(second.token().text, "退款");
        assert!(!second.advance());
    }
}
