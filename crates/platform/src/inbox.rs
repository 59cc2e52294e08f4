//! The consumer inbox: exactly-once effects on top of at-least-once delivery.
//!
//! A handler opens a transaction, calls [`claim_pg`] or [`claim_sqlite`] with its consumer name
//! and the event id, applies its effect only when the claim is new, and commits. A redelivered
//! event finds its claim and is skipped; a crash before commit leaves no claim, so the event is
//! handled again on redelivery.

use std::collections::HashSet;

use chrono::Utc;
use sqlx::{PgConnection, SqliteConnection};

use crate::db::Db;
use crate::metrics::EVENTS_DUPLICATE_TOTAL;

/// Records that `consumer` handles `event_id`; returns false if it did already.
pub async fn claim_pg(
    conn: &mut PgConnection,
    consumer: &str,
    event_id: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO tandem_inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(event_id)
    .execute(conn)
    .await?;
    let fresh = done.rows_affected() == 1;
    if !fresh {
        metrics::counter!(EVENTS_DUPLICATE_TOTAL, "consumer" => consumer.to_owned()).increment(1);
    }
    Ok(fresh)
}

/// Records that `consumer` handles `event_id`; returns false if it did already.
pub async fn claim_sqlite(
    conn: &mut SqliteConnection,
    consumer: &str,
    event_id: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO tandem_inbox (consumer, event_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(event_id)
    .execute(conn)
    .await?;
    let fresh = done.rows_affected() == 1;
    if !fresh {
        metrics::counter!(EVENTS_DUPLICATE_TOTAL, "consumer" => consumer.to_owned()).increment(1);
    }
    Ok(fresh)
}

/// Deletes claims older than `keep`; events older than that can no longer be redelivered.
pub async fn prune(db: &Db, keep: std::time::Duration) -> Result<u64, sqlx::Error> {
    let cutoff = Utc::now()
        - chrono::Duration::from_std(keep).unwrap_or_else(|_| chrono::Duration::days(30));
    Ok(match db {
        Db::Postgres(pool) => sqlx::query("DELETE FROM tandem_inbox WHERE processed_at < $1")
            .bind(cutoff)
            .execute(pool)
            .await?
            .rows_affected(),
        Db::Sqlite(pool) => sqlx::query("DELETE FROM tandem_inbox WHERE processed_at < ?1")
            .bind(cutoff.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .execute(pool)
            .await?
            .rows_affected(),
    })
}

/// How often [`prune_until`] deletes old claims.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Keeps the inbox from growing without end: every `every`, deletes the claims older than
/// `keep`, until `shutdown`. `keep` must outlast every redelivery of an event, so a service
/// keeps claims a day longer than its stream keeps events (a durable consumer created again
/// reads the stream from its first event).
pub async fn prune_until(
    db: Db,
    keep: std::time::Duration,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        match prune(&db, keep).await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "old inbox claims deleted"),
            Err(error) => tracing::warn!(%error, "cannot delete old inbox claims"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Records that `consumer` handles each of `event_ids`; returns those it had not handled yet.
///
/// The ids travel as one array, so the statement is the same for every batch size.
pub async fn claim_batch_pg(
    conn: &mut PgConnection,
    consumer: &str,
    event_ids: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    if event_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let fresh: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO tandem_inbox (consumer, event_id) SELECT $1, id FROM UNNEST($2::text[]) AS id \
         ON CONFLICT DO NOTHING RETURNING event_id",
    )
    .bind(consumer)
    .bind(event_ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    count_duplicates(consumer, event_ids.len() - fresh.len());
    Ok(fresh)
}

/// Records that `consumer` handles each of `event_ids`; returns those it had not handled yet.
pub async fn claim_batch_sqlite(
    conn: &mut SqliteConnection,
    consumer: &str,
    event_ids: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    if event_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let mut builder =
        sqlx::QueryBuilder::<sqlx::Sqlite>::new("INSERT INTO tandem_inbox (consumer, event_id) ");
    builder.push_values(event_ids, |mut row, id| {
        row.push_bind(consumer).push_bind(*id);
    });
    builder.push(" ON CONFLICT DO NOTHING RETURNING event_id");
    let fresh: HashSet<String> = builder
        .build_query_scalar::<String>()
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    count_duplicates(consumer, event_ids.len() - fresh.len());
    Ok(fresh)
}

fn count_duplicates(consumer: &str, duplicates: usize) {
    if duplicates > 0 {
        metrics::counter!(EVENTS_DUPLICATE_TOTAL, "consumer" => consumer.to_owned())
            .increment(duplicates as u64);
    }
}
