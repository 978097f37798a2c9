//! The audit log: append-only, hash-chained, and written before any answer goes out.
//!
//! One writer task per process appends every record. It takes what has queued up into a
//! single transaction (group commit), under a lock that serializes writers across
//! processes, so that the chain stays linear. A change to the vault's data runs inside
//! the same transaction as its record: if the record cannot be written, the change does
//! not happen either, and the caller answers 503 (HashiCorp Vault's rule).

use std::time::Instant;

use chrono::{NaiveDateTime, SubsecRound, Utc};
use common::db::{Db, DbConnection, DbError, HeldConnection};
use diesel::prelude::*;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::crypto::AuditHasher;
use crate::metrics::VaultMetrics;
use crate::schema::audit_log;
use crate::store::StoreError;

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How many queued requests one transaction takes at most.
const MAX_BATCH: usize = 256;

/// How a request ended, as the record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// No or an invalid token.
    Unauthenticated,
    /// A valid token without the right to do this.
    Denied,
    NotFound,
    Conflict,
    Invalid,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Unauthenticated => "unauthenticated",
            Self::Denied => "denied",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Invalid => "invalid",
            Self::Error => "error",
        }
    }

    /// The outcome a store error stands for.
    pub fn of_error(error: &StoreError) -> Self {
        match error {
            StoreError::NotFound => Self::NotFound,
            StoreError::Conflict(_) => Self::Conflict,
            StoreError::Invalid(_) => Self::Invalid,
            StoreError::Db(_) | StoreError::Crypto(_) | StoreError::Corrupt(_) => Self::Error,
        }
    }
}

/// One record before it joins the chain. Never holds a secret value: tokens and token
/// ids are HMAC'd by the caller (see `AuditHasher`).
#[derive(Debug, Clone)]
pub struct Entry {
    pub actor: String,
    pub action: &'static str,
    pub resource: String,
    pub outcome: Outcome,
    pub request_id: String,
    pub client_addr: String,
}

/// A stored record, as `GET /api/audit` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable, Serialize)]
#[diesel(table_name = audit_log)]
pub struct Record {
    pub seq: i64,
    #[serde(serialize_with = "serialize_utc")]
    pub at: NaiveDateTime,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub outcome: String,
    pub request_id: String,
    pub client_addr: String,
    pub prev_hash: String,
    pub hash: String,
}

fn serialize_utc<S: serde::Serializer>(at: &NaiveDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        &at.and_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    )
}

/// The chain link: HMAC-SHA256, under the vault's audit key, over the previous hash and
/// every field, each length-prefixed so that no two records share an encoding. Keyed, so
/// that someone who can write the database but holds no master key cannot rewrite a
/// record and recompute the links after it.
pub fn chain_hash(key: &AuditHasher, record: &Record) -> String {
    let at = record.at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
    let seq = record.seq.to_string();
    let mut context = key.chain_context();
    for field in [
        record.prev_hash.as_str(),
        seq.as_str(),
        at.as_str(),
        record.actor.as_str(),
        record.action.as_str(),
        record.resource.as_str(),
        record.outcome.as_str(),
        record.request_id.as_str(),
        record.client_addr.as_str(),
    ] {
        context.update(&(field.len() as u64).to_be_bytes());
        context.update(field.as_bytes());
    }
    crate::crypto::hex(context.sign().as_ref())
}

/// The record could not be written: the request must fail with 503, its effect undone.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the audit log cannot be written: {0}")]
pub struct AuditUnavailable(pub String);

type Deliver = Box<dyn FnOnce(Result<(), AuditUnavailable>) + Send>;
type Work = Box<dyn FnOnce(&mut DbConnection) -> (Option<Entry>, Deliver) + Send>;

/// What the writer is asked to do.
enum Job {
    /// Only a record (a read, a refusal): it can be re-chained and retried, so a batch of
    /// these takes the fast path, one INSERT with no explicit transaction.
    Record(Entry, oneshot::Sender<Result<(), AuditUnavailable>>),
    /// A change and its record, in one transaction under the chain lock.
    Change(Work),
}

