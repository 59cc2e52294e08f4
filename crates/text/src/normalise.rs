//! Normalisation: compatibility forms folded (NFKC, so full-width `Ａ１！` becomes `a1!` and the
//! ideographic space a plain one), letters lowercased, control and zero-width characters removed,
//! runs of whitespace collapsed to one space, leading and trailing whitespace dropped.
//!
//! Pure ASCII text takes a fast path. Other text is folded one *group* at a time: a character
//! followed by its combining marks, so a decomposed `e` + `◌́` still composes to `é`.
//! [`normalise_with_offsets`] also records, for every output byte, the source bytes it came from,
//! so spans found in normalised text (entities, say) can be reported against what the customer
//! typed.

use std::ops::Range;

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::canonical_combining_class;

/// Normalised text together with the map back to its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalised {
    text: String,
    /// `origins[i]` is the source byte range that produced output byte `i`.
    origins: Vec<Range<usize>>,
    source_len: usize,
}

impl Normalised {
    /// Returns the normalised text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Returns the normalised text, consuming the map.
    pub fn into_string(self) -> String {
        self.text
    }

    /// Returns the source byte range covering the normalised byte range `range`.
    ///
    /// An empty range maps to an empty range, one past the end to the end of the source.
    pub fn source_range(&self, range: Range<usize>) -> Range<usize> {
        if range.start >= self.origins.len() {
            return self.source_len..self.source_len;
        }
        let start = self.origins[range.start].start;
        if range.end <= range.start {
            return start..start;
        }
        let last = (range.end - 1).min(self.origins.len() - 1);
        start..self.origins[last].end
    }
}

/// Returns `source` normalised (see the module documentation).
pub fn normalise(source: &str) -> String {
    if let Some(fast) = normalise_ascii(source) {
        return fast;
    }
    let mut out = String::with_capacity(source.len());
    fold(source, &mut out, |_, _| {});
    out
}

/// Returns `source` normalised, with the map from output bytes back to source bytes.
pub fn normalise_with_offsets(source: &str) -> Normalised {
    let mut text = String::with_capacity(source.len());
    let mut origins = Vec::with_capacity(source.len());
    fold(source, &mut text, |added, origin| {
        origins.extend(std::iter::repeat_n(origin, added));
    });
    debug_assert_eq!(text.len(), origins.len());
    Normalised {
        text,
        origins,
        source_len: source.len(),
    }
}

/// The ASCII fast path; `None` when the text has any non-ASCII byte.
fn normalise_ascii(source: &str) -> Option<String> {
    if !source.is_ascii() {
        return None;
    }
    let mut out = String::with_capacity(source.len());
    let mut pending_space = false;
    for byte in source.bytes() {
        if byte.is_ascii_whitespace() || byte == 0x0b {
            pending_space = true;
        } else if byte.is_ascii_control() {
            continue;
        } else {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(char::from(byte.to_ascii_lowercase()));
        }
    }
    Some(out)
}

/// Folds `source` into `out`, calling `record(bytes_added, source_range)` after every push.
fn fold(source: &str, out: &mut String, mut record: impl FnMut(usize, Range<usize>)) {
    let mut pending_space = false;
    let mut group = String::new();
    let mut chars = source.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        let mut end = start + c.len_utf8();
        let mark_follows = chars.peek().is_some_and(|&(_, next)| is_combining(next));
        if c.is_ascii() && !mark_follows {
            if c.is_ascii_whitespace() || c == '\u{0b}' {
                pending_space = true;
            } else if !c.is_ascii_control() {
                push(
                    out,
                    &mut pending_space,
                    c.to_ascii_lowercase(),
                    start..end,
                    &mut record,
                );
            }
            continue;
        }
        group.clear();
        group.push(c);
        while let Some(&(next_start, next)) = chars.peek() {
            if !is_combining(next) {
                break;
            }
            group.push(next);
            end = next_start + next.len_utf8();
            chars.next();
        }
        for folded in group.nfkc() {
            if folded.is_whitespace() {
                pending_space = true;
            } else if is_invisible(folded) {
                continue;
            } else {
                for lower in folded.to_lowercase() {
                    push(out, &mut pending_space, lower, start..end, &mut record);
                }
            }
        }
    }
}

