//! Article files of import and export: JSON lines, CSV and Markdown.
//!
//! Every format carries the same fields: `external_id`, `scenario_id`, `language` (`zh`, `en`
//! or empty), `visibility` (`bot`, `agents`, `both` or empty), `title`, `questions`, `answer`
//! and `tags`. `external_id` is the import key: a row updates the article with that external
//! id or, when there is none, the article with that id; exports write the article's id there
//! for an article without an external id (see [`row_of`]), so an export imports back without
//! duplicates.
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

/// The columns a CSV header row names, or the row-0 error that stops the file.
fn csv_columns(header: &[String]) -> Result<Vec<String>, RowError> {
    let mut columns = Vec::with_capacity(header.len());
    for h in header {
        let name = h.trim().to_ascii_lowercase();
        if !CSV_COLUMNS.contains(&name.as_str()) {
            return Err(row_error(0, "", &name, format!("unknown column {name:?}")));
        }
        columns.push(name);
    }
    for required in ["title", "questions", "answer"] {
        if !columns.iter().any(|c| c == required) {
            return Err(row_error(0, "", required, "the header lacks this column"));
        }
    }
    Ok(columns)
}

/// The row of a CSV record numbered `n`; `None` for a blank record.
fn csv_row(columns: &[String], fields: Vec<String>, n: i64) -> Option<Parsed> {
    if fields.len() == 1 && fields[0].trim().is_empty() {
        return None;
    }
    if fields.len() != columns.len() {
        return Some((
            n,
            Err(row_error(
                n,
                "",
                "",
                format!("has {} fields, the header {}", fields.len(), columns.len()),
            )),
        ));
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
    Some((n, Ok(row)))
}

fn open_quote_error(line: usize) -> Parsed {
    (
        0,
        Err(row_error(
            0,
            "",
            "",
            format!("a quoted field opened on line {line} is never closed"),
        )),
    )
}

/// Parses CSV with a header row; a file-level problem (bad header, open quote) is reported as
/// an error of row 0 and nothing else is read.
pub fn parse_csv(text: &str) -> Vec<Parsed> {
    let records = match csv_records(text.strip_prefix('\u{feff}').unwrap_or(text)) {
        Ok(r) => r,
        Err(line) => return vec![open_quote_error(line)],
    };
    let mut it = records.into_iter();
    let Some(header) = it.next() else {
        return Vec::new();
    };
    let columns = match csv_columns(&header) {
        Ok(c) => c,
        Err(e) => return vec![(0, Err(e))],
    };
    it.enumerate()
        .filter_map(|(i, fields)| {
            csv_row(&columns, fields, i64::try_from(i + 1).unwrap_or(i64::MAX))
        })
        .collect()
}

/// Splits Markdown text into the defaults of its front matter and the rest, or the row-0 error
/// of a front matter never closed.
fn markdown_front(text: &str) -> Result<(RawRow, &str), RowError> {
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
            return Err(row_error(
                0,
                "",
                "",
                "the front matter is never closed by ---",
            ));
        }
    }
    Ok((defaults, body))
}

/// Parses the `## Title` sections of `body`, numbering them after `before`; text before the
/// first section is ignored.
fn markdown_sections(body: &str, defaults: &RawRow, before: i64) -> Vec<Parsed> {
    let mut out = Vec::new();
    let mut current: Option<(RawRow, bool, Vec<&str>)> = None;
    let mut n = before;
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

/// Parses Markdown articles; see the module documentation.
pub fn parse_markdown(text: &str) -> Vec<Parsed> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match markdown_front(text) {
        Ok((defaults, body)) => markdown_sections(body, &defaults, 0),
        Err(e) => vec![(0, Err(e))],
    }
}

/// Parses a file of `format`.
pub fn parse(format: pb::ArticleFormat, text: &str) -> Vec<Parsed> {
    match format {
        pb::ArticleFormat::Jsonl => parse_jsonl(text),
        pb::ArticleFormat::Csv => parse_csv(text),
        pb::ArticleFormat::Markdown | pb::ArticleFormat::Unspecified => parse_markdown(text),
    }
}

/// Incremental parsing of a file that arrives in chunks: every complete row is returned as soon
/// as its chunk arrives, with the same numbers and errors [`parse`] gives for the whole file.
/// A chunk may end anywhere, also inside a multi-byte character or a quoted CSV field.
pub struct RowStream {
    format: pb::ArticleFormat,
    /// Bytes of an incomplete UTF-8 character.
    tail: Vec<u8>,
    /// Bytes decoded so far.
    decoded: usize,
    /// Decoded text not parsed yet (an incomplete row).
    text: String,
    /// Whether a byte-order mark may still come.
    start: bool,
    /// A file-level error stopped parsing.
    stopped: bool,
    /// Lines (JSON lines) or data records (CSV) or sections (Markdown) parsed so far.
    done: i64,
    /// CSV: lines parsed so far, for error positions.
    lines: usize,
    /// CSV: the header's columns, once read.
    columns: Option<Vec<String>>,
    /// CSV: scanner state at `scan` bytes into `text`.
    scan: CsvScan,
    /// Markdown: the front matter's defaults, once read.
    defaults: Option<RawRow>,
}

