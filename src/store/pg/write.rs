//! A page written to PostgreSQL: the same event decision as on SQLite
//! ([`crate::events::decide`]), rows read and inserted a page at a time (arrays bound with
//! `UNNEST`), events kept until the group commits and then given their ids (see mod.rs).

use std::collections::HashMap;

use postgres::Transaction;
use serde_json::Value;

use super::super::devices::{
    departure, prepare_with, Departure, PageStats, PageWrite, Prepared, SeenIds, SEEN_CHUNK_IDS,
};
use super::super::events::encode_snapshot;
use super::super::{device_row::extra_json, CursorState, StoreError};
use crate::events::{decide, reason, Decision, Known, ReasonContext};
use crate::model::{Device, DeviceRecord, EventKind, FieldShape, Phase, Reason, V10_FIELDS};

/// The device columns as read back (`extra_json` as text), in `device_from_row` order.
pub(super) const PG_DEVICE_COLUMNS: &str =
    "serial_number, model, description, color, asset_tag, profile_status, \
    profile_uuid, profile_assign_time, profile_push_time, device_assigned_date, \
    device_assigned_by, os, device_family, extra_json::text, imei, meid, eid, wifi_mac_address, \
    bluetooth_mac_address, ethernet_mac_address, is_replacement_device, \
    mdm_migration_deadline, released_by_replacement";

/// Columns of [`PG_DEVICE_COLUMNS`].
pub(super) const PG_DEVICE_COLUMN_COUNT: usize = 14 + V10_FIELDS.len();

/// A device's protocol-10 values as their PostgreSQL columns hold them: text (lists as
/// JSON text), booleans as boolean. A value of another shape (a number where Apple sends
/// text, a list that is a string) gets its text in the column, and its exact value in
/// `extra_json`, which wins when the row is read back.
pub(super) struct V10Cells {
    pub(super) text: [Option<String>; 7],
    pub(super) flags: [Option<bool>; 2],
    /// Values kept exactly in `extra_json`.
    pub(super) odd: Vec<(&'static str, Value)>,
}

pub(super) fn v10_cells(d: &Device) -> V10Cells {
    let mut text: [Option<String>; 7] = Default::default();
    let mut flags: [Option<bool>; 2] = Default::default();
    let mut odd = Vec::new();
    let (mut t, mut f) = (0, 0);
    for (name, shape) in V10_FIELDS {
        let v = d.v10(name);
        match shape {
            FieldShape::Bool => {
                flags[f] = match v {
                    Some(Value::Bool(b)) => Some(*b),
                    None => None,
                    Some(other) => {
                        odd.push((name, other.clone()));
                        None
                    }
                };
                f += 1;
            }
            _ => {
                text[t] = match v {
                    None => None,
                    Some(Value::String(s)) => {
                        // A string that reads back as a list would come back as one; a NUL
                        // cannot be stored in text at all.
                        if (shape == FieldShape::List
                            && s.starts_with('[')
                            && serde_json::from_str::<Value>(s).is_ok())
                            || s.contains('\0')
                        {
                            odd.push((name, Value::String(s.clone())));
                        }
                        Some(s.replace('\0', "\u{fffd}"))
                    }
                    Some(Value::Array(a)) if shape == FieldShape::List => {
                        Some(Value::Array(a.clone()).to_string())
                    }
                    Some(other) => {
                        odd.push((name, other.clone()));
                        Some(other.to_string())
                    }
                };
                t += 1;
            }
        }
    }
    V10Cells { text, flags, odd }
}

/// A device's named fields as PostgreSQL's text columns hold them. PostgreSQL refuses a
/// NUL character in text (Apple's JSON may carry `\u0000`): the column gets U+FFFD in its
/// place and the exact value goes to `odd`, kept in `extra_json`, which wins when the row is
/// read back (see [`device_from_row`]).
pub(super) fn field_cells(d: &Device, odd: &mut Vec<(&'static str, Value)>) -> Vec<Option<String>> {
    d.fields()
        .into_iter()
        .zip(crate::model::DEVICE_FIELDS)
        .map(|(f, name)| match f {
            Some(t) if t.contains('\0') => {
                odd.push((name, Value::String(t.clone())));
                Some(t.replace('\0', "\u{fffd}"))
            }
            other => other.clone(),
        })
        .collect()
}

/// `extra_json` as PostgreSQL stores it: SQLite's (the fields beyond the columns) plus the
/// protocol-10 values their columns cannot hold exactly.
pub(super) fn pg_extra_json(sqlite_extra: Option<&str>, odd: &[(&str, Value)]) -> Option<String> {
    if odd.is_empty() {
        return sqlite_extra.map(str::to_owned);
    }
    let mut m = match sqlite_extra.map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(m))) => m,
        _ => serde_json::Map::new(),
    };
    for (k, v) in odd {
        m.insert((*k).to_owned(), v.clone());
    }
    Some(Value::Object(m).to_string())
}

