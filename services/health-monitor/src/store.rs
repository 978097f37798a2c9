//! The monitor's rows: alerts (so that a restart neither re-fires nor drops one) and
//! recovery attempts. The only module that touches diesel.

use chrono::NaiveDateTime;
use common::db::{DbConnection, DbError};
use diesel::prelude::*;

use crate::schema::{alerts, recovery_attempts};

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = alerts)]
#[diesel(treat_none_as_null = true)]
pub struct AlertRow {
    pub fingerprint: String,
    pub rule: String,
    pub service: String,
    pub instance_id: Option<String>,
    pub severity: String,
    pub state: String,
    pub started_at: NaiveDateTime,
    pub resolved_at: Option<NaiveDateTime>,
    pub last_notified_at: Option<NaiveDateTime>,
    /// `{"summary": …}`.
    pub details: String,
    pub notified: String,
    pub caused_by: Option<String>,
    pub escalated_at: Option<NaiveDateTime>,
}

pub fn save_alert(conn: &mut DbConnection, row: &AlertRow) -> Result<(), DbError> {
    match conn {
        DbConnection::Postgresql(pg) => diesel::insert_into(alerts::table)
            .values(row)
            .on_conflict(alerts::fingerprint)
            .do_update()
            .set(row)
            .execute(pg)?,
        DbConnection::Sqlite(sqlite) => diesel::insert_into(alerts::table)
            .values(row)
            .on_conflict(alerts::fingerprint)
            .do_update()
            .set(row)
            .execute(sqlite)?,
    };
    Ok(())
}

/// Firing alerts, and those resolved since `resolved_since`.
pub fn load_alerts(
    conn: &mut DbConnection,
    resolved_since: NaiveDateTime,
) -> Result<Vec<AlertRow>, DbError> {
    Ok(alerts::table
        .filter(
            alerts::state
                .eq("firing")
                .or(alerts::resolved_at.ge(resolved_since)),
        )
        .select(AlertRow::as_select())
        .load(conn)?)
}

/// Forgets alerts resolved before `before` (they have been delivered or never will be).
pub fn prune_alerts(conn: &mut DbConnection, before: NaiveDateTime) -> Result<usize, DbError> {
    Ok(diesel::delete(
        alerts::table
            .filter(alerts::state.eq("resolved"))
            .filter(alerts::resolved_at.lt(before)),
    )
    .execute(conn)?)
}

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(table_name = recovery_attempts)]
pub struct RecoveryRow {
    pub id: String,
    pub service: String,
    pub instance_id: String,
    pub attempt: i32,
    /// `webhook` or `restart`.
    pub action: String,
    pub at: NaiveDateTime,
    pub outcome: String,
    pub detail: String,
}

pub fn record_recovery(conn: &mut DbConnection, row: &RecoveryRow) -> Result<(), DbError> {
    diesel::insert_into(recovery_attempts::table)
        .values(row)
        .execute(conn)?;
    Ok(())
}

pub fn recoveries_since(
    conn: &mut DbConnection,
    since: NaiveDateTime,
) -> Result<Vec<RecoveryRow>, DbError> {
    Ok(recovery_attempts::table
        .filter(recovery_attempts::at.ge(since))
        .order(recovery_attempts::at.asc())
        .select(RecoveryRow::as_select())
        .load(conn)?)
}
