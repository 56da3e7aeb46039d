//! The `devices` table: writing a page (the event decision of [`crate::events::decide`]
//! applied to every record, new rows inserted many per statement, reconciliation after a
//! complete fetch) and the device queries.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};
use serde_json::{Map, Value};

use super::cursors::count_fetch_changes;
use super::events::PageEvents;
use super::{insert_many, upsert_state, CursorState, Store, StoreError};
use crate::events::{decide, reason, Decision, Known, ReasonContext};
use crate::model::{Device, DeviceRecord, EventKind, FieldShape, Phase, DEVICE_FIELDS, V10_FIELDS};

/// One page to write.
#[derive(Debug)]
pub struct PageWrite<'a> {
    /// Token the page belongs to.
    pub token: &'a str,
    /// Fetch or sync page.
    pub kind: Phase,
    /// Records, already de-duplicated by serial (see `model::dedupe_latest`).
    pub records: &'a [DeviceRecord],
    /// The cursor state to store with the page.
    pub next: CursorState,
    /// Apple's `fetched_until`.
    pub fetched_until: Option<&'a str>,
    /// The page completes a full fetch: devices the fetch did not return are deleted.
    pub completes_fetch: bool,
    /// Timestamp for rows and events.
    pub now: &'a str,
    /// Serials of records on this (fetch) page that could not be read: the devices are on
    /// the server, so reconciliation must not delete them.
    pub unreadable: &'a [String],
}

/// What a page changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageStats {
    /// `added` events written.
    pub added: u64,
    /// `modified` events written.
    pub modified: u64,
    /// `deleted` events written.
    pub deleted: u64,
    /// Records that changed nothing.
    pub unchanged: u64,
    /// Sync records older than what is stored, ignored.
    pub stale: u64,
}

impl PageStats {
    /// Adds another page's counts.
    pub fn add(&mut self, o: PageStats) {
        self.added += o.added;
        self.modified += o.modified;
        self.deleted += o.deleted;
        self.unchanged += o.unchanged;
        self.stale += o.stale;
    }
    /// Events written.
    pub fn events(&self) -> u64 {
        self.added + self.modified + self.deleted
    }
}

/// A stored device with its bookkeeping.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredDevice {
    /// Token it belongs to.
    pub token_name: String,
    /// Apple's fields.
    pub device: Device,
    /// When adesync first stored it.
    pub first_seen_at: String,
    /// When a field last changed.
    pub updated_at: String,
    /// When it was removed from the server (None while assigned).
    pub deleted_at: Option<String>,
}

/// Filters for [`Store::devices`].
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    /// Only this token.
    pub token: Option<String>,
    /// Only this serial number.
    pub serial: Option<String>,
    /// Include deleted devices (`Some(true)`: only deleted).
    pub deleted: Option<bool>,
    /// Only this `profile_status`.
    pub profile_status: Option<String>,
    /// Only this model (case-insensitive).
    pub model: Option<String>,
    /// Only this `device_family` (case-insensitive).
    pub family: Option<String>,
    /// Only the device with this IMEI.
    pub imei: Option<String>,
    /// At most this many.
    pub limit: Option<u64>,
}

pub(super) const DEVICE_COLUMNS: &str =
    "serial_number, model, description, color, asset_tag, profile_status, \
    profile_uuid, profile_assign_time, profile_push_time, device_assigned_date, \
    device_assigned_by, os, device_family, extra_json, imei, meid, eid, wifi_mac_address, \
    bluetooth_mac_address, ethernet_mac_address, is_replacement_device, \
    mdm_migration_deadline, released_by_replacement";

/// Columns of [`DEVICE_COLUMNS`]: serial, the named fields, extra_json, protocol 10.
pub(super) const DEVICE_COLUMN_COUNT: usize = 14 + V10_FIELDS.len();

