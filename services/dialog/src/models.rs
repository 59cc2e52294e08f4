//! The tenant's intent model: examples (list, CSV, JSON, JSON lines), training with
//! `tandem-nlu` in Rust on a blocking thread, evaluation, versions and activation (also the
//! rollback). The active version is what the bot's analyser uses.
//!
//! Rows of the text formats may carry an `answer` (CSV: a fifth column): the intent's stored
//! answer in the row's language, which the bot sends when it answers that intent.
//!
//! A leading byte order mark is ignored; a row that cannot be read (a JSON element or line that
//! is not an object with string `text` and `intent`) is an error of that row, and the other rows
//! are stored.

use tandem_nlu::{LabelledText, TextClassifier, TrainingOptions, stratified_split};
use tandem_platform::bus::RawEvent;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as pb;

use crate::app::{App, DialogError, DialogResult, now};

const MAX_EXAMPLES: usize = 5_000;
const MAX_RAW_BYTES: usize = 4 * 1024 * 1024;
/// Row errors listed in an upload's response at most.
const MAX_ROW_ERRORS: usize = 1_000;

#[derive(Debug, Default, PartialEq)]
struct RawRow {
    text: String,
    intent: String,
    scenario_id: String,
    language: String,
    answer: String,
}

/// A row of an upload, or the field at fault (empty for the row itself) and why it could not be
/// read.
type ParsedRow = Result<RawRow, (&'static str, String)>;

/// Parses CSV with a header row; fields may be double-quoted with `""` escapes.
fn parse_csv(raw: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = raw.chars().peekable();
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
            '"' if field.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

fn language_of(code: &str) -> i32 {
    match code.trim().to_ascii_lowercase().as_str() {
        "zh" | "zh-cn" | "language_zh" => common::Language::Zh as i32,
        "en" | "en-us" | "language_en" => common::Language::En as i32,
        _ => common::Language::Unspecified as i32,
    }
}

/// Reads one JSON example: an object with string fields `text` and `intent` and optional string
/// fields `scenario_id`, `language` and `answer` (`null` counts as absent; other fields are
/// ignored). On error returns the field at fault (empty for the row itself) and why.
fn json_row(value: serde_json::Value) -> ParsedRow {
    let serde_json::Value::Object(mut fields) = value else {
        return Err(("", "must be a JSON object".to_owned()));
    };
    let mut field = |name: &'static str, required: bool| match fields.remove(name) {
        Some(serde_json::Value::String(s)) => Ok(s),
        None | Some(serde_json::Value::Null) if required => Err((name, "is required".to_owned())),
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(_) => Err((name, "must be a string".to_owned())),
    };
    Ok(RawRow {
        text: field("text", true)?,
        intent: field("intent", true)?,
        scenario_id: field("scenario_id", false)?,
        language: field("language", false)?,
        answer: field("answer", false)?,
    })
}

/// Parses `raw` into rows numbered from 1 (CSV: data rows after the header; JSON: array
/// elements; JSON lines: lines); a row that cannot be read is an error of that row alone. A
/// leading byte order mark is ignored. Fails when the whole text is unreadable (no CSV header
/// naming `text` and `intent`, not a JSON array).
fn parse_raw(format: pb::ExampleFormat, raw: &str) -> DialogResult<Vec<(i64, ParsedRow)>> {
    let raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
    let number = |n: usize| i64::try_from(n + 1).unwrap_or(i64::MAX);
    match format {
        pb::ExampleFormat::Csv => {
            let rows = parse_csv(raw).map_err(|e| DialogError::Invalid(format!("raw: {e}")))?;
            let mut it = rows.into_iter();
            let header: Vec<String> = it
                .next()
                .ok_or_else(|| DialogError::Invalid("raw: no header row".into()))?
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect();
            let col = |name: &str| header.iter().position(|h| h == name);
            let (Some(t), Some(i)) = (col("text"), col("intent")) else {
                return Err(DialogError::Invalid(
                    "raw: the header must name `text` and `intent` columns".into(),
                ));
            };
            let (s, l, a) = (col("scenario_id"), col("language"), col("answer"));
            let get = |r: &[String], c: Option<usize>| {
                c.and_then(|c| r.get(c)).cloned().unwrap_or_default()
            };
            Ok(it
                .enumerate()
                .filter(|(_, r)| !(r.len() == 1 && r[0].trim().is_empty()))
                .map(|(n, r)| {
                    (
                        number(n),
                        Ok(RawRow {
                            text: get(&r, Some(t)),
                            intent: get(&r, Some(i)),
                            scenario_id: get(&r, s),
                            language: get(&r, l),
                            answer: get(&r, a),
                        }),
                    )
                })
                .collect())
        }
        pb::ExampleFormat::Json => {
            let values: Vec<serde_json::Value> = serde_json::from_str(raw).map_err(|e| {
                DialogError::Invalid(format!("raw: not a JSON array of examples: {e}"))
            })?;
            Ok(values
                .into_iter()
                .enumerate()
                .map(|(n, value)| (number(n), json_row(value)))
                .collect())
        }
        pb::ExampleFormat::Jsonl => Ok(raw
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                let row = serde_json::from_str(line)
                    .map_err(|e| ("", format!("not valid JSON: {e}")))
                    .and_then(json_row);
                (number(n), row)
            })
            .collect()),
        pb::ExampleFormat::Unspecified => {
            Err(DialogError::Invalid("format is required with raw".into()))
        }
    }
}

