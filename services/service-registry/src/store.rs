//! The registry's rows: registrations survive restarts; reads are served from memory.

use chrono::{DateTime, NaiveDateTime, Utc};
use common::api::{HealthState, Instance, ServiceName};
use common::db::{DbConnection, DbError};
use diesel::prelude::*;

use crate::schema::{health_history, instances};

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = instances)]
pub struct InstanceRow {
    pub instance_id: String,
    pub service: String,
    pub version: String,
    pub address: String,
    pub port: i32,
    pub health_endpoint: String,
    pub health: String,
    pub load: Option<f64>,
    pub weight: i32,
    pub tags: String,
    pub metadata: String,
    pub routes: String,
    pub dependencies: String,
    pub registered_at: NaiveDateTime,
    pub last_heartbeat_at: NaiveDateTime,
    pub health_since: NaiveDateTime,
    pub draining: bool,
}

fn utc(at: NaiveDateTime) -> DateTime<Utc> {
    at.and_utc()
}

fn health(text: &str) -> HealthState {
    match text {
        "healthy" => HealthState::Healthy,
        "degraded" => HealthState::Degraded,
        _ => HealthState::Offline,
    }
}

impl InstanceRow {
    pub fn from_instance(instance: &Instance) -> Self {
        Self {
            instance_id: instance.instance_id.clone(),
            service: instance.service.as_str().to_owned(),
            version: instance.version.clone(),
            address: instance.address.clone(),
            port: i32::from(instance.port),
            health_endpoint: instance.health_endpoint.clone(),
            health: instance.health.as_str().to_owned(),
            load: instance.load,
            weight: i32::try_from(instance.weight).unwrap_or(i32::MAX),
            tags: to_json(&instance.tags),
            metadata: to_json(&instance.metadata),
            routes: to_json(&instance.routes),
            dependencies: to_json(&instance.dependencies),
            registered_at: instance.registered_at.naive_utc(),
            last_heartbeat_at: instance.last_heartbeat_at.naive_utc(),
            health_since: instance.health_since.naive_utc(),
            draining: instance.draining,
        }
    }

    /// The row as the API shows it; `None` for a row this build cannot read (logged).
    pub fn into_instance(self) -> Option<Instance> {
        let parsed = (|| {
            Some(Instance {
                service: ServiceName::parse(&self.service).ok()?,
                port: u16::try_from(self.port).ok()?,
                health: health(&self.health),
                tags: serde_json::from_str(&self.tags).ok()?,
                metadata: serde_json::from_str(&self.metadata).ok()?,
                routes: serde_json::from_str(&self.routes).ok()?,
                dependencies: serde_json::from_str(&self.dependencies).ok()?,
                weight: u32::try_from(self.weight).unwrap_or(1),
                load: self.load,
                registered_at: utc(self.registered_at),
                last_heartbeat_at: utc(self.last_heartbeat_at),
                health_since: utc(self.health_since),
                draining: self.draining,
                flapping: false,
                instance_id: self.instance_id.clone(),
                version: self.version.clone(),
                address: self.address.clone(),
                health_endpoint: self.health_endpoint.clone(),
            })
        })();
        if parsed.is_none() {
            tracing::error!(instance_id = %self.instance_id, "skipping an unreadable instance row");
        }
        parsed
    }
}

/// JSON text of the list-like columns; serializing these plain values cannot fail.
fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Inserts the registration, or updates it in place when the same service holds its id;
/// `false` when another service holds it. Each statement is atomic and none writes
/// another service's row, so concurrent registrations (also through other registry
/// replicas, whose catalogs may lag) cannot take an id from its service. The insert is
/// backend SQL, so it is an explicit match on the connection.
pub fn upsert(conn: &mut DbConnection, row: &InstanceRow) -> Result<bool, DbError> {
    let update = |conn: &mut DbConnection| {
        diesel::update(
            instances::table
                .filter(instances::instance_id.eq(&row.instance_id))
                .filter(instances::service.eq(&row.service)),
        )
        .set(row)
        .execute(conn)
    };
    if update(conn)? == 1 {
        return Ok(true);
    }
    let inserted = match conn {
        DbConnection::Postgresql(pg) => diesel::insert_into(instances::table)
            .values(row)
            .on_conflict_do_nothing()
            .execute(pg)?,
        DbConnection::Sqlite(sqlite) => diesel::insert_into(instances::table)
            .values(row)
            .on_conflict_do_nothing()
            .execute(sqlite)?,
    };
    // Nothing inserted: the id is taken, by this service's registration that came in
    // meanwhile (update it), or by another's.
    Ok(inserted == 1 || update(conn)? == 1)
}

pub fn all(conn: &mut DbConnection) -> Result<Vec<InstanceRow>, DbError> {
    Ok(instances::table
        .order(instances::instance_id.asc())
        .select(InstanceRow::as_select())
        .load(conn)?)
}

