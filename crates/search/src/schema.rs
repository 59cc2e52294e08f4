//! The article document, its validation and the tantivy schema it is indexed with.
//!
//! | field | kind | use |
//! |---|---|---|
//! | `tenant` | raw, indexed, fast | every query is restricted to one tenant |
//! | `doc_key` | raw, indexed | tenant + article id: the term a new version deletes by |
//! | `article_id` | raw, stored | returned in hits |
//! | `version` | u64, stored, fast | returned in hits; older versions never replace newer ones |
//! | `scenario` | raw, indexed, stored, fast | optional filter |
//! | `language` | raw, indexed, stored, fast | optional filter |
//! | `audience` | raw, multi-valued, indexed, fast | `bot` and/or `agent`: one term per audience |
//! | `tags` | raw, multi-valued, indexed, stored | returned in hits |
//! | `title`, `questions`, `answer` | analysed text with term frequencies, stored | BM25, snippets |
//!
//! Positions are not indexed: queries are bags of words, never phrases, so they would only cost
//! space and indexing time.

use tantivy::TantivyDocument;
use tantivy::schema::{
    FAST, Field, IndexRecordOption, STORED, Schema, TextFieldIndexing, TextOptions,
};

use crate::analyzer::ANALYZER_NAME;
use crate::error::{SearchError, SearchResult};

pub(crate) const TENANT: &str = "tenant";
pub(crate) const DOC_KEY: &str = "doc_key";
pub(crate) const ARTICLE_ID: &str = "article_id";
pub(crate) const VERSION: &str = "version";
pub(crate) const SCENARIO: &str = "scenario";
pub(crate) const LANGUAGE: &str = "language";
pub(crate) const AUDIENCE: &str = "audience";
pub(crate) const TAGS: &str = "tags";
pub(crate) const TITLE: &str = "title";
pub(crate) const QUESTIONS: &str = "questions";
pub(crate) const ANSWER: &str = "answer";

const AUDIENCE_BOT: &str = "bot";
const AUDIENCE_AGENT: &str = "agent";

const MAX_ID_BYTES: usize = 256;
const MAX_TITLE_BYTES: usize = 4 * 1024;
const MAX_QUESTIONS: usize = 256;
const MAX_QUESTION_BYTES: usize = 4 * 1024;
const MAX_ANSWER_BYTES: usize = 256 * 1024;
const MAX_TAGS: usize = 64;

/// Separates tenant and article id in the deletion key; identifiers cannot contain it because
/// control characters are rejected.
const KEY_SEPARATOR: char = '\u{1f}';

/// One published article version, as the knowledge service hands it to the index.
///
/// Only published versions are indexed; an article has at most one document, and upserting a
/// version replaces the previous one.
#[derive(Clone, Debug, PartialEq)]
pub struct ArticleDoc {
    /// Tenant owning the article; searches never cross tenants.
    pub tenant: String,
    /// Article identifier, unique within the tenant.
    pub article_id: String,
    /// Published version number; an upsert with a lower version than the indexed one is ignored.
    pub version: u64,
    /// Scenario the article belongs to; empty when it belongs to none.
    pub scenario: String,
    /// Language code as the service stores it (`zh`, `en`); filtered by exact match.
    pub language: String,
    /// Who may be shown the article.
    pub visibility: Visibility,
    /// Free-form tags, returned with hits.
    pub tags: Vec<String>,
    /// Short title.
    pub title: String,
    /// Question variants customers ask.
    pub questions: Vec<String>,
    /// The answer text.
    pub answer: String,
}

/// Who an article is visible to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// Only the bot may use it.
    Bot,
    /// Only human agents see it.
    Agents,
    /// Both the bot and agents.
    Both,
}

/// Who is searching; selects the articles visible to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Audience {
    /// The customer-facing bot.
    Bot,
    /// A human agent.
    Agent,
}

impl Audience {
    pub(crate) fn term(self) -> &'static str {
        match self {
            Self::Bot => AUDIENCE_BOT,
            Self::Agent => AUDIENCE_AGENT,
        }
    }
}