/// The protocol-10 fields of a device as their columns store them (in [`V10_FIELDS`]
/// order): lists as JSON text, booleans 0/1, text as text; NULL when Apple sent none.
pub(super) fn v10_sql(d: &Device) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as S;
    V10_FIELDS
        .iter()
        .map(|(name, shape)| match (shape, d.v10(name)) {
            (_, None) => S::Null,
            (_, Some(Value::String(t))) => S::Text(t.clone()),
            (FieldShape::Bool, Some(Value::Bool(b))) => S::Integer(*b as i64),
            (_, Some(Value::Number(n))) if n.is_i64() => S::Integer(n.as_i64().unwrap_or(0)),
            (_, Some(other)) => S::Text(other.to_string()),
        })
        .collect()
}

/// The protocol-10 columns read back into `extra` (see [`v10_sql`]).
fn v10_from_row(
    r: &rusqlite::Row<'_>,
    start: usize,
    extra: &mut Map<String, Value>,
) -> rusqlite::Result<()> {
    use rusqlite::types::ValueRef;
    for (i, (name, shape)) in V10_FIELDS.iter().enumerate() {
        let v = match (shape, r.get_ref(start + i)?) {
            (_, ValueRef::Null) => continue,
            (FieldShape::Bool, ValueRef::Integer(n)) => Value::Bool(n != 0),
            (_, ValueRef::Integer(n)) => Value::from(n),
            (FieldShape::List, ValueRef::Text(t)) if t.first() == Some(&b'[') => {
                serde_json::from_slice(t)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(t).into_owned()))
            }
            (_, ValueRef::Text(t)) => Value::String(String::from_utf8_lossy(t).into_owned()),
            (_, ValueRef::Real(f)) => Value::from(f),
            (_, ValueRef::Blob(_)) => continue,
        };
        extra.insert((*name).to_owned(), v);
    }
    Ok(())
}

/// The stored state of one device, as needed to diff against an incoming record.
pub(super) struct Existing {
    id: i64,
    /// The stored device; None when it equals the incoming record's device (compared in
    /// place while reading, so an unchanged device — most of a re-fetch — is never
    /// decoded).
    device: Option<Device>,
    last_op_date: Option<String>,
    deleted: bool,
}

impl Existing {
    /// The stored device (`incoming` when they are equal).
    pub(super) fn device<'a>(&'a self, incoming: &'a Device) -> &'a Device {
        self.device.as_ref().unwrap_or(incoming)
    }
}

pub(super) fn device_from_row(r: &rusqlite::Row<'_>, start: usize) -> rusqlite::Result<Device> {
    let mut d = Device {
        serial_number: r.get(start)?,
        ..Device::default()
    };
    for (i, f) in d.fields_mut().into_iter().enumerate() {
        *f = r.get(start + 1 + i)?;
    }
    let extra: Option<String> = r.get(start + 13)?;
    if let Some(text) = extra {
        if let Ok(Value::Object(m)) = serde_json::from_str(&text) {
            d.extra = m;
        }
    }
    v10_from_row(r, start + 14, &mut d.extra)?;
    Ok(d)
}