/// The handle requests append through; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    jobs: mpsc::Sender<Job>,
}

impl AuditLog {
    /// Starts the writer on `db`: a thread of its own, so that a batch goes from the
    /// queue to the database and back without hopping between async and blocking
    /// threads (each hop a wake-up and a context switch, per batch).
    pub fn start(db: Db, metrics: VaultMetrics, key: AuditHasher) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>(4 * MAX_BATCH);
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(&db, queue, &metrics, &key))?;
        Ok(Self { jobs })
    }

    /// Appends `entry`; `Ok` once it is committed.
    pub async fn record(&self, entry: Entry) -> Result<(), AuditUnavailable> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Record(entry, tx), rx).await
    }

    async fn submit<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, AuditUnavailable>>,
    ) -> Result<T, AuditUnavailable> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| AuditUnavailable("the audit writer has stopped".into()))?;
        rx.await
            .map_err(|_| AuditUnavailable("the audit writer dropped the request".into()))?
    }

    /// Runs `change` and appends the record `describe` makes of its result, in one
    /// transaction. The outer error means neither happened; the inner one is the change's
    /// own (a conflict, a missing row), recorded and undone.
    pub async fn execute<T, F, D>(
        &self,
        change: F,
        describe: D,
    ) -> Result<Result<T, StoreError>, AuditUnavailable>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(&Result<T, StoreError>) -> Entry + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let work: Work = Box::new(move |conn: &mut DbConnection| {
            // A savepoint: a failed change leaves no trace, but its record still goes in.
            let result = conn.transaction(|conn| change(conn));
            let entry = describe(&result);
            let deliver: Deliver = Box::new(move |committed| {
                let _ = tx.send(committed.map(|()| result));
            });
            (Some(entry), deliver)
        });
        self.submit(Job::Change(work), rx).await
    }
}

/// The last record a writer knows to be committed: the next one links to it.
type Head = Option<(i64, String)>;

/// Takes what has queued up, appends it as one batch, tells each caller; until every
/// handle is gone. While more is queued it keeps its connection for the next batch (a
/// checkout costs the pool's test query); once the queue is empty, or after an error, the
/// connection goes back to the pool, so that a busy writer never starves the readers
/// and a broken connection is replaced by a tested one.
fn writer(db: &Db, mut queue: mpsc::Receiver<Job>, metrics: &VaultMetrics, key: &AuditHasher) {
    let mut head: Head = None;
    let mut held: Option<HeldConnection> = None;
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let started = Instant::now();
        let known = head.take();
        let conn = match held.take() {
            Some(conn) => Ok(conn),
            None => db.hold(),
        };
        let written = conn.and_then(|mut conn| {
            // A change that panics fails its batch (the callers hear "dropped" and
            // answer 503), not the writer: the next batch starts from the database's head.
            let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_batch(&mut conn, key, batch, known)
            }))
            .map_err(|_| DbError::TaskFailed)?;
            if written.1.is_ok() && !queue.is_empty() {
                held = Some(conn);
            }
            Ok(written)
        });
        metrics.observe_audit_batch(size, started.elapsed());
        match written {
            Ok((delivers, Ok(last))) => {
                head = Some(last);
                for deliver in delivers {
                    deliver(Ok(()));
                }
            }
            Ok((delivers, Err(error))) => {
                metrics.audit_failures.inc_by(delivers.len() as u64);
                tracing::error!(%error, requests = delivers.len(), "audit append failed; refusing the requests");
                let failure = AuditUnavailable(error.to_string());
                for deliver in delivers {
                    deliver(Err(failure.clone()));
                }
            }
            Err(error) => {
                // No connection: the batch was dropped unrun, so its callers see
                // "dropped" and answer 503.
                metrics.audit_failures.inc_by(size as u64);
                tracing::error!(%error, requests = size, "audit append failed: no database connection");
            }
        }
    }
}

