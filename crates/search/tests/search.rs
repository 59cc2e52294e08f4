//! Behaviour of the search index through its public API: indexing and searching in Chinese and
//! English, filters, version replacement, removal, commit batching, hostile queries, snippets,
//! rebuild and persistence.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_search::{
    ArticleDoc, Audience, FilterStrategy, HighlightStyle, IndexConfig, Recovery, SearchError,
    SearchIndex, SearchRequest, SearchResponse, Visibility,
};

fn article(
    tenant: &str,
    id: &str,
    language: &str,
    title: &str,
    questions: &[&str],
    answer: &str,
) -> ArticleDoc {
    ArticleDoc {
        tenant: tenant.to_owned(),
        article_id: id.to_owned(),
        version: 1,
        scenario: "general".to_owned(),
        language: language.to_owned(),
        visibility: Visibility::Both,
        tags: vec!["faq".to_owned()],
        title: title.to_owned(),
        questions: questions.iter().map(|q| (*q).to_owned()).collect(),
        answer: answer.to_owned(),
    }
}

fn refund_zh() -> ArticleDoc {
    article(
        "acme",
        "refund-zh",
        "zh",
        "退款政策",
        &["怎么申请退款？", "退款多久到账"],
        "在订单详情页点击申请退款，审核通过后退款将在3到5个工作日内原路退回。",
    )
}

fn password_zh() -> ArticleDoc {
    article(
        "acme",
        "password-zh",
        "zh",
        "修改登录密码",
        &["忘记密码怎么办", "如何重置登录密码"],
        "在登录页点击忘记密码，通过手机验证码重置。",
    )
}

fn refund_en() -> ArticleDoc {
    article(
        "acme",
        "refund-en",
        "en",
        "Refund policy",
        &["How do I get a refund?", "When will my refund arrive?"],
        "Open the order page and choose Request refund. Refunds are returned to the original \
         payment method within 3 to 5 business days.",
    )
}

fn password_en() -> ArticleDoc {
    article(
        "acme",
        "password-en",
        "en",
        "Reset your password",
        &[
            "I forgot my password",
            "How can I change my login password?",
        ],
        "On the sign-in page choose Forgot password and follow the link we email you.",
    )
}

fn fast_config() -> IndexConfig {
    IndexConfig {
        commit_interval: Duration::from_millis(20),
        ..IndexConfig::default()
    }
}

fn index_with(articles: Vec<ArticleDoc>) -> SearchIndex {
    let index = SearchIndex::in_ram(fast_config()).unwrap();
    for doc in articles {
        index.upsert(doc).unwrap();
    }
    index.flush().unwrap();
    index
}

fn sample_index() -> SearchIndex {
    index_with(vec![refund_zh(), password_zh(), refund_en(), password_en()])
}

fn search(index: &SearchIndex, query: &str) -> SearchResponse {
    index
        .search(&SearchRequest::new("acme", query, Audience::Bot))
        .unwrap()
}

fn ids(response: &SearchResponse) -> Vec<&str> {
    response
        .hits
        .iter()
        .map(|h| h.article_id.as_str())
        .collect()
}

#[test]
fn chinese_queries_find_chinese_articles() {
    let index = sample_index();
    let response = search(&index, "我想申请退款");
    assert_eq!(ids(&response).first(), Some(&"refund-zh"), "{response:?}");
    assert!(!response.no_good_result);
    let response = search(&index, "密码忘了");
    assert_eq!(ids(&response).first(), Some(&"password-zh"), "{response:?}");
}

#[test]
fn english_queries_match_stemmed_forms() {
    let index = sample_index();
    let response = search(&index, "REFUNDING my order");
    assert_eq!(ids(&response).first(), Some(&"refund-en"), "{response:?}");
    let response = search(&index, "resetting passwords");
    assert_eq!(ids(&response).first(), Some(&"password-en"), "{response:?}");
}

#[test]
fn mixed_query_matches_both_languages() {
    let index = sample_index();
    let response = search(&index, "refund 退款");
    let found = ids(&response);
    assert!(
        found.contains(&"refund-zh") && found.contains(&"refund-en"),
        "{found:?}"
    );
    assert!(!found.contains(&"password-en"), "{found:?}");
}