/// A device read from [`PG_DEVICE_COLUMNS`] starting at column `start`.
pub(super) fn device_from_row(r: &postgres::Row, start: usize) -> Result<Device, postgres::Error> {
    let mut d = Device {
        serial_number: r.try_get(start)?,
        ..Device::default()
    };
    for (i, f) in d.fields_mut().into_iter().enumerate() {
        *f = r.try_get(start + 1 + i)?;
    }
    let extra: Option<String> = r.try_get(start + 13)?;
    let mut exact = serde_json::Map::new();
    if let Some(text) = extra {
        if let Ok(Value::Object(m)) = serde_json::from_str(&text) {
            exact = m;
        }
    }
    for (col, (name, shape)) in (start + 14..).zip(V10_FIELDS) {
        let v = match shape {
            FieldShape::Bool => r.try_get::<_, Option<bool>>(col)?.map(Value::Bool),
            FieldShape::List => r.try_get::<_, Option<String>>(col)?.map(|t| {
                if t.starts_with('[') {
                    serde_json::from_str(&t).unwrap_or(Value::String(t))
                } else {
                    Value::String(t)
                }
            }),
            FieldShape::Text => r.try_get::<_, Option<String>>(col)?.map(Value::String),
        };
        if let Some(v) = v {
            d.extra.insert(name.to_owned(), v);
        }
    }
    // Values kept exactly win over their columns; the rest are Apple's extra fields.
    for (k, v) in exact {
        match (crate::model::DEVICE_FIELDS.iter().position(|f| *f == k), v) {
            (Some(i), Value::String(t)) => *d.fields_mut()[i] = Some(t),
            (_, v) => {
                d.extra.insert(k, v);
            }
        }
    }
    Ok(d)
}

/// One event waiting for its id (given at commit).
pub(super) struct PendingEvent {
    pub(super) token: String,
    pub(super) serial: String,
    pub(super) kind: EventKind,
    pub(super) changes: Option<String>,
    pub(super) occurred_at: String,
    pub(super) snapshot: String,
    /// None for an organisation device event.
    pub(super) reason: Option<Reason>,
    /// `events.scope` (None: an ADE device event).
    pub(super) scope: Option<&'static str>,
}

/// Events kept for the commit before they are inserted early (see `write_page`).
const MAX_PENDING_EVENTS: usize = 4_000;

/// An open write transaction taking whole pages (see [`super::super::Batch`]).
pub(crate) struct PgBatch<'a> {
    tx: Transaction<'a>,
    shown: &'a str,
    events: Vec<PendingEvent>,
    /// The connection's (new rows since the last ANALYZE, the next threshold).
    inserted: &'a mut (u64, u64),
    /// This transaction holds the `event_ids` row (see [`lock_event_order`]).
    order_locked: bool,
}

