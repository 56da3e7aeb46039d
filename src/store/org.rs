//! The organisation's inventory (`org_devices`, `mdm_servers`, `applecare_coverage`,
//! `org_walks`, `org_server_devices`): a walk's staged server lists, its pages of devices
//! with their events and position in one transaction, the removal at the end of a
//! complete walk, and the queries.

use rusqlite::{params, OptionalExtension};
use serde_json::{Map, Value};

use super::device_row::{
    device_from_row as ade_device_from_row, extra_json as ade_extra_json, DEVICE_COLUMNS,
};
use super::devices::{load_seen, mark_seen};
use super::events::PageEvents;
use super::{Store, StoreError};
use crate::events::EventScope;
use crate::model::{EventKind, Reason};
use crate::orgapi::device::{is_serial, Shape, COVERAGE_COLUMNS, ORG_COLUMNS};
use crate::orgapi::{Coverage, MdmServer, OrgDevice, RawResource};

/// Where an account's walk stands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrgWalk {
    /// The account.
    pub account: String,
    /// Number of the walk (the seen-set of a walk is keyed by it).
    pub walk_run: i64,
    /// `servers`: reading the MDM servers' device lists; `devices`: walking orgDevices.
    pub phase: WalkPhase,
    /// In `servers`: index (in id order) of the server being read.
    pub server_index: i64,
    /// The cursor of the next page to read in the current list; `None`: its first page.
    pub cursor: Option<String>,
    /// When the last run began.
    pub last_run_at: Option<String>,
    /// When a run last ended well.
    pub last_success_at: Option<String>,
    /// When the last complete walk ended.
    pub last_complete_at: Option<String>,
    /// Devices that walk listed.
    pub last_walk_devices: Option<i64>,
    /// The last failure.
    pub last_error: Option<String>,
    /// Its kind.
    pub last_error_kind: Option<String>,
    /// When.
    pub last_error_at: Option<String>,
    /// 429/503 answers received, in all.
    pub rate_limited: i64,
}

/// The two phases of a walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WalkPhase {
    /// Reading each MDM server's device list.
    #[default]
    Servers,
    /// Walking orgDevices.
    Devices,
}

impl WalkPhase {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            WalkPhase::Servers => "servers",
            WalkPhase::Devices => "devices",
        }
    }
}

/// What a page of devices did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrgPageStats {
    /// New (or back after a removal).
    pub added: u64,
    /// Changed columns.
    pub modified: u64,
    /// Removed by a complete walk.
    pub removed: u64,
    /// Identical: no write.
    pub unchanged: u64,
    /// Resources that could not be read (skipped; never removed for it).
    pub refused: u64,
    /// The first refusal's reason, escaped.
    pub first_refusal: Option<String>,
}

impl OrgPageStats {
    /// Sums.
    pub fn add(&mut self, o: OrgPageStats) {
        self.added += o.added;
        self.modified += o.modified;
        self.removed += o.removed;
        self.unchanged += o.unchanged;
        self.refused += o.refused;
        if self.first_refusal.is_none() {
            self.first_refusal = o.first_refusal;
        }
    }

    fn refuse(&mut self, why: crate::orgapi::Refused) {
        self.refused += 1;
        if self.first_refusal.is_none() {
            self.first_refusal = Some(format!(
                "{}: {}",
                why.id.as_deref().unwrap_or("(no id)"),
                why.reason
            ));
        }
    }
}

/// A stored organisation device with its bookkeeping.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredOrgDevice {
    /// The account.
    pub account: String,
    /// The device.
    pub device: OrgDevice,
    /// First stored.
    pub first_seen_at: String,
    /// Last changed.
    pub updated_at: String,
    /// When a complete walk no longer listed it.
    pub removed_at: Option<String>,
}

/// Filters of `adesync org-devices`.
#[derive(Clone, Debug, Default)]
pub struct OrgDeviceFilter {
    /// Only these accounts (empty: all).
    pub accounts: Vec<String>,
    /// `status` equals.
    pub status: Option<String>,
    /// `product_family` equals.
    pub family: Option<String>,
    /// Only devices no MDM server holds.
    pub unassigned: bool,
    /// Only this serial.
    pub serial: Option<String>,
    /// Removed ones too.
    pub include_removed: bool,
}

/// Per-account counts for `status` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrgCounts {
    /// Listed by Apple.
    pub devices: u64,
    /// Listed, held by no MDM server.
    pub unassigned: u64,
    /// Removed.
    pub removed: u64,
    /// MDM servers.
    pub servers: u64,
    /// Devices with AppleCare coverage fetched.
    pub applecare_checked: u64,
}

pub(super) const WALK_COLUMNS: &str = "account_name, walk_run, phase, server_index, cursor, last_run_at, last_success_at, last_complete_at, last_walk_devices, last_error, last_error_kind, last_error_at, rate_limited";