#[test]
fn question_matches_outrank_answer_matches() {
    let mut in_answer = article(
        "acme",
        "answer-only",
        "en",
        "Shipping",
        &["Where is my parcel?"],
        "",
    );
    in_answer.answer =
        "Tracking numbers arrive by email; a voucher is sent for late parcels.".to_owned();
    let in_question = article(
        "acme",
        "question",
        "en",
        "Vouchers",
        &["How do I use a voucher?"],
        "Enter the code at checkout.",
    );
    let index = index_with(vec![in_answer, in_question]);
    let response = search(&index, "voucher");
    assert_eq!(ids(&response), ["question", "answer-only"], "{response:?}");
}

#[test]
fn tenants_never_see_each_other() {
    let mut other = refund_en();
    other.tenant = "globex".to_owned();
    other.title = "Globex refunds".to_owned();
    let index = index_with(vec![refund_en(), other]);
    let response = search(&index, "refund");
    assert_eq!(response.hits.len(), 1);
    assert_eq!(response.hits[0].title, "Refund policy");
    let globex = index
        .search(&SearchRequest::new("globex", "refund", Audience::Bot))
        .unwrap();
    assert_eq!(globex.hits.len(), 1);
    assert_eq!(globex.hits[0].title, "Globex refunds");

    // The same article id in another tenant is a different article.
    index.remove("globex", "refund-en").unwrap();
    index.flush().unwrap();
    assert_eq!(search(&index, "refund").hits.len(), 1);
    let globex = index
        .search(&SearchRequest::new("globex", "refund", Audience::Bot))
        .unwrap();
    assert!(globex.hits.is_empty() && globex.no_good_result);
}

#[test]
fn scenario_and_language_filters_restrict_hits() {
    let mut billing = refund_en();
    billing.scenario = "billing".to_owned();
    let index = index_with(vec![billing, refund_zh(), password_en()]);
    let mut request = SearchRequest::new("acme", "refund 退款 password", Audience::Bot);
    request.scenario = Some("billing".to_owned());
    assert_eq!(ids(&index.search(&request).unwrap()), ["refund-en"]);

    request.scenario = None;
    request.language = Some("zh".to_owned());
    assert_eq!(ids(&index.search(&request).unwrap()), ["refund-zh"]);

    // Empty filter values mean no filter, as unset protobuf strings arrive.
    request.language = Some(String::new());
    request.scenario = Some(String::new());
    assert_eq!(index.search(&request).unwrap().hits.len(), 3);

    request.scenario = Some("unknown".to_owned());
    let response = index.search(&request).unwrap();
    assert!(response.hits.is_empty() && response.no_good_result);
}

#[test]
fn audience_filter_follows_visibility() {
    let mut bot_only = refund_en();
    bot_only.article_id = "bot-only".to_owned();
    bot_only.visibility = Visibility::Bot;
    let mut agents_only = refund_en();
    agents_only.article_id = "agents-only".to_owned();
    agents_only.visibility = Visibility::Agents;
    let mut both = refund_en();
    both.article_id = "both".to_owned();
    let index = index_with(vec![bot_only, agents_only, both]);

    let mut bot = ids(&search(&index, "refund"))
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    bot.sort();
    assert_eq!(bot, ["bot-only", "both"]);
    let agent = index
        .search(&SearchRequest::new("acme", "refund", Audience::Agent))
        .unwrap();
    let mut agent: Vec<_> = ids(&agent).iter().map(|s| s.to_string()).collect();
    agent.sort();
    assert_eq!(agent, ["agents-only", "both"]);
}