fn row_error(row: i64, field: &str, message: String) -> common::RowError {
    common::RowError {
        row_number: row,
        field: field.to_owned(),
        message,
        ..Default::default()
    }
}

fn metrics(e: &tandem_nlu::Evaluation) -> pb::ModelMetrics {
    pb::ModelMetrics {
        accuracy: e.accuracy,
        macro_f1: e.macro_f1,
        per_intent: e
            .classes
            .iter()
            .map(|c| pb::IntentMetrics {
                intent: c.label.clone(),
                precision: c.precision,
                recall: c.recall,
                f1: c.f1,
                support: i64::try_from(c.support).unwrap_or(i64::MAX),
            })
            .collect(),
        confusions: e
            .confusions
            .iter()
            .take(50)
            .map(|c| pb::ConfusionPair {
                expected: c.gold.clone(),
                predicted: c.predicted.clone(),
                count: i64::try_from(c.count).unwrap_or(i64::MAX),
            })
            .collect(),
        evaluated_count: i64::try_from(e.examples).unwrap_or(i64::MAX),
    }
}

/// Trains on a blocking thread.
async fn train(examples: Vec<LabelledText>) -> DialogResult<TextClassifier> {
    tokio::task::spawn_blocking(move || {
        TextClassifier::train(&examples, &[], &TrainingOptions::default())
    })
    .await
    .map_err(|e| DialogError::Training(e.to_string()))?
    .map_err(|e| DialogError::Training(e.to_string()))
}

/// Evaluates on a blocking thread.
async fn evaluate(
    model: TextClassifier,
    test: Vec<LabelledText>,
) -> DialogResult<pb::ModelMetrics> {
    tokio::task::spawn_blocking(move || metrics(&model.evaluate(&test)))
        .await
        .map_err(|e| DialogError::Training(e.to_string()))
}