fn walk_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OrgWalk> {
    Ok(OrgWalk {
        account: r.get(0)?,
        walk_run: r.get(1)?,
        phase: if r.get::<_, String>(2)? == "devices" {
            WalkPhase::Devices
        } else {
            WalkPhase::Servers
        },
        server_index: r.get(3)?,
        cursor: r.get(4)?,
        last_run_at: r.get(5)?,
        last_success_at: r.get(6)?,
        last_complete_at: r.get(7)?,
        last_walk_devices: r.get(8)?,
        last_error: r.get(9)?,
        last_error_kind: r.get(10)?,
        last_error_at: r.get(11)?,
        rate_limited: r.get(12)?,
    })
}

/// `SELECT` list of an org device row, in [`device_from_row`]'s order.
pub(super) fn device_columns() -> String {
    let mut cols = vec!["serial_number"];
    cols.extend(ORG_COLUMNS.iter().map(|c| c.0));
    cols.extend([
        "extra_json",
        "assigned_server_id",
        "assigned_server_name",
        "account_name",
        "first_seen_at",
        "updated_at",
        "removed_at",
    ]);
    cols.join(", ")
}

/// A column's SQL value back to JSON.
pub(super) fn read_value(r: &rusqlite::Row<'_>, i: usize, shape: Shape) -> rusqlite::Result<Value> {
    use rusqlite::types::ValueRef;
    Ok(match r.get_ref(i)? {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(n) if shape == Shape::Bool => Value::Bool(n != 0),
        ValueRef::Integer(n) => Value::from(n),
        ValueRef::Real(f) => Value::from(f),
        ValueRef::Text(t) => {
            let t = String::from_utf8_lossy(t);
            if shape == Shape::List || t.starts_with('[') || t.starts_with('{') {
                serde_json::from_str(&t).unwrap_or(Value::String(t.into_owned()))
            } else {
                Value::String(t.into_owned())
            }
        }
        ValueRef::Blob(_) => Value::Null,
    })
}

/// A JSON value as the column stores it: strings as text, booleans 0/1, numbers as
/// numbers, lists and objects as JSON text.
fn sql_value(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as S;
    match v {
        Value::Null => S::Null,
        Value::Bool(b) => S::Integer(*b as i64),
        Value::Number(n) => n
            .as_i64()
            .map(S::Integer)
            .or_else(|| n.as_f64().map(S::Real))
            .unwrap_or(S::Null),
        Value::String(s) => S::Text(s.clone()),
        other => S::Text(other.to_string()),
    }
}

pub(super) fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredOrgDevice> {
    let mut values = Vec::with_capacity(ORG_COLUMNS.len());
    for (i, (_, _, shape)) in ORG_COLUMNS.iter().enumerate() {
        values.push(read_value(r, 1 + i, *shape)?);
    }
    let n = 1 + ORG_COLUMNS.len();
    let extra: Option<String> = r.get(n)?;
    Ok(StoredOrgDevice {
        device: OrgDevice {
            serial_number: r.get(0)?,
            values,
            extra: extra
                .and_then(|e| serde_json::from_str::<Map<String, Value>>(&e).ok())
                .unwrap_or_default(),
            server_id: r.get(n + 1)?,
            server_name: r.get(n + 2)?,
        },
        account: r.get(n + 3)?,
        first_seen_at: r.get(n + 4)?,
        updated_at: r.get(n + 5)?,
        removed_at: r.get(n + 6)?,
    })
}

fn extra_text(d: &OrgDevice) -> Option<String> {
    (!d.extra.is_empty()).then(|| Value::Object(d.extra.clone()).to_string())
}

impl Store {
    /// Where `account`'s walk stands (a fresh walk when it never ran).
    pub fn org_walk(&self, account: &str) -> Result<OrgWalk, StoreError> {
        let found = match self.pg() {
            Some(mut pg) => pg.org_walk(account)?,
            None => self.sqlite_org_walk(account)?,
        };
        Ok(found.unwrap_or_else(|| OrgWalk {
            account: account.to_owned(),
            walk_run: 1,
            ..OrgWalk::default()
        }))
    }

    fn sqlite_org_walk(&self, account: &str) -> Result<Option<OrgWalk>, StoreError> {
        self.conn()?
            .query_row(
                &format!("SELECT {WALK_COLUMNS} FROM org_walks WHERE account_name = ?1"),
                [account],
                walk_from_row,
            )
            .optional()
            .map_err(self.err("read the walk state"))
    }

