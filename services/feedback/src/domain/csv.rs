//! The bulk feedback formats: RFC 4180 CSV with a header row, and field parsing shared with the
//! JSON lines format.

use super::Micros;
use super::feedback::{FeedbackInput, Score, language, subject, thumbs};

/// Splits CSV text into records (fields unquoted). Quoted fields may hold commas, doubled
/// quotes and line breaks. Returns an error naming the record that is malformed.
pub fn parse_records(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut at_field_start = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                quoted = true;
                at_field_start = false;
            }
            ',' => {
                record.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                at_field_start = true;
            }
            _ => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if quoted {
        return Err(format!(
            "record {} has an unterminated quoted field",
            records.len() + 1
        ));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    records.retain(|r| !(r.len() == 1 && r[0].trim().is_empty()));
    Ok(records)
}

/// The columns of the CSV format.
pub const COLUMNS: [&str; 9] = [
    "client_feedback_id",
    "conversation_id",
    "channel",
    "subject",
    "kind",
    "score",
    "comment",
    "language",
    "submitted_at",
];

/// Where each known column is in a header row.
#[derive(Clone, Debug)]
pub struct Header {
    positions: [Option<usize>; 9],
}

impl Header {
    /// Reads a header row; fails on unknown or missing required columns.
    pub fn parse(row: &[String]) -> Result<Header, String> {
        let mut positions = [None; 9];
        for (i, name) in row.iter().enumerate() {
            let name = name.trim().trim_start_matches('\u{feff}').to_ascii_lowercase();
            match COLUMNS.iter().position(|c| *c == name) {
                Some(col) => positions[col] = Some(i),
                None => return Err(format!("unknown column {name:?}")),
            }
        }
        for required in [0, 4, 5] {
            if positions[required].is_none() {
                return Err(format!("the header has no {} column", COLUMNS[required]));
            }
        }
        Ok(Header { positions })
    }

    fn get<'a>(&self, row: &'a [String], column: usize) -> &'a str {
        self.positions[column]
            .and_then(|i| row.get(i))
            .map_or("", |s| s.trim())
    }
}

/// A row that could not be read: the field and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowProblem {
    /// Field, when the problem is about one.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn problem(field: &str, message: impl Into<String>) -> RowProblem {
    RowProblem {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Parses a channel: a `Channel` value name or its short form (`survey`, `web_chat`, `chat`…).
pub fn parse_channel(text: &str) -> Option<i32> {
    let upper = text.trim().to_ascii_uppercase();
    if upper.is_empty() {
        return Some(0);
    }
    let short = upper.strip_prefix("CHANNEL_").unwrap_or(&upper);
    Some(match short {
        "UNSPECIFIED" => 0,
        "WEB_CHAT" | "CHAT" | "WEB" => 1,
        "APP" => 2,
        "EMAIL" => 3,
        "PHONE" => 4,
        "SMS" => 5,
        "WECHAT" => 6,
        "WHATSAPP" => 7,
        "SURVEY" => 8,
        "API" => 9,
        _ => return None,
    })
}

/// Parses a subject: `bot`, `agent`, `both` or a `FeedbackSubject` value name.
pub fn parse_subject(text: &str) -> Option<i32> {
    let upper = text.trim().to_ascii_uppercase();
    let short = upper.strip_prefix("FEEDBACK_SUBJECT_").unwrap_or(&upper);
    Some(match short {
        "" | "UNSPECIFIED" => subject::UNSPECIFIED,
        "BOT" => subject::BOT,
        "AGENT" => subject::AGENT,
        "BOTH" => subject::BOTH,
        _ => return None,
    })
}

/// Parses a language: `zh`, `en` or a `Language` value name.
pub fn parse_language(text: &str) -> Option<i32> {
    let upper = text.trim().to_ascii_uppercase();
    let short = upper.strip_prefix("LANGUAGE_").unwrap_or(&upper);
    Some(match short {
        "" | "UNSPECIFIED" => language::UNSPECIFIED,
        "ZH" => language::ZH,
        "EN" => language::EN,
        _ => return None,
    })
}

/// Parses an RFC 3339 time.
pub fn parse_time(text: &str) -> Option<Micros> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.timestamp_micros())
}