pub fn find(conn: &mut DbConnection, id: &str) -> Result<Option<InstanceRow>, DbError> {
    Ok(instances::table
        .find(id)
        .select(InstanceRow::as_select())
        .first(conn)
        .optional()?)
}

/// The last heartbeat of each of `instance_ids` that is still registered.
pub fn last_heartbeats(
    conn: &mut DbConnection,
    instance_ids: &[String],
) -> Result<Vec<(String, NaiveDateTime)>, DbError> {
    Ok(instances::table
        .filter(instances::instance_id.eq_any(instance_ids))
        .select((instances::instance_id, instances::last_heartbeat_at))
        .load(conn)?)
}

pub fn heartbeat(
    conn: &mut DbConnection,
    id: &str,
    at: NaiveDateTime,
    load: Option<f64>,
) -> Result<usize, DbError> {
    let target = instances::table.find(id);
    let updated = match load {
        Some(load) => diesel::update(target)
            .set((
                instances::last_heartbeat_at.eq(at),
                instances::load.eq(Some(load)),
            ))
            .execute(conn)?,
        None => diesel::update(target)
            .set(instances::last_heartbeat_at.eq(at))
            .execute(conn)?,
    };
    Ok(updated)
}

pub fn set_health(
    conn: &mut DbConnection,
    id: &str,
    state: HealthState,
    since: NaiveDateTime,
) -> Result<usize, DbError> {
    Ok(diesel::update(instances::table.find(id))
        .set((
            instances::health.eq(state.as_str()),
            instances::health_since.eq(since),
        ))
        .execute(conn)?)
}

pub fn delete(conn: &mut DbConnection, id: &str) -> Result<usize, DbError> {
    Ok(diesel::delete(instances::table.find(id)).execute(conn)?)
}

/// Deletes a service's instances and names the ones deleted, in one statement: an
/// instance registered meanwhile is either named or left, never deleted unnamed.
pub fn delete_service(conn: &mut DbConnection, service: &str) -> Result<Vec<String>, DbError> {
    let target = instances::table.filter(instances::service.eq(service));
    let ids = match conn {
        DbConnection::Postgresql(pg) => diesel::delete(target)
            .returning(instances::instance_id)
            .get_results::<String>(pg)?,
        DbConnection::Sqlite(sqlite) => diesel::delete(target)
            .returning(instances::instance_id)
            .get_results::<String>(sqlite)?,
    };
    Ok(ids)
}

/// One state change of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = health_history)]
pub struct Transition {
    #[serde(skip)]
    pub id: i64,
    #[serde(skip)]
    pub instance_id: String,
    #[serde(skip)]
    pub service: String,
    #[serde(serialize_with = "serialize_utc")]
    pub at: NaiveDateTime,
    #[serde(rename = "from")]
    pub from_state: Option<String>,
    #[serde(rename = "to")]
    pub to_state: String,
    pub reason: String,
}

fn serialize_utc<S: serde::Serializer>(at: &NaiveDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        &at.and_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    )
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = health_history)]
pub struct NewTransition<'a> {
    pub instance_id: &'a str,
    pub service: &'a str,
    pub at: NaiveDateTime,
    pub from_state: Option<&'a str>,
    pub to_state: &'a str,
    pub reason: &'a str,
}

pub fn record_transition(
    conn: &mut DbConnection,
    transition: &NewTransition<'_>,
) -> Result<(), DbError> {
    diesel::insert_into(health_history::table)
        .values(transition)
        .execute(conn)?;
    Ok(())
}

/// An instance's transitions, oldest first, at most the last `limit`.
pub fn history(
    conn: &mut DbConnection,
    instance_id: &str,
    limit: i64,
) -> Result<Vec<Transition>, DbError> {
    let mut newest: Vec<Transition> = health_history::table
        .filter(health_history::instance_id.eq(instance_id))
        .order((health_history::at.desc(), health_history::id.desc()))
        .limit(limit)
        .select(Transition::as_select())
        .load(conn)?;
    newest.reverse();
    Ok(newest)
}

/// Whether `instance_id`'s latest transition was for a reason starting with `reason`.
pub fn last_moved_for(
    conn: &mut DbConnection,
    instance_id: &str,
    reason: &str,
) -> Result<bool, DbError> {
    let latest: Option<String> = health_history::table
        .filter(health_history::instance_id.eq(instance_id))
        .order((health_history::at.desc(), health_history::id.desc()))
        .select(health_history::reason)
        .first(conn)
        .optional()?;
    Ok(latest.is_some_and(|why| why.starts_with(reason)))
}

pub fn prune_history(conn: &mut DbConnection, before: NaiveDateTime) -> Result<usize, DbError> {
    Ok(
        diesel::delete(health_history::table.filter(health_history::at.lt(before)))
            .execute(conn)?,
    )
}

pub fn set_draining(conn: &mut DbConnection, id: &str, draining: bool) -> Result<usize, DbError> {
    Ok(diesel::update(instances::table.find(id))
        .set(instances::draining.eq(draining))
        .execute(conn)?)
}