    /// Every account's walk state.
    pub fn org_walks(&self) -> Result<Vec<OrgWalk>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.org_walks();
        }
        let mut stmt = self
            .conn()?
            .prepare(&format!(
                "SELECT {WALK_COLUMNS} FROM org_walks ORDER BY account_name"
            ))
            .map_err(self.err("read the walk states"))?;
        let rows = stmt
            .query_map([], walk_from_row)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read the walk states"))
    }

    /// Records that a run of `account` began.
    pub fn record_org_run_start(&mut self, account: &str, now: &str) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.record_org_run_start(account, now);
        }
        self.conn()?
            .execute(
                "INSERT INTO org_walks (account_name, last_run_at) VALUES (?1, ?2)
                 ON CONFLICT (account_name) DO UPDATE SET last_run_at = excluded.last_run_at",
                params![account, now],
            )
            .map(drop)
            .map_err(self.err("record the run"))
    }

    /// Records how a run of `account` ended: `error` is (kind, message).
    pub fn record_org_run_end(
        &mut self,
        account: &str,
        error: Option<(&str, &str)>,
        rate_limited: u64,
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.record_org_run_end(account, error, rate_limited, now);
        }
        let sql = match error {
            None => "UPDATE org_walks SET last_success_at = ?2, last_error = NULL, last_error_kind = NULL,
                     last_error_at = NULL, rate_limited = rate_limited + ?5 WHERE account_name = ?1",
            Some(_) => "UPDATE org_walks SET last_error = ?3, last_error_kind = ?4, last_error_at = ?2,
                     rate_limited = rate_limited + ?5 WHERE account_name = ?1",
        };
        let (kind, message) = error.unzip();
        self.in_tx("record the run", |tx| {
            tx.execute(
                "INSERT INTO org_walks (account_name) VALUES (?1) ON CONFLICT (account_name) DO NOTHING",
                [account],
            )?;
            tx.execute(sql, params![account, now, message, kind, rate_limited as i64])
                .map(drop)
        })
    }

    /// Stores the MDM servers Apple lists (a server no longer listed gets `removed_at`).
    pub fn save_mdm_servers(
        &mut self,
        account: &str,
        servers: &[MdmServer],
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.save_mdm_servers(account, servers, now);
        }
        self.in_tx("store the MDM servers", |tx| {
            let mut up = tx.prepare_cached(
                "INSERT INTO mdm_servers (account_name, id, server_name, server_type, status, device_count,
                     created_date_time, updated_date_time, extra_json, seen_at, removed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL)
                 ON CONFLICT (account_name, id) DO UPDATE SET server_name = excluded.server_name,
                     server_type = excluded.server_type, status = excluded.status,
                     device_count = excluded.device_count, created_date_time = excluded.created_date_time,
                     updated_date_time = excluded.updated_date_time, extra_json = excluded.extra_json,
                     seen_at = excluded.seen_at, removed_at = NULL",
            )?;
            for s in servers {
                let mut extra = s.extra.clone();
                let status = extra.remove("status").and_then(|v| v.as_str().map(str::to_owned));
                let count = extra.remove("deviceCount").and_then(|v| v.as_i64());
                let extra = (!extra.is_empty()).then(|| Value::Object(extra).to_string());
                up.execute(params![
                    account,
                    s.id,
                    s.server_name,
                    s.server_type,
                    status,
                    count,
                    s.created_date_time,
                    s.updated_date_time,
                    extra,
                    now
                ])?;
            }
            tx.execute(
                "UPDATE mdm_servers SET removed_at = ?2 WHERE account_name = ?1 AND seen_at <> ?2 AND removed_at IS NULL",
                params![account, now],
            )?;
            Ok(())
        })
    }

    /// The MDM servers Apple listed last, in id order: (id, name).
    pub fn listed_mdm_servers(
        &self,
        account: &str,
    ) -> Result<Vec<(String, Option<String>)>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.listed_mdm_servers(account);
        }
        let mut stmt = self
            .conn()?
            .prepare_cached(
                "SELECT id, server_name FROM mdm_servers WHERE account_name = ?1 AND removed_at IS NULL ORDER BY id",
            )
            .map_err(self.err("read the MDM servers"))?;
        let rows = stmt
            .query_map([account], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read the MDM servers"))
    }

    /// Stages one page of a server's device list and moves the walk on: to `next` of
    /// the same server, or (`next` None) to the next server, or past the last server to
    /// the device walk.
    pub fn stage_server_devices(
        &mut self,
        account: &str,
        server_id: &str,
        serials: &[String],
        next: Option<&str>,
        last_server: bool,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.stage_server_devices(account, server_id, serials, next, last_server);
        }
        self.in_tx("stage a server's devices", |tx| {
            let mut put = tx.prepare_cached(
                "INSERT INTO org_server_devices (account_name, serial_number, server_id) VALUES (?1, ?2, ?3)
                 ON CONFLICT (account_name, serial_number) DO UPDATE SET server_id = excluded.server_id",
            )?;
            for s in serials {
                put.execute(params![account, s, server_id])?;
            }
            match (next, last_server) {
                (Some(c), _) => tx.execute(
                    "UPDATE org_walks SET cursor = ?2 WHERE account_name = ?1",
                    params![account, c],
                )?,
                (None, false) => tx.execute(
                    "UPDATE org_walks SET cursor = NULL, server_index = server_index + 1 WHERE account_name = ?1",
                    [account],
                )?,
                (None, true) => tx.execute(
                    "UPDATE org_walks SET cursor = NULL, phase = 'devices' WHERE account_name = ?1",
                    [account],
                )?,
            };
            Ok(())
        })
    }

    /// Drops the walk's position after a failure that would recur there: in the servers
    /// phase the servers are listed again (and their staged lists dropped); in the devices
    /// phase the device list is read again from its first page (what was seen stays seen).
    pub fn reset_walk_position(&mut self, account: &str) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.reset_walk_position(account);
        }
        self.in_tx("reset the walk", |tx| {
            let phase: Option<String> = tx
                .query_row(
                    "SELECT phase FROM org_walks WHERE account_name = ?1",
                    [account],
                    |r| r.get(0),
                )
                .optional()?;
            if phase.as_deref() == Some("servers") {
                tx.execute(
                    "DELETE FROM org_server_devices WHERE account_name = ?1",
                    [account],
                )?;
                tx.execute(
                    "UPDATE org_walks SET server_index = 0, cursor = NULL WHERE account_name = ?1",
                    [account],
                )?;
            } else {
                tx.execute(
                    "UPDATE org_walks SET cursor = NULL WHERE account_name = ?1",
                    [account],
                )?;
            }
            Ok(())
        })
    }

    /// The device walk starts over from its first page (Apple refused the cursor); what
    /// it has seen so far stays seen.
    pub fn restart_device_walk(&mut self, account: &str) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.restart_device_walk(account);
        }
        self.conn()?
            .execute(
                "UPDATE org_walks SET cursor = NULL WHERE account_name = ?1",
                [account],
            )
            .map(drop)
            .map_err(self.err("restart the walk"))
    }

    /// Writes one page of the device walk: each device with the server its staged list
    /// names, its event, the walk's next cursor — all in one transaction. A device whose
    /// attributes and server are as stored is recognised by their digest and never
    /// decoded; one that cannot be read is kept (never removed for it) and counted. With
    /// `next` None the walk is complete: every device of the account it did not list is
    /// removed (one event each), and the next walk begins with the servers.
    pub fn apply_org_page(
        &mut self,
        account: &str,
        walk_run: i64,
        resources: Vec<RawResource>,
        next: Option<&str>,
        now: &str,
    ) -> Result<OrgPageStats, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.apply_org_page(account, walk_run, resources, next, now);
        }
        self.in_tx("write a page of organisation devices", |tx| {
            write_org_page(tx, account, walk_run, resources, next, now)
        })
    }

    /// Organisation devices, by account and serial.
    pub fn org_devices(&self, f: &OrgDeviceFilter) -> Result<Vec<StoredOrgDevice>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.org_devices(f);
        }
        let accounts =
            (!f.accounts.is_empty()).then(|| Value::from(f.accounts.clone()).to_string());
        let sql = format!(
            "SELECT {} FROM org_devices
             WHERE (?1 IS NULL OR account_name IN (SELECT value FROM json_each(?1)))
               AND (?2 IS NULL OR status = ?2)
               AND (?3 IS NULL OR product_family = ?3)
               AND (?4 = 0 OR assigned_server_id IS NULL)
               AND (?5 IS NULL OR serial_number = ?5)
               AND (?6 = 1 OR removed_at IS NULL)
             ORDER BY account_name, serial_number",
            device_columns()
        );
        let mut stmt = self
            .conn()?
            .prepare_cached(&sql)
            .map_err(self.err("read organisation devices"))?;
        let rows = stmt
            .query_map(
                params![
                    accounts,
                    f.status,
                    f.family,
                    f.unassigned,
                    f.serial,
                    f.include_removed
                ],
                device_from_row,
            )
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read organisation devices"))
    }

    /// Counts for one account.
    pub fn org_counts(&self, account: &str) -> Result<OrgCounts, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.org_counts(account);
        }
        self.conn()?
            .query_row(
                "SELECT
                   COUNT(*) FILTER (WHERE removed_at IS NULL),
                   COUNT(*) FILTER (WHERE removed_at IS NULL AND assigned_server_id IS NULL),
                   COUNT(*) FILTER (WHERE removed_at IS NOT NULL),
                   (SELECT COUNT(*) FROM mdm_servers WHERE account_name = ?1 AND removed_at IS NULL),
                   COUNT(*) FILTER (WHERE applecare_checked_at IS NOT NULL)
                 FROM org_devices WHERE account_name = ?1",
                [account],
                |r| {
                    Ok(OrgCounts {
                        devices: r.get::<_, i64>(0)? as u64,
                        unassigned: r.get::<_, i64>(1)? as u64,
                        removed: r.get::<_, i64>(2)? as u64,
                        servers: r.get::<_, i64>(3)? as u64,
                        applecare_checked: r.get::<_, i64>(4)? as u64,
                    })
                },
            )
            .map_err(self.err("count organisation devices"))
    }

    /// Up to `limit` listed devices of `account` whose AppleCare coverage was never
    /// fetched or fetched before `older_than`, oldest first.
    pub fn applecare_due(
        &self,
        account: &str,
        older_than: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.applecare_due(account, older_than, limit);
        }
        let mut stmt = self
            .conn()?
            .prepare_cached(
                "SELECT serial_number FROM org_devices
                 WHERE account_name = ?1 AND removed_at IS NULL
                   AND (applecare_checked_at IS NULL OR applecare_checked_at < ?2)
                 ORDER BY applecare_checked_at IS NOT NULL, applecare_checked_at, serial_number
                 LIMIT ?3",
            )
            .map_err(self.err("read AppleCare state"))?;
        let rows = stmt
            .query_map(params![account, older_than, limit as i64], |r| r.get(0))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read AppleCare state"))
    }

    /// Replaces a device's AppleCare coverage with what Apple answered.
    pub fn save_applecare(
        &mut self,
        account: &str,
        serial: &str,
        coverages: &[Coverage],
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.save_applecare(account, serial, coverages, now);
        }
        self.in_tx("store AppleCare coverage", |tx| {
            tx.execute(
                "DELETE FROM applecare_coverage WHERE account_name = ?1 AND serial_number = ?2",
                params![account, serial],
            )?;
            let cols: Vec<&str> = COVERAGE_COLUMNS.iter().map(|c| c.0).collect();
            let sql = format!(
                "INSERT OR REPLACE INTO applecare_coverage (account_name, serial_number, coverage_id, {}, extra_json, fetched_at)
                 VALUES ({})",
                cols.join(", "),
                vec!["?"; cols.len() + 5].join(", ")
            );
            let mut ins = tx.prepare_cached(&sql)?;
            for c in coverages {
                let mut vals: Vec<rusqlite::types::Value> = vec![
                    account.to_owned().into(),
                    serial.to_owned().into(),
                    c.id.clone().into(),
                ];
                vals.extend(c.values.iter().map(sql_value));
                vals.push(
                    (!c.extra.is_empty())
                        .then(|| Value::Object(c.extra.clone()).to_string())
                        .into(),
                );
                vals.push(now.to_owned().into());
                ins.execute(rusqlite::params_from_iter(vals))?;
            }
            tx.execute(
                "UPDATE org_devices SET applecare_checked_at = ?3 WHERE account_name = ?1 AND serial_number = ?2",
                params![account, serial, now],
            )?;
            Ok(())
        })
    }

    /// Marks a device's coverage as asked for without changing it (Apple refused the
    /// request): it goes to the back of the queue.
    pub fn applecare_checked(
        &mut self,
        account: &str,
        serial: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.applecare_checked(account, serial, now);
        }
        self.conn()?
            .execute(
                "UPDATE org_devices SET applecare_checked_at = ?3 WHERE account_name = ?1 AND serial_number = ?2",
                params![account, serial, now],
            )
            .map(drop)
            .map_err(self.err("store AppleCare state"))
    }

    /// A device's AppleCare coverage as JSON objects (snake_case columns).
    pub fn applecare_of(&self, account: &str, serial: &str) -> Result<Vec<Value>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.applecare_of(account, serial);
        }
        let cols: Vec<&str> = COVERAGE_COLUMNS.iter().map(|c| c.0).collect();
        let sql = format!(
            "SELECT coverage_id, {}, fetched_at FROM applecare_coverage
             WHERE account_name = ?1 AND serial_number = ?2 ORDER BY coverage_id",
            cols.join(", ")
        );
        let mut stmt = self
            .conn()?
            .prepare_cached(&sql)
            .map_err(self.err("read AppleCare coverage"))?;
        let rows = stmt
            .query_map(params![account, serial], |r| {
                let mut m = Map::new();
                m.insert("coverage_id".into(), Value::String(r.get(0)?));
                for (i, (col, _, shape)) in COVERAGE_COLUMNS.iter().enumerate() {
                    m.insert((*col).into(), read_value(r, 1 + i, *shape)?);
                }
                m.insert(
                    "fetched_at".into(),
                    Value::String(r.get(1 + COVERAGE_COLUMNS.len())?),
                );
                Ok(Value::Object(m))
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read AppleCare coverage"))
    }
}

