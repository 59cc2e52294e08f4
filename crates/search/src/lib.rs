//! Tandem's knowledge-base search index: BM25 over published articles in Chinese and English,
//! built on tantivy with a jieba-based analyser.
//!
//! The knowledge service owns a [`SearchIndex`], fills it with [`SearchIndex::rebuild`] at
//! start-up from its database, keeps it current with [`SearchIndex::upsert`] and
//! [`SearchIndex::remove`] as articles are published and archived, and answers searches with
//! [`SearchIndex::search`]. Writes are applied by one background thread that batches commits;
//! each write returns a sequence number that [`SearchIndex::wait_visible`] turns into
//! "searchable now", so an event is acknowledged only once its article can be found. When that
//! thread fails, [`SearchIndex::writer_failure`] says so and [`SearchIndex::recover`] replaces
//! it; the feature `fault-injection` adds `SearchIndex::inject_fault` (and `clear_faults`) for
//! tests of recovery.
//!
//! Modules:
//! - `analyzer`: the mixed Chinese/English tokenizer ([`mixed_analyzer`], [`analyze`]).
//! - `schema`: [`ArticleDoc`], [`Visibility`], [`Audience`] and the tantivy schema.
//! - `config`: [`IndexConfig`] with batching, boosts, limits and highlighting.
//! - `query`: [`SearchRequest`], [`SearchResponse`], query cleaning and building, filtered top-k.
//! - `snippet`: highlighted [`Snippet`]s of answers and matched questions.
//! - `writer`: the writer thread and its commit batching.
//! - `index`: [`SearchIndex`], the handle tying them together.
//!
//! Boundaries: no database, event bus, async runtime or other workspace crate. The service maps
//! its rows and events to [`ArticleDoc`] and its errors from [`SearchError`].

mod analyzer;
mod config;
mod error;
mod index;
mod query;
mod schema;
mod snippet;
mod writer;

pub use analyzer::{ANALYZER_NAME, MixedTokenizer, analyze, mixed_analyzer, warm_up};
pub use config::{FieldBoosts, FilterStrategy, HighlightStyle, IndexConfig};
pub use error::{SearchError, SearchResult};
pub use index::{IndexStats, RebuildReport, Recovery, SearchIndex};
pub use query::{SearchHit, SearchRequest, SearchResponse};
pub use schema::{ArticleDoc, Audience, Visibility};
pub use snippet::Snippet;
#[cfg(any(test, feature = "fault-injection"))]
pub use writer::Fault;
