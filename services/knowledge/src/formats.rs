//! Article files of import and export: JSON lines, CSV and Markdown.
//!
//! Every format carries the same fields: `external_id`, `scenario_id`, `language` (`zh`, `en`
//! or empty), `visibility` (`bot`, `agents`, `both` or empty), `title`, `questions`, `answer`
//! and `tags`.
//! - JSON lines: one object per line; `questions` and `tags` are arrays of strings.
//! - CSV: a header row naming the columns (any order, unknown columns refused); `questions` and
//!   `tags` are separated by `|`; RFC 4180 quoting.
//! - Markdown: optional YAML-style front matter (`key: value` lines between `---` lines) sets
//!   defaults for `scenario_id`, `language`, `visibility` and `tags`; each `## Title` section is
//!   one article; its leading `Key: value` lines set `ID` (external id), `Scenario`, `Language`,
//!   `Visibility`, `Tags` (comma separated) and `Q` (one question each); the rest is the answer.
//!
//! Parsing never fails as a whole: each row is either a [`RawRow`] or a row error.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use tandem_proto::pb::common::v1::{Language, RowError};
use tandem_proto::pb::knowledge::v1 as pb;

/// One parsed row, before validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRow {
    /// External id.
    pub external_id: String,
    /// Scenario, empty for the import's default.
    pub scenario_id: String,
    /// Language code, empty for the default.
    pub language: String,
    /// Visibility name, empty for the default.
    pub visibility: String,
    /// Title.
    pub title: String,
    /// Question variants.
    pub questions: Vec<String>,
    /// Answer.
    pub answer: String,
    /// Tags.
    pub tags: Vec<String>,
}

/// A row or why it failed, with its 1-based number.
pub type Parsed = (i64, Result<RawRow, RowError>);

fn row_error(row: i64, external_id: &str, field: &str, message: impl Into<String>) -> RowError {
    let mut message: String = message.into();
    if message.chars().count() > 500 {
        message = message.chars().take(500).collect();
    }
    RowError {
        row_number: row,
        external_id: external_id.to_owned(),
        field: field.to_owned(),
        message,
    }
}

/// Parses a language code; empty gives `None`.
pub fn parse_language(code: &str) -> Result<Option<Language>, String> {
    match code.trim().to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "zh" | "zh-cn" | "zh-hans" | "zh-tw" | "zh-hant" => Ok(Some(Language::Zh)),
        "en" | "en-us" | "en-gb" => Ok(Some(Language::En)),
        other => Err(format!("unknown language {other:?}; use zh or en")),
    }
}

/// Parses a visibility name; empty gives `None`.
pub fn parse_visibility(name: &str) -> Result<Option<pb::Visibility>, String> {
    match name.trim().to_ascii_lowercase().as_str() {
        "" => Ok(None),
        "bot" => Ok(Some(pb::Visibility::Bot)),
        "agents" | "agent" => Ok(Some(pb::Visibility::Agents)),
        "both" => Ok(Some(pb::Visibility::Both)),
        other => Err(format!(
            "unknown visibility {other:?}; use bot, agents or both"
        )),
    }
}

/// The file name of a language.
pub fn language_name(language: i32) -> &'static str {
    crate::freshness::language_code(language)
}

/// The file name of a visibility.
pub fn visibility_name(visibility: i32) -> &'static str {
    match pb::Visibility::try_from(visibility) {
        Ok(pb::Visibility::Bot) => "bot",
        Ok(pb::Visibility::Agents) => "agents",
        _ => "both",
    }
}

/// Parses JSON lines; blank lines are skipped but counted.
pub fn parse_jsonl(text: &str) -> Vec<Parsed> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let n = i64::try_from(i + 1).unwrap_or(i64::MAX);
            let parsed = serde_json::from_str::<RawRow>(line)
                .map_err(|e| row_error(n, "", "", format!("invalid JSON: {e}")));
            (n, parsed)
        })
        .collect()
}

