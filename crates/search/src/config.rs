//! Index configuration with its defaults and validation.

use std::time::Duration;

use crate::error::{SearchError, SearchResult};

/// How an index batches writes, scores fields and shapes results.
///
/// Built with `IndexConfig::default()` and adjusted field by field; [`IndexConfig::validate`]
/// reports every problem at once and runs when an index is opened.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// Longest time an accepted operation waits before its commit (default 100 ms). This bounds
    /// publish → searchable latency: freshness is about this interval plus one commit.
    pub commit_interval: Duration,
    /// Number of pending operations that triggers a commit before the interval ends
    /// (default 1,000).
    pub max_pending_ops: usize,
    /// Memory budget of the tantivy writer, shared by its indexing threads (default 64 MB,
    /// at least 15 MB per thread).
    pub writer_memory_bytes: usize,
    /// Indexing threads of the tantivy writer (default 1).
    pub indexing_threads: usize,
    /// Operations that may wait in the writer's queue before `upsert` and `remove` block
    /// (default 4,096).
    pub queue_capacity: usize,
    /// BM25 multipliers per field.
    pub boosts: FieldBoosts,
    /// Characters of a query kept after control characters are removed (default 512).
    pub max_query_chars: usize,
    /// Distinct analysed terms of a query that are searched, in query order (default 32).
    pub max_query_terms: usize,
    /// Largest `limit` a request may ask for (default 100).
    pub max_limit: usize,
    /// Best score under which a response is flagged `no_good_result` when the request gives no
    /// `min_score` (default 4.0; calibrate against the tenant's own queries).
    pub good_result_score: f32,
    /// Longest snippet fragment, in bytes of UTF-8 (default 240: about 80 Chinese characters or
    /// 240 Latin ones).
    pub snippet_max_bytes: usize,
    /// Share of documents above which a query term counts as common (default 0.05). When a
    /// query mixes common and rarer terms, a hit must contain a rarer one and common terms only
    /// add to its score, which keeps words such as `the`, `how` or `的` from making every
    /// document a candidate. If that finds fewer hits than asked for, the query runs again with
    /// every term optional, so recall never falls below the plain disjunction. 1.0 disables it.
    pub common_term_share: f32,
    /// How matched words are marked in [`crate::Snippet::marked`].
    pub highlight: HighlightStyle,
    /// How tenant, audience, scenario and language filters are applied.
    pub filter_strategy: FilterStrategy,
}

/// BM25 multipliers of the three text fields.
///
/// The defaults rank a match in the curated question variants highest (3.0): they are written as
/// customers ask, so a hit there is the strongest sign the article answers the query. The title
/// (2.0) is a short summary; the answer (1.0) is long and contains many incidental words.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FieldBoosts {
    /// Multiplier of the question variants.
    pub questions: f32,
    /// Multiplier of the title.
    pub title: f32,
    /// Multiplier of the answer.
    pub answer: f32,
}

/// Markers around highlighted words in snippets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HighlightStyle {
    /// Inserted before each highlighted range (default `<em>`).
    pub pre: String,
    /// Inserted after each highlighted range (default `</em>`).
    pub post: String,
    /// Escapes `& < > " '` in the text between markers (default true, for HTML markers).
    pub escape_html: bool,
}

/// How request filters are combined with the text query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterStrategy {
    /// `PostFilter` when every filter keeps at least a quarter of the documents, `Intersect`
    /// otherwise (default).
    Auto,
    /// Filters are required clauses of the query, intersected with the text match. Best when a
    /// filter is selective, since the intersection skips over most postings.
    Intersect,
    /// The text query runs alone with block-max WAND pruning and each candidate is checked against
    /// the filters through fast fields. Best when filters keep most documents.
    PostFilter,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(100),
            max_pending_ops: 1_000,
            writer_memory_bytes: 64_000_000,
            indexing_threads: 1,
            queue_capacity: 4_096,
            boosts: FieldBoosts::default(),
            max_query_chars: 512,
            max_query_terms: 32,
            max_limit: 100,
            good_result_score: 4.0,
            snippet_max_bytes: 240,
            common_term_share: 0.05,
            highlight: HighlightStyle::default(),
            filter_strategy: FilterStrategy::Auto,
        }
    }
}

impl Default for FieldBoosts {
    fn default() -> Self {
        Self {
            questions: 3.0,
            title: 2.0,
            answer: 1.0,
        }
    }
}

impl Default for HighlightStyle {
    fn default() -> Self {
        Self {
            pre: "<em>".to_owned(),
            post: "</em>".to_owned(),
            escape_html: true,
        }
    }
}

/// Smallest writer budget tantivy accepts per indexing thread.
const MIN_WRITER_BYTES_PER_THREAD: usize = 15_000_000;

impl IndexConfig {
    /// Checks every field and returns all problems found in one [`SearchError::InvalidConfig`].
    pub fn validate(&self) -> SearchResult<()> {
        let mut problems = Vec::new();
        if self.commit_interval.is_zero() {
            problems.push("commit_interval must be positive".to_owned());
        }
        if self.max_pending_ops == 0 {
            problems.push("max_pending_ops must be at least 1".to_owned());
        }
        if self.indexing_threads == 0 || self.indexing_threads > 8 {
            problems.push("indexing_threads must be between 1 and 8".to_owned());
        }
        let min_bytes = MIN_WRITER_BYTES_PER_THREAD * self.indexing_threads.max(1);
        if self.writer_memory_bytes < min_bytes {
            problems.push(format!(
                "writer_memory_bytes must be at least {min_bytes} for {} indexing threads",
                self.indexing_threads
            ));
        }
        if self.writer_memory_bytes > u32::MAX as usize / 2 {
            problems.push("writer_memory_bytes must stay under 2 GiB".to_owned());
        }
        if self.queue_capacity == 0 {
            problems.push("queue_capacity must be at least 1".to_owned());
        }
        for (name, boost) in [
            ("boosts.questions", self.boosts.questions),
            ("boosts.title", self.boosts.title),
            ("boosts.answer", self.boosts.answer),
        ] {
            if !boost.is_finite() || boost <= 0.0 {
                problems.push(format!("{name} must be a positive number"));
            }
        }
        if self.max_query_chars == 0 {
            problems.push("max_query_chars must be at least 1".to_owned());
        }
        if self.max_query_terms == 0 {
            problems.push("max_query_terms must be at least 1".to_owned());
        }
        if self.max_limit == 0 {
            problems.push("max_limit must be at least 1".to_owned());
        }
        if !self.good_result_score.is_finite() || self.good_result_score < 0.0 {
            problems.push("good_result_score must be a non-negative number".to_owned());
        }
        if !(self.common_term_share > 0.0 && self.common_term_share <= 1.0) {
            problems.push("common_term_share must be in (0, 1]".to_owned());
        }
        if self.snippet_max_bytes < 16 {
            problems.push("snippet_max_bytes must be at least 16".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SearchError::InvalidConfig(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(IndexConfig::default().validate().is_ok());
    }

    #[test]
    fn every_problem_is_reported() {
        let config = IndexConfig {
            commit_interval: Duration::ZERO,
            max_pending_ops: 0,
            indexing_threads: 2,
            writer_memory_bytes: 20_000_000,
            boosts: FieldBoosts {
                questions: f32::NAN,
                title: 0.0,
                answer: 1.0,
            },
            max_limit: 0,
            ..IndexConfig::default()
        };
        let Err(SearchError::InvalidConfig(problems)) = config.validate() else {
            panic!("invalid config accepted");
        };
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("writer_memory_bytes")));
        assert!(problems.iter().any(|p| p.contains("boosts.questions")));
    }
}
