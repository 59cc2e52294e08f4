//! Search requests and responses, query cleaning and building, and filtered top-k collection.
//!
//! The user's text is never handed to tantivy's query parser: control characters are replaced by
//! spaces, the text is cut to `max_query_chars` characters and analysed with the same analyser as
//! the documents, and the query is a boolean OR of one term query per (term, field), each boosted
//! by its field's multiplier. Operators such as `AND`, `:`, `*` or `"` are therefore either
//! dropped as punctuation or searched as ordinary words. When the query mixes common and rarer
//! terms ([`TermClasses`]), the rarer ones are required and the common ones only score.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::StrColumn;
use tantivy::query::{BooleanQuery, BoostQuery, ConstScoreQuery, Occur, Query, TermQuery, Weight};
use tantivy::schema::IndexRecordOption;
use tantivy::{DocAddress, DocId, Score, Searcher, SegmentOrdinal, SegmentReader, Term};

use crate::analyzer::analyze;
use crate::config::FieldBoosts;
use crate::error::{SearchError, SearchResult};
use crate::schema::{AUDIENCE, Audience, Fields, LANGUAGE, SCENARIO, TENANT, check_identifier};
use crate::snippet::Snippet;

/// One search, as the knowledge service receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchRequest {
    /// Tenant to search in (required).
    pub tenant: String,
    /// The user's text, plain: never interpreted as query syntax.
    pub query: String,
    /// Only articles of this scenario; `None` or an empty string for all.
    pub scenario: Option<String>,
    /// Only articles in this language; `None` or an empty string for all.
    pub language: Option<String>,
    /// Who searches: only articles visible to them are returned.
    pub audience: Audience,
    /// Maximum number of hits, from 1 to the index's `max_limit`.
    pub limit: usize,
    /// Hits scoring below this are dropped, and a best score below it sets `no_good_result`;
    /// the index's `good_result_score` is used for the flag when absent.
    pub min_score: Option<f32>,
}

impl SearchRequest {
    /// Returns a request for `query` in `tenant` for `audience`, with no other filter and ten
    /// hits at most.
    pub fn new(tenant: impl Into<String>, query: impl Into<String>, audience: Audience) -> Self {
        Self {
            tenant: tenant.into(),
            query: query.into(),
            scenario: None,
            language: None,
            audience,
            limit: 10,
            min_score: None,
        }
    }
}

/// The outcome of a search.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchResponse {
    /// Hits, best first.
    pub hits: Vec<SearchHit>,
    /// True when nothing matched or the best score is under the threshold: the knowledge base
    /// probably has no answer, which the service reports as a gap.
    pub no_good_result: bool,
    /// Score of the best hit, if any.
    pub best_score: Option<f32>,
    /// Analysed terms that were searched, in query order.
    pub terms: Vec<String>,
}

/// One matching article.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchHit {
    /// Article identifier.
    pub article_id: String,
    /// Indexed version.
    pub version: u64,
    /// BM25 score (field-boosted sum over matched terms).
    pub score: f32,
    /// Article title.
    pub title: String,
    /// Scenario, empty when none.
    pub scenario: String,
    /// Language code, empty when none.
    pub language: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Best fragment of the answer, with matched words highlighted; when no query word occurs in
    /// the answer, its beginning without highlights.
    pub snippet: Snippet,
    /// The question variant that matches the query best, highlighted; `None` when no question
    /// contains a query word.
    pub matched_question: Option<Snippet>,
}

/// A request whose input has been checked and whose text has been analysed.
pub(crate) struct PreparedQuery {
    pub terms: Vec<String>,
    pub filters: Filters,
    pub limit: usize,
    pub min_score: Option<f32>,
}