pub(super) fn write_page(
    tx: &rusqlite::Transaction<'_>,
    page: &PageWrite<'_>,
) -> rusqlite::Result<PageStats> {
    let mut stats = PageStats::default();
    let existing = load_existing(tx, page.token, page.records)?;
    // Ids of the devices this page shows to be on the server, for reconciliation.
    let mut seen: Vec<i64> = Vec::new();
    // New devices: inserted together at the end of the page (see insert_many), with ids
    // given here so the page can record them as seen.
    let mut new_devices: Vec<(i64, &DeviceRecord, Option<String>)> = Vec::new();
    let mut next_id: Option<i64> = None;
    // By id (read with the stored row): no second index lookup. Two statements so that a
    // change to an assigned device does not rewrite its `devices_alive` entry.
    const SET_FIELDS: &str = "model = ?2, description = ?3, color = ?4, asset_tag = ?5,
             profile_status = ?6, profile_uuid = ?7, profile_assign_time = ?8,
             profile_push_time = ?9, device_assigned_date = ?10, device_assigned_by = ?11,
             os = ?12, device_family = ?13, extra_json = ?14,
             last_op_date = COALESCE(?15, last_op_date), updated_at = ?16,
             imei = ?17, meid = ?18, eid = ?19, wifi_mac_address = ?20,
             bluetooth_mac_address = ?21, ethernet_mac_address = ?22,
             is_replacement_device = ?23, mdm_migration_deadline = ?24,
             released_by_replacement = ?25";
    let mut update =
        tx.prepare_cached(&format!("UPDATE devices SET {SET_FIELDS} WHERE id = ?1"))?;
    let mut revive = tx.prepare_cached(&format!(
        "UPDATE devices SET {SET_FIELDS}, deleted_at = NULL WHERE id = ?1"
    ))?;
    let mut touch = tx.prepare_cached("UPDATE devices SET last_op_date = ?2 WHERE id = ?1")?;
    let mut mark_deleted = tx.prepare_cached(
        "UPDATE devices SET deleted_at = ?2, updated_at = ?2, last_op_date = COALESCE(?3, last_op_date),
             released_by_replacement = COALESCE(?4, released_by_replacement)
         WHERE id = ?1",
    )?;
    let mut events = PageEvents::default();

    for rec in page.records {
        let serial = rec.device.serial_number.as_str();
        let old = existing.get(serial);
        let known = old.map(|o| Known {
            device: o.device.as_ref(),
            last_op_date: o.last_op_date.as_deref(),
            deleted: o.deleted,
        });
        // A record that changes nothing still brings a newer op_date to remember.
        let mut note_op_date = |o: &Existing| match &rec.op_date {
            Some(date) if Some(date) != o.last_op_date.as_ref() => {
                touch.execute(params![o.id, date]).map(drop)
            }
            _ => Ok(()),
        };
        let decision = decide(known, rec);
        let kind = decision.event_kind();
        let changes = match decision {
            Decision::Stale => {
                stats.stale += 1;
                continue;
            }
            Decision::AlreadyGone => {
                if let Some(o) = old {
                    note_op_date(o)?;
                }
                stats.unchanged += 1;
                continue;
            }
            Decision::Unchanged => {
                if let Some(o) = old {
                    note_op_date(o)?;
                    seen.push(o.id);
                }
                stats.unchanged += 1;
                continue;
            }
            Decision::Deleted => {
                if let Some(o) = old {
                    // The last stored record, and what the deletion itself says
                    // (`released_by_replacement`), kept with it.
                    let mut stored = o.device(&rec.device).clone();
                    let by_replacement = rec.device.v10("released_by_replacement").cloned();
                    if let Some(v) = &by_replacement {
                        stored
                            .extra
                            .insert("released_by_replacement".into(), v.clone());
                    }
                    mark_deleted.execute(params![
                        o.id,
                        page.now,
                        rec.op_date,
                        by_replacement.as_ref().and_then(Value::as_bool)
                    ])?;
                    let why = reason(
                        &Decision::Deleted,
                        Some(&stored),
                        &rec.device,
                        reason_context(tx, serial)?,
                    );
                    events.push(
                        serial,
                        EventKind::Deleted,
                        None,
                        &stored,
                        extra_json(&stored).as_deref(),
                        why,
                    );
                    stats.deleted += 1;
                }
                continue;
            }
            // `added` events store no changes: they are every field of the snapshot.
            Decision::Added { .. } => None,
            Decision::Modified(ref diff) => Some(Value::Object(diff.clone()).to_string()),
        };
        let kind = kind.unwrap_or(EventKind::Added);
        let d = &rec.device;
        let f = d.fields();
        let extra = extra_json(d);
        let why = reason(
            &decision,
            old.map(|o| o.device(d)),
            d,
            ReasonContext::default(),
        );
        events.push(serial, kind, changes, d, extra.as_deref(), why);
        let id = match old {
            None => {
                let id = match next_id {
                    Some(id) => id,
                    None => {
                        tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM devices", [], |r| {
                            r.get(0)
                        })?
                    }
                };
                next_id = Some(id + 1);
                new_devices.push((id, rec, extra));
                id
            }
            Some(o) => {
                let stmt = if o.deleted { &mut revive } else { &mut update };
                let v10 = v10_sql(d);
                let values: Vec<&dyn rusqlite::ToSql> = [&o.id as &dyn rusqlite::ToSql]
                    .into_iter()
                    .chain(f.iter().map(|v| *v as &dyn rusqlite::ToSql))
                    .chain([&extra as &dyn rusqlite::ToSql, &rec.op_date, &page.now])
                    .chain(v10.iter().map(|v| v as &dyn rusqlite::ToSql))
                    .collect();
                stmt.execute(rusqlite::params_from_iter(values))?;
                o.id
            }
        };
        seen.push(id);
        match kind {
            EventKind::Added => stats.added += 1,
            _ => stats.modified += 1,
        }
    }

    let v10s: Vec<Vec<rusqlite::types::Value>> = new_devices
        .iter()
        .map(|(_, rec, _)| v10_sql(&rec.device))
        .collect();
    let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(new_devices.len() * 28);
    for ((id, rec, extra), v10) in new_devices.iter().zip(&v10s) {
        values.extend([
            id as &dyn rusqlite::ToSql,
            &page.token,
            &rec.device.serial_number,
        ]);
        values.extend(rec.device.fields().map(|v| v as &dyn rusqlite::ToSql));
        values.extend([
            extra as &dyn rusqlite::ToSql,
            &rec.op_date,
            &page.now,
            &page.now,
        ]);
        values.extend(v10.iter().map(|v| v as &dyn rusqlite::ToSql));
    }
    insert_many(
        tx,
        "devices (id, token_name, serial_number, model, description, color, asset_tag,
             profile_status, profile_uuid, profile_assign_time, profile_push_time,
             device_assigned_date, device_assigned_by, os, device_family, extra_json,
             last_op_date, first_seen_at, updated_at, imei, meid, eid, wifi_mac_address,
             bluetooth_mac_address, ethernet_mac_address, is_replacement_device,
             mdm_migration_deadline, released_by_replacement)",
        28,
        &values,
    )?;
    if page.kind == Phase::Fetch {
        if !page.unreadable.is_empty() {
            let serials = serde_json::to_string(page.unreadable).expect("strings always serialise");
            let mut ids = tx.prepare_cached(
                "SELECT id FROM devices WHERE token_name = ?1
                 AND serial_number IN (SELECT value FROM json_each(?2))",
            )?;
            for id in ids.query_map(params![page.token, serials], |r| r.get::<_, i64>(0))? {
                seen.push(id?);
            }
        }
        mark_seen(tx, page.token, page.next.fetch_run, seen)?;
    }
    if page.completes_fetch {
        // Reconcile: the completed full fetch is Apple's whole membership; a device it did
        // not return left while we were not looking (e.g. during an expired cursor).
        let returned = load_seen(tx, page.token, page.next.fetch_run)?;
        let gone: Vec<i64> = tx
            .prepare_cached("SELECT id FROM devices WHERE token_name = ?1 AND deleted_at IS NULL")?
            .query_map([page.token], |r| r.get::<_, i64>(0))?
            .filter(|id| id.as_ref().map_or(true, |id| !returned.contains(*id)))
            .collect::<Result<_, _>>()?;
        let mut read = tx.prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
        ))?;
        for id in gone {
            let d = read.query_row([id], |r| device_from_row(r, 0))?;
            mark_deleted.execute(params![
                id,
                page.now,
                Option::<String>::None,
                Option::<bool>::None
            ])?;
            let why = reason(
                &Decision::Deleted,
                Some(&d),
                &d,
                reason_context(tx, &d.serial_number)?,
            );
            events.push(
                &d.serial_number,
                EventKind::Deleted,
                None,
                &d,
                extra_json(&d).as_deref(),
                why,
            );
            stats.deleted += 1;
        }
        tx.execute("DELETE FROM fetch_seen WHERE token_name = ?1", [page.token])?;
    }

    events.insert(tx, page.token, page.now)?;
    upsert_state(tx, page.token, &page.next, page.fetched_until, page.now)?;
    if page.kind == Phase::Fetch {
        count_fetch_changes(
            tx,
            page.token,
            stats.events(),
            page.completes_fetch,
            page.now,
        )?;
    }
    Ok(stats)
}

