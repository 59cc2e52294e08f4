//! The knowledge base as the bot's source of answers: `Search` on the knowledge service with the
//! caller's own token, then the full answer of the best hit's version (`GetArticle`, cached per
//! tenant, article and version: a published version never changes).
//!
//! The caller's `authorization` metadata is forwarded as it came (the customer channel's token;
//! knowledge reads the tenant from it and lets a channel search for the bot only), with the
//! current W3C trace context. The whole look-up runs under one deadline; the bot's turn degrades
//! to the intent's stored answer when it fails or runs out of time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tandem_platform::propagation::TraceContextInterceptor;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::knowledge::v1 as kpb;
use tandem_proto::pb::knowledge::v1::knowledge_service_client::KnowledgeServiceClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Counter of knowledge look-ups by outcome (`answered`, `no_hit`, `error`, `timeout`).
pub const KNOWLEDGE_LOOKUPS_TOTAL: &str = "tandem_dialog_knowledge_lookups_total";

/// Cached answers kept before the cache is emptied.
const CACHE_CAP: usize = 10_000;

type Client = KnowledgeServiceClient<InterceptedService<Channel, TraceContextInterceptor>>;
type CacheKey = (TenantId, String, i32);

/// How the knowledge look-up of a turn is made.
#[derive(Clone, Debug)]
pub struct KnowledgeOptions {
    /// The knowledge service's gRPC address.
    pub endpoint: String,
    /// Deadline of the whole look-up (search and article read).
    pub timeout: Duration,
    /// Lowest score of a hit the bot answers with.
    pub min_score: f64,
    /// Hits asked for.
    pub limit: i32,
}

/// What a turn asks the knowledge base.
pub struct Query<'a> {
    /// The tenant (for the answer cache; knowledge reads it from the token).
    pub tenant: &'a TenantId,
    /// The caller's `authorization` metadata, forwarded as is.
    pub authorization: &'a AsciiMetadataValue,
    /// The customer's text.
    pub text: &'a str,
    /// The conversation's scenario; empty for all.
    pub scenario_id: &'a str,
    /// The turn's language.
    pub language: common::Language,
    /// The conversation (knowledge records a gap when nothing scores well).
    pub conversation_id: &'a str,
}

/// A hit good enough to answer with.
#[derive(Clone, Debug)]
pub struct Found {
    /// The cited article version.
    pub article: common::ArticleRef,
    /// The version's full answer.
    pub answer: String,
}

/// Why a look-up gave nothing to answer with.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The deadline passed.
    #[error("knowledge look-up timed out after {0:?}")]
    Timeout(Duration),
    /// The knowledge service answered with an error or could not be reached.
    #[error("knowledge look-up failed: {0}")]
    Failed(#[from] tonic::Status),
}

impl LookupError {
    /// The outcome label of the metric and the trace.
    pub fn label(&self) -> &'static str {
        match self {
            LookupError::Timeout(_) => "timeout",
            LookupError::Failed(_) => "error",
        }
    }
}

/// The knowledge client.
#[derive(Debug)]
pub struct KnowledgeClient {
    client: Client,
    options: KnowledgeOptions,
    cache: Mutex<HashMap<CacheKey, String>>,
}

impl KnowledgeClient {
    /// A client on a lazily connected channel: nothing is dialled until the first turn, so the
    /// service starts while knowledge is down.
    pub fn new(options: KnowledgeOptions) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(options.endpoint.clone())?
            .connect_timeout(options.timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            client: KnowledgeServiceClient::with_interceptor(channel, TraceContextInterceptor),
            options,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The best hit at or above the minimum score with its full answer, `None` when nothing
    /// scores well enough.
    pub async fn best(&self, q: &Query<'_>) -> Result<Option<Found>, LookupError> {
        let started = Instant::now();
        let out = tokio::time::timeout(self.options.timeout, self.lookup(q))
            .await
            .unwrap_or(Err(LookupError::Timeout(self.options.timeout)));
        let outcome = match &out {
            Ok(Some(_)) => "answered",
            Ok(None) => "no_hit",
            Err(e) => e.label(),
        };
        metrics::counter!(KNOWLEDGE_LOOKUPS_TOTAL, "outcome" => outcome).increment(1);
        tracing::debug!(
            outcome,
            micros = started.elapsed().as_micros() as u64,
            error = out.as_ref().err().map(|e| e.to_string()),
            "knowledge look-up"
        );
        out
    }

    async fn lookup(&self, q: &Query<'_>) -> Result<Option<Found>, LookupError> {
        let mut client = self.client.clone();
        let mut req = tonic::Request::new(kpb::SearchRequest {
            query: q.text.chars().take(1_000).collect(),
            scenario_id: q.scenario_id.to_owned(),
            language: q.language as i32,
            audience: kpb::Audience::Bot as i32,
            limit: self.options.limit,
            tags: Vec::new(),
            conversation_id: q.conversation_id.to_owned(),
        });
        req.metadata_mut()
            .insert("authorization", q.authorization.clone());
        let hits = client.search(req).await?.into_inner().hits;
        let Some(hit) = hits.into_iter().find(|h| h.score >= self.options.min_score) else {
            return Ok(None);
        };
        let key = (q.tenant.clone(), hit.article_id.clone(), hit.version);
        let cached = self.cache.lock().ok().and_then(|c| c.get(&key).cloned());
        let answer = match cached {
            Some(a) => a,
            None => {
                let mut req = tonic::Request::new(kpb::GetArticleRequest {
                    article_id: hit.article_id.clone(),
                    version: hit.version,
                });
                req.metadata_mut()
                    .insert("authorization", q.authorization.clone());
                let answer = client
                    .get_article(req)
                    .await?
                    .into_inner()
                    .version
                    .map(|v| v.answer)
                    .unwrap_or_default();
                if let Ok(mut c) = self.cache.lock() {
                    if c.len() >= CACHE_CAP {
                        c.clear();
                    }
                    c.insert(key, answer.clone());
                }
                answer
            }
        };
        if answer.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(Found {
            article: common::ArticleRef {
                article_id: hit.article_id,
                version: hit.version,
                title: hit.title,
                score: hit.score,
            },
            answer,
        }))
    }
}