/// One page's organisation events, inserted together at the end of the page (ids follow
/// the page's order).
#[derive(Default)]
pub(super) struct OrgEvents {
    /// (serial, kind, changes, device JSON)
    pub(super) rows: Vec<(String, EventKind, Option<String>, String)>,
}

impl OrgEvents {
    /// The serial numbers this page removed, in order.
    pub(super) fn removed_serials(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| r.1 == EventKind::Deleted)
            .map(|r| r.0.clone())
            .collect()
    }

    pub(super) fn push(
        &mut self,
        d: &OrgDevice,
        kind: EventKind,
        changes: Option<&Map<String, Value>>,
    ) {
        self.rows.push((
            d.serial_number.clone(),
            kind,
            changes.map(|c| Value::Object(c.clone()).to_string()),
            d.to_json().to_string(),
        ));
    }

    fn insert(
        self,
        tx: &rusqlite::Transaction<'_>,
        account: &str,
        now: &str,
    ) -> rusqlite::Result<()> {
        let scope = EventScope::OrgDevice.stored();
        let kinds: Vec<&str> = self.rows.iter().map(|r| r.1.as_str()).collect();
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(self.rows.len() * 7);
        for ((serial, _, changes, device), kind) in self.rows.iter().zip(&kinds) {
            values.extend([
                &account as &dyn rusqlite::ToSql,
                serial,
                kind,
                changes,
                &now,
                device,
                &scope,
            ]);
        }
        super::insert_many(
            tx,
            "events (token_name, serial_number, kind, changes, occurred_at, device_json, scope)",
            7,
            &values,
        )
    }
}