/// What the rest of the mirror says about a device leaving: the organisation saw it
/// released, or a replacement names it as its original.
fn reason_context(tx: &rusqlite::Transaction<'_>, serial: &str) -> rusqlite::Result<ReasonContext> {
    let released_from_org = tx
        .prepare_cached(
            "SELECT 1 FROM org_devices WHERE serial_number = ?1 AND removed_at IS NOT NULL LIMIT 1",
        )?
        .exists([serial])?;
    let original_of_replacement = tx
        .prepare_cached("SELECT 1 FROM devices WHERE original_device_serial_number = ?1 LIMIT 1")?
        .exists([serial])?;
    Ok(ReasonContext {
        released_from_org,
        original_of_replacement,
    })
}

/// Device ids per `fetch_seen` chunk (2 KiB of bits).
pub(super) const SEEN_CHUNK_IDS: i64 = 16_384;

/// Records `ids` as returned by full fetch `run` of `token`.
pub(super) fn mark_seen(
    tx: &rusqlite::Transaction<'_>,
    token: &str,
    run: i64,
    mut ids: Vec<i64>,
) -> rusqlite::Result<()> {
    ids.sort_unstable();
    let mut read = tx.prepare_cached(
        "SELECT bits FROM fetch_seen WHERE token_name = ?1 AND fetch_run = ?2 AND chunk = ?3",
    )?;
    let mut write = tx.prepare_cached(
        "INSERT INTO fetch_seen (token_name, fetch_run, chunk, bits) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (token_name, fetch_run, chunk) DO UPDATE SET bits = excluded.bits",
    )?;
    for group in ids.chunk_by(|a, b| a / SEEN_CHUNK_IDS == b / SEEN_CHUNK_IDS) {
        let chunk = group[0] / SEEN_CHUNK_IDS;
        let mut bits: Vec<u8> = read
            .query_row(params![token, run, chunk], |r| r.get(0))
            .optional()?
            .unwrap_or_default();
        bits.resize((SEEN_CHUNK_IDS / 8) as usize, 0);
        for id in group {
            let bit = (id % SEEN_CHUNK_IDS) as usize;
            bits[bit / 8] |= 1 << (bit % 8);
        }
        write.execute(params![token, run, chunk, bits])?;
    }
    Ok(())
}

