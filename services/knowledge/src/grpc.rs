//! The gRPC adapter: `tandem.knowledge.v1.KnowledgeService` over [`App`].
//!
//! Roles (from the verified token):
//! - reads (search, articles, versions, audit trail, candidates, gaps): admin, supervisor,
//!   agent and other services (the bot searches through dialog);
//! - search and article reads also admit a channel (dialog forwards the customer channel's
//!   token in the bot's turn), only for the bot: search with audience BOT, and the published
//!   version of an article not restricted to agents (`PERMISSION_DENIED` otherwise);
//! - writing drafts (create, new draft, submit for review): admin, supervisor and agent;
//! - reviewing (approve, reject, publish, archive, candidate review, import, export): admin and
//!   supervisor; an import that publishes at once needs an admin.
//!
//! Validation failures answer `INVALID_ARGUMENT` with every problem listed in the message and as
//! `google.rpc.BadRequest` field violations in the status details.

use std::pin::Pin;
use std::sync::Arc;

use tandem_platform::auth::{Caller, Role, caller};
use tandem_platform::error::status_from;
use tandem_platform::paging;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_proto::pb::knowledge::v1::knowledge_service_server::KnowledgeService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::app::{
    Actor, App, Content, KnowledgeError, NewArticle, NewVersion, check_id, violation,
};
use crate::formats;
use crate::store::{ArticleFilter, GapFilter, now_micros, timestamp_micros};

const READERS: &[Role] = &[Role::Admin, Role::Supervisor, Role::Agent, Role::Service];
/// Search and article reads also admit channels, for what the bot may say only.
const SEARCHERS: &[Role] = &[
    Role::Admin,
    Role::Supervisor,
    Role::Agent,
    Role::Service,
    Role::Channel,
];
const EDITORS: &[Role] = &[Role::Admin, Role::Supervisor, Role::Agent];
const REVIEWERS: &[Role] = &[Role::Admin, Role::Supervisor];

/// Export chunks are sent once they reach this size.
const EXPORT_CHUNK: usize = 256 << 10;

/// The gRPC service.
pub struct KnowledgeGrpc {
    app: Arc<App>,
}

impl KnowledgeGrpc {
    /// Wraps the application.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

fn status(e: &KnowledgeError) -> Status {
    if let KnowledgeError::Invalid(errors) = e {
        let mut details = ErrorDetails::new();
        for v in errors {
            details.add_bad_request_violation(v.path.clone(), v.message.clone());
        }
        return Status::with_error_details(tonic::Code::InvalidArgument, e.to_string(), details);
    }
    status_from(e)
}

fn who<'a, T>(req: &'a Request<T>, roles: &[Role]) -> Result<&'a Caller, Status> {
    let c = caller(req)?;
    c.require_any(roles).map_err(|e| status_from(&e))?;
    Ok(c)
}

fn actor(c: &Caller) -> Actor {
    Actor {
        id: c.subject.clone(),
    }
}

fn bad(path: &str, message: &str) -> Status {
    status(&KnowledgeError::Invalid(vec![violation(path, message)]))
}

/// An `INVALID_ARGUMENT` status for one field, with its `BadRequest` detail.
pub(crate) fn invalid_status(path: &str, message: &str) -> Status {
    bad(path, message)
}

fn page_size(page: Option<&common::PageRequest>) -> Result<usize, Status> {
    paging::page_size(page).map_err(|e| bad(e.path, &e.message))
}

fn page_token(page: Option<&common::PageRequest>) -> Result<Option<String>, Status> {
    paging::page_token(page).map_err(|e| bad(e.path, &e.message))
}

/// A `(time, id)` keyset cursor from a page token.
fn keyset(page: Option<&common::PageRequest>) -> Result<(i64, String), Status> {
    match page_token(page)? {
        None => Ok((i64::MAX, String::new())),
        Some(t) => t
            .split_once(':')
            .and_then(|(a, id)| Some((a.parse::<i64>().ok()?, id.to_owned())))
            .ok_or_else(|| bad("page.page_token", "is not a token this service issued")),
    }
}

