//! The `devices` table: writing a page (the event decision of [`crate::events::decide`]
//! applied to every record, new rows inserted many per statement, reconciliation after a
//! complete fetch) and the device queries.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};
use serde_json::{Map, Value};

use super::cursors::count_fetch_changes;
use super::device_row::{
    content_hash, content_hash_of, device_from_row, extra_json, extra_json_of, reads_back_exactly,
    v10_sql, v10_sql_of, V10Values, DEVICE_COLUMNS, DEVICE_COLUMN_COUNT,
};
use super::events::{materialize, PageEvents};
use super::{insert_many, insert_many_or, upsert_state, CursorState, Store, StoreError};
use crate::events::{decide, reason, Decision, Known, ReasonContext};
use crate::model::{Device, DeviceRecord, EventKind, Phase, Reason, DEVICE_FIELDS};

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
    /// The token had no devices when this pass started, so the page's records
    /// are most likely new: they are inserted without being looked up first, and a serial
    /// already stored (Apple repeated it on an earlier page) is found by its insert being
    /// ignored and then handled as usual.
    pub expect_new: bool,
    /// The records' stored form made in advance by [`prepare`] (on another thread, while
    /// the writer writes); made here when None.
    pub prepared: Option<&'a [Prepared]>,
}

/// What a record is stored as beyond its fields: its `extra_json`, content digest and
/// protocol-10 column values, and whether its row reads back exactly as the record (see
/// [`reads_back_exactly`]).
#[derive(Clone, Debug)]
pub struct Prepared {
    extra_json: Option<String>,
    content_hash: i64,
    v10: Vec<rusqlite::types::Value>,
    exact: bool,
}

impl Prepared {
    /// The record's `extra_json`.
    pub(super) fn extra_json(&self) -> Option<&str> {
        self.extra_json.as_deref()
    }

    /// The record's content digest.
    pub(super) fn content_hash(&self) -> i64 {
        self.content_hash
    }

    /// The record's protocol-10 column values (made now if [`prepare_with`] left them).
    fn v10(&self, d: &Device) -> std::borrow::Cow<'_, [rusqlite::types::Value]> {
        if self.v10.is_empty() {
            v10_sql(d).into()
        } else {
            self.v10.as_slice().into()
        }
    }
}

/// The stored form of each record, in order (see [`PageWrite::prepared`]).
pub fn prepare(records: &[DeviceRecord]) -> Vec<Prepared> {
    prepare_with(records, true)
}

