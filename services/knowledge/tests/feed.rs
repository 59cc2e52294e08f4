//! The change feed is pruned, and a replica that falls behind the pruned part rebuilds its index
//! from the database; on PostgreSQL (testkit) and SQLite.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tandem_knowledge::Knowledge;
use tandem_knowledge::app::{Actor, App, AppOptions, Content, Entry, NewArticle, RowOutcome};
use tandem_knowledge::freshness::Indexer;
use tandem_knowledge::store::{Store, now_micros};
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tandem_proto::ids::TenantId;
use tandem_search::{Audience, IndexConfig, SearchIndex, SearchRequest};

async fn indexer(store: &Store) -> Arc<Indexer> {
    let index = SearchIndex::in_ram(IndexConfig {
        commit_interval: Duration::from_millis(10),
        ..IndexConfig::default()
    })
    .unwrap();
    Arc::new(
        Indexer::start(Arc::new(index), store.clone())
            .await
            .unwrap(),
    )
}

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

fn found(indexer: &Indexer, query: &str) -> Vec<String> {
    indexer
        .index()
        .search(&SearchRequest::new("acme", query, Audience::Agent))
        .unwrap()
        .hits
        .into_iter()
        .map(|h| h.article_id)
        .collect()
}

async fn pruned_feed_makes_a_lagging_replica_rebuild(db: Db) {
    db.migrate(Some(Knowledge::migrations())).await.unwrap();
    let store = Store::new(db);
    let tenant = TenantId::new("acme").unwrap();
    let admin = Actor {
        id: "admin-1".into(),
    };
    // The replica that writes, and one that stops reading the feed for a while.
    let writer = indexer(&store).await;
    let lagging = indexer(&store).await;
    let app = App::new(
        store.clone(),
        OutboxWaker::default(),
        Arc::clone(&writer),
        AppOptions::default(),
    );
    let out = app
        .import_rows(
            &tenant,
            &admin,
            vec![
                article("a", "Parcel lockers", "can I use a parcel locker"),
                article("b", "Gift wrapping", "do you offer gift wrapping"),
            ],
            Entry::Publish,
            false,
        )
        .await;
    assert!(
        out.iter().all(|r| matches!(r, Ok(RowOutcome::Created))),
        "{out:?}"
    );
    lagging.catch_up(Duration::from_secs(2)).await.unwrap();
    assert_eq!(found(&lagging, "parcel locker").len(), 1);
    let a_id = found(&lagging, "parcel locker").remove(0);

    // While the lagging replica does not read: one article archived, one added, one changed.
    app.archive(&tenant, &admin, &a_id, "no more lockers")
        .await
        .unwrap();
    app.import_rows(
        &tenant,
        &admin,
        vec![
            article("c", "Store pickup", "can I pick up in a store"),
            article("b", "Gift wrapping", "is gift wrapping free"),
        ],
        Entry::Publish,
        false,
    )
    .await;
    app.refresh().await;
    assert!(store.changes_after(0, 100).await.unwrap().len() >= 5);
    // Nothing is old enough yet: nothing goes.
    assert_eq!(
        store
            .prune_changes(now_micros() - 3_600_000_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.feed_floor().await.unwrap(), 0);
    // Everything is old now: all but the newest row go, and the mark follows.
    let last = store.last_change().await.unwrap();
    let pruned = store.prune_changes(now_micros() + 1).await.unwrap();
    assert!(pruned >= 4, "{pruned}");
    let left = store.changes_after(0, 100).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].seq, last);
    let floor = store.feed_floor().await.unwrap();
    assert!(floor > 0 && floor < last, "{floor} {last}");
    assert_eq!(store.last_change().await.unwrap(), last);

    // The lagging replica notices it cannot follow the feed and rebuilds.
    assert_eq!(lagging.rebuilds(), 0);
    lagging.catch_up(Duration::from_secs(2)).await.unwrap();
    assert_eq!(lagging.rebuilds(), 1);
    assert!(
        found(&lagging, "parcel locker").is_empty(),
        "archived article gone"
    );
    assert_eq!(found(&lagging, "pick up in a store").len(), 1);
    assert_eq!(found(&lagging, "is gift wrapping free").len(), 1);
    // A replica that kept up only reads on: no rebuild.
    writer.catch_up(Duration::from_secs(2)).await.unwrap();
    assert_eq!(writer.rebuilds(), 0);
    // After the rebuild it follows the feed again.
    app.import_rows(
        &tenant,
        &admin,
        vec![article("d", "Night delivery", "do you deliver at night")],
        Entry::Publish,
        false,
    )
    .await;
    lagging.catch_up(Duration::from_secs(2)).await.unwrap();
    assert_eq!(found(&lagging, "deliver at night").len(), 1);
    assert_eq!(lagging.rebuilds(), 1);
    // A replica started after the prune begins at the newest position, not below the mark.
    let late = indexer(&store).await;
    late.catch_up(Duration::from_secs(2)).await.unwrap();
    assert_eq!(late.rebuilds(), 0);
    assert_eq!(found(&late, "deliver at night").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_pruned_feed_makes_a_lagging_replica_rebuild() {
    let pg = tandem_testkit::Postgres::start().await.unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(pg.fresh_database().await.unwrap()),
        schema: "knowledge".into(),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    pruned_feed_makes_a_lagging_replica_rebuild(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_pruned_feed_makes_a_lagging_replica_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(format!("sqlite://{}", dir.path().join("k.db").display())),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    pruned_feed_makes_a_lagging_replica_rebuild(db).await;
}
