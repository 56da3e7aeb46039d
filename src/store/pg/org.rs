//! The organisation's inventory on PostgreSQL: the twins of `store/org.rs`'s statements.
//! What a page writes is decided by the same code on both backends
//! ([`plan_org_page`](super::super::org::plan_org_page)); only the SQL differs here.
//!
//! Apple's attributes keep their columns (text, lists as JSON text, booleans as boolean).
//! A value its column cannot hold exactly (a number where text is documented, a boolean
//! that is not one, a NUL character, which PostgreSQL's text refuses) is kept in
//! `extra_json` under Apple's attribute name, and wins when the row is read back: a
//! column's own attribute is never among the extra attributes otherwise.

use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::Transaction;
use serde_json::{Map, Value};

use super::super::device_row::extra_json as ade_extra_json;
use super::super::events::encode_snapshot;
use super::super::org::{
    device_columns, owes_release, page_items, plan_org_page, remove_unlisted, seen_key, OrgCounts,
    OrgDeviceFilter, OrgPageStats, OrgPlan, OrgWalk, StoredDigest, StoredOrgDevice, WalkPhase,
    WALK_COLUMNS,
};
use super::super::StoreError;
use super::write::{
    device_from_row as ade_device_from_row, insert_events, load_seen, lock_event_order, mark_seen,
    PendingEvent, PG_DEVICE_COLUMNS,
};
use super::Pg;
use crate::events::EventScope;
use crate::model::{EventKind, Reason};
use crate::orgapi::device::{Shape, COVERAGE_COLUMNS, ORG_COLUMNS};
use crate::orgapi::{Coverage, MdmServer, OrgDevice, RawResource};

type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

/// Text as PostgreSQL can hold it (a NUL becomes U+FFFD).
fn pg_text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// One column's values for a page, bound as an array (`UNNEST`).
enum ColumnArray {
    Text(Vec<Option<String>>),
    Flag(Vec<Option<bool>>),
}

impl ColumnArray {
    fn new(shape: Shape, n: usize) -> Self {
        match shape {
            Shape::Bool => ColumnArray::Flag(Vec::with_capacity(n)),
            _ => ColumnArray::Text(Vec::with_capacity(n)),
        }
    }

    fn sql_type(&self) -> &'static str {
        match self {
            ColumnArray::Text(_) => "text[]",
            ColumnArray::Flag(_) => "bool[]",
        }
    }

    /// Appends `v` as the column holds it; false when the column cannot hold it exactly.
    fn push(&mut self, v: &Value, shape: Shape) -> bool {
        match self {
            ColumnArray::Flag(col) => match v {
                Value::Bool(b) => {
                    col.push(Some(*b));
                    true
                }
                Value::Null => {
                    col.push(None);
                    true
                }
                _ => {
                    col.push(None);
                    false
                }
            },
            ColumnArray::Text(col) => {
                let (text, exact) = match v {
                    Value::Null => (None, true),
                    Value::String(s) => {
                        // A string that reads back as a list would come back as one.
                        let looks_like_list = shape == Shape::List
                            && s.starts_with('[')
                            && serde_json::from_str::<Value>(s).is_ok();
                        (Some(pg_text(s)), !s.contains('\0') && !looks_like_list)
                    }
                    Value::Array(_) if shape == Shape::List => (Some(v.to_string()), true),
                    other => (Some(other.to_string()), false),
                };
                col.push(text);
                exact
            }
        }
    }

    fn as_param(&self) -> &(dyn ToSql + Sync) {
        match self {
            ColumnArray::Text(v) => v,
            ColumnArray::Flag(v) => v,
        }
    }
}

/// A column read back as the value it holds (see [`ColumnArray::push`]).
fn read_cell(r: &postgres::Row, i: usize, shape: Shape) -> Result<Value, postgres::Error> {
    Ok(match shape {
        Shape::Bool => r
            .try_get::<_, Option<bool>>(i)?
            .map_or(Value::Null, Value::Bool),
        Shape::List => match r.try_get::<_, Option<String>>(i)? {
            None => Value::Null,
            Some(t) if t.starts_with('[') => serde_json::from_str(&t).unwrap_or(Value::String(t)),
            Some(t) => Value::String(t),
        },
        Shape::Scalar => r
            .try_get::<_, Option<String>>(i)?
            .map_or(Value::Null, Value::String),
    })
}

/// `extra_json` as stored here: the extra attributes, plus the values kept exactly
/// (`odd`: Apple's attribute, value).
fn stored_extra(extra: &Map<String, Value>, odd: Vec<(&str, Value)>) -> Option<String> {
    if extra.is_empty() && odd.is_empty() {
        return None;
    }
    let mut m = extra.clone();
    for (attr, v) in odd {
        m.insert(attr.to_owned(), v);
    }
    Some(Value::Object(m).to_string())
}