/// Links `entries` to `head`, each record's hash covering the one before.
fn chain(key: &AuditHasher, entries: &[Entry], head: &(i64, String)) -> Vec<Record> {
    let (mut seq, mut prev_hash) = head.clone();
    entries
        .iter()
        .map(|entry| {
            seq += 1;
            let mut record = Record {
                seq,
                at: Utc::now().naive_utc().trunc_subsecs(6),
                actor: entry.actor.clone(),
                action: entry.action.to_owned(),
                resource: entry.resource.clone(),
                outcome: entry.outcome.as_str().to_owned(),
                request_id: entry.request_id.clone(),
                client_addr: entry.client_addr.clone(),
                prev_hash: std::mem::take(&mut prev_hash),
                hash: String::new(),
            };
            record.hash = chain_hash(key, &record);
            prev_hash.clone_from(&record.hash);
            record
        })
        .collect()
}

/// One multi-row INSERT; batch inserts are per backend, MultiConnection has none.
fn insert(conn: &mut DbConnection, records: &[Record]) -> Result<(), DbError> {
    match conn {
        DbConnection::Postgresql(pg) => diesel::insert_into(audit_log::table)
            .values(records)
            .execute(pg)?,
        DbConnection::Sqlite(sqlite) => diesel::insert_into(audit_log::table)
            .values(records)
            .execute(sqlite)?,
    };
    Ok(())
}

fn last_of(records: &[Record], head: (i64, String)) -> (i64, String) {
    records.last().map_or(head, |r| (r.seq, r.hash.clone()))
}

fn is_seq_conflict(error: &DbError) -> bool {
    matches!(
        error,
        DbError::Query(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation,
            _
        ))
    )
}

/// Appends a batch and returns the new head. The deliveries come back whatever
/// happened, so that every caller hears the outcome.
fn write_batch(
    conn: &mut DbConnection,
    key: &AuditHasher,
    batch: Vec<Job>,
    known: Head,
) -> (Vec<Deliver>, Result<(i64, String), DbError>) {
    if batch.iter().all(|job| matches!(job, Job::Record(..))) {
        let (entries, delivers): (Vec<Entry>, Vec<Deliver>) = batch
            .into_iter()
            .filter_map(|job| match job {
                Job::Record(entry, tx) => {
                    let deliver: Deliver = Box::new(move |committed| {
                        let _ = tx.send(committed);
                    });
                    Some((entry, deliver))
                }
                Job::Change(_) => None,
            })
            .unzip();
        return (delivers, append_records(conn, key, &entries, known));
    }
    let mut delivers = Vec::with_capacity(batch.len());
    let result = conn.transaction(|conn| {
        lock_chain(conn)?;
        let head = head(conn)?;
        let mut entries = Vec::with_capacity(batch.len());
        for job in batch {
            let (entry, deliver) = match job {
                Job::Change(work) => work(conn),
                Job::Record(entry, tx) => (
                    Some(entry),
                    Box::new(move |committed| {
                        let _ = tx.send(committed);
                    }) as Deliver,
                ),
            };
            delivers.push(deliver);
            entries.extend(entry);
        }
        let records = chain(key, &entries, &head);
        insert(conn, &records)?;
        Ok::<_, DbError>(last_of(&records, head))
    });
    (delivers, result)
}

/// The fast path: one INSERT linked to the head this writer last committed. Another
/// process that appended meanwhile makes the first `seq` collide (the primary key); then
/// the records are re-linked to the real head and tried again. The INSERT takes the
/// chain lock itself (a statement trigger on PostgreSQL, the write lock on SQLite), so it
/// never slips between another writer's head read and its commit.
fn append_records(
    conn: &mut DbConnection,
    key: &AuditHasher,
    entries: &[Entry],
    known: Head,
) -> Result<(i64, String), DbError> {
    let mut head = match known {
        Some(head) => head,
        None => head(conn)?,
    };
    for _ in 0..8 {
        let records = chain(key, entries, &head);
        match insert(conn, &records) {
            Ok(()) => return Ok(last_of(&records, head)),
            Err(error) if is_seq_conflict(&error) => head = self::head(conn)?,
            Err(error) => return Err(error),
        }
    }
    Err(DbError::Unavailable(
        "the audit chain kept moving under this writer".into(),
    ))
}

