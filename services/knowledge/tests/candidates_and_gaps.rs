//! Candidate review and gap upkeep through the use cases, on PostgreSQL (testkit) and SQLite:
//! an approved candidate builds on the published version, concurrent reviews of one candidate
//! take effect once, mined questions are put on one line, and old gaps are deleted.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tandem_knowledge::Knowledge;
use tandem_knowledge::app::{
    Actor, App, AppOptions, Content, GAP_RETENTION, KnowledgeError, NewArticle, NewVersion,
    dedup_key,
};
use tandem_knowledge::freshness::Indexer;
use tandem_knowledge::store::{
    CandidateRow, GapFilter, GapHit, Store, StoreError, micros_timestamp, now_micros,
};
use tandem_platform::bus::RawEvent;
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1::{HandlerKind, Language};
use tandem_proto::pb::dialog::v1::ConversationResolved;
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_search::{IndexConfig, SearchIndex};

#[allow(dead_code, clippy::large_enum_variant, reason = "held for their Drop")]
enum Keep {
    Postgres(tandem_testkit::Postgres),
    Dir(tempfile::TempDir),
}

async fn postgres() -> (Db, Keep) {
    let pg = tandem_testkit::Postgres::start().await.unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(pg.fresh_database().await.unwrap()),
        schema: "knowledge".into(),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    (db, Keep::Postgres(pg))
}

async fn sqlite() -> (Db, Keep) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(format!("sqlite://{}", dir.path().join("k.db").display())),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    (db, Keep::Dir(dir))
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod production {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (db, _keep) = super::postgres().await;
                super::$name(db).await
            }) *
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (db, _keep) = super::sqlite().await;
                super::$name(db).await
            }) *
        }
    };
}

both!(
    an_approved_candidate_builds_on_the_published_version,
    concurrent_reviews_of_a_candidate_take_effect_once,
    mined_questions_are_put_on_one_line,
    gaps_not_seen_for_the_retention_are_deleted,
);

/// The use cases on a migrated database, with their store.
async fn app(db: Db) -> (Arc<App>, Store) {
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
        store.clone(),
        OutboxWaker::default(),
        indexer,
        AppOptions::default(),
    );
    (Arc::new(app), store)
}

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn actor(id: &str) -> Actor {
    Actor { id: id.into() }
}

fn content(title: &str, question: &str, answer: &str) -> Content {
    Content {
        title: title.into(),
        questions: vec![question.into()],
        answer: answer.into(),
        change_note: String::new(),
    }
}

/// Has version `version` of an article submitted by agent-1 and approved (or rejected) by
/// lead-1, and published when approved.
async fn review_version(app: &App, article_id: &str, version: i32, approve: bool) {
    let (t, agent, lead) = (tenant(), actor("agent-1"), actor("lead-1"));
    app.submit(&t, &agent, article_id, version, "")
        .await
        .unwrap();
    app.review(&t, &lead, article_id, version, approve, "not this")
        .await
        .unwrap();
    if approve {
        app.publish(&t, &lead, article_id, version).await.unwrap();
    }
}

/// Stores a pending candidate of scenario "shipping" as mining does.
async fn candidate(store: &Store, id: &str, target: &str, question: &str) -> pb::Candidate {
    let t = tenant();
    let now = now_micros();
    let kind = if target.is_empty() {
        pb::CandidateKind::NewArticle
    } else {
        pb::CandidateKind::EditProposal
    };
    let row = CandidateRow {
        candidate: pb::Candidate {
            id: id.into(),
            kind: kind as i32,
            target_article_id: target.into(),
            target_version: i32::from(!target.is_empty()),
            question: question.into(),
            answer: format!("The answer to {id}."),
            source_count: 1,
            status: pb::CandidateStatus::Pending as i32,
            scenario_id: "shipping".into(),
            language: Language::En as i32,
            created_at: Some(micros_timestamp(now)),
            updated_at: Some(micros_timestamp(now)),
            expires_at: Some(micros_timestamp(now + 86_400_000_000)),
            ..Default::default()
        },
        dedup_key: dedup_key(question),
    };
    let created = |c: &pb::Candidate| {
        RawEvent::new(
            &t,
            &pb::CandidateCreated {
                candidate_id: c.id.clone(),
                ..Default::default()
            },
            None,
        )
    };
    let (c, new) = store
        .mine(&t, ("test-candidates", id), &row, |_| None, |_| {}, created)
        .await
        .unwrap()
        .unwrap();
    assert!(new);
    c
}