/// [`prepare`]; without `v10` the protocol-10 values are left to be made when a row is
/// written (the writer's own preparation of a re-fetch, whose rows are mostly unchanged).
pub(super) fn prepare_with(records: &[DeviceRecord], v10: bool) -> Vec<Prepared> {
    records
        .iter()
        .map(|rec| {
            let values = V10Values::of(&rec.device);
            let extra_json = extra_json_of(&rec.device, &values);
            let content_hash = content_hash_of(&rec.device, extra_json.as_deref(), &values);
            Prepared {
                extra_json,
                content_hash,
                v10: if v10 { v10_sql_of(&values) } else { Vec::new() },
                exact: reads_back_exactly(&values),
            }
        })
        .collect()
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

/// The stored state of each of a page's devices that is stored, by serial.
pub(super) type ExistingRows<'a> = foldhash::HashMap<&'a str, Existing>;

/// The stored state of one device, as needed to diff against an incoming record.
pub(super) struct Existing {
    id: i64,
    /// The stored device; None when it equals the incoming record's device (known from
    /// the content digest, or compared in place for a row without one, so an unchanged
    /// device — most of a re-fetch — is never decoded).
    device: Option<Device>,
    last_op_date: Option<String>,
    deleted: bool,
    /// The row's digest is missing (stored before migration 6) or not the incoming
    /// record's: an unchanged record writes its digest.
    rehash: bool,
    /// The `added` event whose snapshot is this row (see `PageEvents::push_deferred`)...
    snapshot_event_id: Option<i64>,
    /// ...or, once the row changed, the later event that keeps it (its previous_json).
    snapshot_source_id: Option<i64>,
}

impl Existing {
    /// The stored device (`incoming` when they are equal).
    pub(super) fn device<'a>(&'a self, incoming: &'a Device) -> &'a Device {
        self.device.as_ref().unwrap_or(incoming)
    }

    /// Before the row stops naming its deferred `added` event: the event gets its
    /// snapshot written into it.
    fn materialize(
        &self,
        tx: &rusqlite::Transaction<'_>,
        incoming: &Device,
    ) -> rusqlite::Result<()> {
        match self.snapshot_event_id {
            Some(event) => materialize(tx, event, self.snapshot_source_id, self.device(incoming)),
            None => Ok(()),
        }
    }
}

pub(super) fn write_page(
    tx: &rusqlite::Transaction<'_>,
    page: &PageWrite<'_>,
) -> rusqlite::Result<PageStats> {
    let mut stats = PageStats::default();
    // Each record's extra_json and content digest, made once.
    let made;
    let prepared: &[Prepared] = match page.prepared {
        Some(p) if p.len() == page.records.len() => p,
        _ => {
            made = prepare_with(page.records, false);
            &made
        }
    };
    let mut events = PageEvents::start(tx)?;
    let first_event = events.next_id();
    // Ids of the devices this page shows to be on the server, for reconciliation.
    let mut seen: Vec<i64> = Vec::new();
    // New devices: inserted together at the end of the page (see insert_many), with ids
    // given here so the page can record them as seen; each with its `added` event.
    let mut new_devices: Vec<NewRow<'_>> = Vec::new();
    let mut next_id: Option<i64> = None;
    // Expecting new devices: insert every record at once, record k with device id
    // first_id + k and event id first_event + k; the ones whose serial is already stored
    // are ignored by the insert and looked up below.
    let mut first_id = 0;
    let inserted: Option<Vec<bool>> = if page.expect_new && page.kind == Phase::Fetch {
        first_id = tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM devices", [], |r| {
            r.get(0)
        })?;
        // A record with an op_type (a deletion on a fetch page) goes the usual way.
        let rows: Vec<NewRow<'_>> = page
            .records
            .iter()
            .zip(prepared)
            .zip(0..)
            .filter(|((rec, _), _)| rec.op_type.is_none())
            .map(|((rec, p), k)| {
                let event = p.exact.then_some(first_event + k);
                (first_id + k, rec, p, event)
            })
            .collect();
        insert_new(tx, page, &rows, true)?;
        let n = page.records.len() as i64;
        let mut present = tx.prepare_cached("SELECT id FROM devices WHERE id BETWEEN ?1 AND ?2")?;
        let mut flags = vec![false; page.records.len()];
        for id in present.query_map(params![first_id, first_id + n - 1], |r| r.get::<_, i64>(0))? {
            flags[(id? - first_id) as usize] = true;
        }
        next_id = Some(first_id + n);
        Some(flags)
    } else {
        None
    };
    let (records, prepared_rest): (Vec<DeviceRecord>, Vec<Prepared>);
    let existing = match &inserted {
        None => load_existing(tx, page.token, page.records, prepared)?,
        Some(flags) if flags.iter().all(|f| *f) => ExistingRows::default(),
        Some(flags) => {
            (records, prepared_rest) = page
                .records
                .iter()
                .zip(prepared)
                .zip(flags)
                .filter(|(_, inserted)| !**inserted)
                .map(|((rec, p), _)| (rec.clone(), p.clone()))
                .unzip();
            load_existing(tx, page.token, &records, &prepared_rest)?
        }
    };
    // By id (read with the stored row): no second index lookup. Two statements so that a
    // change to an assigned device does not touch the `devices_gone` index.
    const SET_FIELDS: &str = "model = ?2, description = ?3, color = ?4, asset_tag = ?5,
             profile_status = ?6, profile_uuid = ?7, profile_assign_time = ?8,
             profile_push_time = ?9, device_assigned_date = ?10, device_assigned_by = ?11,
             os = ?12, device_family = ?13, extra_json = ?14,
             last_op_date = COALESCE(?15, last_op_date), updated_at = ?16,
             imei = ?17, meid = ?18, eid = ?19, wifi_mac_address = ?20,
             bluetooth_mac_address = ?21, ethernet_mac_address = ?22,
             is_replacement_device = ?23, mdm_migration_deadline = ?24,
             released_by_replacement = ?25, content_hash = ?26, snapshot_event_id = ?27,
             snapshot_source_id = ?28";
    let mut update =
        tx.prepare_cached(&format!("UPDATE devices SET {SET_FIELDS} WHERE id = ?1"))?;
    let mut revive = tx.prepare_cached(&format!(
        "UPDATE devices SET {SET_FIELDS}, deleted_at = NULL WHERE id = ?1"
    ))?;
    let mut touch = tx.prepare_cached(
        "UPDATE devices SET last_op_date = COALESCE(?2, last_op_date),
             content_hash = COALESCE(?3, content_hash) WHERE id = ?1",
    )?;
    // A deletion that changes the row (its `released_by_replacement`) names its event as
    // the one that keeps the row's old content (?6), like any first change after a
    // deferred `added` event: the old event is never rewritten.
    let mut mark_deleted = tx.prepare_cached(
        "UPDATE devices SET deleted_at = ?2, updated_at = ?2, last_op_date = COALESCE(?3, last_op_date),
             released_by_replacement = COALESCE(?4, released_by_replacement),
             content_hash = COALESCE(?5, content_hash),
             snapshot_source_id = COALESCE(?6, snapshot_source_id)
         WHERE id = ?1",
    )?;

    // Rows inserted above whose `added` event defers its snapshot to them: their events
    // are inserted from the rows themselves (see `PageEvents::added_from_rows`).
    let mut added_from_rows = false;
    for (k, (rec, p)) in page.records.iter().zip(prepared).enumerate() {
        let (extra, hash) = (&p.extra_json, &p.content_hash);
        let serial = rec.device.serial_number.as_str();
        if let Some(flags) = &inserted {
            // Record k's event, if it has one, takes the id it was given above.
            events.set_next_id(first_event + k as i64);
            if flags[k] {
                let d = &rec.device;
                let added = Decision::Added { revived: false };
                let why = reason(&added, None, d, ReasonContext::default());
                if p.exact {
                    // Its event is made from its row, with the page's others (below).
                    debug_assert_eq!(why, Reason::Assigned);
                    added_from_rows = true;
                } else {
                    events.push(serial, EventKind::Added, None, d, extra.as_deref(), why);
                }
                seen.push(first_id + k as i64);
                stats.added += 1;
                continue;
            }
        }
        let old = existing.get(serial);
        let known = old.map(|o| Known {
            device: o.device.as_ref(),
            last_op_date: o.last_op_date.as_deref(),
            deleted: o.deleted,
        });
        // A record that changes nothing still brings a newer op_date to remember, and a
        // row without its digest (stored before migration 6, or by another encoding of the
        // same values) gets it.
        let mut note_op_date = |o: &Existing, hash: Option<i64>| {
            let newer = rec
                .op_date
                .as_ref()
                .filter(|date| Some(*date) != o.last_op_date.as_ref());
            let hash = hash.filter(|_| o.rehash);
            if newer.is_some() || hash.is_some() {
                touch.execute(params![o.id, newer, hash]).map(drop)
            } else {
                Ok(())
            }
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
                    note_op_date(o, None)?;
                }
                stats.unchanged += 1;
                continue;
            }
            Decision::Unchanged => {
                if let Some(o) = old {
                    note_op_date(o, Some(*hash))?;
                    seen.push(o.id);
                }
                stats.unchanged += 1;
                continue;
            }
            Decision::Deleted => {
                if let Some(o) = old {
                    let Departure {
                        stored,
                        by_replacement,
                        new_hash,
                    } = departure(o.device(&rec.device), &rec.device);
                    let why = reason(
                        &Decision::Deleted,
                        Some(&stored),
                        &rec.device,
                        reason_context(tx, serial)?,
                    );
                    let extra = extra_json(&stored);
                    // The row's Apple fields change, and it is still the snapshot of its
                    // `added` event: this event keeps what the row was.
                    let keeps_old = new_hash.is_some()
                        && o.snapshot_event_id.is_some()
                        && o.snapshot_source_id.is_none();
                    let id = events.push_with_previous(
                        serial,
                        EventKind::Deleted,
                        None,
                        &stored,
                        extra.as_deref(),
                        keeps_old.then(|| o.device(&rec.device)),
                        why,
                    );
                    let source = keeps_old.then_some(id);
                    mark_deleted.execute(params![
                        o.id,
                        page.now,
                        rec.op_date,
                        by_replacement,
                        new_hash,
                        source,
                    ])?;
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
        let why = reason(
            &decision,
            old.map(|o| o.device(d)),
            d,
            ReasonContext::default(),
        );
        // An `added` event's snapshot is the row it adds, until the row changes; a
        // `modified` event carries its own, and the first change after a deferred `added`
        // event also the row's old content (see `Existing::snapshot_source_id`).
        let (event_id, source_id) = match (kind, old) {
            (EventKind::Added, _) if p.exact => {
                (Some(events.push_deferred(serial, kind, why)), None)
            }
            (EventKind::Added, _) => {
                events.push(serial, kind, changes, d, extra.as_deref(), why);
                (None, None)
            }
            (_, Some(o)) if o.snapshot_event_id.is_some() && o.snapshot_source_id.is_none() => {
                let previous = o.device(d);
                let id = events.push_with_previous(
                    serial,
                    kind,
                    changes,
                    d,
                    extra.as_deref(),
                    Some(previous),
                    why,
                );
                (o.snapshot_event_id, Some(id))
            }
            (_, o) => {
                events.push(serial, kind, changes, d, extra.as_deref(), why);
                (
                    o.and_then(|o| o.snapshot_event_id),
                    o.and_then(|o| o.snapshot_source_id),
                )
            }
        };
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
                new_devices.push((id, rec, p, event_id));
                id
            }
            Some(o) => {
                if kind == EventKind::Added {
                    // Added again: the row will name the new event.
                    o.materialize(tx, d)?;
                }
                let stmt = if o.deleted { &mut revive } else { &mut update };
                let v10 = p.v10(d);
                let f = d.fields();
                let values: Vec<&dyn rusqlite::ToSql> = [&o.id as &dyn rusqlite::ToSql]
                    .into_iter()
                    .chain(f.iter().map(|v| *v as &dyn rusqlite::ToSql))
                    .chain([extra as &dyn rusqlite::ToSql, &rec.op_date, &page.now])
                    .chain(v10.iter().map(|v| v as &dyn rusqlite::ToSql))
                    .chain([hash as &dyn rusqlite::ToSql, &event_id, &source_id])
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

    if let Some(flags) = &inserted {
        events.set_next_id(first_event + flags.len() as i64);
    }
    insert_new(tx, page, &new_devices, false)?;
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
        // The token's ids from the key index alone, less those the fetch returned and
        // those already deleted (read from `devices_gone` alone), so a long history of
        // deleted devices is never read row by row.
        let mut unreturned: Vec<i64> = tx
            .prepare_cached("SELECT id FROM devices WHERE token_name = ?1")?
            .query_map([page.token], |r| r.get::<_, i64>(0))?
            .filter(|id| id.as_ref().map_or(true, |id| !returned.contains(*id)))
            .collect::<Result<_, _>>()?;
        unreturned.sort_unstable();
        let mut already = vec![false; unreturned.len()];
        let mut deleted_ids = tx.prepare_cached(
            "SELECT id FROM devices WHERE token_name = ?1 AND deleted_at IS NOT NULL",
        )?;
        for id in deleted_ids.query_map([page.token], |r| r.get::<_, i64>(0))? {
            if let Ok(i) = unreturned.binary_search(&id?) {
                already[i] = true;
            }
        }
        let gone: Vec<i64> = unreturned
            .into_iter()
            .zip(already)
            .filter_map(|(id, deleted)| (!deleted).then_some(id))
            .collect();
        // The row's own deleted_at is checked again as it is read.
        let mut read = tx.prepare_cached(&format!(
            "SELECT deleted_at IS NULL, {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
        ))?;
        for id in gone {
            let Some(d) = read.query_row([id], |r| {
                Ok(if r.get(0)? {
                    Some(device_from_row(r, 1)?)
                } else {
                    None
                })
            })?
            else {
                continue;
            };
            mark_deleted.execute(params![
                id,
                page.now,
                Option::<String>::None,
                Option::<bool>::None,
                Option::<i64>::None,
                Option::<i64>::None
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

    if added_from_rows {
        let last_id = first_id + page.records.len() as i64 - 1;
        PageEvents::added_from_rows(tx, first_id, last_id, page.now)?;
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

/// A new device row: (id, record, its stored form, the `added` event whose snapshot it is).
type NewRow<'a> = (i64, &'a DeviceRecord, &'a Prepared, Option<i64>);

/// Inserts new device rows many per statement; `ignore_existing`: a row whose serial is
/// already stored is skipped instead of failing the page.
fn insert_new(
    tx: &rusqlite::Transaction<'_>,
    page: &PageWrite<'_>,
    rows: &[NewRow<'_>],
    ignore_existing: bool,
) -> rusqlite::Result<()> {
    let v10s: Vec<_> = rows
        .iter()
        .map(|(_, rec, p, _)| p.v10(&rec.device))
        .collect();
    let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(rows.len() * 30);
    for ((id, rec, p, event_id), v10) in rows.iter().zip(&v10s) {
        values.extend([
            id as &dyn rusqlite::ToSql,
            &page.token,
            &rec.device.serial_number,
        ]);
        values.extend(rec.device.fields().map(|v| v as &dyn rusqlite::ToSql));
        values.extend([
            &p.extra_json as &dyn rusqlite::ToSql,
            &rec.op_date,
            &page.now,
            &page.now,
        ]);
        values.extend(v10.iter().map(|v| v as &dyn rusqlite::ToSql));
        values.extend([&p.content_hash as &dyn rusqlite::ToSql, event_id]);
    }
    const COLUMNS: &str = "devices (id, token_name, serial_number, model, description, color,
             asset_tag, profile_status, profile_uuid, profile_assign_time, profile_push_time,
             device_assigned_date, device_assigned_by, os, device_family, extra_json,
             last_op_date, first_seen_at, updated_at, imei, meid, eid, wifi_mac_address,
             bluetooth_mac_address, ethernet_mac_address, is_replacement_device,
             mdm_migration_deadline, released_by_replacement, content_hash, snapshot_event_id)";
    if ignore_existing {
        insert_many_or(tx, "IGNORE", COLUMNS, 30, &values)
    } else {
        insert_many(tx, COLUMNS, 30, &values)
    }
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

/// Devices read in chunks by key (token, serial), each chunk its own read, so a slow
/// consumer (`| less`) never holds one read open while the daemon writes (both backends).
/// `fetch(after, n)` reads at most `n` devices after the key `after` (from the start when
/// None), in key order; `f` gets each, up to `limit` in all.
pub(super) fn in_key_chunks<E: From<StoreError>>(
    limit: Option<u64>,
    mut f: impl FnMut(StoredDevice) -> Result<(), E>,
    mut fetch: impl FnMut(Option<&(String, String)>, u64) -> Result<Vec<StoredDevice>, StoreError>,
) -> Result<(), E> {
    const CHUNK: u64 = 5000;
    let mut left = limit.unwrap_or(u64::MAX);
    let mut after: Option<(String, String)> = None;
    while left > 0 {
        let want = left.min(CHUNK);
        let chunk = fetch(after.as_ref(), want)?;
        let got = chunk.len() as u64;
        after = chunk
            .last()
            .map(|d| (d.token_name.clone(), d.device.serial_number.clone()));
        for d in chunk {
            f(d)?;
        }
        if got < want {
            break;
        }
        left -= got;
    }
    Ok(())
}

/// What a deletion record leaves in its row (both backends).
pub(super) struct Departure {
    /// The last stored record, with the `released_by_replacement` the deletion carries.
    pub(super) stored: Device,
    /// That value for its column: only a boolean reaches it.
    pub(super) by_replacement: Option<bool>,
    /// The row's new digest, when the deletion changed its Apple fields.
    pub(super) new_hash: Option<i64>,
}

/// The row a deletion leaves: `stored` (the last stored record) with what the deletion
/// itself says (`released_by_replacement`, when a boolean).
pub(super) fn departure(stored: &Device, record: &Device) -> Departure {
    let mut stored = stored.clone();
    let by_replacement = record
        .v10("released_by_replacement")
        .and_then(Value::as_bool);
    let mut new_hash = None;
    if let Some(b) = by_replacement {
        if stored.v10("released_by_replacement") != Some(&Value::Bool(b)) {
            stored
                .extra
                .insert("released_by_replacement".into(), Value::Bool(b));
            new_hash = Some(content_hash(&stored, extra_json(&stored).as_deref()));
        }
    }
    Departure {
        stored,
        by_replacement,
        new_hash,
    }
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
pub(super) struct SeenIds(pub(super) HashMap<i64, Vec<u8>>);

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

/// Reads the stored rows for a page's serials (`prepared`: each record's stored form).
/// The first statement reads only each row's bookkeeping: an unchanged device — most of a
/// re-fetch — is recognised by its digest without its 23 Apple columns being read; the
/// columns of the rest (changed, or stored without a digest) are read by id afterwards.
pub(super) fn load_existing<'a>(
    tx: &rusqlite::Transaction<'_>,
    token: &str,
    records: &'a [DeviceRecord],
    prepared: &[Prepared],
) -> rusqlite::Result<ExistingRows<'a>> {
    let incoming: Incoming<'a> = records
        .iter()
        .zip(prepared)
        .map(|(r, p)| (r.device.serial_number.as_str(), (&r.device, p.content_hash)))
        .collect();
    let mut map = ExistingRows::with_capacity_and_hasher(records.len(), Default::default());
    // Rows whose Apple columns must be read: (serial, whether the stored row has a digest).
    let mut unsure: Vec<(&'a str, bool)> = Vec::new();
    type Incoming<'a> = foldhash::HashMap<&'a str, (&'a Device, i64)>;
    fn take<'a>(
        r: &rusqlite::Row<'_>,
        incoming: &Incoming<'a>,
        map: &mut ExistingRows<'a>,
        unsure: &mut Vec<(&'a str, bool)>,
    ) -> rusqlite::Result<()> {
        let serial = r.get_ref(0)?.as_str()?;
        // The record's own serial is the key: no copy of the stored one.
        let Some((&serial, (_, incoming_hash))) = incoming.get_key_value(serial) else {
            return Ok(());
        };
        let stored_hash: Option<i64> = r.get(1)?;
        if stored_hash != Some(*incoming_hash) {
            unsure.push((serial, stored_hash.is_some()));
        }
        let e = Existing {
            device: None,
            last_op_date: r.get(2)?,
            deleted: r.get(3)?,
            id: r.get(4)?,
            rehash: Some(*incoming_hash) != stored_hash,
            snapshot_event_id: r.get(5)?,
            snapshot_source_id: r.get(6)?,
        };
        map.insert(serial, e);
        Ok(())
    }
    const BOOKKEEPING: &str = "SELECT serial_number, content_hash, last_op_date,
        deleted_at IS NOT NULL, id, snapshot_event_id, snapshot_source_id FROM devices";
    // A page Apple sends again in the order it first sent it (a re-fetch) holds the rows
    // that page inserted, numbered in record order: when the page's first and last
    // serials are stored close together, the rows between them are read in id order — a
    // sequential read of the table instead of a key-index seek per record. Whatever that
    // range does not hold is looked up by key below, so the result is the same either way.
    if let Some((lo, hi)) = id_range(tx, token, records)? {
        let mut stmt = tx.prepare_cached(&format!(
            "{BOOKKEEPING} NOT INDEXED WHERE id BETWEEN ?1 AND ?2 AND token_name = ?3"
        ))?;
        let mut rows = stmt.query(params![lo, hi, token])?;
        while let Some(r) = rows.next()? {
            take(r, &incoming, &mut map, &mut unsure)?;
        }
    }
    if map.len() < incoming.len() {
        // The rest by key, in key order: consecutive lookups walk the key index forward.
        let mut serials: Vec<&str> = incoming
            .keys()
            .copied()
            .filter(|s| !map.contains_key(*s))
            .collect();
        serials.sort_unstable();
        let serials = serde_json::to_string(&serials).expect("strings always serialise");
        let mut stmt = tx.prepare_cached(&format!(
            "{BOOKKEEPING}
             WHERE token_name = ?1 AND serial_number IN (SELECT value FROM json_each(?2))"
        ))?;
        let mut rows = stmt.query(params![token, serials])?;
        while let Some(r) = rows.next()? {
            take(r, &incoming, &mut map, &mut unsure)?;
        }
    }
    if unsure.is_empty() {
        return Ok(map);
    }
    let mut read = tx.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
    ))?;
    for (serial, hashed) in unsure {
        let Some(e) = map.get_mut(serial) else {
            continue;
        };
        let incoming = incoming.get(serial).map(|(d, _)| *d);
        e.device = read.query_row([e.id], |r| {
            // A row without a digest is compared in place: equal, it stays undecoded.
            match incoming {
                Some(d) if !hashed && stored_equals(r, 0, d)? => Ok(None),
                _ => device_from_row(r, 0).map(Some),
            }
        })?;
    }
    Ok(map)
}

/// The ids between the stored rows of a page's first and last records, when both are
/// stored and no further apart than twice the page's length (see `load_existing`).
pub(super) fn id_range(
    tx: &rusqlite::Transaction<'_>,
    token: &str,
    records: &[DeviceRecord],
) -> rusqlite::Result<Option<(i64, i64)>> {
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(None);
    };
    // A short page (most sync pages) is looked up by key alone.
    if records.len() < 64 {
        return Ok(None);
    }
    let mut probe =
        tx.prepare_cached("SELECT id FROM devices WHERE token_name = ?1 AND serial_number = ?2")?;
    let mut id = |serial: &str| {
        probe
            .query_row(params![token, serial], |r| r.get::<_, i64>(0))
            .optional()
    };
    let (Some(a), Some(b)) = (
        id(&first.device.serial_number)?,
        id(&last.device.serial_number)?,
    ) else {
        return Ok(None);
    };
    let (lo, hi) = (a.min(b), a.max(b));
    Ok((hi - lo < 2 * records.len() as i64).then_some((lo, hi)))
}

/// Whether a stored row (serial, the named columns, extra_json, protocol 10, from
/// column `start`) holds exactly `d`, compared in place.
pub(super) fn stored_equals(
    r: &rusqlite::Row<'_>,
    start: usize,
    d: &Device,
) -> rusqlite::Result<bool> {
    for (i, field) in d.fields().into_iter().enumerate() {
        if r.get_ref(start + 1 + i)?.as_str_or_null()? != field.as_deref() {
            return Ok(false);
        }
    }
    // extra_json is written by `extra_json`, so equal extras have equal text.
    let stored = r.get_ref(start + 13)?.as_str_or_null()?;
    if stored != extra_json(d).as_deref() {
        return Ok(false);
    }
    for (i, v) in v10_sql(d).into_iter().enumerate() {
        if r.get::<_, rusqlite::types::Value>(start + 14 + i)? != v {
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
        let mut out = Vec::new();
        self.for_each_device(filter, |d| {
            out.push(d);
            Ok::<_, StoreError>(())
        })?;
        Ok(out)
    }

    /// Calls `f` with each stored device matching `filter`, by token then serial, one at
    /// a time (an export of a million devices holds one in memory, not all).
    pub fn for_each_device<E: From<StoreError>>(
        &self,
        filter: &DeviceFilter,
        f: impl FnMut(StoredDevice) -> Result<(), E>,
    ) -> Result<(), E> {
        if let Some(mut pg) = self.pg() {
            return pg.for_each_device(filter, f);
        }
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
        // Read in chunks by key, each its own read, so a slow consumer (`| less`) never
        // holds one read open while the daemon writes (the WAL could not be reset).
        // The first chunk from the start, the next ones after the last key read (a plain
        // row-value comparison, so SQLite starts in the key index, not from the top).
        let keyed = args.len();
        let first_sql = format!(
            "{sql} ORDER BY token_name, serial_number LIMIT ?{}",
            keyed + 1
        );
        let next_sql = format!(
            "{sql} AND (token_name, serial_number) > (?{}, ?{})
             ORDER BY token_name, serial_number LIMIT ?{}",
            keyed + 1,
            keyed + 2,
            keyed + 3
        );
        in_key_chunks(filter.limit, f, |after, want| {
            let mut chunk_args = args.clone();
            let sql = match after {
                Some((t, sn)) => {
                    chunk_args.extend([t.clone().into(), sn.clone().into()]);
                    &next_sql
                }
                None => &first_sql,
            };
            chunk_args.push((want as i64).into());
            let mut stmt = self
                .conn()?
                .prepare_cached(sql)
                .map_err(self.err("list devices"))?;
            let rows = stmt.query_map(rusqlite::params_from_iter(chunk_args), |r| {
                Ok(StoredDevice {
                    token_name: r.get(0)?,
                    device: device_from_row(r, 1)?,
                    first_seen_at: r.get(DEVICE_COLUMN_COUNT + 1)?,
                    updated_at: r.get(DEVICE_COLUMN_COUNT + 2)?,
                    deleted_at: r.get(DEVICE_COLUMN_COUNT + 3)?,
                })
            });
            rows.and_then(|it| it.collect::<Result<_, _>>())
                .map_err(self.err("list devices"))
        })
    }

    /// Whether `token` has any device row, assigned or deleted.
    pub fn has_devices(&self, token: &str) -> Result<bool, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.has_devices(token);
        }
        self.conn()?
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE token_name = ?1)",
                [token],
                |r| r.get(0),
            )
            .map_err(self.err("count devices"))
    }

    /// Up to `limit` assigned replacement devices of `token` whose replacement details
    /// were never asked for (read through the partial index `devices_replacements_due`,
    /// so a no-op sync does not scan the table).
    pub fn replacements_due(&self, token: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.replacements_due(token, limit);
        }
        let mut stmt = self
            .conn()?
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
        if let Some(mut pg) = self.pg() {
            return pg.save_replacement(token, serial, original, now);
        }
        let (original, date) = original.unzip();
        self.conn()?
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
        if let Some(mut pg) = self.pg() {
            return pg.replacement_links(serial);
        }
        let replaced = self
            .conn()?
            .query_row(
                "SELECT original_device_serial_number, replacement_date FROM devices
                 WHERE serial_number = ?1 AND original_device_serial_number IS NOT NULL LIMIT 1",
                [serial],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.err("read replacement details"))?;
        let mut stmt = self
            .conn()?
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
        if let Some(mut pg) = self.pg() {
            return pg.device_counts(token);
        }
        // Both from indexes alone: every row of the token from the key, the deleted ones
        // from `devices_gone`.
        self.conn()?
            .query_row(
                "SELECT (SELECT COUNT(*) FROM devices WHERE token_name = ?1),
                        (SELECT COUNT(*) FROM devices WHERE token_name = ?1 AND deleted_at IS NOT NULL)",
                [token],
                |r| {
                    let (all, deleted) = (r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64);
                    Ok((all - deleted, deleted))
                },
            )
            .map_err(self.err("count devices"))
    }

    /// Assigned devices by (token, profile_status); a missing status counts as "unknown".
    pub fn profile_status_counts(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.profile_status_counts();
        }
        let mut stmt = self
            .conn()?
            .prepare(
                // Read in table order: through the key index it would visit the rows at
                // random (3.4 s against 0.9 s for a million).
                "SELECT token_name, COALESCE(profile_status, 'unknown'), COUNT(*)
                 FROM devices NOT INDEXED
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