/// The stored state of one device, to diff an incoming record against.
struct Existing {
    id: i64,
    /// None when equal to the incoming device (same digest): never decoded.
    device: Option<Device>,
    last_op_date: Option<String>,
    deleted: bool,
    rehash: bool,
}

const INSERT_DEVICES: &str = "INSERT INTO devices (token_name, first_seen_at, updated_at,
        serial_number, model, description, color, asset_tag, profile_status, profile_uuid,
        profile_assign_time, profile_push_time, device_assigned_date, device_assigned_by, os,
        device_family, extra_json, last_op_date, imei, meid, eid, wifi_mac_address,
        bluetooth_mac_address, ethernet_mac_address, mdm_migration_deadline,
        is_replacement_device, released_by_replacement, content_hash)
    SELECT $1, $2, $2, u.sn, u.model, u.descr, u.color, u.asset, u.ps, u.pu, u.pat, u.ppt,
           u.dad, u.dab, u.os, u.fam, u.extra::json, u.op, u.imei, u.meid, u.eid, u.wifi, u.bt,
           u.eth, u.deadline, u.repl, u.released, u.hash
      FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                  $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                  $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::text[],
                  $21::text[], $22::text[], $23::text[], $24::text[], $25::bool[], $26::bool[],
                  $27::int8[])
        AS u(sn, model, descr, color, asset, ps, pu, pat, ppt, dad, dab, os, fam, extra, op,
             imei, meid, eid, wifi, bt, eth, deadline, repl, released, hash)
    RETURNING id";

const UPDATE_DEVICES: &str = "UPDATE devices d SET model = u.model, description = u.descr,
        color = u.color, asset_tag = u.asset, profile_status = u.ps, profile_uuid = u.pu,
        profile_assign_time = u.pat, profile_push_time = u.ppt, device_assigned_date = u.dad,
        device_assigned_by = u.dab, os = u.os, device_family = u.fam, extra_json = u.extra::json,
        last_op_date = COALESCE(u.op, d.last_op_date), updated_at = $1, imei = u.imei,
        meid = u.meid, eid = u.eid, wifi_mac_address = u.wifi, bluetooth_mac_address = u.bt,
        ethernet_mac_address = u.eth, mdm_migration_deadline = u.deadline,
        is_replacement_device = u.repl, released_by_replacement = u.released,
        content_hash = u.hash, deleted_at = NULL
    FROM UNNEST($2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
                $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::text[],
                $20::text[], $21::text[], $22::text[], $23::text[], $24::text[], $25::bool[],
                $26::bool[], $27::int8[])
        AS u(id, sn, model, descr, color, asset, ps, pu, pat, ppt, dad, dab, os, fam, extra, op,
             imei, meid, eid, wifi, bt, eth, deadline, repl, released, hash)
    WHERE d.id = u.id";

const TOUCH_DEVICE: &str = "UPDATE devices SET last_op_date = COALESCE($2, last_op_date),
        content_hash = COALESCE($3, content_hash) WHERE id = $1";

const MARK_DELETED: &str = "UPDATE devices SET deleted_at = $2, updated_at = $2,
        last_op_date = COALESCE($3, last_op_date),
        released_by_replacement = COALESCE($4, released_by_replacement),
        content_hash = COALESCE($5, content_hash)
    WHERE id = $1";

impl<'a> PgBatch<'a> {
    pub(super) fn new(tx: Transaction<'a>, shown: &'a str, inserted: &'a mut (u64, u64)) -> Self {
        PgBatch {
            tx,
            shown,
            events: Vec::new(),
            inserted,
            order_locked: false,
        }
    }

    fn wrap(&self, action: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
        let url = self.shown.to_owned();
        move |source| StoreError::Postgres {
            url,
            action,
            source,
        }
    }

    /// Writes one page (rows, events, the cursor after it) into the open transaction.
    pub(crate) fn apply_page(&mut self, page: &PageWrite<'_>) -> Result<PageStats, StoreError> {
        let err = self.wrap("write a page");
        self.write_page(page).map_err(err)
    }