/// Restrictions applied to every candidate document.
#[derive(Clone, Debug)]
pub(crate) struct Filters {
    /// (fast-field name, field, required value); tenant and audience always come first.
    pub clauses: Vec<(&'static str, tantivy::schema::Field, String)>,
}

/// Replaces control characters by spaces and keeps at most `max_chars` characters.
pub(crate) fn clean_query(raw: &str, max_chars: usize) -> String {
    raw.chars()
        .take(max_chars)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Returns the distinct analysed terms of `text`, in order, at most `max_terms` of them.
pub(crate) fn distinct_terms(text: &str, max_terms: usize) -> Vec<String> {
    let mut terms: Vec<String> = Vec::new();
    for term in analyze(text) {
        if terms.len() == max_terms {
            break;
        }
        if !terms.contains(&term) {
            terms.push(term);
        }
    }
    terms
}

fn non_empty(value: Option<&String>) -> Option<&str> {
    value.map(String::as_str).filter(|v| !v.is_empty())
}

/// Checks a request and analyses its text.
pub(crate) fn prepare(
    request: &SearchRequest,
    fields: &Fields,
    max_query_chars: usize,
    max_query_terms: usize,
    max_limit: usize,
) -> SearchResult<PreparedQuery> {
    let invalid = SearchError::InvalidRequest;
    check_identifier("tenant", &request.tenant, true).map_err(invalid)?;
    if request.limit == 0 || request.limit > max_limit {
        return Err(invalid(format!(
            "limit must be between 1 and {max_limit}, got {}",
            request.limit
        )));
    }
    if let Some(score) = request.min_score
        && (!score.is_finite() || score < 0.0)
    {
        return Err(invalid(format!(
            "min_score must be a non-negative number, got {score}"
        )));
    }
    let mut clauses = vec![
        (TENANT, fields.tenant, request.tenant.clone()),
        (
            AUDIENCE,
            fields.audience,
            request.audience.term().to_owned(),
        ),
    ];
    if let Some(scenario) = non_empty(request.scenario.as_ref()) {
        check_identifier("scenario", scenario, true).map_err(invalid)?;
        clauses.push((SCENARIO, fields.scenario, scenario.to_owned()));
    }
    if let Some(language) = non_empty(request.language.as_ref()) {
        check_identifier("language", language, true).map_err(invalid)?;
        clauses.push((LANGUAGE, fields.language, language.to_owned()));
    }
    let cleaned = clean_query(&request.query, max_query_chars);
    let terms = distinct_terms(&cleaned, max_query_terms);
    if terms.is_empty() {
        return Err(SearchError::EmptyQuery);
    }
    Ok(PreparedQuery {
        terms,
        filters: Filters { clauses },
        limit: request.limit,
        min_score: request.min_score,
    })
}

/// Builds the OR of every (term, text field) pair, each boosted by its field's multiplier.
pub(crate) fn text_query(fields: &Fields, terms: &[String], boosts: &FieldBoosts) -> BooleanQuery {
    let weighted = [
        (fields.questions, boosts.questions),
        (fields.title, boosts.title),
        (fields.answer, boosts.answer),
    ];
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::with_capacity(terms.len() * 3);
    for term in terms {
        for (field, boost) in weighted {
            let query = TermQuery::new(
                Term::from_field_text(field, term),
                IndexRecordOption::WithFreqs,
            );
            clauses.push((
                Occur::Should,
                Box::new(BoostQuery::new(Box::new(query), boost)),
            ));
        }
    }
    BooleanQuery::new(clauses)
}

/// Terms of a query split by how many documents contain them.
pub(crate) struct TermClasses {
    /// Terms found in at most the configured share of documents.
    pub rare: Vec<String>,
    /// Terms found in more documents than that, in any text field.
    pub common: Vec<String>,
}

impl TermClasses {
    /// Classifies each term by its largest document frequency over the three text fields.
    pub fn of(
        searcher: &Searcher,
        fields: &Fields,
        terms: &[String],
        common_share: f32,
    ) -> tantivy::Result<TermClasses> {
        let limit = (f64::from(common_share) * searcher.num_docs() as f64) as u64;
        let mut classes = TermClasses {
            rare: Vec::new(),
            common: Vec::new(),
        };
        for term in terms {
            let mut doc_freq = 0;
            for field in [fields.questions, fields.title, fields.answer] {
                doc_freq = doc_freq.max(searcher.doc_freq(&Term::from_field_text(field, term))?);
            }
            if doc_freq > limit {
                classes.common.push(term.clone());
            } else {
                classes.rare.push(term.clone());
            }
        }
        Ok(classes)
    }

    /// True when the query mixes both kinds, so requiring a rare term changes the candidates.
    pub fn is_mixed(&self) -> bool {
        !self.rare.is_empty() && !self.common.is_empty()
    }
}

/// Builds the query that requires a rare term and lets common terms add to the score.
pub(crate) fn rare_required_query(
    fields: &Fields,
    classes: &TermClasses,
    boosts: &FieldBoosts,
) -> BooleanQuery {
    BooleanQuery::new(vec![
        (
            Occur::Must,
            Box::new(text_query(fields, &classes.rare, boosts)) as Box<dyn Query>,
        ),
        (
            Occur::Should,
            Box::new(text_query(fields, &classes.common, boosts)),
        ),
    ])
}

impl Filters {
    /// Returns the text query with every filter added as a required clause scoring zero, so
    /// scores are the same as the unfiltered text query's.
    pub fn intersect_with(&self, text: BooleanQuery) -> BooleanQuery {
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![(Occur::Must, Box::new(text))];
        for (_, field, value) in &self.clauses {
            let term = TermQuery::new(
                Term::from_field_text(*field, value),
                IndexRecordOption::Basic,
            );
            clauses.push((
                Occur::Must,
                Box::new(ConstScoreQuery::new(Box::new(term), 0.0)),
            ));
        }
        BooleanQuery::new(clauses)
    }

    /// Terms of the filter clauses, to estimate how many documents they keep.
    pub fn terms(&self) -> impl Iterator<Item = Term> + '_ {
        self.clauses
            .iter()
            .map(|(_, field, value)| Term::from_field_text(*field, value))
    }
}

/// Top-k by score among the documents that pass [`Filters`], checked through fast fields.
///
/// Unlike a filtered boolean query, the text query keeps its pure-disjunction shape, so tantivy
/// runs block-max WAND over it and skips blocks that cannot beat the current k-th score; the
/// filter only rejects candidates that would otherwise enter the top k.
pub(crate) struct FilteredTopScores {
    pub limit: usize,
    pub filters: Filters,
}

/// Per-segment form of [`Filters`]: the column of each clause and the ordinal of its value.
struct SegmentFilter {
    columns: Vec<(StrColumn, u64)>,
}

impl SegmentFilter {
    /// Returns `None` when a filter value does not occur in the segment: nothing can match.
    fn new(reader: &SegmentReader, filters: &Filters) -> tantivy::Result<Option<SegmentFilter>> {
        let mut columns = Vec::with_capacity(filters.clauses.len());
        for (name, _, value) in &filters.clauses {
            let Some(column) = reader.fast_fields().str(name)? else {
                return Ok(None);
            };
            let Some(ordinal) = column.dictionary().term_ord(value.as_bytes())? else {
                return Ok(None);
            };
            columns.push((column, ordinal));
        }
        Ok(Some(SegmentFilter { columns }))
    }

