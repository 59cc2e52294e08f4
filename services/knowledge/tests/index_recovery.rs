//! A failed search index writer is replaced and the index rebuilt from the database, so the
//! writes the failed writer lost become searchable; on PostgreSQL (testkit) and SQLite.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tandem_knowledge::Knowledge;
use tandem_knowledge::app::{Actor, App, AppOptions, Content, Entry, NewArticle, RowOutcome};
use tandem_knowledge::freshness::{FreshnessError, Indexer};
use tandem_knowledge::store::Store;
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tandem_proto::ids::TenantId;
use tandem_search::{
    ArticleDoc, Audience, Fault, IndexConfig, SearchIndex, SearchRequest, Visibility,
};

fn article(id: &str, title: &str, question: &str) -> NewArticle {
    NewArticle {
        external_id: id.into(),
        scenario_id: "faq".into(),
        content: Content {
            title: title.into(),
            questions: vec![question.into()],
            answer: format!("The answer about {title}."),
            change_note: String::new(),
        },
        ..NewArticle::default()
    }
}

/// The title of the best hit.
fn top(indexer: &Indexer, query: &str) -> Option<String> {
    indexer
        .index()
        .search(&SearchRequest::new("acme", query, Audience::Agent))
        .unwrap()
        .hits
        .into_iter()
        .map(|h| h.title)
        .next()
}

/// Publishes an article through an import.
async fn publish(app: &App, external_id: &str, title: &str, question: &str) {
    let out = app
        .import_rows(
            &TenantId::new("acme").unwrap(),
            &Actor {
                id: "admin-1".into(),
            },
            vec![article(external_id, title, question)],
            Entry::Publish,
            false,
        )
        .await;
    assert!(
        out.iter().all(|r| matches!(r, Ok(RowOutcome::Created))),
        "{out:?}"
    );
    // Indexes the change at once, as after a publish through the API.
    app.refresh().await;
}

async fn a_failed_index_writer_is_replaced_without_losing_writes(db: Db) {
    db.migrate(Some(Knowledge::migrations())).await.unwrap();
    let store = Store::new(db);
    let index = SearchIndex::in_ram(IndexConfig {
        commit_interval: Duration::from_millis(10),
        ..IndexConfig::default()
    })
    .unwrap();
    let indexer = Arc::new(
        Indexer::start(Arc::new(index), store.clone())
            .await
            .unwrap(),
    );
    let app = App::new(
        store,
        OutboxWaker::default(),
        Arc::clone(&indexer),
        AppOptions::default(),
    );
    publish(&app, "a", "Parcel lockers", "can I use a parcel locker").await;
    assert_eq!(
        top(&indexer, "parcel locker").as_deref(),
        Some("Parcel lockers")
    );

    // The commit of the next publish fails: the writer stops and the publish is lost from the
    // index; the indexing that follows the publish replaces the writer and rebuilds the index.
    indexer.index().inject_fault(Fault::CommitError);
    publish(&app, "b", "Gift wrapping", "do you offer gift wrapping").await;
    assert_eq!(
        top(&indexer, "gift wrapping").as_deref(),
        Some("Gift wrapping")
    );
    assert_eq!(indexer.writer_failures(), 1);
    assert_eq!(indexer.recoveries(), 1);
    assert_eq!(indexer.index().writer_failure(), None);
    assert_eq!(
        top(&indexer, "parcel locker").as_deref(),
        Some("Parcel lockers")
    );
    // Later publishes are indexed by the new writer.
    publish(&app, "c", "Store pickup", "can I pick up in a store").await;
    assert_eq!(
        top(&indexer, "pick up in a store").as_deref(),
        Some("Store pickup")
    );
    assert_eq!(indexer.recoveries(), 1);

    // The writer thread panics: the same.
    indexer.index().inject_fault(Fault::Panic);
    publish(&app, "d", "Night delivery", "do you deliver at night").await;
    assert_eq!(indexer.recoveries(), 2);
    assert_eq!(
        top(&indexer, "deliver at night").as_deref(),
        Some("Night delivery")
    );

    // A failure outside any indexing (here a write the database never had) is found by the
    // next poll; when the recovery fails too (its rebuild's commit fails), the next attempt
    // waits for the backoff and then succeeds. The index holds the database's articles only.
    indexer.index().inject_fault(Fault::CommitError);
    indexer
        .index()
        .upsert(ArticleDoc {
            tenant: "acme".into(),
            article_id: "ghost".into(),
            version: 1,
            scenario: "faq".into(),
            language: "en".into(),
            visibility: Visibility::Both,
            tags: Vec::new(),
            title: "Ghost".into(),
            questions: vec!["ghost question".into()],
            answer: "Not in the database.".into(),
        })
        .unwrap();
    assert!(indexer.index().flush().is_err());
    indexer.index().inject_fault(Fault::CommitError);
    assert!(indexer.catch_up(Duration::from_secs(2)).await.is_err());
    assert!(indexer.index().writer_failure().is_some());
    let err = indexer.catch_up(Duration::from_secs(2)).await.unwrap_err();
    assert!(matches!(err, FreshnessError::WriterDown { .. }), "{err:?}");
    publish(&app, "e", "Gift cards", "do you sell gift cards").await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    indexer.catch_up(Duration::from_secs(2)).await.unwrap();
    assert_eq!(indexer.writer_failures(), 3);
    assert_eq!(indexer.recoveries(), 3);
    assert_ne!(top(&indexer, "ghost question").as_deref(), Some("Ghost"));
    assert_eq!(
        top(&indexer, "sell gift cards").as_deref(),
        Some("Gift cards")
    );
    for (query, title) in [
        ("parcel locker", "Parcel lockers"),
        ("offer gift wrapping", "Gift wrapping"),
        ("pick up in a store", "Store pickup"),
        ("deliver at night", "Night delivery"),
    ] {
        assert_eq!(top(&indexer, query).as_deref(), Some(title), "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_a_failed_index_writer_is_replaced_without_losing_writes() {
    let pg = tandem_testkit::Postgres::start().await.unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(pg.fresh_database().await.unwrap()),
        schema: "knowledge".into(),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    a_failed_index_writer_is_replaced_without_losing_writes(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_a_failed_index_writer_is_replaced_without_losing_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(format!("sqlite://{}", dir.path().join("k.db").display())),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    a_failed_index_writer_is_replaced_without_losing_writes(db).await;
}
