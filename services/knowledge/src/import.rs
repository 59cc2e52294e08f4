//! The streaming import behind `ImportArticles`: rows are parsed as the file's chunks arrive and
//! written in chunks of [`IMPORT_BATCH`] rows, each in one transaction (see
//! [`App::import_rows`]); every written chunk is followed by a progress event, bad rows by row
//! errors, and the summary comes last.
//!
//! Limits: a chunk message must fit the gRPC message limit (1 MiB by default, framing
//! included), so clients send chunks of 512 KiB; a larger message is refused with
//! `RESOURCE_EXHAUSTED` and an explanation. A chunk above 1 MiB (possible only when the server's
//! message limit is raised) is `INVALID_ARGUMENT`, a file above 64 MiB `RESOURCE_EXHAUSTED`.
//! Rows of the chunks before such an error, or before bytes that are not UTF-8, stay imported;
//! the error says how many.

use std::collections::HashMap;
use std::sync::Arc;

use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1::RowError;
use tandem_proto::pb::knowledge::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::app::{Actor, App, Content, Entry, KnowledgeError, NewArticle, RowOutcome, Unnamed};
use crate::formats::{self, Parsed, RawRow, RowStream};

/// Largest import chunk.
pub const MAX_CHUNK: usize = 1 << 20;
/// Largest import file.
pub const MAX_IMPORT: usize = 64 << 20;
/// Import rows written per transaction.
pub const IMPORT_BATCH: usize = 500;

/// Where the events of an import go.
pub type ImportTx = mpsc::Sender<Result<pb::ImportArticlesResponse, Status>>;

/// An import in progress.
struct Import<'a> {
    app: &'a App,
    tenant: &'a TenantId,
    actor: &'a Actor,
    header: &'a pb::ImportHeader,
    entry: Entry,
    tx: &'a ImportTx,
    summary: pb::ImportSummary,
    /// Rows waiting to be written, with their numbers.
    pending: Vec<(i64, NewArticle)>,
    /// The row that first used each external id of the file.
    seen: HashMap<String, i64>,
}

/// The import stopped: the caller went away, or an error was sent.
struct Stopped;

fn invalid(path: &str, message: String) -> Status {
    crate::grpc::invalid_status(path, &message)
}

/// Whether a stream error is tonic's refusal of a message above the decoding limit.
fn too_large(s: &Status) -> bool {
    s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large")
}

/// Runs an import over the chunks of `input` (the header already read), sending row errors,
/// progress and the summary to `tx`.
pub async fn run(
    app: Arc<App>,
    tenant: TenantId,
    actor: Actor,
    header: pb::ImportHeader,
    format: pb::ArticleFormat,
    mut input: Streaming<pb::ImportArticlesRequest>,
    tx: ImportTx,
) {
    let mut import = Import {
        app: &app,
        tenant: &tenant,
        actor: &actor,
        header: &header,
        entry: if header.publish {
            Entry::Publish
        } else {
            Entry::Draft
        },
        tx: &tx,
        summary: pb::ImportSummary {
            dry_run: header.dry_run,
            ..Default::default()
        },
        pending: Vec::with_capacity(IMPORT_BATCH),
        seen: HashMap::new(),
    };
    let mut rows = RowStream::new(format);
    let mut bytes = 0_usize;
    loop {
        let failure = match input.message().await {
            Ok(None) => break,
            Ok(Some(m)) => match m.part {
                Some(pb::import_articles_request::Part::Chunk(chunk)) => {
                    bytes += chunk.len();
                    if chunk.len() > MAX_CHUNK {
                        Some(invalid(
                            "chunk",
                            format!("has {} bytes, more than 1 MiB", chunk.len()),
                        ))
                    } else if bytes > MAX_IMPORT {
                        Some(Status::resource_exhausted("the file is larger than 64 MiB"))
                    } else {
                        match rows.push(&chunk) {
                            Ok(parsed) => {
                                if import.take(parsed).await.is_err() {
                                    return;
                                }
                                None
                            }
                            Err(at) => Some(not_utf8(at)),
                        }
                    }
                }
                _ => Some(invalid(
                    "header",
                    "only the first message is a header".into(),
                )),
            },
            Err(s) if too_large(&s) => Some(Status::resource_exhausted(format!(
                "an import message is over the server's gRPC message limit ({}); send the file \
                 in chunks of at most 512 KiB",
                s.message()
            ))),
            Err(s) => Some(s),
        };
        if let Some(status) = failure {
            import.fail(status).await;
            return;
        }
    }
    match rows.finish() {
        Ok(parsed) => {
            if import.take(parsed).await.is_err() || import.flush().await.is_err() {
                return;
            }
        }
        Err(at) => {
            import.fail(not_utf8(at)).await;
            return;
        }
    }
    if header.publish && !header.dry_run {
        app.refresh().await;
    }
    let summary = std::mem::take(&mut import.summary);
    let _ = import
        .send(pb::import_articles_response::Event::Summary(summary))
        .await;
}

fn not_utf8(at: usize) -> Status {
    invalid("chunk", format!("the file is not UTF-8 (byte {at})"))
}