    /// Stores a cursor transition that comes with no page.
    pub(crate) fn set_cursor(
        &mut self,
        token: &str,
        next: &CursorState,
        now: &str,
    ) -> Result<(), StoreError> {
        let err = self.wrap("store cursor");
        upsert_state(&mut self.tx, token, next, None, now).map_err(err)
    }

    /// Gives the pages' events their ids and commits everything.
    pub(crate) fn commit(mut self) -> Result<(), StoreError> {
        let err = self.wrap("commit pages");
        let events = std::mem::take(&mut self.events);
        insert_events(&mut self.tx, events).map_err(self.wrap("commit pages"))?;
        self.tx.commit().map_err(err)
    }

    fn write_page(&mut self, page: &PageWrite<'_>) -> Result<PageStats, postgres::Error> {
        let mut stats = PageStats::default();
        let made;
        let prepared: &[Prepared] = match page.prepared {
            Some(p) if p.len() == page.records.len() => p,
            _ => {
                made = prepare_with(page.records, false);
                &made
            }
        };
        let existing = load_existing(&mut self.tx, page.token, page.records, prepared)?;
        let mut seen: Vec<i64> = Vec::new();
        let mut new_rows: Vec<(&DeviceRecord, &Prepared)> = Vec::new();
        let mut updates: Vec<(i64, &DeviceRecord, &Prepared)> = Vec::new();
        let touch = self.tx.prepare(TOUCH_DEVICE)?;
        let mark_deleted = self.tx.prepare(MARK_DELETED)?;
        let mut events: Vec<PendingEvent> = Vec::new();
        let mut push = |serial: &str,
                        kind: EventKind,
                        changes: Option<String>,
                        d: &Device,
                        extra: Option<&str>,
                        why: Reason| {
            events.push(PendingEvent {
                token: page.token.to_owned(),
                serial: serial.to_owned(),
                kind,
                changes,
                occurred_at: page.now.to_owned(),
                snapshot: encode_snapshot(d, extra),
                reason: Some(why),
                scope: None,
            });
        };
        for (rec, p) in page.records.iter().zip(prepared) {
            let serial = rec.device.serial_number.as_str();
            let old = existing.get(serial);
            let known = old.map(|o| Known {
                device: o.device.as_ref(),
                last_op_date: o.last_op_date.as_deref(),
                deleted: o.deleted,
            });
            let newer_op = |o: &Existing| {
                rec.op_date
                    .clone()
                    .filter(|date| Some(date) != o.last_op_date.as_ref())
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
                        if let Some(date) = newer_op(o) {
                            self.tx
                                .execute(&touch, &[&o.id, &Some(date), &None::<i64>])?;
                        }
                    }
                    stats.unchanged += 1;
                    continue;
                }
                Decision::Unchanged => {
                    if let Some(o) = old {
                        let date = newer_op(o);
                        let hash = o.rehash.then_some(p.content_hash());
                        if date.is_some() || hash.is_some() {
                            self.tx.execute(&touch, &[&o.id, &date, &hash])?;
                        }
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
                        } = departure(o.device.as_ref().unwrap_or(&rec.device), &rec.device);
                        self.tx.execute(
                            &mark_deleted,
                            &[&o.id, &page.now, &rec.op_date, &by_replacement, &new_hash],
                        )?;
                        lock_event_order(&mut self.tx, &mut self.order_locked)?;
                        let ctx = reason_context(&mut self.tx, serial)?;
                        let why = reason(&Decision::Deleted, Some(&stored), &rec.device, ctx);
                        push(
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
                Decision::Added { .. } => None,
                Decision::Modified(ref diff) => Some(Value::Object(diff.clone()).to_string()),
            };
            let kind = kind.unwrap_or(EventKind::Added);
            let d = &rec.device;
            let why = reason(
                &decision,
                old.map(|o| o.device.as_ref().unwrap_or(d)),
                d,
                ReasonContext::default(),
            );
            push(serial, kind, changes, d, p.extra_json(), why);
            match old {
                None => new_rows.push((rec, p)),
                Some(o) => {
                    updates.push((o.id, rec, p));
                    seen.push(o.id);
                }
            }
            match kind {
                EventKind::Added => stats.added += 1,
                _ => stats.modified += 1,
            }
        }
        update_rows(&mut self.tx, page, &updates)?;
        seen.extend(insert_new(&mut self.tx, page, &new_rows)?);
        self.inserted.0 += new_rows.len() as u64;
        if page.kind == Phase::Fetch {
            if !page.unreadable.is_empty() {
                let serials: Vec<&str> = page.unreadable.iter().map(String::as_str).collect();
                for r in self.tx.query(
                    "SELECT id FROM devices WHERE token_name = $1 AND serial_number = ANY($2)",
                    &[&page.token, &serials],
                )? {
                    seen.push(r.get(0));
                }
            }
            mark_seen(&mut self.tx, page.token, page.next.fetch_run, seen)?;
        }
        if page.completes_fetch {
            let returned = load_seen(&mut self.tx, page.token, page.next.fetch_run)?;
            // The token's assigned ids in chunks, so a million devices are never held at once.
            let mut gone: Vec<i64> = Vec::new();
            let mut after = 0i64;
            loop {
                let ids: Vec<i64> = self
                    .tx
                    .query(
                        "SELECT id FROM devices WHERE token_name = $1 AND deleted_at IS NULL
                           AND id > $2 ORDER BY id LIMIT 50000",
                        &[&page.token, &after],
                    )?
                    .iter()
                    .map(|r| r.get::<_, i64>(0))
                    .collect();
                let Some(last) = ids.last().copied() else {
                    break;
                };
                after = last;
                gone.extend(ids.into_iter().filter(|id| !returned.contains(*id)));
            }
            let read = self.tx.prepare(&format!(
                "SELECT {PG_DEVICE_COLUMNS} FROM devices WHERE id = $1"
            ))?;
            for id in gone {
                let row = self.tx.query_one(&read, &[&id])?;
                let d = device_from_row(&row, 0)?;
                self.tx.execute(
                    &mark_deleted,
                    &[&id, &page.now, &None::<String>, &None::<bool>, &None::<i64>],
                )?;
                lock_event_order(&mut self.tx, &mut self.order_locked)?;
                let ctx = reason_context(&mut self.tx, &d.serial_number)?;
                let why = reason(&Decision::Deleted, Some(&d), &d, ctx);
                push(
                    &d.serial_number,
                    EventKind::Deleted,
                    None,
                    &d,
                    extra_json(&d).as_deref(),
                    why,
                );
                stats.deleted += 1;
            }
            self.tx.execute(
                "DELETE FROM fetch_seen WHERE token_name = $1",
                &[&page.token],
            )?;
        }
        upsert_state(
            &mut self.tx,
            page.token,
            &page.next,
            page.fetched_until,
            page.now,
        )?;
        if page.kind == Phase::Fetch {
            count_fetch_changes(
                &mut self.tx,
                page.token,
                stats.events(),
                page.completes_fetch,
                page.now,
            )?;
        }
        self.events.extend(events);
        if self.events.len() >= MAX_PENDING_EVENTS {
            // Bounded memory on a large group: the ids are taken now, and the lock on them is
            // held from here to the commit (at most one group, GROUP_MAX_AGE).
            insert_events(&mut self.tx, std::mem::take(&mut self.events))?;
        }
        Ok(stats)
    }
}