/// Whether an ADE device that left `token` gets a `released` event of its own now that
/// the organisation released it (see [`released_from_org`]): its row is gone from the
/// token, no replacement names it, and its story does not already end with a release.
pub(super) fn owes_release(replaced: bool, last_reason: Option<&str>) -> bool {
    !replaced && last_reason != Some("released")
}

/// Devices the organisation released that an ADE token had already seen leave (without a
/// replacement): their story ends with a `released` event of their own (a later ADE
/// deletion is `released` by itself, see `devices::reason_context`).
fn released_from_org(
    tx: &rusqlite::Transaction<'_>,
    serials: &[String],
    now: &str,
) -> rusqlite::Result<()> {
    if serials.is_empty() {
        return Ok(());
    }
    let tokens: Vec<String> = tx
        .prepare_cached("SELECT token_name FROM sync_state ORDER BY 1")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut find = tx.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices
         WHERE token_name = ?1 AND serial_number = ?2 AND deleted_at IS NOT NULL
           AND released_by_replacement IS NOT 1"
    ))?;
    let mut replaced = tx
        .prepare_cached("SELECT 1 FROM devices WHERE original_device_serial_number = ?1 LIMIT 1")?;
    let mut last_reason = tx.prepare_cached(
        "SELECT reason FROM events WHERE token_name = ?1 AND serial_number = ?2 AND scope IS NULL
         ORDER BY id DESC LIMIT 1",
    )?;
    for token in &tokens {
        let mut events = PageEvents::start(tx)?;
        for serial in serials {
            let Some(d) = find
                .query_row(params![token, serial], |r| ade_device_from_row(r, 0))
                .optional()?
            else {
                continue;
            };
            let last: Option<Option<String>> = last_reason
                .query_row(params![token, serial], |r| r.get(0))
                .optional()?;
            if !owes_release(replaced.exists([serial])?, last.flatten().as_deref()) {
                continue;
            }
            events.push(
                serial,
                EventKind::Deleted,
                None,
                &d,
                ade_extra_json(&d).as_deref(),
                Reason::Released,
            );
        }
        events.insert(tx, token, now)?;
    }
    Ok(())
}