#[test]
fn post_filter_and_intersection_return_the_same_hits() {
    let mut docs = Vec::new();
    for i in 0..300u64 {
        let mut doc = if i % 2 == 0 {
            refund_en()
        } else {
            password_en()
        };
        doc.article_id = format!("a{i}");
        doc.tenant = if i % 5 == 0 { "globex" } else { "acme" }.to_owned();
        doc.visibility = match i % 3 {
            0 => Visibility::Bot,
            1 => Visibility::Agents,
            _ => Visibility::Both,
        };
        doc.scenario = format!("s{}", i % 4);
        doc.answer = format!(
            "{} order number {i} {}",
            doc.answer,
            "refund ".repeat((i % 7) as usize)
        );
        docs.push(doc);
    }
    let mut results = Vec::new();
    for strategy in [FilterStrategy::Intersect, FilterStrategy::PostFilter] {
        let index = SearchIndex::in_ram(IndexConfig {
            filter_strategy: strategy,
            max_pending_ops: 64,
            ..fast_config()
        })
        .unwrap();
        for doc in &docs {
            index.upsert(doc.clone()).unwrap();
        }
        index.remove("acme", "a2").unwrap();
        index.flush().unwrap();
        assert!(
            index.stats().num_segments > 1,
            "several segments are part of the check"
        );
        let mut per_strategy = Vec::new();
        for (audience, scenario) in [
            (Audience::Bot, None),
            (Audience::Agent, None),
            (Audience::Bot, Some("s2")),
        ] {
            let mut request = SearchRequest::new("acme", "refund password order", audience);
            request.limit = 25;
            request.scenario = scenario.map(str::to_owned);
            let response = index.search(&request).unwrap();
            assert_eq!(response.hits.len(), 25);
            for hit in &response.hits {
                let n: u64 = hit.article_id[1..].parse().unwrap();
                assert!(!n.is_multiple_of(5), "other tenant's article {n}");
                let visible = match audience {
                    Audience::Bot => n % 3 != 1,
                    Audience::Agent => !n.is_multiple_of(3),
                };
                assert!(visible, "article {n} is not visible to {audience:?}");
                assert!(scenario.is_none_or(|s| s == format!("s{}", n % 4)));
                assert_ne!(n, 2, "removed article returned");
            }
            per_strategy.push(response.hits);
        }
        results.push(per_strategy);
    }
    // Both strategies score the same documents the same way. Scores are summed in a different
    // order (block-max WAND or not), so they may differ in the last bits, and documents tied at
    // the cut-off may be swapped: compare the scores with a tolerance and the identities of the
    // documents that are clearly inside the top k.
    for (intersected, post_filtered) in results[0].iter().zip(&results[1]) {
        for (a, b) in intersected.iter().zip(post_filtered) {
            assert!(
                (a.score - b.score).abs() < 1e-4,
                "{} vs {}",
                a.score,
                b.score
            );
        }
        let cut_off = intersected.last().unwrap().score + 1e-3;
        let clear = |hits: &[tandem_search::SearchHit]| {
            let mut ids: Vec<String> = hits
                .iter()
                .filter(|h| h.score > cut_off)
                .map(|h| h.article_id.clone())
                .collect();
            ids.sort();
            ids
        };
        let clear_ids = clear(intersected);
        assert!(!clear_ids.is_empty());
        assert_eq!(clear_ids, clear(post_filtered));
    }
}

#[test]
fn a_new_version_replaces_the_old_one() {
    let index = index_with(vec![refund_en()]);
    let mut v2 = refund_en();
    v2.version = 2;
    v2.title = "Returns and refunds".to_owned();
    v2.answer = "Refunds now go to your wallet instantly.".to_owned();
    index.upsert(v2).unwrap();
    index.flush().unwrap();

    let response = search(&index, "refund");
    assert_eq!(response.hits.len(), 1);
    assert_eq!(response.hits[0].version, 2);
    assert_eq!(response.hits[0].title, "Returns and refunds");
    assert!(
        search(&index, "business days").hits.is_empty(),
        "old answer still indexed"
    );
    assert_eq!(index.stats().num_docs, 1);
}

#[test]
fn an_older_version_never_replaces_a_newer_one() {
    let index = SearchIndex::in_ram(fast_config()).unwrap();
    let mut v3 = refund_en();
    v3.version = 3;
    index.upsert(v3).unwrap();
    index.flush().unwrap();
    // Stale both against the committed index and against a pending upsert in the same batch.
    let mut v4 = refund_en();
    v4.version = 4;
    index.upsert(v4).unwrap();
    let mut v1 = refund_en();
    v1.version = 1;
    index.upsert(v1.clone()).unwrap();
    index.flush().unwrap();
    index.upsert(v1).unwrap();
    index.flush().unwrap();

    let response = search(&index, "refund");
    assert_eq!(response.hits.len(), 1);
    assert_eq!(response.hits[0].version, 4);
    assert_eq!(index.stats().stale_upserts, 2);
}