/// Reads the stored rows for a page's serials in one statement.
fn load_existing(
    tx: &mut Transaction<'_>,
    token: &str,
    records: &[DeviceRecord],
    prepared: &[Prepared],
) -> Result<HashMap<String, Existing>, postgres::Error> {
    let incoming: HashMap<&str, i64> = records
        .iter()
        .zip(prepared)
        .map(|(r, p)| (r.device.serial_number.as_str(), p.content_hash()))
        .collect();
    let serials: Vec<&str> = incoming.keys().copied().collect();
    let rows = tx.query(
        &format!(
            "SELECT id, content_hash, last_op_date, deleted_at IS NOT NULL, {PG_DEVICE_COLUMNS}
               FROM devices WHERE token_name = $1 AND serial_number = ANY($2)"
        ),
        &[&token, &serials],
    )?;
    let mut map = HashMap::with_capacity(rows.len());
    for r in rows {
        let serial: String = r.try_get(4)?;
        let stored: Option<i64> = r.try_get(1)?;
        let wanted = incoming.get(serial.as_str()).copied();
        let same = stored.is_some() && stored == wanted;
        map.insert(
            serial,
            Existing {
                id: r.try_get(0)?,
                device: if same {
                    None
                } else {
                    Some(device_from_row(&r, 4)?)
                },
                last_op_date: r.try_get(2)?,
                deleted: r.try_get(3)?,
                rehash: stored != wanted,
            },
        );
    }
    Ok(map)
}

