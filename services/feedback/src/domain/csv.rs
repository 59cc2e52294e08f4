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
            let name = name
                .trim()
                .trim_start_matches('\u{feff}')
                .to_ascii_lowercase();
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
            problems.push(problem(
                "channel",
                format!("unknown channel {channel_text:?}"),
            ));
            0
        })
    };
    let subject_text = header.get(row, 3);
    let subject = parse_subject(subject_text).unwrap_or_else(|| {
        problems.push(problem(
            "subject",
            format!("unknown subject {subject_text:?}"),
        ));
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

/// Reads one JSON line (the protobuf JSON mapping of `Feedback`; field names in lowerCamelCase
/// or as in the proto file, enums by name or number, times in RFC 3339).
pub fn read_json_row(line: &str, default_channel: i32) -> Result<FeedbackInput, Vec<RowProblem>> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| vec![problem("", format!("not a JSON object: {e}"))])?;
    let Some(object) = value.as_object() else {
        return Err(vec![problem("", "not a JSON object")]);
    };
    let get = |snake: &str, camel: &str| object.get(camel).or_else(|| object.get(snake));
    let text = |snake: &str, camel: &str| -> String {
        get(snake, camel)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let mut problems = Vec::new();
    let mut enumerated = |field: &str,
                          value: Option<&serde_json::Value>,
                          parse: fn(&str) -> Option<i32>,
                          default: i32|
     -> i32 {
        match value {
            None | Some(serde_json::Value::Null) => default,
            Some(serde_json::Value::Number(n)) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .unwrap_or_else(|| {
                    problems.push(problem(field, format!("{n} is not a valid value")));
                    0
                }),
            Some(serde_json::Value::String(s)) => parse(s).unwrap_or_else(|| {
                problems.push(problem(field, format!("unknown value {s:?}")));
                0
            }),
            Some(other) => {
                problems.push(problem(field, format!("{other} is not a valid value")));
                0
            }
        }
    };
    let channel = enumerated(
        "channel",
        get("channel", "channel"),
        parse_channel,
        default_channel,
    );
    let subject = enumerated("subject", get("subject", "subject"), parse_subject, 0);
    let language = enumerated("language", get("language", "language"), parse_language, 0);
    let thumbs_value = get("thumbs", "thumbs").cloned();
    let thumbs_parsed = thumbs_value.as_ref().map(|v| {
        enumerated(
            "thumbs",
            Some(v),
            |s| match s.to_ascii_uppercase().as_str() {
                "THUMBS_UP" | "UP" => Some(thumbs::UP),
                "THUMBS_DOWN" | "DOWN" => Some(thumbs::DOWN),
                "THUMBS_UNSPECIFIED" => Some(0),
                _ => None,
            },
            0,
        )
    });
    let mut scores = Vec::new();
    for (name, build) in [
        ("csat", Score::Csat as fn(i32) -> Score),
        ("nps", Score::Nps),
        ("ces", Score::Ces),
    ] {
        if let Some(v) = object.get(name) {
            match v.as_i64().and_then(|n| i32::try_from(n).ok()) {
                Some(n) => scores.push(build(n)),
                None => problems.push(problem(name, format!("{v} is not a whole number"))),
            }
        }
    }
    if let Some(t) = thumbs_parsed {
        scores.push(Score::Thumbs(t));
    }
    if scores.len() > 1 {
        problems.push(problem(
            "score",
            "give only one of csat, nps, ces and thumbs",
        ));
    }
    let submitted_text = text("submitted_at", "submittedAt");
    let submitted_at = if submitted_text.is_empty() {
        None
    } else {
        let parsed = parse_time(&submitted_text);
        if parsed.is_none() {
            problems.push(problem(
                "submitted_at",
                format!("{submitted_text:?} is not an RFC 3339 time"),
            ));
        }
        parsed
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(FeedbackInput {
        client_feedback_id: text("client_feedback_id", "clientFeedbackId"),
        conversation_id: text("conversation_id", "conversationId"),
        channel,
        subject,
        score: scores.first().copied(),
        comment: text("comment", "comment"),
        language,
        question_id: text("question_id", "questionId"),
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
            &[
                "csat".into(),
                "5".into(),
                "f1".into(),
                "".into(),
                "2025-01-01T00:00:00Z".into(),
            ],
            8,
        )
        .unwrap();
        assert_eq!(ok.channel, 8);
        assert_eq!(ok.score, Some(Score::Csat(5)));
        let bad = read_row(
            &header,
            &[
                "stars".into(),
                "x".into(),
                "f2".into(),
                "pigeon".into(),
                "yesterday".into(),
            ],
            8,
        )
        .unwrap_err();
        let fields: Vec<&str> = bad.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["channel", "kind", "submitted_at"]);
        assert!(Header::parse(&["score".into()]).is_err());
    }

    #[test]
    fn json_lines_follow_the_protobuf_json_mapping() {
        let row = read_json_row(
            r#"{"clientFeedbackId":"f1","channel":"CHANNEL_APP","subject":"FEEDBACK_SUBJECT_BOT","nps":9,"submittedAt":"2025-01-01T00:00:00Z"}"#,
            8,
        )
        .unwrap();
        assert_eq!(
            (row.channel, row.subject, row.score),
            (2, 1, Some(Score::Nps(9)))
        );
        let defaulted =
            read_json_row(r#"{"client_feedback_id":"f2","thumbs":"THUMBS_DOWN"}"#, 8).unwrap();
        assert_eq!(
            (defaulted.channel, defaulted.score),
            (8, Some(Score::Thumbs(2)))
        );
        let bad = read_json_row(r#"{"csat":5,"nps":3,"channel":"CHANNEL_X"}"#, 8).unwrap_err();
        let fields: Vec<&str> = bad.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["channel", "score"]);
        assert!(read_json_row("[1]", 0).is_err());
    }
}