#[test]
fn removed_articles_disappear() {
    let index = sample_index();
    let seq = index.remove("acme", "refund-en").unwrap();
    index.wait_visible(seq, Duration::from_secs(5)).unwrap();
    assert!(search(&index, "refund").hits.is_empty());
    assert!(!ids(&search(&index, "refund 退款")).contains(&"refund-en"));
    // Removing twice, or removing an unknown article, is fine.
    index.remove("acme", "refund-en").unwrap();
    index.remove("acme", "never-existed").unwrap();
    index.flush().unwrap();
    assert_eq!(index.stats().num_docs, 3);
}

#[test]
fn commits_are_batched_by_count() {
    let index = SearchIndex::in_ram(IndexConfig {
        commit_interval: Duration::from_secs(600),
        max_pending_ops: 100,
        ..IndexConfig::default()
    })
    .unwrap();
    let mut last = 0;
    for i in 0..500 {
        let mut doc = refund_en();
        doc.article_id = format!("a{i}");
        last = index.upsert(doc).unwrap();
    }
    index.wait_visible(last, Duration::from_secs(30)).unwrap();
    let stats = index.stats();
    assert_eq!(stats.commits, 5, "{stats:?}");
    assert_eq!(stats.num_docs, 500);
    // Nothing is pending, so a flush needs no commit.
    index.flush().unwrap();
    assert_eq!(index.stats().commits, 5);
}

#[test]
fn commits_are_batched_by_time() {
    let index = SearchIndex::in_ram(IndexConfig {
        commit_interval: Duration::from_millis(50),
        max_pending_ops: 1_000_000,
        ..IndexConfig::default()
    })
    .unwrap();
    let mut seqs = Vec::new();
    for i in 0..200 {
        let mut doc = password_en();
        doc.article_id = format!("p{i}");
        seqs.push(index.upsert(doc).unwrap());
    }
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    // No flush: the interval alone makes the batch visible.
    index.wait_visible(200, Duration::from_secs(10)).unwrap();
    let stats = index.stats();
    assert_eq!(stats.num_docs, 200);
    assert!(stats.commits >= 1 && stats.commits < 200, "{stats:?}");
    assert_eq!(search(&index, "password").hits.len(), 10);
}

#[test]
fn waiting_for_an_operation_never_issued_times_out() {
    let index = sample_index();
    let visible = index.visible_seq();
    let error = index
        .wait_visible(visible + 10, Duration::from_millis(50))
        .unwrap_err();
    assert!(matches!(error, SearchError::VisibilityTimeout { seq } if seq == visible + 10));
}

#[test]
fn operator_and_control_characters_are_searched_as_words() {
    let index = sample_index();
    let hostile = [
        "refund AND (password OR \"reset\")",
        "title:refund^10 answer:*",
        "refund~2 -password +order",
        "\"unterminated refund",
        "refund)))(((",
        "refund\u{0}\u{1b}[31m\u{7f}",
        "{!lucene}refund [* TO *] \\ / ? | &&",
        "退款 AND 密码 OR \"重置\"",
    ];
    for query in hostile {
        let response = index
            .search(&SearchRequest::new("acme", query, Audience::Bot))
            .unwrap_or_else(|e| panic!("{query:?} failed: {e}"));
        assert!(!response.hits.is_empty(), "{query:?} found nothing");
    }
    let response = search(&index, "re\u{0}fund");
    assert_eq!(response.terms, ["re", "fund"]);

    for empty in [
        "",
        "   ",
        "*:*",
        "() ^~ \"\" :* -+",
        "\u{0}\u{1}\u{2}\n\t",
        "？！。，",
    ] {
        let error = index
            .search(&SearchRequest::new("acme", empty, Audience::Bot))
            .unwrap_err();
        assert!(
            matches!(error, SearchError::EmptyQuery),
            "{empty:?}: {error}"
        );
        assert!(error.is_invalid_input());
    }
}