    fn matches(&self, doc: DocId) -> bool {
        self.columns
            .iter()
            .all(|(column, ordinal)| column.term_ords(doc).any(|o| o == *ordinal))
    }
}

/// A candidate in the top-k heap; `Ord` says which of two is better (higher score, then lower
/// document id, as tantivy's own top-docs collector breaks ties).
#[derive(Clone, Copy, Debug)]
struct Candidate {
    score: Score,
    doc: DocId,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.doc.cmp(&self.doc))
    }
}

/// Keeps the best `limit` candidates; the worst of them sits on top of the min-heap.
struct TopK {
    limit: usize,
    heap: BinaryHeap<Reverse<Candidate>>,
}

impl TopK {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            heap: BinaryHeap::with_capacity(limit + 1),
        }
    }

    fn push(&mut self, score: Score, doc: DocId) {
        let candidate = Candidate { score, doc };
        if self.heap.len() < self.limit {
            self.heap.push(Reverse(candidate));
        } else if let Some(mut worst) = self.heap.peek_mut()
            && candidate > worst.0
        {
            worst.0 = candidate;
        }
    }

    /// Score a new document must beat to enter: the k-th best once the heap is full.
    fn threshold(&self) -> Score {
        match self.heap.peek() {
            Some(worst) if self.heap.len() == self.limit => worst.0.score,
            _ => Score::MIN,
        }
    }

    fn into_fruit(self, segment_ord: SegmentOrdinal) -> Vec<(Score, DocAddress)> {
        self.heap
            .into_iter()
            .map(|Reverse(c)| (c.score, DocAddress::new(segment_ord, c.doc)))
            .collect()
    }
}