/// Inserts new device rows with one statement; returns their ids.
fn insert_new(
    tx: &mut Transaction<'_>,
    page: &PageWrite<'_>,
    rows: &[(&DeviceRecord, &Prepared)],
) -> Result<Vec<i64>, postgres::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let c = RowColumns::of(rows.iter().copied());
    let mut args: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&page.token, &page.now];
    c.args(&mut args);
    Ok(tx
        .query(INSERT_DEVICES, &args)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Rewrites changed rows, a page's worth in one statement (by id, read with the stored
/// row; a row that had left comes back).
fn update_rows(
    tx: &mut Transaction<'_>,
    page: &PageWrite<'_>,
    rows: &[(i64, &DeviceRecord, &Prepared)],
) -> Result<(), postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = rows.iter().map(|(id, ..)| *id).collect();
    let c = RowColumns::of(rows.iter().map(|(_, r, p)| (*r, *p)));
    let mut args: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&page.now, &ids];
    c.args(&mut args);
    tx.execute(UPDATE_DEVICES, &args)?;
    Ok(())
}

/// A page's device rows as column arrays (bound with `UNNEST`): serial, the named fields,
/// extra_json, op_date, the protocol-10 text columns; the two booleans; the digests.
struct RowColumns {
    text: Vec<Vec<Option<String>>>,
    flags: Vec<Vec<Option<bool>>>,
    hashes: Vec<i64>,
}

impl RowColumns {
    fn of<'r>(rows: impl ExactSizeIterator<Item = (&'r DeviceRecord, &'r Prepared)>) -> Self {
        let n = rows.len();
        let mut c = RowColumns {
            text: (0..22).map(|_| Vec::with_capacity(n)).collect(),
            flags: (0..2).map(|_| Vec::with_capacity(n)).collect(),
            hashes: Vec::with_capacity(n),
        };
        for (rec, p) in rows {
            let d = &rec.device;
            let mut cells = v10_cells(d);
            c.text[0].push(Some(d.serial_number.clone()));
            for (i, f) in field_cells(d, &mut cells.odd).into_iter().enumerate() {
                c.text[1 + i].push(f);
            }
            c.text[13].push(pg_extra_json(p.extra_json(), &cells.odd));
            c.text[14].push(rec.op_date.clone());
            for (i, t) in cells.text.into_iter().enumerate() {
                c.text[15 + i].push(t);
            }
            for (i, b) in cells.flags.into_iter().enumerate() {
                c.flags[i].push(b);
            }
            c.hashes.push(p.content_hash());
        }
        c
    }

    fn args<'s>(&'s self, args: &mut Vec<&'s (dyn postgres::types::ToSql + Sync)>) {
        args.extend(
            self.text
                .iter()
                .map(|v| v as &(dyn postgres::types::ToSql + Sync)),
        );
        args.extend(
            self.flags
                .iter()
                .map(|v| v as &(dyn postgres::types::ToSql + Sync)),
        );
        args.push(&self.hashes);
    }
}