#[test]
fn long_queries_are_capped() {
    let index = sample_index();
    let long = format!("{} refund", "x".repeat(100_000));
    // The cap keeps only the first 512 characters, so the trailing word is not searched.
    let error = index
        .search(&SearchRequest::new("acme", long, Audience::Bot))
        .unwrap_err();
    assert!(matches!(error, SearchError::EmptyQuery), "{error}");
    let many_words = "refund password order reset ".repeat(200);
    let response = search(&index, &many_words);
    assert!(response.terms.len() <= index.config().max_query_terms);
    assert!(!response.hits.is_empty());
}

#[test]
fn malformed_requests_are_rejected() {
    let index = sample_index();
    let base = SearchRequest::new("acme", "refund", Audience::Bot);
    let cases = [
        SearchRequest {
            tenant: String::new(),
            ..base.clone()
        },
        SearchRequest {
            limit: 0,
            ..base.clone()
        },
        SearchRequest {
            limit: 101,
            ..base.clone()
        },
        SearchRequest {
            min_score: Some(f32::NAN),
            ..base.clone()
        },
        SearchRequest {
            min_score: Some(-1.0),
            ..base.clone()
        },
        SearchRequest {
            scenario: Some("a\u{0}b".to_owned()),
            ..base
        },
    ];
    for request in cases {
        let error = index.search(&request).unwrap_err();
        assert!(
            matches!(error, SearchError::InvalidRequest(_)),
            "{request:?}: {error}"
        );
    }
}

#[test]
fn invalid_articles_are_rejected_before_queueing() {
    let index = SearchIndex::in_ram(fast_config()).unwrap();
    let mut doc = refund_en();
    doc.tenant.clear();
    let error = index.upsert(doc).unwrap_err();
    assert!(matches!(error, SearchError::InvalidDocument(_)), "{error}");
    assert!(index.remove("acme", "").is_err());
    assert_eq!(index.visible_seq(), 0);
}

#[test]
fn snippets_highlight_matched_words() {
    let index = sample_index();
    let hit = &search(&index, "refunds").hits[0];
    assert_eq!(hit.article_id, "refund-en");
    assert!(
        hit.snippet.marked.contains("<em>refund</em>"),
        "{:?}",
        hit.snippet
    );
    assert!(
        hit.snippet.marked.contains("<em>Refunds</em>"),
        "{:?}",
        hit.snippet
    );
    for range in &hit.snippet.highlights {
        let word = hit.snippet.fragment[range.clone()].to_lowercase();
        assert!(word.starts_with("refund"), "{word}");
    }
    let question = hit.matched_question.as_ref().unwrap();
    assert!(question.marked.contains("<em>refund</em>"), "{question:?}");

    let hit = &search(&index, "退款到账").hits[0];
    assert_eq!(hit.article_id, "refund-zh");
    assert!(
        hit.snippet.marked.contains("<em>退款</em>"),
        "{:?}",
        hit.snippet
    );
    let question = hit.matched_question.as_ref().unwrap();
    assert_eq!(
        question.fragment, "退款多久到账",
        "the question matching both words wins"
    );
    assert_eq!(question.marked, "<em>退款</em>多久<em>到账</em>");
}

#[test]
fn snippets_fall_back_to_the_answer_start_and_honour_markers() {
    let index = SearchIndex::in_ram(IndexConfig {
        highlight: HighlightStyle {
            pre: "[[".to_owned(),
            post: "]]".to_owned(),
            escape_html: false,
        },
        snippet_max_bytes: 20,
        ..fast_config()
    })
    .unwrap();
    let mut doc = refund_en();
    doc.answer = "Use <b>the</b> form on the returns page to send it back.".to_owned();
    index.upsert(doc).unwrap();
    index.flush().unwrap();
    let hit = &search(&index, "policy").hits[0];
    assert!(hit.snippet.highlights.is_empty());
    assert_eq!(hit.snippet.fragment, "Use <b>the</b> form ");
    assert_eq!(hit.snippet.marked, hit.snippet.fragment);
    assert!(hit.matched_question.is_none());
    let hit = &search(&index, "returns").hits[0];
    assert!(
        hit.snippet.marked.contains("[[returns]]"),
        "{:?}",
        hit.snippet
    );
}