/// Splits CSV text into records of fields (RFC 4180: quotes, doubled quotes, newlines inside
/// quotes). Returns the records with their starting line numbers, or the line where a quote is
/// left open.
fn csv_records(text: &str) -> Result<Vec<Vec<String>>, usize> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut line = 1;
    let mut open_line = 0;
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => {
                quoted = true;
                open_line = line;
            }
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                line += 1;
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                any = false;
            }
            c => field.push(c),
        }
    }
    if quoted {
        return Err(open_line);
    }
    if any {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

fn split_list(value: &str, sep: char) -> Vec<String> {
    value
        .split(sep)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

const CSV_COLUMNS: [&str; 8] = [
    "external_id",
    "scenario_id",
    "language",
    "visibility",
    "title",
    "questions",
    "answer",
    "tags",
];

/// Parses CSV with a header row; a file-level problem (bad header, open quote) is reported as
/// an error of row 0 and nothing else is read.
pub fn parse_csv(text: &str) -> Vec<Parsed> {
    let records = match csv_records(text.strip_prefix('\u{feff}').unwrap_or(text)) {
        Ok(r) => r,
        Err(line) => {
            return vec![(
                0,
                Err(row_error(
                    0,
                    "",
                    "",
                    format!("a quoted field opened on line {line} is never closed"),
                )),
            )];
        }
    };
    let mut it = records.into_iter();
    let Some(header) = it.next() else {
        return Vec::new();
    };
    let mut columns = Vec::with_capacity(header.len());
    for h in &header {
        let name = h.trim().to_ascii_lowercase();
        if !CSV_COLUMNS.contains(&name.as_str()) {
            return vec![(
                0,
                Err(row_error(0, "", &name, format!("unknown column {name:?}"))),
            )];
        }
        columns.push(name);
    }
    for required in ["title", "questions", "answer"] {
        if !columns.iter().any(|c| c == required) {
            return vec![(
                0,
                Err(row_error(0, "", required, "the header lacks this column")),
            )];
        }
    }
    it.enumerate()
        .filter(|(_, fields)| !(fields.len() == 1 && fields[0].trim().is_empty()))
        .map(|(i, fields)| {
            let n = i64::try_from(i + 1).unwrap_or(i64::MAX);
            if fields.len() != columns.len() {
                return (
                    n,
                    Err(row_error(
                        n,
                        "",
                        "",
                        format!("has {} fields, the header {}", fields.len(), columns.len()),
                    )),
                );
            }
            let mut row = RawRow::default();
            for (name, value) in columns.iter().zip(fields) {
                match name.as_str() {
                    "external_id" => row.external_id = value,
                    "scenario_id" => row.scenario_id = value,
                    "language" => row.language = value,
                    "visibility" => row.visibility = value,
                    "title" => row.title = value,
                    "questions" => row.questions = split_list(&value, '|'),
                    "answer" => row.answer = value,
                    _ => row.tags = split_list(&value, '|'),
                }
            }
            (n, Ok(row))
        })
        .collect()
}

/// Parses Markdown articles; see the module documentation.
pub fn parse_markdown(text: &str) -> Vec<Parsed> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut defaults = RawRow::default();
    let mut body = text;
    if let Some(rest) = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
    {
        let end = rest.find("\n---").map(|i| i + 1);
        if let Some(end) = end {
            let (front, after) = rest.split_at(end);
            body = after
                .trim_start_matches("---")
                .trim_start_matches('\r')
                .trim_start_matches('\n');
            for line in front.lines() {
                let Some((k, v)) = line.split_once(':') else {
                    continue;
                };
                let v = v.trim().trim_matches('"').trim_matches('\'');
                match k.trim().to_ascii_lowercase().as_str() {
                    "scenario_id" | "scenario" => defaults.scenario_id = v.to_owned(),
                    "language" => defaults.language = v.to_owned(),
                    "visibility" => defaults.visibility = v.to_owned(),
                    "tags" => {
                        defaults.tags =
                            split_list(v.trim_start_matches('[').trim_end_matches(']'), ',')
                                .into_iter()
                                .map(|t| t.trim_matches('"').trim_matches('\'').to_owned())
                                .collect();
                    }
                    _ => {}
                }
            }
        } else {
            return vec![(
                0,
                Err(row_error(
                    0,
                    "",
                    "",
                    "the front matter is never closed by ---",
                )),
            )];
        }
    }
    let mut out = Vec::new();
    let mut current: Option<(RawRow, bool, Vec<&str>)> = None;
    let mut n = 0;
    let finish = |row: Option<(RawRow, bool, Vec<&str>)>, n: i64, out: &mut Vec<Parsed>| {
        if let Some((mut r, _, answer)) = row {
            r.answer = answer.join("\n").trim().to_owned();
            out.push((n, Ok(r)));
        }
    };
    for line in body.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            finish(current.take(), n, &mut out);
            n += 1;
            let mut r = defaults.clone();
            r.title = title.trim().to_owned();
            current = Some((r, true, Vec::new()));
            continue;
        }
        let Some((row, header, answer)) = current.as_mut() else {
            continue;
        };
        if *header {
            if line.trim().is_empty() {
                if !row.questions.is_empty() {
                    *header = false;
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let v = v.trim().to_owned();
                let key = k.trim().to_ascii_lowercase();
                let known = match key.as_str() {
                    "q" => {
                        row.questions.push(v);
                        true
                    }
                    "id" => {
                        row.external_id = v;
                        true
                    }
                    "scenario" => {
                        row.scenario_id = v;
                        true
                    }
                    "language" => {
                        row.language = v;
                        true
                    }
                    "visibility" => {
                        row.visibility = v;
                        true
                    }
                    "tags" => {
                        row.tags = split_list(&v, ',');
                        true
                    }
                    _ => false,
                };
                if known {
                    continue;
                }
            }
            *header = false;
        }
        answer.push(line);
    }
    finish(current.take(), n, &mut out);
    out
}