#[derive(Clone, Copy, Default)]
struct CsvScan {
    /// Bytes of `text` scanned.
    pos: usize,
    /// Inside a quoted field.
    quoted: bool,
    /// The current field has no character yet.
    field_empty: bool,
    /// End of the last complete record (after its newline).
    boundary: usize,
}

impl RowStream {
    /// A parser for a file of `format`.
    pub fn new(format: pb::ArticleFormat) -> Self {
        Self {
            format,
            tail: Vec::new(),
            decoded: 0,
            text: String::new(),
            start: true,
            stopped: false,
            done: 0,
            lines: 0,
            columns: None,
            scan: CsvScan {
                field_empty: true,
                ..CsvScan::default()
            },
            defaults: None,
        }
    }

    /// Adds a chunk and returns the rows it completes; fails with the offset of the first byte
    /// that is not UTF-8.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Parsed>, usize> {
        self.tail.extend_from_slice(chunk);
        let valid = match std::str::from_utf8(&self.tail) {
            Ok(t) => t.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => return Err(self.decoded + e.valid_up_to()),
        };
        let rest = self.tail.split_off(valid);
        let bytes = std::mem::replace(&mut self.tail, rest);
        self.decoded += bytes.len();
        // The bytes were checked above.
        self.text
            .push_str(&String::from_utf8(bytes).map_err(|e| e.utf8_error().valid_up_to())?);
        Ok(self.rows(false))
    }

    /// Ends the file and returns the last rows; fails with the offset of an incomplete
    /// character at the end.
    pub fn finish(&mut self) -> Result<Vec<Parsed>, usize> {
        if !self.tail.is_empty() {
            return Err(self.decoded);
        }
        Ok(self.rows(true))
    }

    fn rows(&mut self, last: bool) -> Vec<Parsed> {
        if self.stopped {
            self.text.clear();
            return Vec::new();
        }
        if self.start {
            if self.text.is_empty() || (!last && "\u{feff}".starts_with(self.text.as_str())) {
                return Vec::new();
            }
            if self.text.starts_with('\u{feff}') && self.format != pb::ArticleFormat::Jsonl {
                self.text.drain(..'\u{feff}'.len_utf8());
            }
            self.start = false;
        }
        match self.format {
            pb::ArticleFormat::Jsonl => self.jsonl(last),
            pb::ArticleFormat::Csv => self.csv(last),
            pb::ArticleFormat::Markdown | pb::ArticleFormat::Unspecified => self.markdown(last),
        }
    }

    fn jsonl(&mut self, last: bool) -> Vec<Parsed> {
        let end = if last {
            self.text.len()
        } else {
            match self.text.rfind('\n') {
                Some(i) => i + 1,
                None => return Vec::new(),
            }
        };
        let part: String = self.text.drain(..end).collect();
        let mut rows = parse_jsonl(&part);
        for (n, r) in &mut rows {
            *n += self.done;
            if let Err(e) = r {
                e.row_number = *n;
            }
        }
        self.done += i64::try_from(part.lines().count()).unwrap_or(0);
        rows
    }

    /// Moves the CSV scanner to the end of the text, remembering the end of the last complete
    /// record. A quote at the very end of a quoted field waits for the next byte.
    fn scan_csv(&mut self) {
        let bytes = self.text.as_bytes();
        let mut s = self.scan;
        while s.pos < bytes.len() {
            let c = bytes[s.pos];
            if s.quoted {
                if c == b'"' {
                    match bytes.get(s.pos + 1) {
                        None => break,
                        Some(b'"') => s.pos += 1,
                        Some(_) => {
                            s.quoted = false;
                            s.field_empty = false;
                        }
                    }
                }
            } else {
                match c {
                    b'"' if s.field_empty => s.quoted = true,
                    b',' => s.field_empty = true,
                    b'\n' => {
                        s.field_empty = true;
                        s.boundary = s.pos + 1;
                    }
                    b'\r' if bytes.get(s.pos + 1) == Some(&b'\n') => {}
                    _ => s.field_empty = false,
                }
            }
            s.pos += 1;
        }
        self.scan = s;
    }

    fn csv(&mut self, last: bool) -> Vec<Parsed> {
        let end = if last {
            self.text.len()
        } else {
            self.scan_csv();
            self.scan.boundary
        };
        if end == 0 {
            return Vec::new();
        }
        let part: String = self.text.drain(..end).collect();
        self.scan.pos -= self.scan.pos.min(end);
        self.scan.boundary = 0;
        let records = match csv_records(&part) {
            Ok(r) => r,
            Err(line) => {
                self.stopped = true;
                return vec![open_quote_error(self.lines + line)];
            }
        };
        self.lines += part.matches('\n').count();
        let mut out = Vec::new();
        for fields in records {
            let Some(columns) = &self.columns else {
                match csv_columns(&fields) {
                    Ok(c) => self.columns = Some(c),
                    Err(e) => {
                        self.stopped = true;
                        self.text.clear();
                        return vec![(0, Err(e))];
                    }
                }
                continue;
            };
            self.done += 1;
            out.extend(csv_row(columns, fields, self.done));
        }
        out
    }

    fn markdown(&mut self, last: bool) -> Vec<Parsed> {
        if self.defaults.is_none() {
            let opens = self.text.starts_with("---\n") || self.text.starts_with("---\r\n");
            let waiting =
                (opens && !self.text.contains("\n---")) || "---\r\n".starts_with(&*self.text);
            if !last && waiting {
                return Vec::new();
            }
            let (defaults, consumed) = match markdown_front(&self.text) {
                Ok((d, body)) => (d, self.text.len() - body.len()),
                Err(e) => {
                    self.stopped = true;
                    self.text.clear();
                    return vec![(0, Err(e))];
                }
            };
            self.text.drain(..consumed);
            self.defaults = Some(defaults);
        }
        let end = if last {
            self.text.len()
        } else {
            match self.text.rfind("\n## ") {
                Some(i) => i + 1,
                None => return Vec::new(),
            }
        };
        let part: String = self.text.drain(..end).collect();
        let defaults = self.defaults.clone().unwrap_or_default();
        let rows = markdown_sections(&part, &defaults, self.done);
        self.done += i64::try_from(rows.len()).unwrap_or(0);
        rows
    }
}