#[test]
fn no_good_result_and_min_score() {
    let index = sample_index();
    let response = search(&index, "quantum chromodynamics");
    assert!(response.hits.is_empty());
    assert!(response.no_good_result);
    assert_eq!(response.best_score, None);

    let good = search(&index, "How do I get a refund");
    assert!(!good.no_good_result, "{good:?}");
    let best = good.best_score.unwrap();

    let mut request = SearchRequest::new("acme", "How do I get a refund", Audience::Bot);
    request.min_score = Some(best + 1.0);
    let strict = index.search(&request).unwrap();
    assert!(strict.hits.is_empty());
    assert!(strict.no_good_result);
    assert_eq!(strict.best_score, Some(best));

    request.min_score = Some(best);
    let response = index.search(&request).unwrap();
    assert_eq!(response.hits.len(), 1);
    assert!(!response.no_good_result);
}

#[test]
fn rebuild_replaces_content_in_one_commit() {
    let index = sample_index();
    let commits_before = index.stats().commits;
    let mut old = refund_en();
    old.article_id = "new-1".to_owned();
    old.version = 1;
    let mut newer = old.clone();
    newer.version = 2;
    newer.title = "Refunds, second edition".to_owned();
    let mut invalid = password_en();
    invalid.article_id = String::new();
    let mut others: Vec<ArticleDoc> = (0..1500)
        .map(|i| {
            let mut doc = password_zh();
            doc.article_id = format!("pw-{i}");
            doc
        })
        .collect();
    others.push(newer);
    others.push(old);
    others.push(invalid);

    let report = index.rebuild(others).unwrap();
    assert_eq!(report.indexed, 1501);
    assert_eq!(report.superseded, 1);
    assert_eq!(report.rejected, 1);
    assert!(
        report.rejections[0].contains("article_id is empty"),
        "{report:?}"
    );
    assert_eq!(index.visible_seq(), report.seq);
    let stats = index.stats();
    assert_eq!(stats.commits, commits_before + 1, "{stats:?}");
    assert_eq!(stats.num_docs, 1501);

    let response = search(&index, "refund");
    assert_eq!(ids(&response), ["new-1"]);
    assert_eq!(response.hits[0].version, 2);
    assert!(
        search(&index, "怎么申请退款")
            .hits
            .iter()
            .all(|h| h.article_id != "refund-zh")
    );

    // Writes after a rebuild go on as usual.
    index.upsert(refund_zh()).unwrap();
    index.flush().unwrap();
    assert_eq!(ids(&search(&index, "申请退款"))[0], "refund-zh");
}

#[test]
fn a_panicking_rebuild_input_leaves_the_index_unchanged() {
    let index = sample_index();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let input = (0..2000).map(|i| {
            assert!(i < 1000, "source failed");
            let mut doc = password_en();
            doc.article_id = format!("x{i}");
            doc
        });
        index.rebuild(input)
    }));
    assert!(outcome.is_err());
    index.upsert(password_zh()).unwrap();
    index.flush().unwrap();
    assert_eq!(index.stats().num_docs, 4);
    assert_eq!(ids(&search(&index, "refund")), ["refund-en"]);
}

#[test]
fn a_directory_index_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let index = SearchIndex::in_dir(dir.path(), fast_config()).unwrap();
        index.upsert(refund_zh()).unwrap();
        index.upsert(refund_en()).unwrap();
        // Pending operations are committed on close.
        index.close().unwrap();
    }
    let index = SearchIndex::in_dir(dir.path(), fast_config()).unwrap();
    assert_eq!(index.stats().num_docs, 2);
    assert_eq!(ids(&search(&index, "退款"))[0], "refund-zh");
    // Version checks see what the previous process indexed.
    let mut stale = refund_en();
    stale.version = 0;
    index.upsert(stale).unwrap();
    index.flush().unwrap();
    assert_eq!(index.stats().stale_upserts, 1);
}