/// Segment collector used when tantivy drives collection document by document.
pub(crate) struct FilteredSegmentCollector {
    segment_ord: SegmentOrdinal,
    filter: Option<SegmentFilter>,
    top: TopK,
}

impl SegmentCollector for FilteredSegmentCollector {
    type Fruit = Vec<(Score, DocAddress)>;

    fn collect(&mut self, doc: DocId, score: Score) {
        if self.filter.as_ref().is_some_and(|f| f.matches(doc)) {
            self.top.push(score, doc);
        }
    }

    fn harvest(self) -> Self::Fruit {
        self.top.into_fruit(self.segment_ord)
    }
}

impl Collector for FilteredTopScores {
    type Fruit = Vec<(Score, DocAddress)>;
    type Child = FilteredSegmentCollector;

    fn for_segment(
        &self,
        segment_ord: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<Self::Child> {
        Ok(FilteredSegmentCollector {
            segment_ord,
            filter: SegmentFilter::new(reader, &self.filters)?,
            top: TopK::new(self.limit),
        })
    }

    fn requires_scoring(&self) -> bool {
        true
    }

    fn merge_fruits(&self, fruits: Vec<Self::Fruit>) -> tantivy::Result<Self::Fruit> {
        let mut all: Vec<(Score, DocAddress)> = fruits.into_iter().flatten().collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        all.truncate(self.limit);
        Ok(all)
    }

    fn collect_segment(
        &self,
        weight: &dyn Weight,
        segment_ord: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<Self::Fruit> {
        let Some(filter) = SegmentFilter::new(reader, &self.filters)? else {
            return Ok(Vec::new());
        };
        let alive = reader.alive_bitset();
        let mut top = TopK::new(self.limit);
        weight.for_each_pruning(Score::MIN, reader, &mut |doc, score| {
            let deleted = alive.is_some_and(|bits| bits.is_deleted(doc));
            if !deleted && filter.matches(doc) {
                top.push(score, doc);
            }
            top.threshold()
        })?;
        Ok(top.into_fruit(segment_ord))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_spaces_and_length_is_capped() {
        assert_eq!(clean_query("a\u{0}b\nc\u{7f}d", 100), "a b c d");
        assert_eq!(clean_query("退款退款退款", 2).chars().count(), 2);
    }

    #[test]
    fn distinct_terms_keep_order_and_cap() {
        assert_eq!(
            distinct_terms("refund refunds REFUND order", 10),
            ["refund", "order"]
        );
        assert_eq!(distinct_terms("a b c d e", 3), ["a", "b", "c"]);
    }

    #[test]
    fn top_k_keeps_best_scores_and_lowest_doc_on_ties() {
        let mut top = TopK::new(2);
        assert_eq!(top.threshold(), Score::MIN);
        for (score, doc) in [(1.0, 0), (3.0, 1), (2.0, 2), (3.0, 3), (2.0, 4)] {
            top.push(score, doc);
        }
        let mut docs: Vec<DocId> = top.into_fruit(0).iter().map(|(_, a)| a.doc_id).collect();
        docs.sort_unstable();
        assert_eq!(docs, [1, 3]);
    }
}
