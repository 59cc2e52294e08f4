//! Database connections for the two storage engines: PostgreSQL in production, SQLite in the
//! standalone mode. Each service owns its tables (in its own PostgreSQL schema when configured)
//! and brings its own migrations; the platform's outbox and inbox tables are migrated alongside.

use std::str::FromStr as _;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::config::DatabaseConfig;
use crate::error::{ErrorCode, ServiceError};

/// Database failures at the platform level.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL or options are invalid.
    #[error("invalid database configuration: {0}")]
    Config(String),
    /// The database cannot be reached.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// A migration failed.
    #[error("database migration failed")]
    Migration(#[source] sqlx::migrate::MigrateError),
}

impl ServiceError for DbError {
    fn code(&self) -> ErrorCode {
        match self {
            DbError::Unavailable(_) => ErrorCode::Unavailable,
            DbError::Config(_) | DbError::Migration(_) => ErrorCode::Internal,
        }
    }
}

/// A service's connection pool, on one of the two engines.
#[derive(Clone, Debug)]
pub enum Db {
    /// PostgreSQL.
    Postgres(PgPool),
    /// SQLite.
    Sqlite(SqlitePool),
}

/// A service's migrations for both engines (`sqlx::migrate!` of each directory). Versions of
/// different sets must not collide: the platform uses 1–999, services 1000 and up.
pub struct Migrations {
    /// PostgreSQL migrations.
    pub postgres: Migrator,
    /// SQLite migrations.
    pub sqlite: Migrator,
}

fn platform_migrations() -> Migrations {
    Migrations {
        postgres: sqlx::migrate!("./migrations/postgres"),
        sqlite: sqlx::migrate!("./migrations/sqlite"),
    }
}

/// A PostgreSQL connection idle for this long is pinged before it is handed out.
const PING_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl Db {
    /// Connects a pool according to the configuration.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Self, DbError> {
        let url = cfg.url.expose();
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| DbError::Config(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(std::time::Duration::from_secs(5))
                .foreign_keys(true);
            // Every connection to ":memory:" would be a separate database.
            let max = if url.contains(":memory:") {
                1
            } else {
                cfg.max_connections
            };
            let pool = SqlitePoolOptions::new()
                .max_connections(max)
                .acquire_timeout(cfg.acquire_timeout)
                .connect_with(options)
                .await
                .map_err(DbError::Unavailable)?;
            return Ok(Db::Sqlite(pool));
        }
        let mut options =
            PgConnectOptions::from_str(url).map_err(|e| DbError::Config(e.to_string()))?;
        if !cfg.schema.is_empty() {
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await
                .map_err(DbError::Unavailable)?;
            // The schema name is validated to [a-z0-9_]+ by the configuration.
            let statement = format!("CREATE SCHEMA IF NOT EXISTS {}", cfg.schema);
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&admin)
                .await
                .map_err(DbError::Unavailable)?;
            admin.close().await;
            options = options.options([("search_path", cfg.schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(cfg.acquire_timeout)
            // The pool pings every connection it hands out by default: one more round trip
            // before each transaction. A connection is also pinged when it comes back to the
            // pool (and dropped if that fails), so one used a moment ago is known to be alive;
            // only one idle for longer is pinged before use.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE_AFTER {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .map_err(DbError::Unavailable)?;
        Ok(Db::Postgres(pool))
    }

    /// Applies the platform's and the service's migrations.
    pub async fn migrate(&self, service: Option<Migrations>) -> Result<(), DbError> {
        let platform = platform_migrations();
        for set in std::iter::once(platform).chain(service) {
            match self {
                Db::Postgres(pool) => {
                    let mut migrator = set.postgres;
                    migrator.set_ignore_missing(true);
                    migrator.run(pool).await.map_err(DbError::Migration)?;
                }
                Db::Sqlite(pool) => {
                    let mut migrator = set.sqlite;
                    migrator.set_ignore_missing(true);
                    migrator.run(pool).await.map_err(DbError::Migration)?;
                }
            }
        }
        Ok(())
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        match self {
            Db::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
            Db::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
        }
        .map_err(DbError::Unavailable)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match self {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }
}

/// Expands `$body` once per engine with `$pool` bound to that engine's pool, so a repository
/// writes its SQL once (placeholders `$n` in order of first appearance work on both engines).
#[macro_export]
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Postgres($pool) => $body,
            $crate::db::Db::Sqlite($pool) => $body,
        }
    };
}

/// Runs `$body` in a transaction `$tx` once per engine, with `$enqueue` and `$claim` bound to
/// the engine's outbox and inbox functions (and, in the second form, `$pg` telling whether the
/// engine is PostgreSQL); commits when `$body` completes without returning early, so `?` or
/// `return` inside it rolls everything back. The enclosing function's error type must convert
/// from `sqlx::Error`.
#[macro_export]
macro_rules! in_tx {
    ($db:expr, $tx:ident, $enqueue:ident, $claim:ident => $body:block) => {
        $crate::in_tx!($db, $tx, $enqueue, $claim, _is_postgres => $body)
    };
    ($db:expr, $tx:ident, $enqueue:ident, $claim:ident, $pg:ident => $body:block) => {
        match $db {
            $crate::db::Db::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                #[allow(unused_variables)]
                let $enqueue = $crate::outbox::enqueue_pg;
                #[allow(unused_variables)]
                let $claim = $crate::inbox::claim_pg;
                #[allow(unused_variables)]
                let $pg = true;
                let out = $body;
                $tx.commit().await?;
                out
            }
            $crate::db::Db::Sqlite(pool) => {
                let mut $tx = pool.begin().await?;
                #[allow(unused_variables)]
                let $enqueue = $crate::outbox::enqueue_sqlite;
                #[allow(unused_variables)]
                let $claim = $crate::inbox::claim_sqlite;
                #[allow(unused_variables)]
                let $pg = false;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}

/// Returns the current time in microseconds since the Unix epoch, the unit services store times
/// in so one SQL text serves both engines.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Converts a protobuf timestamp to microseconds since the epoch.
pub fn timestamp_micros(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos / 1_000))
}

/// Converts microseconds since the epoch to a protobuf timestamp.
pub fn micros_timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}