impl Import<'_> {
    async fn send(&self, event: pb::import_articles_response::Event) -> Result<(), Stopped> {
        self.tx
            .send(Ok(pb::ImportArticlesResponse { event: Some(event) }))
            .await
            .map_err(|_| Stopped)
    }

    /// Writes what is pending, then ends the import with `status`, saying what was imported.
    async fn fail(&mut self, status: Status) {
        if self.flush().await.is_err() {
            return;
        }
        let s = &self.summary;
        let done = s.created + s.updated + s.unchanged;
        let status = if done > 0 && !s.dry_run {
            Status::with_details(
                status.code(),
                format!(
                    "{}; the {done} rows before were imported ({} created, {} updated, {} \
                     unchanged)",
                    status.message(),
                    s.created,
                    s.updated,
                    s.unchanged
                ),
                status.details().to_vec().into(),
            )
        } else {
            status
        };
        let _ = self.tx.send(Err(status)).await;
    }

    async fn row_error(&mut self, e: RowError) -> Result<(), Stopped> {
        self.summary.failed += 1;
        self.send(pb::import_articles_response::Event::RowError(e))
            .await
    }

    /// Takes parsed rows: bad ones are reported, good ones wait for their chunk, which is
    /// written once full.
    async fn take(&mut self, parsed: Vec<Parsed>) -> Result<(), Stopped> {
        for (number, row) in parsed {
            if number > 0 {
                self.summary.rows_read += 1;
            }
            match row.and_then(|row| row_article(self.header, row, number)) {
                Ok(new) => {
                    if !new.external_id.trim().is_empty() {
                        let id = new.external_id.trim().to_owned();
                        if let Some(first) = self.seen.get(&id) {
                            let e = RowError {
                                row_number: number,
                                external_id: id,
                                field: "external_id".into(),
                                message: format!(
                                    "row {first} of the file has the same external id"
                                ),
                            };
                            self.row_error(e).await?;
                            continue;
                        }
                        self.seen.insert(id, number);
                    }
                    self.pending.push((number, new));
                    if self.pending.len() >= IMPORT_BATCH {
                        self.flush().await?;
                    }
                }
                Err(e) => self.row_error(e).await?,
            }
        }
        Ok(())
    }

    /// Writes the pending rows in one transaction and reports their errors and the progress.
    async fn flush(&mut self) -> Result<(), Stopped> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (numbers, rows): (Vec<(i64, String)>, Vec<NewArticle>) = self
            .pending
            .drain(..)
            .map(|(n, new)| ((n, new.external_id.clone()), new))
            .unzip();
        let outcomes = self
            .app
            .import_rows(
                self.tenant,
                self.actor,
                rows,
                self.entry,
                self.header.dry_run,
            )
            .await;
        for ((number, external_id), outcome) in numbers.into_iter().zip(outcomes) {
            match outcome {
                Ok(RowOutcome::Created) => self.summary.created += 1,
                Ok(RowOutcome::Updated) => self.summary.updated += 1,
                Ok(RowOutcome::Unchanged) => self.summary.unchanged += 1,
                Err(e) => {
                    self.row_error(row_failure(number, &external_id, &e))
                        .await?
                }
            }
        }
        let s = &self.summary;
        let progress = pb::ImportProgress {
            rows_read: s.rows_read,
            imported: s.created + s.updated + s.unchanged,
            failed: s.failed,
        };
        self.send(pb::import_articles_response::Event::Progress(progress))
            .await
    }
}

/// The article a file row describes, with the import's defaults filled in.
fn row_article(
    header: &pb::ImportHeader,
    row: RawRow,
    number: i64,
) -> Result<NewArticle, RowError> {
    let fail = |field: &str, message: String| RowError {
        row_number: number,
        external_id: row.external_id.clone(),
        field: field.to_owned(),
        message,
    };
    let language = formats::parse_language(&row.language).map_err(|m| fail("language", m))?;
    let visibility =
        formats::parse_visibility(&row.visibility).map_err(|m| fail("visibility", m))?;
    // What the row leaves empty: the header's defaults fill it for a new article, an existing
    // article keeps its own.
    let unnamed = Unnamed {
        scenario: row.scenario_id.trim().is_empty(),
        language: language.is_none(),
        visibility: visibility.is_none(),
        tags: row.tags.iter().all(|t| t.trim().is_empty()),
    };
    let language = language.map_or(header.default_language, |l| l as i32);
    let visibility = visibility.map_or(header.default_visibility, |v| v as i32);
    let scenario_id = if unnamed.scenario {
        header.default_scenario_id.clone()
    } else {
        row.scenario_id
    };
    Ok(NewArticle {
        unnamed,
        external_id: row.external_id,
        scenario_id,
        language,
        visibility,
        tags: row.tags,
        content: Content {
            title: row.title,
            questions: row.questions,
            answer: row.answer,
            change_note: "imported".into(),
        },
    })
}

fn row_failure(number: i64, external_id: &str, e: &KnowledgeError) -> RowError {
    let (field, message) = match e {
        KnowledgeError::Invalid(v) => (
            v.first().map(|v| v.path.clone()).unwrap_or_default(),
            e.to_string(),
        ),
        e => (
            String::new(),
            tandem_platform::error::DisplayChain(e).to_string(),
        ),
    };
    RowError {
        row_number: number,
        external_id: external_id.to_owned(),
        field,
        message: message.chars().take(500).collect(),
    }
}