/// Reads one data row into a submission. `default_channel` fills an empty channel.
pub fn read_row(
    header: &Header,
    row: &[String],
    default_channel: i32,
) -> Result<FeedbackInput, Vec<RowProblem>> {
    let mut problems = Vec::new();
    let channel_text = header.get(row, 2);
    let channel = if channel_text.is_empty() {
        default_channel
    } else {
        parse_channel(channel_text).unwrap_or_else(|| {
            problems.push(problem("channel", format!("unknown channel {channel_text:?}")));
            0
        })
    };
    let subject_text = header.get(row, 3);
    let subject = parse_subject(subject_text).unwrap_or_else(|| {
        problems.push(problem("subject", format!("unknown subject {subject_text:?}")));
        0
    });
    let kind = header.get(row, 4).to_ascii_lowercase();
    let score_text = header.get(row, 5);
    let value = if kind == "thumbs" {
        match score_text.to_ascii_lowercase().as_str() {
            "up" | "1" | "thumbs_up" => Some(thumbs::UP),
            "down" | "2" | "thumbs_down" => Some(thumbs::DOWN),
            _ => None,
        }
    } else {
        score_text.parse::<i32>().ok()
    };
    let score = match (Score::from_parts(&kind, 0), value) {
        (None, _) => {
            problems.push(problem(
                "kind",
                format!("unknown kind {kind:?} (csat, nps, ces or thumbs)"),
            ));
            None
        }
        (Some(_), None) => {
            problems.push(problem("score", format!("{score_text:?} is not a score")));
            None
        }
        (Some(_), Some(value)) => Score::from_parts(&kind, value),
    };
    let language_text = header.get(row, 7);
    let language = parse_language(language_text).unwrap_or_else(|| {
        problems.push(problem(
            "language",
            format!("unknown language {language_text:?}"),
        ));
        0
    });
    let time_text = header.get(row, 8);
    let submitted_at = if time_text.is_empty() {
        None
    } else {
        let parsed = parse_time(time_text);
        if parsed.is_none() {
            problems.push(problem(
                "submitted_at",
                format!("{time_text:?} is not an RFC 3339 time"),
            ));
        }
        parsed
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(FeedbackInput {
        client_feedback_id: header.get(row, 0).to_owned(),
        conversation_id: header.get(row, 1).to_owned(),
        channel,
        subject,
        score,
        comment: header.get(row, 6).to_owned(),
        language,
        question_id: String::new(),
        submitted_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_keep_commas_quotes_and_line_breaks() {
        let text = "a,b\r\n\"x, \"\"y\"\"\nz\",2\n\n3,4";
        let records = parse_records(text).unwrap();
        assert_eq!(
            records,
            vec![
                vec!["a".to_owned(), "b".to_owned()],
                vec!["x, \"y\"\nz".to_owned(), "2".to_owned()],
                vec!["3".to_owned(), "4".to_owned()],
            ]
        );
        assert!(parse_records("a,\"open").is_err());
    }

    #[test]
    fn rows_are_read_by_header_name_with_every_problem() {
        let header = Header::parse(&[
            "kind".into(),
            "score".into(),
            "client_feedback_id".into(),
            "channel".into(),
            "submitted_at".into(),
        ])
        .unwrap();
        let ok = read_row(
            &header,
            &["csat".into(), "5".into(), "f1".into(), "".into(), "2025-01-01T00:00:00Z".into()],
            8,
        )
        .unwrap();
        assert_eq!(ok.channel, 8);
        assert_eq!(ok.score, Some(Score::Csat(5)));
        let bad = read_row(
            &header,
            &["stars".into(), "x".into(), "f2".into(), "pigeon".into(), "yesterday".into()],
            8,
        )
        .unwrap_err();
        let fields: Vec<&str> = bad.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["channel", "kind", "submitted_at"]);
        assert!(Header::parse(&["score".into()]).is_err());
    }
}