impl App {
    /// Stores training examples.
    pub async fn upload_examples(
        &self,
        tenant: &TenantId,
        req: pb::UploadExamplesRequest,
    ) -> DialogResult<pb::UploadExamplesResponse> {
        if req.raw.len() > MAX_RAW_BYTES {
            return Err(DialogError::Invalid("raw is larger than 4 MiB".into()));
        }
        if req.examples.len() > MAX_EXAMPLES {
            return Err(DialogError::Invalid(format!(
                "examples: {} given, at most {MAX_EXAMPLES}",
                req.examples.len()
            )));
        }
        if req.raw.is_empty() == req.examples.is_empty() {
            return Err(DialogError::Invalid(
                "give either examples or raw with format".into(),
            ));
        }
        let rows: Vec<(i64, ParsedRow)> = if req.raw.is_empty() {
            req.examples
                .iter()
                .enumerate()
                .map(|(n, e)| {
                    (
                        i64::try_from(n + 1).unwrap_or(i64::MAX),
                        Ok(RawRow {
                            text: e.text.clone(),
                            intent: e.intent.clone(),
                            scenario_id: e.scenario_id.clone(),
                            language: match common::Language::try_from(e.language) {
                                Ok(common::Language::Zh) => "zh".into(),
                                Ok(common::Language::En) => "en".into(),
                                _ => String::new(),
                            },
                            answer: String::new(),
                        }),
                    )
                })
                .collect()
        } else {
            let format = pb::ExampleFormat::try_from(req.format)
                .map_err(|_| DialogError::Invalid("format is unknown".into()))?;
            parse_raw(format, &req.raw)?
        };
        if rows.len() > MAX_EXAMPLES {
            return Err(DialogError::Invalid(format!(
                "{} rows given, at most {MAX_EXAMPLES}",
                rows.len()
            )));
        }
        let mut errors = Vec::new();
        let mut examples = Vec::new();
        let mut answers = Vec::new();
        for (n, r) in rows {
            let r = match r {
                Ok(r) => r,
                Err((field, message)) => {
                    if errors.len() < MAX_ROW_ERRORS {
                        errors.push(row_error(n, field, message));
                    }
                    continue;
                }
            };
            let text = r.text.trim().to_owned();
            let intent = r.intent.trim().to_owned();
            let scenario = if r.scenario_id.trim().is_empty() {
                req.scenario_id.clone()
            } else {
                r.scenario_id.trim().to_owned()
            };
            let bad = if text.is_empty() || text.chars().count() > 500 {
                Some(("text", "must have 1..=500 characters".to_owned()))
            } else if text.chars().any(char::is_control) {
                Some(("text", "contains control characters".to_owned()))
            } else if intent.is_empty()
                || intent.chars().count() > 100
                || intent.chars().any(char::is_control)
            {
                Some(("intent", "must have 1..=100 characters".to_owned()))
            } else if scenario.chars().count() > 64 {
                Some(("scenario_id", "has more than 64 characters".to_owned()))
            } else if r.answer.chars().count() > crate::app::MAX_TEXT_CHARS {
                Some(("answer", "has more than 4,000 characters".to_owned()))
            } else {
                None
            };
            if let Some((field, message)) = bad {
                if errors.len() < MAX_ROW_ERRORS {
                    errors.push(row_error(n, field, message));
                }
                continue;
            }
            let mut language = language_of(&r.language);
            if language == common::Language::Unspecified as i32 {
                language =
                    crate::nlu::language(tandem_text::detect_language(&text).language) as i32;
            }
            if !r.answer.trim().is_empty() {
                answers.push((intent.clone(), language, r.answer.trim().to_owned()));
            }
            examples.push((scenario, text, intent));
        }
        let (accepted, duplicates, total) = self
            .store()
            .add_examples(tenant, &req.scenario_id, req.replace, &examples, &answers)
            .await?;
        Ok(pb::UploadExamplesResponse {
            accepted,
            duplicates,
            errors,
            total_examples: total,
        })
    }

    /// Trains a new model version from the stored examples.
    pub async fn train_model(
        &self,
        tenant: &TenantId,
        actor: &str,
        req: pb::TrainModelRequest,
    ) -> DialogResult<pb::ModelVersion> {
        if req.notes.chars().count() > 1_000 {
            return Err(DialogError::Invalid(
                "notes has more than 1,000 characters".into(),
            ));
        }
        let examples: Vec<LabelledText> = self
            .store()
            .examples(tenant, &req.scenario_ids)
            .await?
            .into_iter()
            .map(|(t, l)| LabelledText::new(t, l))
            .collect();
        let intents: std::collections::BTreeSet<&str> =
            examples.iter().map(|e| e.label.as_str()).collect();
        if intents.len() < 2 {
            return Err(DialogError::Precondition(format!(
                "training needs examples of at least two intents; {} stored",
                intents.len()
            )));
        }
        let intent_count = i32::try_from(intents.len()).unwrap_or(i32::MAX);
        // Metrics on a held-out split, then the served model on every example.
        let labels: Vec<&str> = examples.iter().map(|e| e.label.as_str()).collect();
        let (train_idx, test_idx) = stratified_split(&labels, 0.8, 7);
        let held_metrics = if test_idx.is_empty() || train_idx.is_empty() {
            None
        } else {
            let tr: Vec<LabelledText> = train_idx.iter().map(|&i| examples[i].clone()).collect();
            let te: Vec<LabelledText> = test_idx.iter().map(|&i| examples[i].clone()).collect();
            match train(tr).await {
                Ok(m) => Some(evaluate(m, te).await?),
                Err(_) => None,
            }
        };
        let count = examples.len();
        let model = train(examples).await?;
        let bytes = model
            .to_bytes()
            .map_err(|e| DialogError::Training(e.to_string()))?;
        let version = pb::ModelVersion {
            id: uuid::Uuid::now_v7().to_string(),
            scenario_ids: req.scenario_ids.clone(),
            created_at: Some(now()),
            example_count: i64::try_from(count).unwrap_or(i64::MAX),
            intent_count,
            metrics: held_metrics,
            created_by: actor.to_owned(),
            notes: req.notes.clone(),
            ..Default::default()
        };
        let version = self.store().insert_model(tenant, version, &bytes).await?;
        if req.activate {
            return Ok(self.activate_model(tenant, actor, &version.id).await?.0);
        }
        Ok(version)
    }

