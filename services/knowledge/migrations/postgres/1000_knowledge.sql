-- Articles: the latest state of each article (body is an encoded tandem.knowledge.v1.Article).
CREATE TABLE knowledge_articles (
    tenant TEXT NOT NULL,
    article_id TEXT NOT NULL,
    external_id TEXT NOT NULL,
    scenario_id TEXT NOT NULL,
    language INTEGER NOT NULL,
    visibility INTEGER NOT NULL,
    status INTEGER NOT NULL,
    revision BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, article_id)
);
CREATE UNIQUE INDEX knowledge_articles_external ON knowledge_articles (tenant, external_id)
    WHERE external_id <> '';
CREATE INDEX knowledge_articles_updated ON knowledge_articles (tenant, updated_at, article_id);

CREATE TABLE knowledge_article_tags (
    tenant TEXT NOT NULL,
    article_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (tenant, article_id, tag)
);
CREATE INDEX knowledge_article_tags_tag ON knowledge_article_tags (tenant, tag);

-- Immutable versions; only status fields change (body is an encoded ArticleVersion).
CREATE TABLE knowledge_versions (
    tenant TEXT NOT NULL,
    article_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    status INTEGER NOT NULL,
    visibility INTEGER NOT NULL,
    tags TEXT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, article_id, version)
);

CREATE TABLE knowledge_audit (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    article_id TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX knowledge_audit_article ON knowledge_audit (tenant, article_id, occurred_at, id);

-- The change feed every replica polls to keep its search index current. Rows are inserted under
-- a table lock, so sequence numbers become visible in commit order.
CREATE TABLE knowledge_changes (
    seq BIGSERIAL PRIMARY KEY,
    tenant TEXT NOT NULL,
    article_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE knowledge_gaps (
    tenant TEXT NOT NULL,
    scenario_id TEXT NOT NULL,
    language INTEGER NOT NULL,
    query TEXT NOT NULL,
    miss_count BIGINT NOT NULL,
    fallback_count BIGINT NOT NULL,
    best_score DOUBLE PRECISION NOT NULL,
    best_article BYTEA NOT NULL,
    examples TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    PRIMARY KEY (tenant, scenario_id, language, query)
);
CREATE INDEX knowledge_gaps_seen ON knowledge_gaps (tenant, last_seen);

CREATE TABLE knowledge_candidates (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    status INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    scenario_id TEXT NOT NULL,
    language INTEGER NOT NULL,
    dedup_key TEXT NOT NULL,
    source_count INTEGER NOT NULL,
    updated_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX knowledge_candidates_key
    ON knowledge_candidates (tenant, scenario_id, language, dedup_key, status);
CREATE INDEX knowledge_candidates_status ON knowledge_candidates (tenant, status, source_count);