/// The file row of an article version.
///
/// The row's `external_id` is the article's external id or, when it has none, the article's id,
/// so every exported row names its article: an import of the file into the same tenant matches
/// the article by its id, and an import into another tenant creates articles whose external id
/// is that id, which later imports of the same file match.
pub fn row_of(a: &pb::Article, v: &pb::ArticleVersion) -> RawRow {
    let external_id = if a.external_id.is_empty() {
        a.id.clone()
    } else {
        a.external_id.clone()
    };
    RawRow {
        external_id,
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

    /// Parses `text` through a [`RowStream`] fed `size` bytes at a time.
    fn streamed(format: pb::ArticleFormat, text: &str, size: usize) -> Vec<Parsed> {
        let mut stream = RowStream::new(format);
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(size) {
            out.extend(stream.push(chunk).unwrap());
        }
        out.extend(stream.finish().unwrap());
        out
    }

    #[test]
    fn streamed_chunks_parse_like_the_whole_file() {
        let mut jsonl = String::new();
        let mut csv = header(pb::ArticleFormat::Csv);
        let mut md = "\u{feff}---\nscenario_id: shipping\nlanguage: zh\n---\npreamble\n".to_owned();
        for i in 0..12 {
            let mut row = sample();
            row.external_id = format!("faq-{i}");
            row.title = format!("标题 {i}, \"quoted\"");
            row.answer = format!("答案 {i}\nsecond line, with \"quotes\"\r\nthird");
            write_row(pb::ArticleFormat::Jsonl, &row, &mut jsonl);
            write_row(pb::ArticleFormat::Csv, &row, &mut csv);
            write_row(pb::ArticleFormat::Markdown, &row, &mut md);
            if i == 5 {
                jsonl.push_str("\nnot json\n");
                csv.push_str("only,three,fields\n\n");
                md.push_str("## \nQ: untitled\nbody\n");
            }
        }
        let cases = [
            (pb::ArticleFormat::Jsonl, jsonl),
            (pb::ArticleFormat::Csv, format!("\u{feff}{csv}")),
            (pb::ArticleFormat::Markdown, md),
            (pb::ArticleFormat::Csv, "title,colour\na,b\n".to_owned()),
            (
                pb::ArticleFormat::Markdown,
                "---\nlanguage: en\n## never closed\n".to_owned(),
            ),
        ];
        for (format, text) in cases {
            let whole = parse(format, &text);
            assert!(!whole.is_empty());
            for size in [1, 2, 3, 7, 64, 1 << 20] {
                assert_eq!(streamed(format, &text, size), whole, "{format:?} by {size}");
            }
        }
        // An open quote stops the file where it opens, after the rows before it.
        let text = "title,questions,answer\nA,q,a\n\"open,q,a\nB,q,a\n";
        let rows = streamed(pb::ArticleFormat::Csv, text, 5);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].1.is_ok());
        let e = rows[1].1.as_ref().unwrap_err();
        assert_eq!(
            (e.row_number, e.message.contains("line 3")),
            (0, true),
            "{e:?}"
        );
        // Bytes that are not UTF-8 are reported with their offset; a character split between
        // chunks is not.
        let mut stream = RowStream::new(pb::ArticleFormat::Jsonl);
        assert!(stream.push(&"{}\n退".as_bytes()[..4]).is_ok());
        assert!(stream.push(&"退".as_bytes()[1..]).is_ok());
        assert_eq!(stream.push(b"\xff"), Err(6));
        let mut stream = RowStream::new(pb::ArticleFormat::Jsonl);
        stream.push(&"退".as_bytes()[..2]).unwrap();
        assert_eq!(stream.finish(), Err(0));
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