/// Gives `events` their ids, in order, and inserts them. The `event_ids` row stays locked
/// until the transaction ends, so no other writer's later ids become visible first.
pub(super) fn insert_events(
    tx: &mut Transaction<'_>,
    events: Vec<PendingEvent>,
) -> Result<(), postgres::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let first = take_event_ids(tx, events.len())?;
    let mut cols: Vec<Vec<Option<String>>> =
        (0..8).map(|_| Vec::with_capacity(events.len())).collect();
    for e in events {
        cols[0].push(Some(e.token));
        cols[1].push(Some(e.serial));
        cols[2].push(Some(e.kind.as_str().to_owned()));
        cols[3].push(e.changes);
        cols[4].push(Some(e.occurred_at));
        cols[5].push(Some(e.snapshot));
        cols[6].push(e.reason.map(|r| r.as_str().to_owned()));
        cols[7].push(e.scope.map(str::to_owned));
    }
    tx.execute(
        "INSERT INTO events (id, token_name, serial_number, kind, changes, occurred_at,
             device_json, reason, scope)
         SELECT $1 + u.n - 1, u.t, u.s, u.k, u.c::json, u.o, u.d::json, u.r, u.sc
           FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                       $8::text[], $9::text[]) WITH ORDINALITY AS u(t, s, k, c, o, d, r, sc, n)",
        &[
            &first, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5], &cols[6], &cols[7],
        ],
    )?;
    Ok(())
}

/// Takes `n` consecutive event ids; returns the first. The `event_ids` row stays locked
/// until the transaction ends, so no other writer's later ids become visible first.
fn take_event_ids(tx: &mut Transaction<'_>, n: usize) -> Result<i64, postgres::Error> {
    let n = n as i64;
    Ok(tx
        .query_one(
            "UPDATE event_ids SET next_id = next_id + $1 RETURNING next_id - $1",
            &[&n],
        )?
        .get(0))
}

/// Locks the `event_ids` row for the rest of the transaction (once: `locked` says whether
/// it already is). Taken before a transaction reads what another writer may be changing at
/// the same moment to decide an event — an ADE deletion's reason reads the organisation's
/// removals, an organisation removal's `released` events read the ADE deletions — so of
/// two such transactions the second waits for the first's commit, and then sees it (READ
/// COMMITTED: each statement sees what committed before it began). SQLite has one writer
/// at a time and needs nothing of the kind. One lock for both, and the one every writer
/// takes before committing events anyway, so no two writers ever wait on each other in
/// opposite orders.
pub(super) fn lock_event_order(
    tx: &mut Transaction<'_>,
    locked: &mut bool,
) -> Result<(), postgres::Error> {
    if !*locked {
        tx.execute("SELECT 1 FROM event_ids FOR UPDATE", &[])?;
        *locked = true;
    }
    Ok(())
}

/// What the rest of the mirror says about a device leaving (see the SQLite twin).
fn reason_context(
    tx: &mut Transaction<'_>,
    serial: &str,
) -> Result<ReasonContext, postgres::Error> {
    let released_from_org = tx
        .query_opt(
            "SELECT 1 FROM org_devices WHERE serial_number = $1 AND removed_at IS NOT NULL LIMIT 1",
            &[&serial],
        )?
        .is_some();
    let original_of_replacement = tx
        .query_opt(
            "SELECT 1 FROM devices WHERE original_device_serial_number = $1 LIMIT 1",
            &[&serial],
        )?
        .is_some();
    Ok(ReasonContext {
        released_from_org,
        original_of_replacement,
    })
}

