//! One SQL text, two engines. Statements are written once with `$1`-style parameters (both
//! PostgreSQL and sqlx's SQLite driver number them the same way) and run inside a [`Tx`] on
//! whichever engine the service uses. The few differences are explicit: PostgreSQL locks rows
//! with `FOR UPDATE [SKIP LOCKED]`; SQLite has one writer at a time, taken at `BEGIN IMMEDIATE`.

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{FromRow, PgConnection, Postgres, Sqlite, SqliteConnection, Transaction};

use tandem_platform::bus::RawEvent;
use tandem_platform::db::Db;
use tandem_platform::{inbox, outbox};

/// A statement: the same on both engines, or one text per engine.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Sql {
    /// The same text everywhere.
    Same(&'static str),
    /// Engine-specific texts.
    Each {
        /// For PostgreSQL.
        pg: &'static str,
        /// For SQLite.
        sqlite: &'static str,
    },
}

impl From<&'static str> for Sql {
    fn from(text: &'static str) -> Self {
        Sql::Same(text)
    }
}

impl Sql {
    fn pg(self) -> &'static str {
        match self {
            Sql::Same(text) | Sql::Each { pg: text, .. } => text,
        }
    }

    fn sqlite(self) -> &'static str {
        match self {
            Sql::Same(text) | Sql::Each { sqlite: text, .. } => text,
        }
    }
}

/// A statement that locks the rows it reads on PostgreSQL (`FOR UPDATE` appended) and relies on
/// the single writer on SQLite.
macro_rules! locking {
    ($sql:expr) => {
        $crate::store::sql::Sql::Each {
            pg: concat!($sql, " FOR UPDATE"),
            sqlite: $sql,
        }
    };
}

/// Like `locking!`, but PostgreSQL skips rows another transaction holds (`SKIP LOCKED`), so
/// replicas claiming work never wait for each other.
macro_rules! claiming {
    ($sql:expr) => {
        $crate::store::sql::Sql::Each {
            pg: concat!($sql, " FOR UPDATE SKIP LOCKED"),
            sqlite: $sql,
        }
    };
}

pub(crate) use {claiming, locking};

/// A bound parameter.
#[derive(Clone, Debug)]
pub(crate) enum Arg {
    I64(i64),
    OptI64(Option<i64>),
    F64(f64),
    Bool(bool),
    Text(String),
    OptText(Option<String>),
    Bytes(Vec<u8>),
}

impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::I64(v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::I64(i64::from(v))
    }
}
impl From<Option<i64>> for Arg {
    fn from(v: Option<i64>) -> Self {
        Arg::OptI64(v)
    }
}
impl From<f64> for Arg {
    fn from(v: f64) -> Self {
        Arg::F64(v)
    }
}
impl From<bool> for Arg {
    fn from(v: bool) -> Self {
        Arg::Bool(v)
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Self {
        Arg::Text(v)
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Arg::Text(v.clone())
    }
}
impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(v.to_owned())
    }
}
impl From<Option<String>> for Arg {
    fn from(v: Option<String>) -> Self {
        Arg::OptText(v)
    }
}
impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Self {
        Arg::OptText(v.map(str::to_owned))
    }
}
impl From<Vec<u8>> for Arg {
    fn from(v: Vec<u8>) -> Self {
        Arg::Bytes(v)
    }
}

/// Builds a parameter list: `args![tenant, id, now]`.
macro_rules! args {
    ($($value:expr),* $(,)?) => {
        vec![$($crate::store::sql::Arg::from($value)),*]
    };
}
pub(crate) use args;

macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Arg::I64(v) => query.bind(v),
                Arg::OptI64(v) => query.bind(v),
                Arg::F64(v) => query.bind(v),
                Arg::Bool(v) => query.bind(v),
                Arg::Text(v) => query.bind(v),
                Arg::OptText(v) => query.bind(v),
                Arg::Bytes(v) => query.bind(v),
            };
        }
        query
    }};
}

/// A row type readable from both engines (what `#[derive(sqlx::FromRow)]` gives).
pub(crate) trait AnyRow:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}
impl<T> AnyRow for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

/// A transaction on either engine (or, for reads on PostgreSQL, a plain connection).
pub(crate) enum Tx {
    Pg(Transaction<'static, Postgres>),
    /// PostgreSQL statements without `BEGIN`/`COMMIT`, each its own snapshot ([`Tx::reads`]).
    PgReads(PoolConnection<Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// The connection under a [`Tx`].
enum Conn<'a> {
    Pg(&'a mut PgConnection),
    Sqlite(&'a mut SqliteConnection),
}

impl Tx {
    /// Begins a transaction that writes. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so a read-then-write inside it can never be overtaken.
    pub(crate) async fn write(db: &Db) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Db::Postgres(pool) => Tx::Pg(pool.begin().await?),
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// Reads without a transaction on PostgreSQL: each statement runs on its own (what a
    /// READ COMMITTED transaction gives a series of reads anyway) and the `BEGIN` and `COMMIT`
    /// round trips are saved. On SQLite, a read transaction as [`Tx::read`]. Only for reads
    /// whose statements need not see one snapshot.
    pub(crate) async fn reads(db: &Db) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Db::Postgres(pool) => Tx::PgReads(pool.acquire().await?),
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
        })
    }

    fn conn(&mut self) -> Conn<'_> {
        match self {
            Tx::Pg(tx) => Conn::Pg(tx),
            Tx::PgReads(conn) => Conn::Pg(conn),
            Tx::Sqlite(tx) => Conn::Sqlite(tx),
        }
    }