/// Field handles of the schema.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fields {
    pub tenant: Field,
    pub doc_key: Field,
    pub article_id: Field,
    pub version: Field,
    pub scenario: Field,
    pub language: Field,
    pub audience: Field,
    pub tags: Field,
    pub title: Field,
    pub questions: Field,
    pub answer: Field,
}

fn raw(stored: bool, fast: bool) -> TextOptions {
    let mut options = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("raw")
            .set_fieldnorms(false)
            .set_index_option(IndexRecordOption::Basic),
    );
    if stored {
        options = options.set_stored();
    }
    if fast {
        options = options.set_fast("raw");
    }
    options
}

fn analysed() -> TextOptions {
    TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(ANALYZER_NAME)
                .set_index_option(IndexRecordOption::WithFreqs),
        )
        .set_stored()
}

impl Fields {
    /// Builds the schema and returns it with its field handles.
    pub fn schema() -> (Schema, Fields) {
        let mut builder = Schema::builder();
        let fields = Fields {
            tenant: builder.add_text_field(TENANT, raw(false, true)),
            doc_key: builder.add_text_field(DOC_KEY, raw(false, false)),
            article_id: builder.add_text_field(ARTICLE_ID, TextOptions::default().set_stored()),
            version: builder.add_u64_field(VERSION, STORED | FAST),
            scenario: builder.add_text_field(SCENARIO, raw(true, true)),
            language: builder.add_text_field(LANGUAGE, raw(true, true)),
            audience: builder.add_text_field(AUDIENCE, raw(false, true)),
            tags: builder.add_text_field(TAGS, raw(true, false)),
            title: builder.add_text_field(TITLE, analysed()),
            questions: builder.add_text_field(QUESTIONS, analysed()),
            answer: builder.add_text_field(ANSWER, analysed()),
        };
        (builder.build(), fields)
    }

    /// Looks the field handles up in an existing schema, failing if one is missing.
    pub fn from_schema(schema: &Schema) -> SearchResult<Fields> {
        let get = |name: &str| schema.get_field(name).map_err(SearchError::from);
        Ok(Fields {
            tenant: get(TENANT)?,
            doc_key: get(DOC_KEY)?,
            article_id: get(ARTICLE_ID)?,
            version: get(VERSION)?,
            scenario: get(SCENARIO)?,
            language: get(LANGUAGE)?,
            audience: get(AUDIENCE)?,
            tags: get(TAGS)?,
            title: get(TITLE)?,
            questions: get(QUESTIONS)?,
            answer: get(ANSWER)?,
        })
    }

    /// Converts a validated article into a tantivy document.
    pub fn document(&self, article: &ArticleDoc) -> TantivyDocument {
        let mut doc = TantivyDocument::new();
        doc.add_text(self.tenant, &article.tenant);
        doc.add_text(self.doc_key, doc_key(&article.tenant, &article.article_id));
        doc.add_text(self.article_id, &article.article_id);
        doc.add_u64(self.version, article.version);
        if !article.scenario.is_empty() {
            doc.add_text(self.scenario, &article.scenario);
        }
        if !article.language.is_empty() {
            doc.add_text(self.language, &article.language);
        }
        if matches!(article.visibility, Visibility::Bot | Visibility::Both) {
            doc.add_text(self.audience, AUDIENCE_BOT);
        }
        if matches!(article.visibility, Visibility::Agents | Visibility::Both) {
            doc.add_text(self.audience, AUDIENCE_AGENT);
        }
        for tag in &article.tags {
            doc.add_text(self.tags, tag);
        }
        doc.add_text(self.title, &article.title);
        for question in &article.questions {
            doc.add_text(self.questions, question);
        }
        doc.add_text(self.answer, &article.answer);
        doc
    }
}