/// The key of an account's seen-set in `fetch_seen`, apart from every token's (a token
/// name never holds a `:`).
pub(super) fn seen_key(account: &str) -> String {
    format!("org:{account}")
}

/// A page's resources by serial (the id; decoded when there is none), the last record
/// winning when a serial repeats within the page. Unreadable ones are counted in `stats`.
pub(super) fn page_items(
    resources: Vec<RawResource>,
    stats: &mut OrgPageStats,
) -> Vec<(String, RawResource)> {
    let mut items: Vec<(String, RawResource)> = Vec::with_capacity(resources.len());
    for r in resources {
        match r.id_text().filter(|id| is_serial(id)) {
            Some(id) => items.push((id, r)),
            None => match r.decode() {
                Ok(d) => items.push((d.serial_number, r)),
                Err(why) => stats.refuse(why),
            },
        }
    }
    let mut last = std::collections::HashMap::with_capacity(items.len());
    for (i, (serial, _)) in items.iter().enumerate() {
        last.insert(serial.clone(), i);
    }
    let mut i = 0;
    items.retain(|(serial, _)| {
        let keep = last[serial] == i;
        i += 1;
        keep
    });
    items
}

/// A stored organisation device as a page needs it: (id, digest, removed).
pub(super) type StoredDigest = (i64, i64, bool);