/// Values read from columns `start..` (one per `columns` entry) and `extra_json` text:
/// the values (exact ones winning) and the remaining extra attributes.
fn read_values(
    r: &postgres::Row,
    start: usize,
    columns: &[(&str, &str, Shape)],
    extra: Option<String>,
) -> Result<(Vec<Value>, Map<String, Value>), postgres::Error> {
    let mut extra = extra
        .and_then(|e| serde_json::from_str::<Map<String, Value>>(&e).ok())
        .unwrap_or_default();
    let mut values = Vec::with_capacity(columns.len());
    for (i, (_, attr, shape)) in columns.iter().enumerate() {
        let v = match extra.remove(*attr) {
            Some(exact) => exact,
            None => read_cell(r, start + i, *shape)?,
        };
        values.push(v);
    }
    Ok((values, extra))
}

/// `device_columns()` with `extra_json` as text.
fn pg_device_columns() -> String {
    device_columns().replace("extra_json", "extra_json::text")
}

fn device_from_row(r: &postgres::Row) -> Result<StoredOrgDevice, postgres::Error> {
    let n = 1 + ORG_COLUMNS.len();
    let (values, extra) = read_values(r, 1, &ORG_COLUMNS, r.try_get(n)?)?;
    Ok(StoredOrgDevice {
        device: OrgDevice {
            serial_number: r.try_get(0)?,
            values,
            extra,
            server_id: r.try_get(n + 1)?,
            server_name: r.try_get(n + 2)?,
        },
        account: r.try_get(n + 3)?,
        first_seen_at: r.try_get(n + 4)?,
        updated_at: r.try_get(n + 5)?,
        removed_at: r.try_get(n + 6)?,
    })
}

fn walk_from_row(r: &postgres::Row) -> OrgWalk {
    OrgWalk {
        account: r.get(0),
        walk_run: r.get(1),
        phase: if r.get::<_, &str>(2) == "devices" {
            WalkPhase::Devices
        } else {
            WalkPhase::Servers
        },
        server_index: r.get(3),
        cursor: r.get(4),
        last_run_at: r.get(5),
        last_success_at: r.get(6),
        last_complete_at: r.get(7),
        last_walk_devices: r.get(8),
        last_error: r.get(9),
        last_error_kind: r.get(10),
        last_error_at: r.get(11),
        rate_limited: r.get(12),
    }
}

/// Rows of organisation devices as column arrays: the key columns are given apart.
struct OrgRows {
    columns: Vec<ColumnArray>,
    extra: Vec<Option<String>>,
    server_ids: Vec<Option<String>>,
    server_names: Vec<Option<String>>,
    hashes: Vec<i64>,
}

impl OrgRows {
    fn of<'d>(rows: impl ExactSizeIterator<Item = (&'d OrgDevice, i64)>) -> Self {
        let n = rows.len();
        let mut c = OrgRows {
            columns: ORG_COLUMNS
                .iter()
                .map(|(_, _, shape)| ColumnArray::new(*shape, n))
                .collect(),
            extra: Vec::with_capacity(n),
            server_ids: Vec::with_capacity(n),
            server_names: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
        };
        for (d, hash) in rows {
            let mut odd = Vec::new();
            for ((col, (_, attr, shape)), v) in c.columns.iter_mut().zip(ORG_COLUMNS).zip(&d.values)
            {
                if !col.push(v, shape) {
                    odd.push((attr, v.clone()));
                }
            }
            c.extra.push(stored_extra(&d.extra, odd));
            c.server_ids.push(d.server_id.as_deref().map(pg_text));
            c.server_names.push(d.server_name.as_deref().map(pg_text));
            c.hashes.push(hash);
        }
        c
    }

    /// `$first::type[], …` for the arrays in [`OrgRows::params`] order, and the names
    /// they take in `UNNEST … AS u(…)`.
    fn unnest(&self, first: usize) -> (String, String) {
        let types: Vec<&str> = self
            .columns
            .iter()
            .map(ColumnArray::sql_type)
            .chain(["text[]", "text[]", "text[]", "int8[]"])
            .collect();
        let arrays: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::{t}", first + i))
            .collect();
        let names: Vec<&str> = ORG_COLUMNS
            .iter()
            .map(|c| c.0)
            .chain(super::super::org::ROW_TAIL)
            .collect();
        (arrays.join(", "), names.join(", "))
    }

    fn params<'s>(&'s self, p: &mut Params<'s>) {
        p.extend(self.columns.iter().map(ColumnArray::as_param));
        p.push(&self.extra);
        p.push(&self.server_ids);
        p.push(&self.server_names);
        p.push(&self.hashes);
    }
}

impl Pg {
    pub(crate) fn org_walk(&mut self, account: &str) -> Result<Option<OrgWalk>, StoreError> {
        let row = self
            .c()
            .query_opt(
                &format!("SELECT {WALK_COLUMNS} FROM org_walks WHERE account_name = $1"),
                &[&account],
            )
            .map_err(self.err("read the walk state"))?;
        Ok(row.as_ref().map(walk_from_row))
    }