fn push(
    out: &mut String,
    pending_space: &mut bool,
    c: char,
    origin: Range<usize>,
    record: &mut impl FnMut(usize, Range<usize>),
) {
    if *pending_space && !out.is_empty() {
        out.push(' ');
        // The separator stands for the whitespace just before this character.
        record(1, origin.start..origin.start);
    }
    *pending_space = false;
    out.push(c);
    record(c.len_utf8(), origin);
}

fn is_combining(c: char) -> bool {
    !c.is_ascii() && canonical_combining_class(c) != 0
}

/// Control characters and the zero-width format characters that change nothing visible.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_full_width_forms_and_lowercases() {
        assert_eq!(normalise("ＡＢＣ１２３！"), "abc123!");
        assert_eq!(normalise("订单号：ＡＢ１２３"), "订单号:ab123");
        assert_eq!(normalise("Hello World"), "hello world");
    }

    #[test]
    fn collapses_whitespace_and_strips_controls() {
        assert_eq!(normalise("  a \t\n b\u{3000}\u{3000}c  "), "a b c");
        assert_eq!(normalise("a\u{0007}b\u{200b}c\u{feff}"), "abc");
        assert_eq!(normalise("\u{0}\u{1f}"), "");
        assert_eq!(normalise(""), "");
    }

    #[test]
    fn composes_combining_marks() {
        assert_eq!(normalise("Cafe\u{301}"), "café");
        assert_eq!(normalise("CAFÉ"), "café");
    }

    #[test]
    fn keeps_chinese_and_maps_compatibility_forms() {
        assert_eq!(normalise("我的快递！！"), "我的快递!!");
        assert_eq!(normalise("㎏ ﬁ"), "kg fi");
        assert_eq!(normalise("￥100"), "¥100");
    }

    #[test]
    fn ascii_fast_path_agrees_with_the_general_path() {
        let source = "  Order #AB-1234\tarrived?\r\n NO!\u{7f} ";
        let mut general = String::new();
        fold(source, &mut general, |_, _| {});
        assert_eq!(normalise(source), general);
    }

    #[test]
    fn maps_normalised_spans_back_to_the_source() {
        let source = "  订单 ＡＢ１２３ ok";
        let normalised = normalise_with_offsets(source);
        assert_eq!(normalised.as_str(), "订单 ab123 ok");
        let start = normalised.as_str().find("ab123").unwrap();
        let range = normalised.source_range(start..start + 5);
        assert_eq!(&source[range], "ＡＢ１２３");
        let ok = normalised.as_str().find("ok").unwrap();
        assert_eq!(&source[normalised.source_range(ok..ok + 2)], "ok");
    }

    #[test]
    fn maps_expanded_characters_to_their_whole_source() {
        let source = "5㎏";
        let normalised = normalise_with_offsets(source);
        assert_eq!(normalised.as_str(), "5kg");
        assert_eq!(&source[normalised.source_range(1..2)], "㎏");
        assert_eq!(normalised.source_range(3..3), 4..4);
        assert_eq!(normalised.source_range(2..9), 1..4);
        assert_eq!(normalise_with_offsets("").source_range(0..3), 0..0);
    }

    proptest::proptest! {
        #[test]
        fn normalising_is_idempotent_and_offsets_are_valid(source in "\\PC{0,40}") {
            let once = normalise(&source);
            proptest::prop_assert_eq!(&normalise(&once), &once);
            let with_offsets = normalise_with_offsets(&source);
            proptest::prop_assert_eq!(with_offsets.as_str(), once.as_str());
            for (i, _) in with_offsets.as_str().char_indices() {
                let range = with_offsets.source_range(i..i + 1);
                proptest::prop_assert!(source.get(range).is_some());
            }
        }
    }
}