#[test]
fn common_terms_only_add_to_the_score_of_documents_with_a_rarer_term() {
    let mut docs = Vec::new();
    for i in 0..10 {
        docs.push(article(
            "acme",
            &format!("parcel-{i}"),
            "en",
            "Parcels",
            &["How do I get my parcel?", "How do I get my parcel faster?"],
            "Parcels arrive within two days.",
        ));
    }
    for i in 0..89 {
        docs.push(article(
            "acme",
            &format!("other-{i}"),
            "en",
            "Opening hours",
            &["When are stores open?"],
            "Stores open at nine.",
        ));
    }
    docs.push(article(
        "acme",
        "voucher",
        "en",
        "Gift cards",
        &["Where is the help page?"],
        "Gift cards and a voucher code can be combined at checkout, once per order.",
    ));
    let query = "how do I get my voucher";
    let top = |config: IndexConfig, limit: usize| {
        let index = SearchIndex::in_ram(config).unwrap();
        for doc in &docs {
            index.upsert(doc.clone()).unwrap();
        }
        index.flush().unwrap();
        let mut request = SearchRequest::new("acme", query, Audience::Bot);
        request.limit = limit;
        index.search(&request).unwrap()
    };

    // "how do i get my" are in 10 % of the documents, over the 5 % share: only "voucher" is
    // required, and the one article containing it wins although it matches one word.
    let split = top(fast_config(), 1);
    assert_eq!(ids(&split), ["voucher"]);
    assert!(split.hits[0].snippet.marked.contains("<em>voucher</em>"));
    assert!(!split.hits[0].snippet.marked.contains("<em>get</em>"));

    // The plain disjunction ranks the articles matching five common words first.
    let plain = top(
        IndexConfig {
            common_term_share: 1.0,
            ..fast_config()
        },
        1,
    );
    assert!(ids(&plain)[0].starts_with("parcel-"), "{plain:?}");

    // Fewer hits with a rare term than asked for: the plain disjunction fills the page.
    let filled = top(fast_config(), 20);
    assert_eq!(filled.hits.len(), 11);
    assert!(ids(&filled).contains(&"voucher"));
    assert!(ids(&filled)[0].starts_with("parcel-"), "{filled:?}");
}

#[test]
fn a_storage_failure_stops_the_writer_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index");
    let index = SearchIndex::in_dir(&path, fast_config()).unwrap();
    index.upsert(refund_en()).unwrap();
    index.flush().unwrap();

    std::fs::remove_dir_all(&path).unwrap();
    let seq = index.upsert(password_en()).unwrap();
    let error = index
        .wait_visible(seq, Duration::from_secs(10))
        .unwrap_err();
    assert!(matches!(error, SearchError::WriterFailed(_)), "{error}");
    assert!(!error.is_invalid_input());
    let error = index.upsert(refund_zh()).unwrap_err();
    assert!(matches!(error, SearchError::WriterFailed(_)), "{error}");
    // What was committed before the failure stays searchable.
    assert_eq!(ids(&search(&index, "refund")), ["refund-en"]);
    assert!(index.close().is_err());
}

#[test]
fn a_writer_failed_on_storage_is_recovered_with_a_new_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index");
    let index = SearchIndex::in_dir(&path, fast_config()).unwrap();
    index.upsert(refund_en()).unwrap();
    index.flush().unwrap();

    // The directory goes away: the writer fails, and no writer can be opened on the index.
    std::fs::remove_dir_all(&path).unwrap();
    let lost = index.upsert(password_en()).unwrap();
    assert!(index.wait_visible(lost, Duration::from_secs(10)).is_err());
    assert!(index.writer_failure().is_some());
    assert!(index.stats().writer_failed);
    assert_eq!(index.recover().unwrap(), Recovery::IndexRecreated);
    assert_eq!(index.writer_failure(), None);
    assert!(
        index.wait_visible(lost, Duration::from_secs(1)).is_err(),
        "still lost"
    );
    assert!(
        search(&index, "refund").hits.is_empty(),
        "the new index starts empty"
    );

    // Rebuilt, it takes writes again and keeps them in the directory.
    index.rebuild([refund_en(), password_en()]).unwrap();
    let seq = index.upsert(refund_zh()).unwrap();
    index.wait_visible(seq, Duration::from_secs(10)).unwrap();
    assert_eq!(ids(&search(&index, "password")), ["password-en"]);
    assert_eq!(index.stats().num_docs, 3);
    assert_eq!(index.stats().writer_restarts, 1);
    index.close().unwrap();
    let reopened = SearchIndex::in_dir(&path, fast_config()).unwrap();
    assert_eq!(reopened.stats().num_docs, 3);
}