/// Returns the deletion key of an article: unique across tenants.
pub(crate) fn doc_key(tenant: &str, article_id: &str) -> String {
    let mut key = String::with_capacity(tenant.len() + article_id.len() + 1);
    key.push_str(tenant);
    key.push(KEY_SEPARATOR);
    key.push_str(article_id);
    key
}

/// Checks an identifier-like value: bounded, and free of control characters.
pub(crate) fn check_identifier(name: &str, value: &str, required: bool) -> Result<(), String> {
    if required && value.trim().is_empty() {
        return Err(format!("{name} is empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(format!("{name} is longer than {MAX_ID_BYTES} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{name} contains control characters"));
    }
    Ok(())
}

impl ArticleDoc {
    /// Checks that the document can be indexed and found again.
    pub fn validate(&self) -> SearchResult<()> {
        self.check().map_err(|reason| {
            SearchError::InvalidDocument(format!("article {:?}: {reason}", self.article_id))
        })
    }

    fn check(&self) -> Result<(), String> {
        check_identifier("tenant", &self.tenant, true)?;
        check_identifier("article_id", &self.article_id, true)?;
        check_identifier("scenario", &self.scenario, false)?;
        check_identifier("language", &self.language, false)?;
        if self.tags.len() > MAX_TAGS {
            return Err(format!("more than {MAX_TAGS} tags"));
        }
        for tag in &self.tags {
            check_identifier("tag", tag, true)?;
        }
        if self.title.len() > MAX_TITLE_BYTES {
            return Err(format!("title is longer than {MAX_TITLE_BYTES} bytes"));
        }
        if self.questions.len() > MAX_QUESTIONS {
            return Err(format!("more than {MAX_QUESTIONS} questions"));
        }
        if self.questions.iter().any(|q| q.len() > MAX_QUESTION_BYTES) {
            return Err(format!(
                "a question is longer than {MAX_QUESTION_BYTES} bytes"
            ));
        }
        if self.answer.len() > MAX_ANSWER_BYTES {
            return Err(format!("answer is longer than {MAX_ANSWER_BYTES} bytes"));
        }
        let searchable = !self.title.trim().is_empty()
            || !self.answer.trim().is_empty()
            || self.questions.iter().any(|q| !q.trim().is_empty());
        if !searchable {
            return Err("title, questions and answer are all empty".to_owned());
        }
        Ok(())
    }

    /// Returns the deletion key of this article.
    pub(crate) fn key(&self) -> String {
        doc_key(&self.tenant, &self.article_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn article() -> ArticleDoc {
        ArticleDoc {
            tenant: "acme".to_owned(),
            article_id: "a-1".to_owned(),
            version: 1,
            scenario: "refunds".to_owned(),
            language: "en".to_owned(),
            visibility: Visibility::Both,
            tags: vec!["billing".to_owned()],
            title: "Refunds".to_owned(),
            questions: vec!["How do I get a refund?".to_owned()],
            answer: "Open the order and press refund.".to_owned(),
        }
    }

    #[test]
    fn a_complete_article_is_valid() {
        assert!(article().validate().is_ok());
    }

    #[test]
    fn missing_identifiers_and_text_are_rejected() {
        type Mutation = fn(&mut ArticleDoc);
        let cases: [(Mutation, &str); 5] = [
            (|a| a.tenant = " ".to_owned(), "tenant is empty"),
            (
                |a| a.article_id = "x\u{0}y".to_owned(),
                "control characters",
            ),
            (|a| a.tags.push(String::new()), "tag is empty"),
            (
                |a| a.answer = "x".repeat(MAX_ANSWER_BYTES + 1),
                "answer is longer",
            ),
            (
                |a| {
                    a.title.clear();
                    a.questions = vec![" ".to_owned()];
                    a.answer.clear();
                },
                "all empty",
            ),
        ];
        for (mutate, expected) in cases {
            let mut doc = article();
            mutate(&mut doc);
            let error = doc
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains(expected),
                "{error:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn keys_of_different_tenants_differ() {
        assert_ne!(doc_key("a", "bc"), doc_key("ab", "c"));
    }
}