/// The device ids full fetch `run` of `token` has returned (bounded: one bit per id).
pub(super) struct SeenIds(HashMap<i64, Vec<u8>>);

impl SeenIds {
    pub(super) fn contains(&self, id: i64) -> bool {
        let bit = (id % SEEN_CHUNK_IDS) as usize;
        self.0
            .get(&(id / SEEN_CHUNK_IDS))
            .and_then(|bits| bits.get(bit / 8))
            .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
    }
}

pub(super) fn load_seen(
    tx: &rusqlite::Transaction<'_>,
    token: &str,
    run: i64,
) -> rusqlite::Result<SeenIds> {
    let mut stmt = tx.prepare_cached(
        "SELECT chunk, bits FROM fetch_seen WHERE token_name = ?1 AND fetch_run = ?2",
    )?;
    let chunks = stmt
        .query_map(params![token, run], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    Ok(SeenIds(chunks))
}

/// `extra_json` for a device: its extra fields beyond the protocol-10 columns as a JSON
/// object, None when it has none.
pub(super) fn extra_json(d: &Device) -> Option<String> {
    let is_v10 = |k: &str| V10_FIELDS.iter().any(|(name, _)| *name == k);
    // Written as serde_json writes a map (keys in order), without copying the map.
    let mut out = String::new();
    for (k, v) in d.extra.iter().filter(|(k, _)| !is_v10(k)) {
        out.push(if out.is_empty() { '{' } else { ',' });
        out.push_str(&serde_json::to_string(k).expect("strings always serialise"));
        out.push(':');
        out.push_str(&v.to_string());
    }
    if out.is_empty() {
        return None;
    }
    out.push('}');
    Some(out)
}

/// Reads the stored rows for a page's serials in one statement.
pub(super) fn load_existing(
    tx: &rusqlite::Transaction<'_>,
    token: &str,
    records: &[DeviceRecord],
) -> rusqlite::Result<HashMap<String, Existing>> {
    let incoming: HashMap<&str, &Device> = records
        .iter()
        .map(|r| (r.device.serial_number.as_str(), &r.device))
        .collect();
    let serials = serde_json::to_string(&incoming.keys().collect::<Vec<_>>())
        .expect("strings always serialise");
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS}, last_op_date, deleted_at, id FROM devices
         WHERE token_name = ?1 AND serial_number IN (SELECT value FROM json_each(?2))"
    ))?;
    let mut map = HashMap::with_capacity(records.len());
    let mut rows = stmt.query(params![token, serials])?;
    while let Some(r) = rows.next()? {
        let serial = r.get_ref(0)?.as_str()?;
        let same = match incoming.get(serial) {
            Some(d) => stored_equals(r, d)?,
            None => false,
        };
        let e = Existing {
            device: if same {
                None
            } else {
                Some(device_from_row(r, 0)?)
            },
            last_op_date: r.get(DEVICE_COLUMN_COUNT)?,
            deleted: r.get_ref(DEVICE_COLUMN_COUNT + 1)? != rusqlite::types::ValueRef::Null,
            id: r.get(DEVICE_COLUMN_COUNT + 2)?,
        };
        map.insert(serial.to_owned(), e);
    }
    Ok(map)
}