/// Records `ids` as returned by full fetch `run` of `token` (bitmaps, as on SQLite).
pub(super) fn mark_seen(
    tx: &mut Transaction<'_>,
    token: &str,
    run: i64,
    mut ids: Vec<i64>,
) -> Result<(), postgres::Error> {
    ids.sort_unstable();
    let chunks: Vec<i64> = {
        let mut c: Vec<i64> = ids.iter().map(|id| id / SEEN_CHUNK_IDS).collect();
        c.dedup();
        c
    };
    if chunks.is_empty() {
        return Ok(());
    }
    let mut stored: HashMap<i64, Vec<u8>> = tx
        .query(
            "SELECT chunk, bits FROM fetch_seen WHERE token_name = $1 AND fetch_run = $2
               AND chunk = ANY($3) FOR UPDATE",
            &[&token, &run, &chunks],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for id in ids {
        let bits = stored.entry(id / SEEN_CHUNK_IDS).or_default();
        bits.resize((SEEN_CHUNK_IDS / 8) as usize, 0);
        let bit = (id % SEEN_CHUNK_IDS) as usize;
        bits[bit / 8] |= 1 << (bit % 8);
    }
    let (keys, values): (Vec<i64>, Vec<Vec<u8>>) = stored.into_iter().unzip();
    tx.execute(
        "INSERT INTO fetch_seen (token_name, fetch_run, chunk, bits)
         SELECT $1, $2, u.c, u.b FROM UNNEST($3::int8[], $4::bytea[]) AS u(c, b)
         ON CONFLICT (token_name, fetch_run, chunk) DO UPDATE SET bits = excluded.bits",
        &[&token, &run, &keys, &values],
    )?;
    Ok(())
}

pub(super) fn load_seen(
    tx: &mut Transaction<'_>,
    token: &str,
    run: i64,
) -> Result<SeenIds, postgres::Error> {
    Ok(SeenIds(
        tx.query(
            "SELECT chunk, bits FROM fetch_seen WHERE token_name = $1 AND fetch_run = $2",
            &[&token, &run],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect(),
    ))
}

pub(super) fn upsert_state(
    tx: &mut impl postgres::GenericClient,
    token: &str,
    next: &CursorState,
    fetched_until: Option<&str>,
    now: &str,
) -> Result<(), postgres::Error> {
    tx.execute(
        "INSERT INTO sync_state (token_name, phase, cursor, fetch_run, cursor_at, fetched_until)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (token_name) DO UPDATE SET phase = excluded.phase, cursor = excluded.cursor,
             fetch_run = excluded.fetch_run, cursor_at = excluded.cursor_at,
             fetched_until = COALESCE(excluded.fetched_until, sync_state.fetched_until),
             fetch_changes = CASE WHEN excluded.phase = 'fetch' AND excluded.cursor IS NULL
                                  THEN 0 ELSE sync_state.fetch_changes END",
        &[
            &token,
            &next.phase.as_str(),
            &next.cursor,
            &next.fetch_run,
            &now,
            &fetched_until,
        ],
    )?;
    Ok(())
}

fn count_fetch_changes(
    tx: &mut Transaction<'_>,
    token: &str,
    changes: u64,
    completes: bool,
    now: &str,
) -> Result<(), postgres::Error> {
    tx.execute(
        "UPDATE sync_state SET fetch_changes = fetch_changes + $2 WHERE token_name = $1",
        &[&token, &(changes as i64)],
    )?;
    if completes {
        tx.execute(
            "UPDATE sync_state SET last_full_fetch_at = $2,
                 last_full_fetch_changes = CASE WHEN last_full_fetch_at IS NULL THEN NULL
                                                ELSE fetch_changes END,
                 fetch_changes = 0
             WHERE token_name = $1",
            &[&token, &now],
        )?;
    }
    Ok(())
}