    pub(crate) fn org_walks(&mut self) -> Result<Vec<OrgWalk>, StoreError> {
        Ok(self
            .c()
            .query(
                &format!("SELECT {WALK_COLUMNS} FROM org_walks ORDER BY account_name"),
                &[],
            )
            .map_err(self.err("read the walk states"))?
            .iter()
            .map(walk_from_row)
            .collect())
    }

    pub(crate) fn record_org_run_start(
        &mut self,
        account: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO org_walks (account_name, last_run_at) VALUES ($1, $2)
                 ON CONFLICT (account_name) DO UPDATE SET last_run_at = excluded.last_run_at",
                &[&account, &now],
            )
            .map(drop)
            .map_err(self.err("record the run"))
    }

    pub(crate) fn record_org_run_end(
        &mut self,
        account: &str,
        error: Option<(&str, &str)>,
        rate_limited: u64,
        now: &str,
    ) -> Result<(), StoreError> {
        let (kind, message) = error.unzip();
        let message = message.map(pg_text);
        self.in_tx("record the run", |tx| {
            tx.execute(
                "INSERT INTO org_walks (account_name) VALUES ($1) ON CONFLICT (account_name) DO NOTHING",
                &[&account],
            )?;
            let limited = rate_limited as i64;
            match kind {
                None => tx.execute(
                    "UPDATE org_walks SET last_success_at = $2, last_error = NULL,
                         last_error_kind = NULL, last_error_at = NULL,
                         rate_limited = rate_limited + $3 WHERE account_name = $1",
                    &[&account, &now, &limited],
                ),
                Some(kind) => tx.execute(
                    "UPDATE org_walks SET last_error = $3, last_error_kind = $4, last_error_at = $2,
                         rate_limited = rate_limited + $5 WHERE account_name = $1",
                    &[&account, &now, &message, &kind, &limited],
                ),
            }
            .map(drop)
        })
    }

    pub(crate) fn save_mdm_servers(
        &mut self,
        account: &str,
        servers: &[MdmServer],
        now: &str,
    ) -> Result<(), StoreError> {
        self.in_tx("store the MDM servers", |tx| {
            let up = tx.prepare(
                "INSERT INTO mdm_servers (account_name, id, server_name, server_type, status, device_count,
                     created_date_time, updated_date_time, extra_json, seen_at, removed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::json, $10, NULL)
                 ON CONFLICT (account_name, id) DO UPDATE SET server_name = excluded.server_name,
                     server_type = excluded.server_type, status = excluded.status,
                     device_count = excluded.device_count, created_date_time = excluded.created_date_time,
                     updated_date_time = excluded.updated_date_time, extra_json = excluded.extra_json,
                     seen_at = excluded.seen_at, removed_at = NULL",
            )?;
            for s in servers {
                let mut extra = s.extra.clone();
                let status = extra
                    .remove("status")
                    .and_then(|v| v.as_str().map(pg_text));
                let count = extra.remove("deviceCount").and_then(|v| v.as_i64());
                let extra = (!extra.is_empty()).then(|| Value::Object(extra).to_string());
                let text = |v: &Option<String>| v.as_deref().map(pg_text);
                tx.execute(
                    &up,
                    &[
                        &account,
                        &pg_text(&s.id),
                        &text(&s.server_name),
                        &text(&s.server_type),
                        &status,
                        &count,
                        &text(&s.created_date_time),
                        &text(&s.updated_date_time),
                        &extra,
                        &now,
                    ],
                )?;
            }
            tx.execute(
                "UPDATE mdm_servers SET removed_at = $2
                 WHERE account_name = $1 AND seen_at <> $2 AND removed_at IS NULL",
                &[&account, &now],
            )?;
            Ok(())
        })
    }

    pub(crate) fn listed_mdm_servers(
        &mut self,
        account: &str,
    ) -> Result<Vec<(String, Option<String>)>, StoreError> {
        Ok(self
            .c()
            .query(
                "SELECT id, server_name FROM mdm_servers
                 WHERE account_name = $1 AND removed_at IS NULL ORDER BY id",
                &[&account],
            )
            .map_err(self.err("read the MDM servers"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    pub(crate) fn stage_server_devices(
        &mut self,
        account: &str,
        server_id: &str,
        serials: &[String],
        next: Option<&str>,
        last_server: bool,
    ) -> Result<(), StoreError> {
        // Once each: one statement cannot write a row twice (a list may repeat a serial).
        let mut serials: Vec<String> = serials.iter().map(|s| pg_text(s)).collect();
        serials.sort_unstable();
        serials.dedup();
        let server_id = pg_text(server_id);
        let staged = self.in_tx("stage a server's devices", |tx| {
            if !serials.is_empty() {
                tx.execute(
                    "INSERT INTO org_server_devices (account_name, serial_number, server_id)
                     SELECT $1, s, $3 FROM UNNEST($2::text[]) AS s
                     ON CONFLICT (account_name, serial_number) DO UPDATE SET server_id = excluded.server_id",
                    &[&account, &serials, &server_id],
                )?;
            }
            match (next, last_server) {
                (Some(c), _) => tx.execute(
                    "UPDATE org_walks SET cursor = $2 WHERE account_name = $1",
                    &[&account, &c],
                )?,
                (None, false) => tx.execute(
                    "UPDATE org_walks SET cursor = NULL, server_index = server_index + 1
                     WHERE account_name = $1",
                    &[&account],
                )?,
                (None, true) => tx.execute(
                    "UPDATE org_walks SET cursor = NULL, phase = 'devices' WHERE account_name = $1",
                    &[&account],
                )?,
            };
            Ok(())
        });
        if staged.is_ok() && next.is_none() && last_server {
            // Every page of the device walk reads the staged lists by serial: the planner
            // must know how large they have grown since the last walk (see FIRST_ANALYZE).
            self.analyze("org_server_devices");
        }
        staged
    }

    pub(crate) fn reset_walk_position(&mut self, account: &str) -> Result<(), StoreError> {
        self.in_tx("reset the walk", |tx| {
            let phase: Option<String> = tx
                .query_opt(
                    "SELECT phase FROM org_walks WHERE account_name = $1",
                    &[&account],
                )?
                .map(|r| r.get(0));
            if phase.as_deref() == Some("servers") {
                tx.execute(
                    "DELETE FROM org_server_devices WHERE account_name = $1",
                    &[&account],
                )?;
                tx.execute(
                    "UPDATE org_walks SET server_index = 0, cursor = NULL WHERE account_name = $1",
                    &[&account],
                )?;
            } else {
                tx.execute(
                    "UPDATE org_walks SET cursor = NULL WHERE account_name = $1",
                    &[&account],
                )?;
            }
            Ok(())
        })
    }

    pub(crate) fn restart_device_walk(&mut self, account: &str) -> Result<(), StoreError> {
        self.c()
            .execute(
                "UPDATE org_walks SET cursor = NULL WHERE account_name = $1",
                &[&account],
            )
            .map(drop)
            .map_err(self.err("restart the walk"))
    }

    pub(crate) fn apply_org_page(
        &mut self,
        account: &str,
        walk_run: i64,
        resources: Vec<RawResource>,
        next: Option<&str>,
        now: &str,
    ) -> Result<OrgPageStats, StoreError> {
        self.org_inserted = self.analyze_if_due("org_devices", self.org_inserted);
        let stats = self.in_tx("write a page of organisation devices", |tx| {
            write_org_page(tx, account, walk_run, resources, next, now)
        })?;
        self.org_inserted.0 += stats.added;
        Ok(stats)
    }

    pub(crate) fn org_devices(
        &mut self,
        f: &OrgDeviceFilter,
    ) -> Result<Vec<StoredOrgDevice>, StoreError> {
        let accounts: Option<Vec<String>> = (!f.accounts.is_empty()).then(|| f.accounts.clone());
        let rows = self
            .c()
            .query(
                &format!(
                    "SELECT {} FROM org_devices
                     WHERE ($1::text[] IS NULL OR account_name = ANY($1))
                       AND ($2::text IS NULL OR status = $2)
                       AND ($3::text IS NULL OR product_family = $3)
                       AND (NOT $4 OR assigned_server_id IS NULL)
                       AND ($5::text IS NULL OR serial_number = $5)
                       AND ($6 OR removed_at IS NULL)
                     ORDER BY account_name, serial_number",
                    pg_device_columns()
                ),
                &[
                    &accounts,
                    &f.status,
                    &f.family,
                    &f.unassigned,
                    &f.serial,
                    &f.include_removed,
                ],
            )
            .map_err(self.err("read organisation devices"))?;
        rows.iter()
            .map(device_from_row)
            .collect::<Result<_, _>>()
            .map_err(self.err("read organisation devices"))
    }

    pub(crate) fn org_counts(&mut self, account: &str) -> Result<OrgCounts, StoreError> {
        let r = self
            .c()
            .query_one(
                "SELECT
                   COUNT(*) FILTER (WHERE removed_at IS NULL),
                   COUNT(*) FILTER (WHERE removed_at IS NULL AND assigned_server_id IS NULL),
                   COUNT(*) FILTER (WHERE removed_at IS NOT NULL),
                   (SELECT COUNT(*) FROM mdm_servers WHERE account_name = $1 AND removed_at IS NULL),
                   COUNT(*) FILTER (WHERE applecare_checked_at IS NOT NULL)
                 FROM org_devices WHERE account_name = $1",
                &[&account],
            )
            .map_err(self.err("count organisation devices"))?;
        let n = |i: usize| r.get::<_, i64>(i) as u64;
        Ok(OrgCounts {
            devices: n(0),
            unassigned: n(1),
            removed: n(2),
            servers: n(3),
            applecare_checked: n(4),
        })
    }

    pub(crate) fn applecare_due(
        &mut self,
        account: &str,
        older_than: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .c()
            .query(
                "SELECT serial_number FROM org_devices
                 WHERE account_name = $1 AND removed_at IS NULL
                   AND (applecare_checked_at IS NULL OR applecare_checked_at < $2)
                 ORDER BY applecare_checked_at IS NOT NULL, applecare_checked_at, serial_number
                 LIMIT $3",
                &[&account, &older_than, &(limit as i64)],
            )
            .map_err(self.err("read AppleCare state"))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub(crate) fn save_applecare(
        &mut self,
        account: &str,
        serial: &str,
        coverages: &[Coverage],
        now: &str,
    ) -> Result<(), StoreError> {
        let coverages = coverages.to_vec();
        self.in_tx("store AppleCare coverage", |tx| {
            tx.execute(
                "DELETE FROM applecare_coverage WHERE account_name = $1 AND serial_number = $2",
                &[&account, &serial],
            )?;
            insert_coverage(tx, account, serial, coverages, now)?;
            tx.execute(
                "UPDATE org_devices SET applecare_checked_at = $3
                 WHERE account_name = $1 AND serial_number = $2",
                &[&account, &serial, &now],
            )?;
            Ok(())
        })
    }

    pub(crate) fn applecare_checked(
        &mut self,
        account: &str,
        serial: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        self.c()
            .execute(
                "UPDATE org_devices SET applecare_checked_at = $3
                 WHERE account_name = $1 AND serial_number = $2",
                &[&account, &serial, &now],
            )
            .map(drop)
            .map_err(self.err("store AppleCare state"))
    }

    pub(crate) fn applecare_of(
        &mut self,
        account: &str,
        serial: &str,
    ) -> Result<Vec<Value>, StoreError> {
        let cols: Vec<&str> = COVERAGE_COLUMNS.iter().map(|c| c.0).collect();
        let rows = self
            .c()
            .query(
                &format!(
                    "SELECT coverage_id, {}, extra_json::text, fetched_at FROM applecare_coverage
                     WHERE account_name = $1 AND serial_number = $2 ORDER BY coverage_id",
                    cols.join(", ")
                ),
                &[&account, &serial],
            )
            .map_err(self.err("read AppleCare coverage"))?;
        let n = COVERAGE_COLUMNS.len();
        rows.iter()
            .map(|r| {
                let (values, _) = read_values(r, 1, &COVERAGE_COLUMNS, r.try_get(1 + n)?)?;
                let mut m = Map::new();
                m.insert("coverage_id".into(), Value::String(r.try_get(0)?));
                for ((col, _, _), v) in COVERAGE_COLUMNS.iter().zip(values) {
                    m.insert((*col).into(), v);
                }
                m.insert("fetched_at".into(), Value::String(r.try_get(2 + n)?));
                Ok(Value::Object(m))
            })
            .collect::<Result<_, postgres::Error>>()
            .map_err(self.err("read AppleCare coverage"))
    }
}

/// Inserts a device's coverages (Apple's ids; the last one wins if an id repeats, as
/// SQLite's REPLACE does).
fn insert_coverage(
    tx: &mut Transaction<'_>,
    account: &str,
    serial: &str,
    coverages: Vec<Coverage>,
    fetched_at: &str,
) -> Result<(), postgres::Error> {
    let mut by_id: Vec<(String, Coverage)> = Vec::with_capacity(coverages.len());
    for c in coverages {
        let id = pg_text(&c.id);
        by_id.retain(|(i, _)| *i != id);
        by_id.push((id, c));
    }
    if by_id.is_empty() {
        return Ok(());
    }
    let mut columns: Vec<ColumnArray> = COVERAGE_COLUMNS
        .iter()
        .map(|(_, _, shape)| ColumnArray::new(*shape, by_id.len()))
        .collect();
    let mut extra = Vec::with_capacity(by_id.len());
    for (_, c) in &by_id {
        let mut odd = Vec::new();
        for ((col, (_, attr, shape)), v) in columns.iter_mut().zip(COVERAGE_COLUMNS).zip(&c.values)
        {
            if !col.push(v, shape) {
                odd.push((attr, v.clone()));
            }
        }
        extra.push(stored_extra(&c.extra, odd));
    }
    let ids: Vec<String> = by_id.into_iter().map(|(id, _)| id).collect();
    let names: Vec<&str> = COVERAGE_COLUMNS.iter().map(|c| c.0).collect();
    let sql = format!(
        "INSERT INTO applecare_coverage (account_name, serial_number, coverage_id, {cols},
             extra_json, fetched_at)
         SELECT $1, $2, u.coverage_id, {u_cols}, u.extra_json::json, $3
           FROM UNNEST($4::text[], {arrays}, ${extra}::text[])
             AS u(coverage_id, {cols}, extra_json)",
        cols = names.join(", "),
        u_cols = names
            .iter()
            .map(|n| format!("u.{n}"))
            .collect::<Vec<_>>()
            .join(", "),
        arrays = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}", 5 + i, c.sql_type()))
            .collect::<Vec<_>>()
            .join(", "),
        extra = 5 + columns.len(),
    );
    let mut p: Params<'_> = vec![&account, &serial, &fetched_at, &ids];
    p.extend(columns.iter().map(ColumnArray::as_param));
    p.push(&extra);
    tx.execute(&sql, &p)?;
    Ok(())
}

/// Writes one page of the device walk (see `Store::apply_org_page`).
fn write_org_page(
    tx: &mut Transaction<'_>,
    account: &str,
    walk_run: i64,
    resources: Vec<RawResource>,
    next: Option<&str>,
    now: &str,
) -> Result<OrgPageStats, postgres::Error> {
    let mut stats = OrgPageStats::default();
    let items = page_items(resources, &mut stats);
    let serials: Vec<&str> = items.iter().map(|(s, _)| s.as_str()).collect();
    let staged: HashMap<String, (String, Option<String>)> = tx
        .query(
            "SELECT s.serial_number, s.server_id, m.server_name FROM org_server_devices s
             LEFT JOIN mdm_servers m ON m.account_name = s.account_name AND m.id = s.server_id
             WHERE s.account_name = $1 AND s.serial_number = ANY($2)",
            &[&account, &serials],
        )?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let stored: HashMap<String, StoredDigest> = tx
        .query(
            "SELECT serial_number, id, content_hash, removed_at IS NOT NULL FROM org_devices
             WHERE account_name = $1 AND serial_number = ANY($2)",
            &[&account, &serials],
        )?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let read = tx.prepare(&format!(
        "SELECT {} FROM org_devices WHERE id = $1",
        pg_device_columns()
    ))?;
    let mut plan = {
        let tx = &mut *tx;
        plan_org_page(items, staged, &stored, stats, |id| {
            device_from_row(&tx.query_one(&read, &[&id])?).map(|s| s.device)
        })?
    };
    if !plan.updates.is_empty() {
        let ids: Vec<i64> = plan.updates.iter().map(|(id, ..)| *id).collect();
        let rows = OrgRows::of(plan.updates.iter().map(|(_, d, h)| (d, *h)));
        let (arrays, names) = rows.unnest(3);
        let set: Vec<String> = names
            .split(", ")
            .map(|c| {
                if c == "extra_json" {
                    format!("{c} = u.{c}::json")
                } else {
                    format!("{c} = u.{c}")
                }
            })
            .collect();
        let mut p: Params<'_> = vec![&now, &ids];
        rows.params(&mut p);
        tx.execute(
            &format!(
                "UPDATE org_devices o SET {}, updated_at = $1, removed_at = NULL
                   FROM UNNEST($2::int8[], {arrays}) AS u(id, {names})
                  WHERE o.id = u.id",
                set.join(", ")
            ),
            &p,
        )?;
    }
    if !plan.new_rows.is_empty() {
        let serials: Vec<&str> = plan
            .new_rows
            .iter()
            .map(|(d, _)| d.serial_number.as_str())
            .collect();
        let rows = OrgRows::of(plan.new_rows.iter().map(|(d, h)| (d, *h)));
        let (arrays, names) = rows.unnest(4);
        let values = names.replace("extra_json", "extra_json::json");
        let values: Vec<String> = values.split(", ").map(|c| format!("u.{c}")).collect();
        let mut p: Params<'_> = vec![&account, &now, &serials];
        rows.params(&mut p);
        let ids = tx.query(
            &format!(
                "INSERT INTO org_devices (account_name, serial_number, first_seen_at, updated_at, {names})
                 SELECT $1, u.serial_number, $2, $2, {}
                   FROM UNNEST($3::text[], {arrays}) AS u(serial_number, {names})
                 RETURNING id",
                values.join(", ")
            ),
            &p,
        )?;
        plan.seen.extend(ids.iter().map(|r| r.get::<_, i64>(0)));
    }
    let OrgPlan {
        seen,
        mut events,
        mut stats,
        ..
    } = plan;
    mark_seen(tx, &seen_key(account), walk_run, seen)?;
    match next {
        Some(cursor) => {
            tx.execute(
                "UPDATE org_walks SET cursor = $2 WHERE account_name = $1",
                &[&account, &cursor],
            )?;
        }
        None => {
            let listed = load_seen(tx, &seen_key(account), walk_run)?;
            let alive: Vec<i64> = tx
                .query(
                    "SELECT id FROM org_devices WHERE account_name = $1 AND removed_at IS NULL",
                    &[&account],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let listed_count = remove_unlisted(alive, &listed, &mut events, &mut stats, |id| {
                let old = device_from_row(&tx.query_one(&read, &[&id])?)?;
                tx.execute(
                    "UPDATE org_devices SET removed_at = $2, updated_at = $2 WHERE id = $1",
                    &[&id, &now],
                )?;
                Ok::<_, postgres::Error>(old.device)
            })?;
            tx.execute(
                "DELETE FROM fetch_seen WHERE token_name = $1",
                &[&seen_key(account)],
            )?;
            tx.execute(
                "DELETE FROM org_server_devices WHERE account_name = $1",
                &[&account],
            )?;
            tx.execute(
                "UPDATE org_walks SET walk_run = walk_run + 1, phase = 'servers', server_index = 0,
                     cursor = NULL, last_complete_at = $2, last_walk_devices = $3
                 WHERE account_name = $1",
                &[&account, &now, &listed_count],
            )?;
        }
    }
    let released = events.removed_serials();
    let scope = EventScope::OrgDevice.stored();
    let mut pending: Vec<PendingEvent> = events
        .rows
        .into_iter()
        .map(|(serial, kind, changes, device)| PendingEvent {
            token: account.to_owned(),
            serial,
            kind,
            changes,
            occurred_at: now.to_owned(),
            snapshot: device,
            reason: None,
            scope,
        })
        .collect();
    // After the organisation's own events: the cause before its effect.
    released_from_org(tx, &released, now, &mut pending)?;
    insert_events(tx, pending).map(|()| stats)
}

/// The ADE side of devices the organisation released (see the SQLite twin).
fn released_from_org(
    tx: &mut Transaction<'_>,
    serials: &[String],
    now: &str,
    events: &mut Vec<PendingEvent>,
) -> Result<(), postgres::Error> {
    if serials.is_empty() {
        return Ok(());
    }
    // An ADE transaction deciding a deletion's reason at this moment reads our removals:
    // one of the two waits for the other (see `lock_event_order`).
    lock_event_order(tx, &mut false)?;
    let tokens: Vec<String> = tx
        .query("SELECT token_name FROM sync_state ORDER BY 1", &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for token in &tokens {
        for row in tx.query(
            &format!(
                "SELECT {PG_DEVICE_COLUMNS},
                        EXISTS (SELECT 1 FROM devices r
                                 WHERE r.original_device_serial_number = d.serial_number),
                        (SELECT e.reason FROM events e
                          WHERE e.token_name = d.token_name AND e.serial_number = d.serial_number
                            AND e.scope IS NULL ORDER BY e.id DESC LIMIT 1)
                   FROM UNNEST($2::text[]) WITH ORDINALITY AS s(serial, n)
                   JOIN devices d ON d.token_name = $1 AND d.serial_number = s.serial
                  WHERE d.deleted_at IS NOT NULL
                    AND d.released_by_replacement IS NOT TRUE
                  ORDER BY s.n"
            ),
            &[token, &serials],
        )? {
            let n = super::write::PG_DEVICE_COLUMN_COUNT;
            let replaced: bool = row.try_get(n)?;
            let last: Option<String> = row.try_get(n + 1)?;
            if !owes_release(replaced, last.as_deref()) {
                continue;
            }
            let d = ade_device_from_row(&row, 0)?;
            events.push(PendingEvent {
                token: token.clone(),
                serial: d.serial_number.clone(),
                kind: EventKind::Deleted,
                changes: None,
                occurred_at: now.to_owned(),
                snapshot: encode_snapshot(&d, ade_extra_json(&d).as_deref()),
                reason: Some(Reason::Released),
                scope: None,
            });
        }
    }
    Ok(())
}

/// What `store copy` moved of the organisation's inventory.
pub(super) struct OrgCopied {
    pub(super) devices: u64,
    pub(super) coverages: u64,
}

/// Copies the organisation devices (keeping their ids, which an unfinished walk's
/// `fetch_seen` bitmaps name) and AppleCare coverage of the SQLite mirror `from`, read
/// as the SQLite backend reads them, into the open transaction; `read` wraps SQLite's
/// errors. The smaller organisation tables go with `copy.rs`'s row-by-row copy.
pub(super) fn copy_org_from_sqlite(
    tx: &mut Transaction<'_>,
    from: &rusqlite::Connection,
    read: &dyn Fn(rusqlite::Error) -> StoreError,
    write: &dyn Fn(postgres::Error) -> StoreError,
) -> Result<OrgCopied, StoreError> {
    use super::super::org::{device_from_row as lite_device, read_value};
    let mut copied = OrgCopied {
        devices: 0,
        coverages: 0,
    };
    let n = 1 + ORG_COLUMNS.len();
    let mut last = 0i64;
    loop {
        let mut stmt = from
            .prepare_cached(&format!(
                "SELECT {}, id, content_hash, applecare_checked_at FROM org_devices
                 WHERE id > ?1 ORDER BY id LIMIT 5000",
                device_columns()
            ))
            .map_err(read)?;
        let mut devices: Vec<(StoredOrgDevice, i64)> = Vec::new();
        let mut ids: Vec<i64> = Vec::new();
        let mut checked: Vec<Option<String>> = Vec::new();
        let mut rows = stmt.query([last]).map_err(read)?;
        while let Some(r) = rows.next().map_err(read)? {
            devices.push((lite_device(r).map_err(read)?, r.get(n + 8).map_err(read)?));
            ids.push(r.get(n + 7).map_err(read)?);
            checked.push(r.get(n + 9).map_err(read)?);
        }
        drop(rows);
        let Some(&end) = ids.last() else {
            break;
        };
        last = end;
        copied.devices += ids.len() as u64;
        let rows = OrgRows::of(devices.iter().map(|(s, h)| (&s.device, *h)));
        let text = |f: fn(&StoredOrgDevice) -> Option<String>| -> Vec<Option<String>> {
            devices.iter().map(|(s, _)| f(s)).collect()
        };
        let accounts = text(|s| Some(pg_text(&s.account)));
        let serials = text(|s| Some(pg_text(&s.device.serial_number)));
        let first_seen = text(|s| Some(s.first_seen_at.clone()));
        let updated = text(|s| Some(s.updated_at.clone()));
        let removed = text(|s| s.removed_at.clone());
        let (arrays, names) = rows.unnest(8);
        let values: Vec<String> = names
            .replace("extra_json", "extra_json::json")
            .split(", ")
            .map(|c| format!("u.{c}"))
            .collect();
        let mut p: Params<'_> = vec![
            &ids,
            &accounts,
            &serials,
            &first_seen,
            &updated,
            &removed,
            &checked,
        ];
        rows.params(&mut p);
        tx.execute(
            &format!(
                "INSERT INTO org_devices (id, account_name, serial_number, first_seen_at,
                     updated_at, removed_at, applecare_checked_at, {names})
                 SELECT u.id, u.account_name, u.serial_number, u.first_seen_at, u.updated_at,
                        u.removed_at, u.applecare_checked_at, {}
                   FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[],
                               $6::text[], $7::text[], {arrays})
                     AS u(id, account_name, serial_number, first_seen_at, updated_at,
                          removed_at, applecare_checked_at, {names})",
                values.join(", ")
            ),
            &p,
        )
        .map_err(write)?;
    }
    tx.execute(
        "SELECT setval(pg_get_serial_sequence('org_devices', 'id'),
                       GREATEST((SELECT max(id) FROM org_devices), 1))",
        &[],
    )
    .map_err(write)?;

    // AppleCare coverage, device by device.
    let cols: Vec<&str> = COVERAGE_COLUMNS.iter().map(|c| c.0).collect();
    let mut stmt = from
        .prepare(&format!(
            "SELECT account_name, serial_number, coverage_id, fetched_at, extra_json, {}
             FROM applecare_coverage ORDER BY account_name, serial_number, coverage_id",
            cols.join(", ")
        ))
        .map_err(read)?;
    let mut rows = stmt.query([]).map_err(read)?;
    let mut device: Option<(String, String, String)> = None;
    let mut coverages: Vec<Coverage> = Vec::new();
    let flush = |tx: &mut Transaction<'_>,
                 device: &Option<(String, String, String)>,
                 coverages: &mut Vec<Coverage>|
     -> Result<(), postgres::Error> {
        if let Some((account, serial, fetched)) = device {
            insert_coverage(tx, account, serial, std::mem::take(coverages), fetched)?;
        }
        Ok(())
    };
    while let Some(r) = rows.next().map_err(read)? {
        let key: (String, String, String) = (
            r.get(0).map_err(read)?,
            r.get(1).map_err(read)?,
            r.get(3).map_err(read)?,
        );
        if device.as_ref().map(|d| (&d.0, &d.1)) != Some((&key.0, &key.1)) {
            flush(tx, &device, &mut coverages).map_err(write)?;
            device = Some(key);
        }
        let mut values = Vec::with_capacity(COVERAGE_COLUMNS.len());
        for (i, (_, _, shape)) in COVERAGE_COLUMNS.iter().enumerate() {
            values.push(read_value(r, 5 + i, *shape).map_err(read)?);
        }
        let extra: Option<String> = r.get(4).map_err(read)?;
        coverages.push(Coverage {
            id: r.get(2).map_err(read)?,
            values,
            extra: extra
                .and_then(|e| serde_json::from_str(&e).ok())
                .unwrap_or_default(),
        });
        copied.coverages += 1;
    }
    flush(tx, &device, &mut coverages).map_err(write)?;
    Ok(copied)
}
