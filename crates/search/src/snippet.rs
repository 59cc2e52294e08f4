//! Highlighted snippets of the answer and of the best-matching question.

use std::collections::BTreeMap;
use std::ops::Range;

use tantivy::schema::Field;
use tantivy::snippet::{SnippetGenerator, collapse_overlapped_ranges};
use tantivy::{Score, Searcher, Term};

use crate::analyzer::mixed_analyzer;
use crate::config::HighlightStyle;

/// A fragment of stored text with the ranges that matched the query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snippet {
    /// The fragment, verbatim from the article.
    pub fragment: String,
    /// Byte ranges of `fragment` that matched a query term; sorted, not overlapping.
    pub highlights: Vec<Range<usize>>,
    /// The fragment with each highlight wrapped in the index's markers (and the text
    /// HTML-escaped when the style asks for it).
    pub marked: String,
}

impl Snippet {
    fn new(fragment: String, highlights: Vec<Range<usize>>, style: &HighlightStyle) -> Self {
        let valid: Vec<Range<usize>> = highlights
            .into_iter()
            .filter(|r| r.start < r.end && fragment.get(r.clone()).is_some())
            .collect();
        // Adjacent ranges are joined too, so a word jieba split in two reads as one mark.
        let mut highlights: Vec<Range<usize>> = Vec::new();
        for range in collapse_overlapped_ranges(&valid) {
            match highlights.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => highlights.push(range),
            }
        }
        let marked = mark(&fragment, &highlights, style);
        Self {
            fragment,
            highlights,
            marked,
        }
    }
}

fn push_text(out: &mut String, text: &str, escape_html: bool) {
    if !escape_html {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
}

fn mark(fragment: &str, highlights: &[Range<usize>], style: &HighlightStyle) -> String {
    let mut out = String::with_capacity(fragment.len() + highlights.len() * 10);
    let mut from = 0;
    for range in highlights {
        // Ranges come from the analyser's offsets and always fall on character boundaries;
        // one that does not is skipped rather than trusted.
        let (Some(before), Some(marked)) =
            (fragment.get(from..range.start), fragment.get(range.clone()))
        else {
            continue;
        };
        push_text(&mut out, before, style.escape_html);
        out.push_str(&style.pre);
        push_text(&mut out, marked, style.escape_html);
        out.push_str(&style.post);
        from = range.end;
    }
    push_text(
        &mut out,
        fragment.get(from..).unwrap_or_default(),
        style.escape_html,
    );
    out
}

/// Returns the longest prefix of `text` of at most `max_bytes` bytes ending on a character
/// boundary.
fn leading(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Builds the snippets of all hits of one search.
pub(crate) struct SnippetMaker<'a> {
    answer: SnippetGenerator,
    questions: SnippetGenerator,
    max_bytes: usize,
    style: &'a HighlightStyle,
}

impl<'a> SnippetMaker<'a> {
    /// Prepares generators for the answer and question fields, weighting each query term by its
    /// rarity in the field so fragments with rare words win.
    pub fn new(
        searcher: &Searcher,
        answer_field: Field,
        questions_field: Field,
        terms: &[String],
        max_bytes: usize,
        style: &'a HighlightStyle,
    ) -> tantivy::Result<Self> {
        let generator = |field: Field| -> tantivy::Result<SnippetGenerator> {
            let mut weights: BTreeMap<String, Score> = BTreeMap::new();
            for term in terms {
                let doc_freq = searcher.doc_freq(&Term::from_field_text(field, term))?;
                if doc_freq > 0 {
                    weights.insert(term.clone(), 1.0 / (1.0 + doc_freq as Score));
                }
            }
            Ok(SnippetGenerator::new(
                weights,
                mixed_analyzer(),
                field,
                max_bytes,
            ))
        };
        Ok(Self {
            answer: generator(answer_field)?,
            questions: generator(questions_field)?,
            max_bytes,
            style,
        })
    }

    /// Returns the best fragment of the answer, or its beginning when no term occurs in it.
    pub fn answer(&self, answer: &str) -> Snippet {
        let snippet = self.answer.snippet(answer);
        if snippet.highlighted().is_empty() {
            Snippet::new(
                leading(answer, self.max_bytes).to_owned(),
                Vec::new(),
                self.style,
            )
        } else {
            Snippet::new(
                snippet.fragment().to_owned(),
                snippet.highlighted().to_vec(),
                self.style,
            )
        }
    }

    /// Returns the question with the most highlighted text, if any question matches.
    pub fn best_question<'q>(&self, questions: impl Iterator<Item = &'q str>) -> Option<Snippet> {
        let mut best: Option<(usize, Snippet)> = None;
        for question in questions {
            let snippet = self.questions.snippet(question);
            if snippet.highlighted().is_empty() {
                continue;
            }
            let candidate = Snippet::new(
                snippet.fragment().to_owned(),
                snippet.highlighted().to_vec(),
                self.style,
            );
            let covered: usize = candidate.highlights.iter().map(|r| r.len()).sum();
            if best.as_ref().is_none_or(|(b, _)| covered > *b) {
                best = Some((covered, candidate));
            }
        }
        best.map(|(_, snippet)| snippet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_inserted_and_text_escaped() {
        let style = HighlightStyle::default();
        let snippet = Snippet::new("a <b> & refund".to_owned(), vec![8..14, 40..50], &style);
        assert_eq!(snippet.marked, "a &lt;b&gt; &amp; <em>refund</em>");
        assert_eq!(snippet.highlights, vec![8..14]);
        let raw = HighlightStyle {
            pre: "[".to_owned(),
            post: "]".to_owned(),
            escape_html: false,
        };
        let snippet = Snippet::new("订单号码".to_owned(), vec![0..6, 3..9], &raw);
        assert_eq!(snippet.highlights, vec![0..9]);
        assert_eq!(snippet.marked, "[订单号]码");
    }

    #[test]
    fn leading_cuts_on_a_character_boundary() {
        assert_eq!(leading("退款申请", 7), "退款");
        assert_eq!(leading("short", 100), "short");
    }
}