    /// Begins a transaction that only reads.
    pub(crate) async fn read(db: &Db) -> Result<Self, sqlx::Error> {
        Ok(match db {
            Db::Postgres(pool) => Tx::Pg(pool.begin().await?),
            Db::Sqlite(pool) => Tx::Sqlite(pool.begin().await?),
        })
    }

    /// Runs a statement; returns the rows affected.
    pub(crate) async fn execute(
        &mut self,
        sql: impl Into<Sql>,
        args: Vec<Arg>,
    ) -> Result<u64, sqlx::Error> {
        let sql = sql.into();
        Ok(match self.conn() {
            Conn::Pg(tx) => bind_all!(sqlx::query(sql.pg()), args)
                .execute(tx)
                .await?
                .rows_affected(),
            Conn::Sqlite(tx) => bind_all!(sqlx::query(sql.sqlite()), args)
                .execute(tx)
                .await?
                .rows_affected(),
        })
    }

    /// Runs a statement built at run time (the same text on both engines, e.g. a multi-row
    /// `VALUES` list); returns the rows affected. The text must hold only parameter
    /// references (`$n`) and SQL of this crate, never values.
    pub(crate) async fn execute_text(
        &mut self,
        text: &str,
        args: Vec<Arg>,
    ) -> Result<u64, sqlx::Error> {
        Ok(match self.conn() {
            Conn::Pg(tx) => bind_all!(sqlx::query(sqlx::AssertSqlSafe(text.to_owned())), args)
                .execute(tx)
                .await?
                .rows_affected(),
            Conn::Sqlite(tx) => bind_all!(sqlx::query(sqlx::AssertSqlSafe(text.to_owned())), args)
                .execute(tx)
                .await?
                .rows_affected(),
        })
    }

    /// Returns every row of a statement built at run time (the same text on both engines).
    pub(crate) async fn fetch_all_text<T: AnyRow>(
        &mut self,
        text: &str,
        args: Vec<Arg>,
    ) -> Result<Vec<T>, sqlx::Error> {
        match self.conn() {
            Conn::Pg(tx) => {
                bind_all!(
                    sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(text.to_owned())),
                    args
                )
                .fetch_all(tx)
                .await
            }
            Conn::Sqlite(tx) => {
                bind_all!(
                    sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(text.to_owned())),
                    args
                )
                .fetch_all(tx)
                .await
            }
        }
    }

    /// Whether this transaction runs on PostgreSQL.
    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self, Tx::Pg(_) | Tx::PgReads(_))
    }

    /// Returns every row.
    pub(crate) async fn fetch_all<T: AnyRow>(
        &mut self,
        sql: impl Into<Sql>,
        args: Vec<Arg>,
    ) -> Result<Vec<T>, sqlx::Error> {
        let sql = sql.into();
        match self.conn() {
            Conn::Pg(tx) => {
                bind_all!(sqlx::query_as::<_, T>(sql.pg()), args)
                    .fetch_all(tx)
                    .await
            }
            Conn::Sqlite(tx) => {
                bind_all!(sqlx::query_as::<_, T>(sql.sqlite()), args)
                    .fetch_all(tx)
                    .await
            }
        }
    }

    /// Returns the first row, if any.
    pub(crate) async fn fetch_optional<T: AnyRow>(
        &mut self,
        sql: impl Into<Sql>,
        args: Vec<Arg>,
    ) -> Result<Option<T>, sqlx::Error> {
        let sql = sql.into();
        match self.conn() {
            Conn::Pg(tx) => {
                bind_all!(sqlx::query_as::<_, T>(sql.pg()), args)
                    .fetch_optional(tx)
                    .await
            }
            Conn::Sqlite(tx) => {
                bind_all!(sqlx::query_as::<_, T>(sql.sqlite()), args)
                    .fetch_optional(tx)
                    .await
            }
        }
    }

    /// Returns a single `BIGINT` (e.g. a `COUNT(*)`).
    pub(crate) async fn fetch_i64(
        &mut self,
        sql: impl Into<Sql>,
        args: Vec<Arg>,
    ) -> Result<i64, sqlx::Error> {
        let row: Option<(i64,)> = self.fetch_optional(sql, args).await?;
        Ok(row.map_or(0, |(v,)| v))
    }

    /// Writes events to the outbox in this transaction.
    pub(crate) async fn enqueue(&mut self, events: &[RawEvent]) -> Result<(), sqlx::Error> {
        match self.conn() {
            Conn::Pg(tx) => outbox::enqueue_pg(tx, events).await,
            Conn::Sqlite(tx) => outbox::enqueue_sqlite(tx, events).await,
        }
    }

    /// Records that `consumer` handles `event_id` in this transaction; false if it did already.
    pub(crate) async fn claim(
        &mut self,
        consumer: &str,
        event_id: &str,
    ) -> Result<bool, sqlx::Error> {
        match self.conn() {
            Conn::Pg(tx) => inbox::claim_pg(tx, consumer, event_id).await,
            Conn::Sqlite(tx) => inbox::claim_sqlite(tx, consumer, event_id).await,
        }
    }

    /// Commits.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Pg(tx) => tx.commit().await,
            Tx::PgReads(_) => Ok(()),
            Tx::Sqlite(tx) => tx.commit().await,
        }
    }
}