    /// Activates a version; returns it and the previous active id.
    pub async fn activate_model(
        &self,
        tenant: &TenantId,
        actor: &str,
        id: &str,
    ) -> DialogResult<(pb::ModelVersion, String)> {
        let at = now();
        let actor = actor.to_owned();
        let out = self
            .store()
            .activate_model(tenant, id, at, |v, previous| {
                let m = v.metrics.clone().unwrap_or_default();
                RawEvent::new(
                    tenant,
                    &pb::IntentModelActivated {
                        model_version_id: v.id.clone(),
                        version: v.version,
                        previous_model_version_id: previous.to_owned(),
                        scenario_ids: v.scenario_ids.clone(),
                        accuracy: m.accuracy,
                        macro_f1: m.macro_f1,
                        actor: actor.clone(),
                        occurred_at: Some(at),
                    },
                    None,
                )
            })
            .await?
            .ok_or_else(|| DialogError::NotFound(format!("model version {id}")))?;
        self.forget_model(tenant);
        Ok(out)
    }

    /// Returns a model version.
    pub async fn model_version(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> DialogResult<pb::ModelVersion> {
        if id.is_empty() {
            return Err(DialogError::Invalid("model_version_id is empty".into()));
        }
        Ok(self
            .store()
            .model(tenant, id)
            .await?
            .ok_or_else(|| DialogError::NotFound(format!("model version {id}")))?
            .version)
    }

    /// Evaluates a version (or the active one) on held-out examples, or a fresh model on a
    /// random split of the stored examples.
    pub async fn evaluate_model(
        &self,
        tenant: &TenantId,
        req: pb::EvaluateModelRequest,
    ) -> DialogResult<(String, pb::ModelMetrics)> {
        if req.held_out.len() > MAX_EXAMPLES {
            return Err(DialogError::Invalid(format!(
                "held_out: at most {MAX_EXAMPLES} examples"
            )));
        }
        if !req.held_out.is_empty() {
            let stored = if req.model_version_id.is_empty() {
                self.store()
                    .active_model(tenant)
                    .await?
                    .ok_or_else(|| DialogError::Precondition("no active model version".into()))?
            } else {
                self.store()
                    .model(tenant, &req.model_version_id)
                    .await?
                    .ok_or_else(|| {
                        DialogError::NotFound(format!("model version {}", req.model_version_id))
                    })?
            };
            let model = TextClassifier::from_bytes(&stored.bytes)
                .map_err(|e| DialogError::Training(e.to_string()))?;
            let test = req
                .held_out
                .iter()
                .map(|e| LabelledText::new(e.text.clone(), e.intent.clone()))
                .collect();
            return Ok((stored.version.id, evaluate(model, test).await?));
        }
        if !(req.split_fraction > 0.0 && req.split_fraction < 1.0) {
            return Err(DialogError::Invalid(
                "give held_out examples or a split_fraction in (0, 1)".into(),
            ));
        }
        let examples: Vec<LabelledText> = self
            .store()
            .examples(tenant, &[])
            .await?
            .into_iter()
            .map(|(t, l)| LabelledText::new(t, l))
            .collect();
        let labels: Vec<&str> = examples.iter().map(|e| e.label.as_str()).collect();
        let (train_idx, test_idx) = stratified_split(&labels, 1.0 - req.split_fraction, req.seed);
        if train_idx.is_empty() || test_idx.is_empty() {
            return Err(DialogError::Precondition(
                "too few stored examples for this split".into(),
            ));
        }
        let tr = train_idx.iter().map(|&i| examples[i].clone()).collect();
        let te = test_idx.iter().map(|&i| examples[i].clone()).collect();
        let model = train(tr).await?;
        Ok((String::new(), evaluate(model, te).await?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn row(text: &str, intent: &str) -> RawRow {
        RawRow {
            text: text.into(),
            intent: intent.into(),
            ..RawRow::default()
        }
    }

    fn parsed(format: pb::ExampleFormat, raw: &str) -> Vec<(i64, ParsedRow)> {
        parse_raw(format, raw).unwrap()
    }

    #[test]
    fn a_byte_order_mark_is_ignored_in_every_format() {
        let csv = parsed(
            pb::ExampleFormat::Csv,
            "\u{feff}text,intent,language\r\nwhere is my parcel,track,en\r\n",
        );
        let want = RawRow {
            language: "en".into(),
            ..row("where is my parcel", "track")
        };
        assert_eq!(csv, [(1, Ok(want))]);
        let json = parsed(
            pb::ExampleFormat::Json,
            "\u{feff}[{\"text\": \"where is my parcel\", \"intent\": \"track\"}]",
        );
        assert_eq!(json, [(1, Ok(row("where is my parcel", "track")))]);
        let jsonl = parsed(
            pb::ExampleFormat::Jsonl,
            "\u{feff}{\"text\": \"where is my parcel\", \"intent\": \"track\"}\n",
        );
        assert_eq!(jsonl, [(1, Ok(row("where is my parcel", "track")))]);
        // Only a leading mark is removed.
        let inner = parsed(pb::ExampleFormat::Csv, "text,intent\n\u{feff}hi,greet\n");
        assert_eq!(inner, [(1, Ok(row("\u{feff}hi", "greet")))]);
    }

    #[test]
    fn a_bad_json_element_is_an_error_of_that_row() {
        let raw = r#"[
            {"text": "refund please", "intent": "refund", "scenario_id": null, "extra": 1},
            {"text": "no intent"},
            {"text": "typed", "intent": 5},
            42,
            {"text": "answered", "intent": "refund", "language": "en", "answer": "Sure."},
            {"intent": "refund", "text": ["a"]}
        ]"#;
        let rows = parsed(pb::ExampleFormat::Json, raw);
        assert_eq!(
            rows,
            [
                (1, Ok(row("refund please", "refund"))),
                (2, Err(("intent", "is required".to_owned()))),
                (3, Err(("intent", "must be a string".to_owned()))),
                (4, Err(("", "must be a JSON object".to_owned()))),
                (
                    5,
                    Ok(RawRow {
                        language: "en".into(),
                        answer: "Sure.".into(),
                        ..row("answered", "refund")
                    })
                ),
                (6, Err(("text", "must be a string".to_owned()))),
            ]
        );
        // A text that is not a JSON array at all is refused as a whole.
        assert!(matches!(
            parse_raw(pb::ExampleFormat::Json, r#"{"text": "a", "intent": "b"}"#),
            Err(DialogError::Invalid(_))
        ));
    }

    #[test]
    fn a_bad_json_line_is_an_error_of_that_line() {
        let raw = "{\"text\": \"refund please\", \"intent\": \"refund\"}\n\
                   {\"text\": \"broken\", \n\
                   \n\
                   {\"intent\": \"refund\"}\n\
                   {\"text\": \"late\", \"intent\": \"track\", \"language\": 7}\n\
                   {\"text\": \"where is it\", \"intent\": \"track\"}";
        let rows = parsed(pb::ExampleFormat::Jsonl, raw);
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert_eq!(rows[0], (1, Ok(row("refund please", "refund"))));
        let (n, Err(("", message))) = &rows[1] else {
            panic!("{:?}", rows[1]);
        };
        assert_eq!(*n, 2);
        assert!(message.starts_with("not valid JSON"), "{message}");
        assert_eq!(rows[2], (4, Err(("text", "is required".to_owned()))));
        assert_eq!(
            rows[3],
            (5, Err(("language", "must be a string".to_owned())))
        );
        assert_eq!(rows[4], (6, Ok(row("where is it", "track"))));
    }
}