/// What a page of the device walk writes, decided the same way on both backends.
#[derive(Default)]
pub(super) struct OrgPlan {
    /// New devices with their digests.
    pub(super) new_rows: Vec<(OrgDevice, i64)>,
    /// Changed (or returning) devices: (id, device, digest).
    pub(super) updates: Vec<(i64, OrgDevice, i64)>,
    /// Ids of stored devices the page listed.
    pub(super) seen: Vec<i64>,
    /// The page's events, in its order.
    pub(super) events: OrgEvents,
    /// Counts.
    pub(super) stats: OrgPageStats,
}

/// Decides a page: each item with the server its staged list names (`staged`, taken),
/// against the stored digests; `read_old` reads a stored device whose digest differs.
pub(super) fn plan_org_page<E>(
    items: Vec<(String, RawResource)>,
    mut staged: std::collections::HashMap<String, (String, Option<String>)>,
    stored: &std::collections::HashMap<String, StoredDigest>,
    stats: OrgPageStats,
    mut read_old: impl FnMut(i64) -> Result<OrgDevice, E>,
) -> Result<OrgPlan, E> {
    let mut plan = OrgPlan {
        stats,
        seen: Vec::with_capacity(items.len()),
        ..OrgPlan::default()
    };
    for (serial, raw) in items {
        let (server_id, server_name) = match staged.remove(&serial) {
            Some((id, name)) => (Some(id), name),
            None => (None, None),
        };
        let hash = raw.digest(server_id.as_deref(), server_name.as_deref());
        let existing = stored.get(&serial).copied();
        if let Some((id, stored_hash, removed)) = existing {
            // Listed, even if its record cannot be read: never removed for that.
            plan.seen.push(id);
            if stored_hash == hash && !removed {
                plan.stats.unchanged += 1;
                continue;
            }
        }
        let mut d = match raw.decode() {
            Ok(d) => d,
            Err(why) => {
                plan.stats.refuse(why);
                continue;
            }
        };
        d.serial_number = serial;
        d.server_id = server_id;
        d.server_name = server_name;
        match existing {
            None => {
                plan.events.push(&d, EventKind::Added, None);
                plan.stats.added += 1;
                plan.new_rows.push((d, hash));
            }
            Some((id, _, true)) => {
                plan.events.push(&d, EventKind::Added, None);
                plan.stats.added += 1;
                plan.updates.push((id, d, hash));
            }
            Some((id, _, false)) => {
                let old = read_old(id)?;
                let changes = d.changes_from(&old);
                if changes.is_empty() {
                    // A difference of shape, or only attributes beyond the columns:
                    // stored, no event.
                    plan.stats.unchanged += 1;
                } else {
                    plan.events.push(&d, EventKind::Modified, Some(&changes));
                    plan.stats.modified += 1;
                }
                plan.updates.push((id, d, hash));
            }
        }
    }
    Ok(plan)
}

/// At the end of a complete walk: every device of `alive` (ids of the account's listed
/// devices) the walk did not list is removed by `remove` (which marks its row and returns
/// the device as stored), one event each. Returns how many of `alive` the walk listed.
pub(super) fn remove_unlisted<E>(
    alive: Vec<i64>,
    listed: &super::devices::SeenIds,
    events: &mut OrgEvents,
    stats: &mut OrgPageStats,
    mut remove: impl FnMut(i64) -> Result<OrgDevice, E>,
) -> Result<i64, E> {
    let listed_count = alive.iter().filter(|id| listed.contains(**id)).count();
    for id in alive.into_iter().filter(|id| !listed.contains(*id)) {
        let old = remove(id)?;
        events.push(&old, EventKind::Deleted, None);
        stats.removed += 1;
    }
    Ok(listed_count as i64)
}

/// The columns a device row is written with after its key: Apple's attributes, then
/// these.
pub(super) const ROW_TAIL: [&str; 4] = [
    "extra_json",
    "assigned_server_id",
    "assigned_server_name",
    "content_hash",
];