/// Whether a stored row (serial, the named columns, extra_json) holds exactly `d`,
/// compared in place.
pub(super) fn stored_equals(r: &rusqlite::Row<'_>, d: &Device) -> rusqlite::Result<bool> {
    for (i, field) in d.fields().into_iter().enumerate() {
        if r.get_ref(1 + i)?.as_str_or_null()? != field.as_deref() {
            return Ok(false);
        }
    }
    // extra_json is written by `extra_json`, so equal extras have equal text.
    let stored = r.get_ref(13)?.as_str_or_null()?;
    if stored != extra_json(d).as_deref() {
        return Ok(false);
    }
    for (i, v) in v10_sql(d).into_iter().enumerate() {
        if r.get::<_, rusqlite::types::Value>(14 + i)? != v {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The device fields as a JSON object map, named columns and extras together.
pub fn device_map(d: &Device) -> Map<String, Value> {
    match d.to_json() {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Names of the stored columns that mirror Apple's fields, for docs and exports.
pub fn apple_columns() -> impl Iterator<Item = &'static str> {
    std::iter::once("serial_number").chain(DEVICE_FIELDS)
}

impl Store {
    /// Stored devices matching `filter`, by token then serial.
    pub fn devices(&self, filter: &DeviceFilter) -> Result<Vec<StoredDevice>, StoreError> {
        let mut sql = format!(
            "SELECT token_name, {DEVICE_COLUMNS}, first_seen_at, updated_at, deleted_at FROM devices WHERE 1=1"
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(t) = &filter.token {
            args.push(t.clone().into());
            sql.push_str(&format!(" AND token_name = ?{}", args.len()));
        }
        if let Some(s) = &filter.serial {
            args.push(s.clone().into());
            sql.push_str(&format!(" AND serial_number = ?{}", args.len()));
        }
        if let Some(s) = &filter.profile_status {
            args.push(s.clone().into());
            sql.push_str(&format!(" AND profile_status = ?{}", args.len()));
        }
        if let Some(s) = &filter.model {
            args.push(s.clone().into());
            sql.push_str(&format!(" AND model = ?{} COLLATE NOCASE", args.len()));
        }
        if let Some(s) = &filter.family {
            args.push(s.clone().into());
            sql.push_str(&format!(
                " AND device_family = ?{} COLLATE NOCASE",
                args.len()
            ));
        }
        if let Some(s) = &filter.imei {
            args.push(format!("\"{s}\"").into());
            sql.push_str(&format!(" AND instr(imei, ?{}) > 0", args.len()));
        }
        match filter.deleted {
            None => sql.push_str(" AND deleted_at IS NULL"),
            Some(true) => sql.push_str(" AND deleted_at IS NOT NULL"),
            Some(false) => {}
        }
        sql.push_str(" ORDER BY token_name, serial_number");
        if let Some(l) = filter.limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let mut stmt = self.conn.prepare(&sql).map_err(self.err("list devices"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| {
                Ok(StoredDevice {
                    token_name: r.get(0)?,
                    device: device_from_row(r, 1)?,
                    first_seen_at: r.get(DEVICE_COLUMN_COUNT + 1)?,
                    updated_at: r.get(DEVICE_COLUMN_COUNT + 2)?,
                    deleted_at: r.get(DEVICE_COLUMN_COUNT + 3)?,
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("list devices"))
    }

    /// Up to `limit` assigned replacement devices of `token` whose replacement details
    /// were never asked for (read through the partial index `devices_replacements_due`,
    /// so a no-op sync does not scan the table).
    pub fn replacements_due(&self, token: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT serial_number FROM devices INDEXED BY devices_replacements_due
                 WHERE token_name = ?1
                   AND is_replacement_device = 1 AND replacement_checked_at IS NULL
                   AND deleted_at IS NULL
                 LIMIT ?2",
            )
            .map_err(self.err("read replacement devices"))?;
        let rows = stmt
            .query_map(params![token, limit as i64], |r| r.get(0))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read replacement devices"))
    }

    /// Stores what a replacement device replaced (`None`: Apple says it is not one).
    pub fn save_replacement(
        &mut self,
        token: &str,
        serial: &str,
        original: Option<(&str, Option<&str>)>,
        now: &str,
    ) -> Result<(), StoreError> {
        let (original, date) = original.unzip();
        self.conn
            .execute(
                "UPDATE devices SET original_device_serial_number = ?3, replacement_date = ?4,
                     replacement_checked_at = ?5
                 WHERE token_name = ?1 AND serial_number = ?2",
                params![token, serial, original, date.flatten(), now],
            )
            .map(drop)
            .map_err(self.err("store replacement details"))
    }

    /// The replacement link of a serial: (the device it replaced, when) and the devices
    /// that replaced it, over every token.
    #[allow(clippy::type_complexity)]
    pub fn replacement_links(
        &self,
        serial: &str,
    ) -> Result<(Option<(String, Option<String>)>, Vec<String>), StoreError> {
        let replaced = self
            .conn
            .query_row(
                "SELECT original_device_serial_number, replacement_date FROM devices
                 WHERE serial_number = ?1 AND original_device_serial_number IS NOT NULL LIMIT 1",
                [serial],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err("read replacement details"))?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT serial_number FROM devices WHERE original_device_serial_number = ?1 ORDER BY 1",
            )
            .map_err(self.err("read replacement details"))?;
        let by = stmt
            .query_map([serial], |r| r.get(0))
            .and_then(|it| it.collect::<Result<Vec<String>, _>>())
            .map_err(self.err("read replacement details"))?;
        Ok((replaced, by))
    }

    /// Counts of stored devices per token: (assigned, deleted).
    pub fn device_counts(&self, token: &str) -> Result<(u64, u64), StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FILTER (WHERE deleted_at IS NULL), COUNT(*) FILTER (WHERE deleted_at IS NOT NULL)
                 FROM devices WHERE token_name = ?1",
                [token],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(self.err("count devices"))
    }

    /// Assigned devices by (token, profile_status); a missing status counts as "unknown".
    pub fn profile_status_counts(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT token_name, COALESCE(profile_status, 'unknown'), COUNT(*) FROM devices
                 WHERE deleted_at IS NULL GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .map_err(self.err("count devices"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("count devices"))
    }
}
