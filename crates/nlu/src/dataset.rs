//! Labelled text: reading CSV files (RFC 4180 quoting, a header line) and deterministic,
//! stratified splits.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{NluError, NluResult};

/// One training or test example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelledText {
    /// What the customer wrote.
    pub text: String,
    /// The intent (or sentiment class) it belongs to.
    pub label: String,
}

impl LabelledText {
    /// Returns an example.
    pub fn new(text: impl Into<String>, label: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            label: label.into(),
        }
    }
}

/// Which CSV column holds the text and which the label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnOrder {
    /// `text,label`
    TextLabel,
    /// `label,text`
    LabelText,
}

impl std::str::FromStr for ColumnOrder {
    type Err = NluError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.replace(' ', "").as_str() {
            "text,label" => Ok(Self::TextLabel),
            "label,text" => Ok(Self::LabelText),
            other => Err(NluError::InvalidArgument(format!(
                "columns must be `text,label` or `label,text`, not `{other}`"
            ))),
        }
    }
}

/// Reads a two-column CSV file with a header line.
pub fn read_labelled_csv(path: &Path, order: ColumnOrder) -> NluResult<Vec<LabelledText>> {
    let content = std::fs::read_to_string(path).map_err(|source| NluError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_labelled_csv(&content, order).map_err(|error| match error {
        NluError::Csv { line, message, .. } => NluError::Csv {
            file: path.display().to_string(),
            line,
            message,
        },
        other => other,
    })
}

/// Parses two-column CSV text with a header line; rows with an empty text or label are errors.
pub fn parse_labelled_csv(content: &str, order: ColumnOrder) -> NluResult<Vec<LabelledText>> {
    let records = parse_csv(content)?;
    let mut examples = Vec::with_capacity(records.len().saturating_sub(1));
    for (line, record) in records.into_iter().skip(1) {
        let [first, second]: [String; 2] =
            record
                .try_into()
                .map_err(|record: Vec<String>| NluError::Csv {
                    file: String::new(),
                    line,
                    message: format!("expected 2 fields, found {}", record.len()),
                })?;
        let (text, label) = match order {
            ColumnOrder::TextLabel => (first, second),
            ColumnOrder::LabelText => (second, first),
        };
        if text.trim().is_empty() || label.trim().is_empty() {
            return Err(NluError::Csv {
                file: String::new(),
                line,
                message: "empty text or label".to_owned(),
            });
        }
        examples.push(LabelledText {
            text,
            label: label.trim().to_owned(),
        });
    }
    Ok(examples)
}

/// Splits CSV text into records (with the 1-based line each starts on); blank lines are skipped.
fn parse_csv(content: &str) -> NluResult<Vec<(usize, Vec<String>)>> {
    let content = content.strip_prefix('\u{feff}').unwrap_or(content);
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut field_was_quoted = false;
    let mut line = 1;
    let mut record_line = 1;
    let mut chars = content.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !field_was_quoted => {
                in_quotes = true;
                field_was_quoted = true;
            }
            ',' => {
                record.push(std::mem::take(&mut field));
                field_was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if !(record.is_empty() && field.is_empty() && !field_was_quoted) {
                    record.push(std::mem::take(&mut field));
                    records.push((record_line, std::mem::take(&mut record)));
                }
                field_was_quoted = false;
                line += 1;
                record_line = line;
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err(NluError::Csv {
            file: String::new(),
            line: record_line,
            message: "unterminated quoted field".to_owned(),
        });
    }
    if !(record.is_empty() && field.is_empty() && !field_was_quoted) {
        record.push(field);
        records.push((record_line, record));
    }
    Ok(records)
}

/// A small deterministic generator (SplitMix64) for shuffles and splits.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Returns a generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Returns the next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: usize) -> usize {
        // Multiply-shift: the bias is negligible for the sizes shuffled here.
        ((u128::from(self.next_u64()) * bound as u128) >> 64) as usize
    }

    /// Shuffles `items` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// Splits example indices into two parts per label: about `first_share` of each label's
/// examples go to the first part (at least one when the label has two or more), the rest to the
/// second. The result depends only on the labels, `first_share` and `seed`.
pub fn stratified_split(labels: &[&str], first_share: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, label) in labels.iter().enumerate() {
        by_label.entry(label).or_default().push(i);
    }
    let mut rng = SplitMix64::new(seed);
    let mut first = Vec::new();
    let mut second = Vec::new();
    for (_, mut indices) in by_label {
        rng.shuffle(&mut indices);
        let n = indices.len();
        let mut take = (n as f64 * first_share.clamp(0.0, 1.0)).round() as usize;
        if n >= 2 {
            take = take.clamp(1, n - 1);
        } else {
            take = n;
        }
        first.extend_from_slice(&indices[..take]);
        second.extend_from_slice(&indices[take..]);
    }
    first.sort_unstable();
    second.sort_unstable();
    (first, second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quoted_fields_and_header() {
        let csv = "text,category\r\nHow do I locate my card?,card_arrival\n\"I still have not, \
                   \"\"really\"\", received it\",card_arrival\n\n\"two\nlines\",x\n";
        let examples = parse_labelled_csv(csv, ColumnOrder::TextLabel).unwrap();
        assert_eq!(examples.len(), 3);
        assert_eq!(
            examples[0],
            LabelledText::new("How do I locate my card?", "card_arrival")
        );
        assert_eq!(
            examples[1].text,
            "I still have not, \"really\", received it"
        );
        assert_eq!(examples[2].text, "two\nlines");
    }

    #[test]
    fn reads_label_first_files() {
        let examples = parse_labelled_csv(
            "label,review\n1,很快，好吃\n0,太慢了",
            ColumnOrder::LabelText,
        )
        .unwrap();
        assert_eq!(examples[1], LabelledText::new("太慢了", "0"));
    }

    #[test]
    fn reports_malformed_rows_with_their_line() {
        let error = parse_labelled_csv("a,b\nx,y\nonly one\n", ColumnOrder::TextLabel);
        assert!(
            matches!(error, Err(NluError::Csv { line: 3, .. })),
            "{error:?}"
        );
        let error = parse_labelled_csv("a,b\n\"open,y\n", ColumnOrder::TextLabel);
        assert!(
            matches!(error, Err(NluError::Csv { line: 2, .. })),
            "{error:?}"
        );
        let error = parse_labelled_csv("a,b\n,y\n", ColumnOrder::TextLabel);
        assert!(
            matches!(error, Err(NluError::Csv { line: 2, .. })),
            "{error:?}"
        );
        assert!("text|label".parse::<ColumnOrder>().is_err());
    }

    #[test]
    fn splits_every_label_deterministically() {
        let labels: Vec<&str> = (0..100)
            .map(|i| if i % 4 == 0 { "a" } else { "b" })
            .chain(["solo"])
            .collect();
        let (first, second) = stratified_split(&labels, 0.8, 42);
        assert_eq!(first.len() + second.len(), labels.len());
        assert_eq!(first.iter().filter(|&&i| labels[i] == "a").count(), 20);
        assert_eq!(first.iter().filter(|&&i| labels[i] == "b").count(), 60);
        assert!(first.contains(&100));
        assert_eq!(stratified_split(&labels, 0.8, 42), (first.clone(), second));
        assert_ne!(stratified_split(&labels, 0.8, 7).0, first);
    }
}