fn write_org_page(
    tx: &rusqlite::Transaction<'_>,
    account: &str,
    walk_run: i64,
    resources: Vec<RawResource>,
    next: Option<&str>,
    now: &str,
) -> rusqlite::Result<OrgPageStats> {
    let mut stats = OrgPageStats::default();
    let items = page_items(resources, &mut stats);
    let serials = {
        let all: Vec<&str> = items.iter().map(|(s, _)| s.as_str()).collect();
        serde_json::to_string(&all).expect("strings always serialise")
    };
    // The page's staged servers and stored rows, one statement each.
    let staged: std::collections::HashMap<String, (String, Option<String>)> = tx
        .prepare_cached(
            "SELECT s.serial_number, s.server_id, m.server_name FROM org_server_devices s
             LEFT JOIN mdm_servers m ON m.account_name = s.account_name AND m.id = s.server_id
             WHERE s.account_name = ?1 AND s.serial_number IN (SELECT value FROM json_each(?2))",
        )?
        .query_map(params![account, serials], |r| {
            Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?)))
        })?
        .collect::<Result<_, _>>()?;
    let stored: std::collections::HashMap<String, StoredDigest> = tx
        .prepare_cached(
            "SELECT serial_number, id, content_hash, removed_at IS NOT NULL FROM org_devices
             WHERE account_name = ?1 AND serial_number IN (SELECT value FROM json_each(?2))",
        )?
        .query_map(params![account, serials], |r| {
            Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?)))
        })?
        .collect::<Result<_, _>>()?;
    let mut read = tx.prepare_cached(&format!(
        "SELECT {} FROM org_devices WHERE id = ?1",
        device_columns()
    ))?;
    let mut plan = plan_org_page(items, staged, &stored, stats, |id| {
        read.query_row([id], device_from_row).map(|s| s.device)
    })?;
    let row_values = |d: &OrgDevice, hash: i64| -> Vec<rusqlite::types::Value> {
        let mut v: Vec<rusqlite::types::Value> = Vec::with_capacity(ORG_COLUMNS.len() + 4);
        v.extend(d.values.iter().map(sql_value));
        v.push(extra_text(d).into());
        v.push(d.server_id.clone().into());
        v.push(d.server_name.clone().into());
        v.push(hash.into());
        v
    };
    if !plan.updates.is_empty() {
        let set_list: Vec<String> = ORG_COLUMNS
            .iter()
            .map(|c| c.0)
            .chain(ROW_TAIL)
            .enumerate()
            .map(|(i, c)| format!("{c} = ?{}", i + 3))
            .collect();
        let mut update = tx.prepare_cached(&format!(
            "UPDATE org_devices SET {}, updated_at = ?2, removed_at = NULL WHERE id = ?1",
            set_list.join(", ")
        ))?;
        for (id, d, hash) in &plan.updates {
            let mut vals: Vec<rusqlite::types::Value> = vec![(*id).into(), now.to_owned().into()];
            vals.extend(row_values(d, *hash));
            update.execute(rusqlite::params_from_iter(vals))?;
        }
    }
    if !plan.new_rows.is_empty() {
        // New rows: ids given here, inserted many per statement.
        let first: i64 = tx.query_row(
            "SELECT COALESCE(MAX(id), 0) + 1 FROM org_devices",
            [],
            |r| r.get(0),
        )?;
        let mut rows: Vec<Vec<rusqlite::types::Value>> = Vec::with_capacity(plan.new_rows.len());
        for (id, (d, hash)) in (first..).zip(&plan.new_rows) {
            let mut row: Vec<rusqlite::types::Value> = vec![
                id.into(),
                account.to_owned().into(),
                d.serial_number.clone().into(),
                now.to_owned().into(),
                now.to_owned().into(),
            ];
            row.extend(row_values(d, *hash));
            rows.push(row);
            plan.seen.push(id);
        }
        let cols: Vec<&str> = [
            "id",
            "account_name",
            "serial_number",
            "first_seen_at",
            "updated_at",
        ]
        .into_iter()
        .chain(ORG_COLUMNS.iter().map(|c| c.0))
        .chain(ROW_TAIL)
        .collect();
        let values: Vec<&dyn rusqlite::ToSql> = rows
            .iter()
            .flatten()
            .map(|v| v as &dyn rusqlite::ToSql)
            .collect();
        super::insert_many(
            tx,
            &format!("org_devices ({})", cols.join(", ")),
            cols.len(),
            &values,
        )?;
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
                "UPDATE org_walks SET cursor = ?2 WHERE account_name = ?1",
                params![account, cursor],
            )?;
        }
        None => {
            let listed = load_seen(tx, &seen_key(account), walk_run)?;
            let alive: Vec<i64> = tx
                .prepare_cached(
                    "SELECT id FROM org_devices WHERE account_name = ?1 AND removed_at IS NULL",
                )?
                .query_map([account], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut remove = tx.prepare_cached(
                "UPDATE org_devices SET removed_at = ?2, updated_at = ?2 WHERE id = ?1",
            )?;
            let listed_count = remove_unlisted(alive, &listed, &mut events, &mut stats, |id| {
                let old = read.query_row([id], device_from_row)?;
                remove.execute(params![id, now])?;
                Ok::<_, rusqlite::Error>(old.device)
            })?;

            tx.execute(
                "DELETE FROM fetch_seen WHERE token_name = ?1",
                [seen_key(account)],
            )?;
            tx.execute(
                "DELETE FROM org_server_devices WHERE account_name = ?1",
                [account],
            )?;
            tx.execute(
                "UPDATE org_walks SET walk_run = walk_run + 1, phase = 'servers', server_index = 0,
                     cursor = NULL, last_complete_at = ?2, last_walk_devices = ?3
                 WHERE account_name = ?1",
                params![account, now, listed_count as i64],
            )?;
        }
    }
    let released = events.removed_serials();
    events.insert(tx, account, now)?;
    // After the organisation's own events: the cause before its effect.
    released_from_org(tx, &released, now)?;
    Ok(stats)
}