/// Serializes appenders across processes, so that two never extend the chain from the
/// same head: an advisory lock on PostgreSQL, the database write lock on SQLite.
fn lock_chain(conn: &mut DbConnection) -> Result<(), DbError> {
    match conn {
        DbConnection::Postgresql(_) => {
            diesel::sql_query("SELECT pg_advisory_xact_lock(7395412)").execute(conn)?;
        }
        DbConnection::Sqlite(_) => {
            // A write before any read upgrades the transaction to a write transaction
            // now, while waiting (busy_timeout) is still possible.
            diesel::sql_query("UPDATE audit_log SET seq = seq WHERE 0 = 1").execute(conn)?;
        }
    }
    Ok(())
}

fn head(conn: &mut DbConnection) -> Result<(i64, String), DbError> {
    let last = audit_log::table
        .select((audit_log::seq, audit_log::hash))
        .order(audit_log::seq.desc())
        .first::<(i64, String)>(conn)
        .optional()?;
    Ok(last.unwrap_or_else(|| (0, GENESIS.to_owned())))
}

/// What `GET /api/audit/verify` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub ok: bool,
    pub records: i64,
    /// The first record that does not link up, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_broken: Option<Broken>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    pub seq: i64,
    pub reason: &'static str,
}

/// Walks the whole chain in order, page by page.
pub fn verify(conn: &mut DbConnection, key: &AuditHasher) -> Result<Verification, DbError> {
    const PAGE: i64 = 1000;
    let mut expected_seq = 1;
    let mut prev_hash = GENESIS.to_owned();
    let mut records = 0;
    loop {
        let page: Vec<Record> = audit_log::table
            .filter(audit_log::seq.ge(expected_seq))
            .order(audit_log::seq.asc())
            .limit(PAGE)
            .select(Record::as_select())
            .load(conn)?;
        let full = page.len() as i64 == PAGE;
        for record in page {
            let broken = if record.seq != expected_seq {
                // A gap: the record expected here was deleted.
                Some(Broken {
                    seq: expected_seq,
                    reason: "missing",
                })
            } else if record.prev_hash != prev_hash {
                Some(Broken {
                    seq: record.seq,
                    reason: "prev_hash does not match the previous record",
                })
            } else if chain_hash(key, &record) != record.hash {
                Some(Broken {
                    seq: record.seq,
                    reason: "modified",
                })
            } else {
                None
            };
            if let Some(broken) = broken {
                return Ok(Verification {
                    ok: false,
                    records,
                    first_broken: Some(broken),
                });
            }
            records += 1;
            expected_seq = record.seq + 1;
            prev_hash = record.hash;
        }
        if !full {
            return Ok(Verification {
                ok: true,
                records,
                first_broken: None,
            });
        }
    }
}

/// Filters for `GET /api/audit`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Records whose actor starts with this (a subject, optionally with its token's HMAC).
    pub actor_prefix: Option<String>,
    pub resource: Option<String>,
    pub since: Option<NaiveDateTime>,
    pub until: Option<NaiveDateTime>,
    pub after_seq: i64,
    pub limit: i64,
}

pub fn records(conn: &mut DbConnection, filter: &Filter) -> Result<Vec<Record>, DbError> {
    let mut query = audit_log::table
        .filter(audit_log::seq.gt(filter.after_seq))
        .order(audit_log::seq.asc())
        .limit(filter.limit)
        .select(Record::as_select())
        .into_boxed();
    if let Some(prefix) = &filter.actor_prefix {
        query = query.filter(
            audit_log::actor
                .like(common::db::like_prefix(prefix))
                .escape('\\'),
        );
    }
    if let Some(resource) = &filter.resource {
        query = query.filter(audit_log::resource.eq(resource.clone()));
    }
    if let Some(since) = filter.since {
        query = query.filter(audit_log::at.ge(since));
    }
    if let Some(until) = filter.until {
        query = query.filter(audit_log::at.lt(until));
    }
    Ok(query.load(conn)?)
}