/// Parses a file of `format`.
pub fn parse(format: pb::ArticleFormat, text: &str) -> Vec<Parsed> {
    match format {
        pb::ArticleFormat::Jsonl => parse_jsonl(text),
        pb::ArticleFormat::Csv => parse_csv(text),
        pb::ArticleFormat::Markdown | pb::ArticleFormat::Unspecified => parse_markdown(text),
    }
}

/// The file row of an article version.
pub fn row_of(a: &pb::Article, v: &pb::ArticleVersion) -> RawRow {
    RawRow {
        external_id: a.external_id.clone(),
        scenario_id: a.scenario_id.clone(),
        language: language_name(a.language).to_owned(),
        visibility: visibility_name(a.visibility).to_owned(),
        title: v.title.clone(),
        questions: v.questions.clone(),
        answer: v.answer.clone(),
        tags: a.tags.clone(),
    }
}

fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// The header of a file, if the format has one.
pub fn header(format: pb::ArticleFormat) -> String {
    match format {
        pb::ArticleFormat::Csv => format!("{}\n", CSV_COLUMNS.join(",")),
        _ => String::new(),
    }
}

/// Writes one row in `format`.
pub fn write_row(format: pb::ArticleFormat, row: &RawRow, out: &mut String) {
    match format {
        pb::ArticleFormat::Jsonl => {
            if let Ok(line) = serde_json::to_string(row) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        pb::ArticleFormat::Csv => {
            let values = [
                row.external_id.clone(),
                row.scenario_id.clone(),
                row.language.clone(),
                row.visibility.clone(),
                row.title.clone(),
                row.questions.join("|"),
                row.answer.clone(),
                row.tags.join("|"),
            ];
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                csv_field(out, v);
            }
            out.push('\n');
        }
        pb::ArticleFormat::Markdown | pb::ArticleFormat::Unspecified => {
            let _ = writeln!(out, "## {}", row.title);
            if !row.external_id.is_empty() {
                let _ = writeln!(out, "ID: {}", row.external_id);
            }
            let _ = writeln!(out, "Scenario: {}", row.scenario_id);
            let _ = writeln!(out, "Language: {}", row.language);
            let _ = writeln!(out, "Visibility: {}", row.visibility);
            if !row.tags.is_empty() {
                let _ = writeln!(out, "Tags: {}", row.tags.join(", "));
            }
            for q in &row.questions {
                let _ = writeln!(out, "Q: {q}");
            }
            let _ = writeln!(out, "\n{}\n", row.answer);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sample() -> RawRow {
        RawRow {
            external_id: "faq-1".into(),
            scenario_id: "refund".into(),
            language: "en".into(),
            visibility: "both".into(),
            title: "Refunds, \"fast\"".into(),
            questions: vec!["how do I get a refund?".into(), "refund time".into()],
            answer: "Refunds take 3 days.\nContact us, if not.".into(),
            tags: vec!["billing".into()],
        }
    }

    #[test]
    fn every_format_round_trips() {
        for format in [
            pb::ArticleFormat::Jsonl,
            pb::ArticleFormat::Csv,
            pb::ArticleFormat::Markdown,
        ] {
            let mut text = header(format);
            write_row(format, &sample(), &mut text);
            write_row(format, &sample(), &mut text);
            let rows = parse(format, &text);
            assert_eq!(rows.len(), 2, "{format:?}: {text}");
            for (_, r) in rows {
                assert_eq!(r.unwrap(), sample(), "{format:?}");
            }
        }
    }

    #[test]
    fn bad_rows_are_reported_and_good_rows_kept() {
        let text = "{\"title\":\"a\",\"questions\":[\"q\"],\"answer\":\"x\"}\nnot json\n\n\
                    {\"title\":\"b\",\"questions\":[\"q\"],\"answer\":\"y\",\"colour\":1}\n";
        let rows = parse_jsonl(text);
        assert_eq!(rows.len(), 3);
        assert!(rows[0].1.is_ok());
        assert_eq!(rows[1].1.as_ref().unwrap_err().row_number, 2);
        assert!(rows[2].1.is_err());
        let csv = "title,questions,answer\nA,q1|q2,x\nB,only two\n\"C\",q,\"multi\nline\"\n";
        let rows = parse_csv(csv);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].1.as_ref().unwrap().questions, vec!["q1", "q2"]);
        assert!(rows[1].1.is_err());
        assert_eq!(rows[2].1.as_ref().unwrap().answer, "multi\nline");
        assert!(parse_csv("title,colour\n")[0].1.is_err());
        assert!(
            parse_csv("title,questions,answer\n\"open,q,a\n")[0]
                .1
                .is_err()
        );
    }

    #[test]
    fn markdown_front_matter_sets_defaults() {
        let text = "---\nscenario_id: shipping\nlanguage: zh\ntags: [物流, 时效]\n---\n\
                    ## 发货时间\nQ: 什么时候发货\nQ: 多久能发货\n\n下单后 24 小时内发货。\n\n\
                    ## Second\nScenario: other\nQ: second?\nThe answer.\n";
        let rows = parse_markdown(text);
        assert_eq!(rows.len(), 2);
        let a = rows[0].1.as_ref().unwrap();
        assert_eq!(a.scenario_id, "shipping");
        assert_eq!(a.language, "zh");
        assert_eq!(a.tags, vec!["物流", "时效"]);
        assert_eq!(a.questions.len(), 2);
        assert_eq!(a.answer, "下单后 24 小时内发货。");
        let b = rows[1].1.as_ref().unwrap();
        assert_eq!(b.scenario_id, "other");
        assert_eq!(b.answer, "The answer.");
    }
}