fn enum_ok<E: TryFrom<i32>>(path: &str, value: i32) -> Result<(), Status> {
    E::try_from(value)
        .map(|_| ())
        .map_err(|_| bad(path, "is not a known value"))
}

fn knowledge(e: KnowledgeError) -> Status {
    status(&e)
}

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl KnowledgeService for KnowledgeGrpc {
    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let c = who(&req, SEARCHERS)?;
        // A channel (the bot's turn, with the customer channel's token) may only search what
        // the bot may say.
        if c.require_any(READERS).is_err() && req.get_ref().audience != pb::Audience::Bot as i32 {
            return Err(Status::permission_denied(
                "a channel may only search with audience AUDIENCE_BOT",
            ));
        }
        let tenant = c.tenant.clone();
        let out = self
            .app
            .search(&tenant, req.get_ref())
            .await
            .map_err(knowledge)?;
        Ok(Response::new(out))
    }

    async fn get_article(
        &self,
        req: Request<pb::GetArticleRequest>,
    ) -> Result<Response<pb::GetArticleResponse>, Status> {
        let c = who(&req, SEARCHERS)?;
        let channel = c.require_any(READERS).is_err();
        let tenant = c.tenant.clone();
        let r = req.get_ref();
        let (article, version) = self
            .app
            .get(&tenant, &r.article_id, r.version)
            .await
            .map_err(knowledge)?;
        // A channel reads only what the bot may say: a published version of an article that
        // is not for agents only.
        if channel
            && (version.status != pb::VersionStatus::Published as i32
                || article.visibility == pb::Visibility::Agents as i32)
        {
            return Err(Status::permission_denied(
                "a channel may only read published versions of articles visible to the bot",
            ));
        }
        Ok(Response::new(pb::GetArticleResponse {
            article: Some(article),
            version: Some(version),
        }))
    }

    async fn list_articles(
        &self,
        req: Request<pb::ListArticlesRequest>,
    ) -> Result<Response<pb::ListArticlesResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let size = page_size(r.page.as_ref())?;
        enum_ok::<common::Language>("language", r.language)?;
        enum_ok::<pb::ArticleStatus>("status", r.status)?;
        enum_ok::<pb::Visibility>("visibility", r.visibility)?;
        let filter = ArticleFilter {
            scenario_id: r.scenario_id,
            language: r.language,
            status: r.status,
            visibility: r.visibility,
            tag: r.tag,
            cursor: keyset(r.page.as_ref())?,
            limit: i64::try_from(size + 1).unwrap_or(21),
        };
        let mut articles = self.app.list(&tenant, &filter).await.map_err(knowledge)?;
        let more = articles.len() > size;
        articles.truncate(size);
        let last = articles.last().map(|a| {
            format!(
                "{}:{}",
                a.updated_at.as_ref().map_or(0, timestamp_micros),
                a.id
            )
        });
        Ok(Response::new(pb::ListArticlesResponse {
            articles,
            page: paging::next_page(more, last),
        }))
    }

    async fn list_article_versions(
        &self,
        req: Request<pb::ListArticleVersionsRequest>,
    ) -> Result<Response<pb::ListArticleVersionsResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let size = page_size(r.page.as_ref())?;
        let before = match page_token(r.page.as_ref())? {
            None => i32::MAX,
            Some(t) => t
                .parse()
                .map_err(|_| bad("page.page_token", "is not a token this service issued"))?,
        };
        let mut versions = self
            .app
            .versions(
                &tenant,
                &r.article_id,
                before,
                i64::try_from(size + 1).unwrap_or(21),
            )
            .await
            .map_err(knowledge)?;
        let more = versions.len() > size;
        versions.truncate(size);
        let last = versions.last().map(|v| v.version.to_string());
        Ok(Response::new(pb::ListArticleVersionsResponse {
            versions,
            page: paging::next_page(more, last),
        }))
    }

    async fn create_article(
        &self,
        req: Request<pb::CreateArticleRequest>,
    ) -> Result<Response<pb::CreateArticleResponse>, Status> {
        let c = who(&req, EDITORS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = req.into_inner();
        let new = NewArticle {
            external_id: r.external_id,
            scenario_id: r.scenario_id,
            language: r.language,
            visibility: r.visibility,
            tags: r.tags,
            content: Content {
                title: r.title,
                questions: r.questions,
                answer: r.answer,
                change_note: r.change_note,
            },
            ..NewArticle::default()
        };
        let (article, version) = self
            .app
            .create(&tenant, &actor, new)
            .await
            .map_err(knowledge)?;
        Ok(Response::new(pb::CreateArticleResponse {
            article: Some(article),
            version: Some(version),
        }))
    }

    async fn update_draft(
        &self,
        req: Request<pb::UpdateDraftRequest>,
    ) -> Result<Response<pb::UpdateDraftResponse>, Status> {
        let c = who(&req, EDITORS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = req.into_inner();
        let new = NewVersion {
            content: Content {
                title: r.title,
                questions: r.questions,
                answer: r.answer,
                change_note: r.change_note,
            },
            visibility: r.visibility,
            tags: r.tags.map(|t| t.tags),
        };
        let (article, version) = self
            .app
            .update_draft(&tenant, &actor, &r.article_id, r.base_version, new)
            .await
            .map_err(knowledge)?;
        Ok(Response::new(pb::UpdateDraftResponse {
            article: Some(article),
            version: Some(version),
        }))
    }

    async fn submit_for_review(
        &self,
        req: Request<pb::SubmitForReviewRequest>,
    ) -> Result<Response<pb::SubmitForReviewResponse>, Status> {
        let c = who(&req, EDITORS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = req.into_inner();
        let version = self
            .app
            .submit(&tenant, &actor, &r.article_id, r.version, &r.comment)
            .await
            .map_err(knowledge)?;
        Ok(Response::new(pb::SubmitForReviewResponse {
            version: Some(version),
        }))
    }

    async fn approve_version(
        &self,
        req: Request<pb::ApproveVersionRequest>,
    ) -> Result<Response<pb::ApproveVersionResponse>, Status> {
        let c = who(&req, REVIEWERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = req.into_inner();
        let version = self
            .app
            .review(&tenant, &actor, &r.article_id, r.version, true, &r.comment)
            .await
            .map_err(knowledge)?;
        Ok(Response::new(pb::ApproveVersionResponse {
            version: Some(version),
        }))
    }

    async fn reject_version(
        &self,
        req: Request<pb::RejectVersionRequest>,
    ) -> Result<Response<pb::RejectVersionResponse>, Status> {
        let c = who(&req, REVIEWERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = req.into_inner();
        let version = self
            .app
            .review(&tenant, &actor, &r.article_id, r.version, false, &r.reason)
            .await
            .map_err(knowledge)?;
        Ok(Response::new(pb::RejectVersionResponse {
            version: Some(version),
        }))
    }

    async fn publish_version(
        &self,
        req: Request<pb::PublishVersionRequest>,
    ) -> Result<Response<pb::PublishVersionResponse>, Status> {
        let c = who(&req, REVIEWERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = req.into_inner();
        let (article, version) = self
            .app
            .publish(&tenant, &actor, &r.article_id, r.version)
            .await
            .map_err(knowledge)?;
        Ok(Response::new(pb::PublishVersionResponse {
            article: Some(article),
            version: Some(version),
        }))
    }

    async fn archive_article(
        &self,
        req: Request<pb::ArchiveArticleRequest>,
    ) -> Result<Response<pb::ArchiveArticleResponse>, Status> {
        let c = who(&req, REVIEWERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = req.into_inner();
        let article = self
            .app
            .archive(&tenant, &actor, &r.article_id, &r.reason)
            .await
            .map_err(knowledge)?;
        Ok(Response::new(pb::ArchiveArticleResponse {
            article: Some(article),
        }))
    }

    async fn get_audit_trail(
        &self,
        req: Request<pb::GetAuditTrailRequest>,
    ) -> Result<Response<pb::GetAuditTrailResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let size = page_size(r.page.as_ref())?;
        let cursor = keyset(r.page.as_ref())?;
        let mut entries = self
            .app
            .audit_trail(
                &tenant,
                &r.article_id,
                &cursor,
                i64::try_from(size + 1).unwrap_or(21),
            )
            .await
            .map_err(knowledge)?;
        let more = entries.len() > size;
        entries.truncate(size);
        let last = entries.last().map(|e| {
            format!(
                "{}:{}",
                e.occurred_at.as_ref().map_or(0, timestamp_micros),
                e.id
            )
        });
        Ok(Response::new(pb::GetAuditTrailResponse {
            entries,
            page: paging::next_page(more, last),
        }))
    }

    type ImportArticlesStream = BoxStream<pb::ImportArticlesResponse>;

    async fn import_articles(
        &self,
        req: Request<Streaming<pb::ImportArticlesRequest>>,
    ) -> Result<Response<Self::ImportArticlesStream>, Status> {
        let c = who(&req, REVIEWERS)?;
        let (tenant, actor, admin) = (c.tenant.clone(), actor(c), c.has(Role::Admin));
        let mut input = req.into_inner();
        let Some(pb::import_articles_request::Part::Header(header)) =
            input.message().await?.and_then(|m| m.part)
        else {
            return Err(bad("header", "the first message must be the header"));
        };
        let format = match pb::ArticleFormat::try_from(header.format) {
            Ok(f) if f != pb::ArticleFormat::Unspecified => f,
            _ => return Err(bad("header.format", "must be JSONL, CSV or MARKDOWN")),
        };
        enum_ok::<common::Language>("header.default_language", header.default_language)?;
        enum_ok::<pb::Visibility>("header.default_visibility", header.default_visibility)?;
        if !header.default_scenario_id.is_empty() {
            check_id("header.default_scenario_id", &header.default_scenario_id)
                .map_err(knowledge)?;
        }
        if header.publish && !admin {
            return Err(Status::permission_denied(
                "publishing on import needs the admin role",
            ));
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(crate::import::run(
            Arc::clone(&self.app),
            tenant,
            actor,
            header,
            format,
            input,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExportArticlesStream = BoxStream<pb::ExportArticlesResponse>;

    async fn export_articles(
        &self,
        req: Request<pb::ExportArticlesRequest>,
    ) -> Result<Response<Self::ExportArticlesStream>, Status> {
        let tenant = who(&req, REVIEWERS)?.tenant.clone();
        let r = req.into_inner();
        let format = match pb::ArticleFormat::try_from(r.format) {
            Ok(f) if f != pb::ArticleFormat::Unspecified => f,
            _ => return Err(bad("format", "must be JSONL, CSV or MARKDOWN")),
        };
        enum_ok::<common::Language>("language", r.language)?;
        enum_ok::<pb::ArticleStatus>("status", r.status)?;
        let status = if r.status == 0 {
            pb::ArticleStatus::Published as i32
        } else {
            r.status
        };
        let (tx, rx) = mpsc::channel(8);
        let app = Arc::clone(&self.app);
        tokio::spawn(async move {
            let mut filter = ArticleFilter {
                scenario_id: r.scenario_id,
                language: r.language,
                status,
                cursor: (i64::MAX, String::new()),
                limit: 500,
                ..ArticleFilter::default()
            };
            let mut buffer = formats::header(format);
            let mut written = 0_i64;
            loop {
                let page = match app.list(&tenant, &filter).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(status_of(&e))).await;
                        return;
                    }
                };
                let Some(last) = page.last() else { break };
                filter.cursor = (
                    last.updated_at.as_ref().map_or(0, timestamp_micros),
                    last.id.clone(),
                );
                let full = page.len() == 500;
                for a in &page {
                    let v = if a.published_version > 0 {
                        a.published_version
                    } else {
                        a.current_version
                    };
                    let version = match app.get(&tenant, &a.id, v).await {
                        Ok((_, version)) => version,
                        Err(e) => {
                            let _ = tx.send(Err(status_of(&e))).await;
                            return;
                        }
                    };
                    formats::write_row(format, &formats::row_of(a, &version), &mut buffer);
                    written += 1;
                    if buffer.len() >= EXPORT_CHUNK && !send_chunk(&tx, &mut buffer, written).await
                    {
                        return;
                    }
                }
                if !full {
                    break;
                }
            }
            if !buffer.is_empty() || written == 0 {
                send_chunk(&tx, &mut buffer, written).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_candidates(
        &self,
        req: Request<pb::ListCandidatesRequest>,
    ) -> Result<Response<pb::ListCandidatesResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        let size = page_size(r.page.as_ref())?;
        enum_ok::<pb::CandidateStatus>("status", r.status)?;
        enum_ok::<pb::CandidateKind>("kind", r.kind)?;
        let offset: i64 = match page_token(r.page.as_ref())? {
            None => 0,
            Some(t) => t
                .parse()
                .map_err(|_| bad("page.page_token", "is not a token this service issued"))?,
        };
        let status = if r.status == 0 {
            pb::CandidateStatus::Pending as i32
        } else {
            r.status
        };
        let mut candidates = self
            .app
            .candidates(
                &tenant,
                status,
                &r.scenario_id,
                r.kind,
                offset,
                i64::try_from(size + 1).unwrap_or(21),
            )
            .await
            .map_err(knowledge)?;
        let more = candidates.len() > size;
        candidates.truncate(size);
        let next = offset + i64::try_from(candidates.len()).unwrap_or(0);
        Ok(Response::new(pb::ListCandidatesResponse {
            candidates,
            page: paging::next_page(more, Some(next.to_string())),
        }))
    }

    async fn review_candidate(
        &self,
        req: Request<pb::ReviewCandidateRequest>,
    ) -> Result<Response<pb::ReviewCandidateResponse>, Status> {
        let c = who(&req, REVIEWERS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let out = self
            .app
            .review_candidate(&tenant, &actor, req.get_ref())
            .await
            .map_err(knowledge)?;
        Ok(Response::new(out))
    }

    async fn get_gaps(
        &self,
        req: Request<pb::GetGapsRequest>,
    ) -> Result<Response<pb::GetGapsResponse>, Status> {
        let tenant = who(&req, READERS)?.tenant.clone();
        let r = req.into_inner();
        enum_ok::<common::Language>("language", r.language)?;
        let limit = match r.limit {
            0 => 20,
            n @ 1..=100 => i64::from(n),
            n => return Err(bad("limit", &format!("is {n}, outside 0..=100"))),
        };
        let now = now_micros();
        let start = r
            .range
            .as_ref()
            .and_then(|t| t.start.as_ref())
            .map_or(now - 7 * 86_400 * 1_000_000, timestamp_micros);
        let end = r
            .range
            .as_ref()
            .and_then(|t| t.end.as_ref())
            .map_or(now + 1, timestamp_micros);
        if end < start {
            return Err(bad("range", "end is before start"));
        }
        let gaps = self
            .app
            .gaps(
                &tenant,
                &GapFilter {
                    scenario_id: r.scenario_id,
                    language: r.language,
                    start,
                    end,
                    limit,
                },
            )
            .await
            .map_err(knowledge)?;
        Ok(Response::new(pb::GetGapsResponse { gaps }))
    }
}

fn status_of(e: &KnowledgeError) -> Status {
    status(e)
}

async fn send_chunk(
    tx: &mpsc::Sender<Result<pb::ExportArticlesResponse, Status>>,
    buffer: &mut String,
    written: i64,
) -> bool {
    let chunk = std::mem::take(buffer).into_bytes();
    tx.send(Ok(pb::ExportArticlesResponse {
        chunk,
        articles_written: written,
    }))
    .await
    .is_ok()
}