fn decide(id: &str, decision: pb::CandidateDecision) -> pb::ReviewCandidateRequest {
    pb::ReviewCandidateRequest {
        candidate_id: id.into(),
        decision: decision as i32,
        reason: "not useful".into(),
        ..Default::default()
    }
}

/// Approving a candidate into an existing article takes the title, the question variants, the
/// visibility and the tags of the published version, never those of a newer draft or rejected
/// version; an article with nothing published cannot get a candidate published at once.
async fn an_approved_candidate_builds_on_the_published_version(db: Db) {
    let (app, store) = app(db).await;
    let (t, agent, lead) = (tenant(), actor("agent-1"), actor("lead-1"));
    let (article, _) = app
        .create(
            &t,
            &agent,
            NewArticle {
                scenario_id: "shipping".into(),
                visibility: pb::Visibility::Agents as i32,
                tags: vec!["internal".into()],
                content: content(
                    "Courier hotline",
                    "courier hotline number",
                    "Call the courier at 555-0100 (staff only).",
                ),
                ..NewArticle::default()
            },
        )
        .await
        .unwrap();
    review_version(&app, &article.id, 1, true).await;
    // Version 2 shows the article to the bot with other content; the reviewer rejects it.
    app.update_draft(
        &t,
        &agent,
        &article.id,
        1,
        NewVersion {
            content: content("Rejected title", "rejected question", "Rejected answer."),
            visibility: pb::Visibility::Both as i32,
            tags: Some(vec!["public".into()]),
        },
    )
    .await
    .unwrap();
    review_version(&app, &article.id, 2, false).await;

    let c = candidate(
        &store,
        "cand-edit",
        &article.id,
        "what is the courier hotline number",
    )
    .await;
    let out = app
        .review_candidate(
            &t,
            &lead,
            &decide(&c.id, pb::CandidateDecision::ApproveAndPublish),
        )
        .await
        .unwrap();
    let v = out.version.unwrap();
    assert_eq!(
        (v.version, v.status),
        (3, pb::VersionStatus::Published as i32)
    );
    assert_eq!(v.title, "Courier hotline");
    assert_eq!(
        v.questions,
        [
            "courier hotline number",
            "what is the courier hotline number"
        ]
    );
    assert_eq!(v.answer, "The answer to cand-edit.");
    let a = out.article.unwrap();
    assert_eq!(a.visibility, pb::Visibility::Agents as i32);
    assert_eq!(a.tags, ["internal"]);
    let row = store.version(&t, &article.id, 3).await.unwrap().unwrap();
    assert_eq!(
        (row.visibility, row.tags),
        (pb::Visibility::Agents as i32, vec!["internal".to_owned()])
    );
    // The bot does not see the internal article; agents do.
    for (audience, hits) in [(pb::Audience::Bot, 0), (pb::Audience::Agent, 1)] {
        let found = app
            .search(
                &t,
                &pb::SearchRequest {
                    query: "courier hotline number".into(),
                    audience: audience as i32,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .hits;
        assert_eq!(found.len(), hits, "{audience:?}: {found:?}");
    }

    // Nothing published: no one-step publish; a draft builds on the latest version.
    let (draft, _) = app
        .create(
            &t,
            &agent,
            NewArticle {
                scenario_id: "shipping".into(),
                content: content("Parcel lockers", "can I use a parcel locker", "Yes."),
                ..NewArticle::default()
            },
        )
        .await
        .unwrap();
    let c = candidate(
        &store,
        "cand-unpublished",
        &draft.id,
        "where are parcel lockers",
    )
    .await;
    let err = app
        .review_candidate(
            &t,
            &lead,
            &decide(&c.id, pb::CandidateDecision::ApproveAndPublish),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, KnowledgeError::FailedPrecondition(_)),
        "{err:?}"
    );
    let out = app
        .review_candidate(
            &t,
            &lead,
            &decide(&c.id, pb::CandidateDecision::ApproveAsDraft),
        )
        .await
        .unwrap();
    let v = out.version.unwrap();
    assert_eq!((v.version, v.status), (2, pb::VersionStatus::Draft as i32));
    assert_eq!(
        v.questions,
        ["can I use a parcel locker", "where are parcel lockers"]
    );
}

/// Reviews of one candidate racing each other: one takes effect, the others fail and write
/// nothing (no second article, no rejection of an approved candidate).
async fn concurrent_reviews_of_a_candidate_take_effect_once(db: Db) {
    let (app, store) = app(db).await;
    let t = tenant();
    let lead = actor("lead-1");
    let articles = |app: Arc<App>| async move {
        app.list(
            &tenant(),
            &tandem_knowledge::store::ArticleFilter {
                cursor: (i64::MAX, String::new()),
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap()
    };

    // Several approvals of one new-article candidate at once create one article.
    let c = candidate(&store, "cand-new", "", "do you deliver on sundays").await;
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let app = Arc::clone(&app);
            let (t, lead) = (t.clone(), lead.clone());
            let decision = if i % 2 == 0 {
                pb::CandidateDecision::ApproveAsDraft
            } else {
                pb::CandidateDecision::ApproveAndPublish
            };
            let r = decide(&c.id, decision);
            tokio::spawn(async move { app.review_candidate(&t, &lead, &r).await })
        })
        .collect();
    let mut ok = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(out) => ok.push(out),
            Err(KnowledgeError::Aborted(_) | KnowledgeError::FailedPrecondition(_)) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(ok.len(), 1, "{ok:?}");
    let list = articles(Arc::clone(&app)).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let stored = store.candidate(&t, &c.id).await.unwrap().unwrap().candidate;
    assert_eq!(stored.status, pb::CandidateStatus::Approved as i32);
    assert_eq!(stored.result_article_id, list[0].id);

    // An approval and a rejection at once: the candidate ends as the one that took effect says.
    let c = candidate(&store, "cand-race", "", "can I pay on delivery").await;
    let approve = {
        let (app, t, lead) = (Arc::clone(&app), t.clone(), lead.clone());
        let r = decide(&c.id, pb::CandidateDecision::ApproveAsDraft);
        tokio::spawn(async move { app.review_candidate(&t, &lead, &r).await })
    };
    let reject = {
        let (app, t, lead) = (Arc::clone(&app), t.clone(), lead.clone());
        let r = decide(&c.id, pb::CandidateDecision::Reject);
        tokio::spawn(async move { app.review_candidate(&t, &lead, &r).await })
    };
    let (approved, rejected) = (approve.await.unwrap(), reject.await.unwrap());
    assert!(
        approved.is_ok() != rejected.is_ok(),
        "{approved:?} {rejected:?}"
    );
    let stored = store.candidate(&t, &c.id).await.unwrap().unwrap().candidate;
    let list = articles(Arc::clone(&app)).await;
    if approved.is_ok() {
        assert_eq!(stored.status, pb::CandidateStatus::Approved as i32);
        assert_eq!(list.len(), 2);
    } else {
        assert_eq!(stored.status, pb::CandidateStatus::Rejected as i32);
        assert_eq!(list.len(), 1);
    }

    // A review read before another one committed is not written over it.
    let c = candidate(&store, "cand-stale", "", "is there a student discount").await;
    let mut stale = store.candidate(&t, &c.id).await.unwrap().unwrap();
    app.review_candidate(
        &t,
        &lead,
        &decide(&c.id, pb::CandidateDecision::ApproveAsDraft),
    )
    .await
    .unwrap();
    stale.candidate.status = pb::CandidateStatus::Rejected as i32;
    let err = store.put_candidate(&t, &stale).await.unwrap_err();
    assert!(
        matches!(err, StoreError::CandidateNotPending(ref id) if *id == c.id),
        "{err:?}"
    );
    let stored = store.candidate(&t, &c.id).await.unwrap().unwrap().candidate;
    assert_eq!(stored.status, pb::CandidateStatus::Approved as i32);
    // A later resolution with the same question becomes a new candidate; the approved one stays.
    let again = candidate(&store, "cand-stale-2", "", "is there a student discount").await;
    assert_eq!(again.status, pb::CandidateStatus::Pending as i32);
    let stored = store.candidate(&t, &c.id).await.unwrap().unwrap().candidate;
    assert_eq!(stored.status, pb::CandidateStatus::Approved as i32);
}

/// A customer question over several lines is mined on one line and can be approved; so can a
/// multi-line candidate stored before, and a multi-line edited question.
async fn mined_questions_are_put_on_one_line(db: Db) {
    let (app, store) = app(db).await;
    let (t, lead) = (tenant(), actor("lead-1"));
    let resolved = ConversationResolved {
        conversation_id: "conv-1".into(),
        scenario_id: "shipping".into(),
        resolved_by: HandlerKind::Agent as i32,
        agent_id: "ag-1".into(),
        customer_question: "  Hello,\nmy parcel is late.\r\n\tWhere   is it?  ".into(),
        agent_answers: vec!["It left the depot today.\nTrack it in My orders.".into()],
        ..Default::default()
    };
    let (mined, created) = app
        .mine(&t, "test-mining", "event-1", &resolved)
        .await
        .unwrap()
        .unwrap();
    assert!(created);
    assert_eq!(mined.question, "Hello, my parcel is late. Where is it?");
    assert_eq!(
        mined.answer,
        "It left the depot today.\nTrack it in My orders."
    );
    let out = app
        .review_candidate(
            &t,
            &lead,
            &decide(&mined.id, pb::CandidateDecision::ApproveAndPublish),
        )
        .await
        .unwrap();
    let v = out.version.unwrap();
    assert_eq!(v.questions, ["Hello, my parcel is late. Where is it?"]);
    assert_eq!(v.title, "Hello, my parcel is late. Where is it?");

    let old = candidate(&store, "cand-lines", "", "Hi\nwhat does\n\nshipping cost?").await;
    let out = app
        .review_candidate(
            &t,
            &lead,
            &decide(&old.id, pb::CandidateDecision::ApproveAsDraft),
        )
        .await
        .unwrap();
    assert_eq!(
        out.version.unwrap().questions,
        ["Hi what does shipping cost?"]
    );

    let c = candidate(&store, "cand-edited", "", "gift wrap").await;
    let out = app
        .review_candidate(
            &t,
            &lead,
            &pb::ReviewCandidateRequest {
                question: "Do you\ngift wrap?".into(),
                ..decide(&c.id, pb::CandidateDecision::ApproveAsDraft)
            },
        )
        .await
        .unwrap();
    assert_eq!(out.version.unwrap().questions, ["Do you gift wrap?"]);
}

/// The hourly upkeep deletes gaps not seen for the retention (90 days) and keeps the others.
async fn gaps_not_seen_for_the_retention_are_deleted(db: Db) {
    let (app, store) = app(db).await;
    let t = tenant();
    let now = now_micros();
    let retention = i64::try_from(GAP_RETENTION.as_micros()).unwrap();
    assert_eq!(retention, 90 * 86_400 * 1_000_000);
    let day = 86_400 * 1_000_000;
    for (query, at) in [
        ("do you ship to mars", now - retention - day),
        ("can i pay with crypto", now - retention + day),
        ("is there a night service", now),
    ] {
        store
            .record_gap(
                &t,
                &GapHit {
                    scenario_id: "shipping".into(),
                    language: Language::En as i32,
                    query: query.into(),
                    best_score: 0.0,
                    best_article: None,
                    conversation_id: format!("conv-{at}"),
                    at,
                },
            )
            .await
            .unwrap();
    }
    let all = GapFilter {
        scenario_id: String::new(),
        language: 0,
        start: 0,
        end: now + 1,
        limit: 100,
    };
    assert_eq!(store.gaps(&t, &all).await.unwrap().len(), 3);
    assert_eq!(app.prune_gaps().await.unwrap(), 1);
    let mut left: Vec<String> = store
        .gaps(&t, &all)
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.query)
        .collect();
    left.sort();
    assert_eq!(left, ["can i pay with crypto", "is there a night service"]);
    assert_eq!(app.prune_gaps().await.unwrap(), 0);
}
