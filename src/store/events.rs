//! The `events` table: a page's events inserted together (ids follow record order; a new
//! token's `added` events made from its rows), the positional device snapshot each event
//! carries, and the event queries.

use rusqlite::{params, OptionalExtension};
use serde_json::Value;

use super::device_row::{device_from_row, extra_json, qualified_device_columns};
use super::{insert_many, Store, StoreError};
use crate::events::{EventScope, StoredEvent};
use crate::model::{Device, EventKind, Reason, V10_FIELDS};
use crate::orgapi::OrgDevice;

/// Encodes a device for `events.device_json`: `[serial_number, the named fields in
/// column order, extra_json, the protocol-10 fields (JSON text) in column order]`,
/// positional to keep every event small. Cells are only ever appended, so every event
/// stored since the first version decodes.
pub(super) fn encode_snapshot(d: &Device, extra_json: Option<&str>) -> String {
    let mut cells: Vec<Option<std::borrow::Cow<'_, str>>> = Vec::with_capacity(SNAPSHOT_CELLS);
    cells.push(Some(d.serial_number.as_str().into()));
    cells.extend(d.fields().into_iter().map(|f| f.as_deref().map(Into::into)));
    cells.push(extra_json.map(Into::into));
    cells.extend(
        V10_FIELDS
            .iter()
            .map(|(name, _)| d.v10(name).map(|v| v.to_string().into())),
    );
    serde_json::to_string(&cells).expect("strings always serialise")
}

/// Cells of a snapshot written since protocol-10 columns (14 before).
const SNAPSHOT_CELLS: usize = 14 + V10_FIELDS.len();

/// Decodes `events.device_json` (see [`encode_snapshot`]); None if it is not one.
pub(super) fn decode_snapshot(text: &str) -> Option<Device> {
    let Ok(Value::Array(cells)) = serde_json::from_str::<Value>(text) else {
        return None;
    };
    if cells.len() != 14 && cells.len() != SNAPSHOT_CELLS {
        return None;
    }
    let text_of = |v: &Value| v.as_str().map(str::to_owned);
    let mut d = Device {
        serial_number: text_of(&cells[0])?,
        ..Device::default()
    };
    for (field, cell) in d.fields_mut().into_iter().zip(&cells[1..13]) {
        *field = text_of(cell);
    }
    if let Some(extra) = cells[13].as_str() {
        if let Ok(Value::Object(m)) = serde_json::from_str(extra) {
            d.extra = m;
        }
    }
    for ((name, _), cell) in V10_FIELDS.iter().zip(cells.iter().skip(14)) {
        if let Some(v) = cell
            .as_str()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
        {
            d.extra.insert((*name).to_owned(), v);
        }
    }
    Some(d)
}

/// One event to insert.
struct EventRow {
    id: i64,
    serial: String,
    kind: EventKind,
    changes: Option<String>,
    snapshot: String,
    /// The device before this event, for the deferred `added` event that reads it here.
    previous: Option<String>,
    reason: Reason,
}

/// A page's events, in record order; inserted together at the end of the page (see
/// [`insert_many`]) with ids given as they are pushed, so ids follow record order and a
/// device row can name its event before it is written. On a new token's fetch pages the
/// ids of most `added` events are only skipped here (`set_next_id`): those events are
/// made from the rows, in a statement of their own (see [`PageEvents::added_from_rows`]).
pub(super) struct PageEvents {
    next_id: i64,
    rows: Vec<EventRow>,
}

impl PageEvents {
    /// Starts a page's events after every id ever given (AUTOINCREMENT's counter too, so
    /// an id a sink may have delivered is never given again after a purge).
    pub(super) fn start(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        let next_id = tx
            .prepare_cached(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),
                            COALESCE((SELECT MAX(id) FROM events), 0)) + 1",
            )?
            .query_row([], |r| r.get(0))?;
        Ok(PageEvents {
            next_id,
            rows: Vec::new(),
        })
    }

    /// The id the next event will get.
    pub(super) fn next_id(&self) -> i64 {
        self.next_id
    }

    /// Gives the next event this id (never one already given: ids must grow).
    pub(super) fn set_next_id(&mut self, id: i64) {
        debug_assert!(id >= self.next_id);
        self.next_id = id;
    }

    /// An event that carries `d` as its snapshot; returns its id. `extra` is `d`'s
    /// `extra_json`, which the caller has already made.
    pub(super) fn push(
        &mut self,
        serial: &str,
        kind: EventKind,
        changes: Option<String>,
        d: &Device,
        extra: Option<&str>,
        reason: Reason,
    ) -> i64 {
        self.push_row(
            serial,
            kind,
            changes,
            encode_snapshot(d, extra),
            None,
            reason,
        )
    }

    /// [`PageEvents::push`] that also keeps `previous`, when given: the device before this
    /// event, for the deferred `added` event whose row this event changes. Returns its id.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn push_with_previous(
        &mut self,
        serial: &str,
        kind: EventKind,
        changes: Option<String>,
        d: &Device,
        extra: Option<&str>,
        previous: Option<&Device>,
        reason: Reason,
    ) -> i64 {
        let previous = previous.map(|p| encode_snapshot(p, extra_json(p).as_deref()));
        self.push_row(
            serial,
            kind,
            changes,
            encode_snapshot(d, extra),
            previous,
            reason,
        )
    }

    /// An event whose snapshot is the device's row as it is now (device_json ''); the
    /// row names it in `snapshot_event_id`. Returns its id.
    pub(super) fn push_deferred(&mut self, serial: &str, kind: EventKind, reason: Reason) -> i64 {
        self.push_row(serial, kind, None, String::new(), None, reason)
    }

    fn push_row(
        &mut self,
        serial: &str,
        kind: EventKind,
        changes: Option<String>,
        snapshot: String,
        previous: Option<String>,
        reason: Reason,
    ) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.rows.push(EventRow {
            id,
            serial: serial.to_owned(),
            kind,
            changes,
            snapshot,
            previous,
            reason,
        });
        id
    }

    /// The `added` events of the rows with ids `first..=last` that name one as theirs
    /// (`snapshot_event_id`), made from the rows in one statement: a new device's event is
    /// its token, serial and id, which the row already holds, so nothing more is bound per
    /// event (a first fetch of a million devices 7% faster, BENCHMARKS.md). Each is new to
    /// the server (`assigned`) and defers its snapshot to the row (`device_json` '').
    ///
    /// For a new token's fetch pages only, whose events are nearly all of this kind: on a
    /// sync page they are mixed with `modified` and `deleted` events, and inserting them
    /// apart would put the others' ids between rows already written (page splits; an
    /// incremental was slower).
    pub(super) fn added_from_rows(
        tx: &rusqlite::Transaction<'_>,
        first: i64,
        last: i64,
        now: &str,
    ) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "INSERT OR ROLLBACK INTO events (id, token_name, serial_number, kind, changes,
                 occurred_at, device_json, previous_json, reason)
             SELECT snapshot_event_id, token_name, serial_number, 'added', NULL, ?3, '', NULL, ?4
               FROM devices WHERE id BETWEEN ?1 AND ?2 AND snapshot_event_id IS NOT NULL
              ORDER BY id",
        )?
        .execute(params![first, last, now, Reason::Assigned.as_str()])
        .map(drop)
    }

    pub(super) fn insert(
        self,
        tx: &rusqlite::Transaction<'_>,
        token: &str,
        now: &str,
    ) -> rusqlite::Result<()> {
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(self.rows.len() * 9);
        let names: Vec<(&str, &str)> = self
            .rows
            .iter()
            .map(|r| (r.kind.as_str(), r.reason.as_str()))
            .collect();
        for (r, (kind, reason)) in self.rows.iter().zip(&names) {
            values.extend([
                &r.id as &dyn rusqlite::ToSql,
                &token,
                &r.serial,
                kind,
                &r.changes,
                &now,
                &r.snapshot,
                &r.previous,
                reason,
            ]);
        }
        insert_many(
            tx,
            "events (id, token_name, serial_number, kind, changes, occurred_at, device_json,
                 previous_json, reason)",
            9,
            &values,
        )
    }
}

/// Writes the snapshot of a deferred `added` event into it: `source`'s previous_json when a
/// later event keeps it, else the device as it is now (`d`). For the one change after
/// which the row can no longer name the event: the device is added again.
pub(super) fn materialize(
    tx: &rusqlite::Transaction<'_>,
    event_id: i64,
    source: Option<i64>,
    d: &Device,
) -> rusqlite::Result<()> {
    let kept: Option<String> = match source {
        Some(src) => tx
            .prepare_cached("SELECT previous_json FROM events WHERE id = ?1")?
            .query_row([src], |r| r.get(0))
            .optional()?
            .flatten(),
        None => None,
    };
    let snapshot = match (source, kept) {
        (_, Some(kept)) => kept,
        (None, None) => encode_snapshot(d, extra_json(d).as_deref()),
        // The event that kept it is gone (pruned): the row has changed since, so it is
        // not the snapshot either. JSON `null` (read as no snapshot, as before) rather
        // than '', so that the event stays in the index of a serial's events
        // (`events_serial`) once no row names it.
        (Some(_), None) => "null".to_owned(),
    };
    tx.prepare_cached("UPDATE events SET device_json = ?2 WHERE id = ?1 AND device_json = ''")?
        .execute(params![event_id, snapshot])
        .map(drop)
}

/// An organisation device event read back: the snapshot is the device's JSON object;
/// an addition's or removal's changes are derived from it, as for ADE events.
pub(super) fn org_event(
    (id, token_name, serial_number, occurred_at): (i64, String, String, String),
    kind: EventKind,
    changes: Option<String>,
    snapshot: &str,
) -> StoredEvent {
    let device = serde_json::from_str::<Value>(snapshot)
        .ok()
        .and_then(|v| OrgDevice::from_json(&v));
    let changes = match (changes, &device) {
        (Some(text), _) => serde_json::from_str(&text).unwrap_or(Value::Null),
        (None, Some(d)) => Value::Object(d.all_changes(kind == EventKind::Deleted)),
        (None, None) => Value::Null,
    };
    StoredEvent {
        id,
        token_name,
        serial_number,
        kind,
        changes,
        occurred_at,
        scope: EventScope::OrgDevice,
        device: None,
        org_device: device,
        reason: None,
        assignment: None,
    }
}

/// A profile assignment event read back: its snapshot is the assignment.
fn profile_event(
    r: &rusqlite::Row<'_>,
    kind: EventKind,
    snapshot: &str,
) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        id: r.get(0)?,
        token_name: r.get(1)?,
        serial_number: r.get(2)?,
        kind,
        changes: Value::Object(Default::default()),
        occurred_at: r.get(5)?,
        scope: EventScope::Profile,
        device: None,
        org_device: None,
        reason: None,
        assignment: serde_json::from_str(snapshot).ok(),
    })
}

/// The statement [`Store::events_of`] runs: events with `id > ?1`, of token `?2` when not
/// NULL, at most `?3`, of serial `?4` when `by_serial`. An event whose snapshot is
/// deferred (device_json '') reads its device's row.
pub(super) fn events_sql(by_serial: bool) -> String {
    // One serial's events come from the index of the events that carry their own snapshot
    // and from the rows that name a deferred one (schema migration 8), not from a scan of
    // every event. The rows are found by key, token by token: the tokens are read off the
    // key index, one seek each. Without a serial, `?4` is NULL (the term is there only so
    // that both statements take the same four parameters).
    let (with, which) = if by_serial {
        (
            "WITH RECURSIVE tokens(t) AS (
                 SELECT MIN(token_name) FROM devices
                 UNION ALL
                 SELECT (SELECT MIN(token_name) FROM devices WHERE token_name > t)
                   FROM tokens WHERE t IS NOT NULL)",
            "e.id IN (SELECT id FROM events WHERE serial_number = ?4 AND device_json <> ''
                          AND id > ?1
                      UNION ALL
                      SELECT snapshot_event_id FROM devices
                       WHERE token_name IN (SELECT t FROM tokens)
                         AND serial_number = ?4 AND snapshot_event_id > ?1)
             AND e.serial_number = ?4",
        )
    } else {
        ("", "e.id > ?1 AND ?4 IS NULL")
    };
    format!(
        "{with}
         SELECT e.id, e.token_name, e.serial_number, e.kind, e.changes, e.occurred_at,
                e.device_json, e.scope, e.reason, src.previous_json, d.snapshot_source_id, {}
         FROM events e
         LEFT JOIN devices d ON e.device_json = '' AND e.scope IS NULL
              AND d.token_name = e.token_name AND d.serial_number = e.serial_number
              AND d.snapshot_event_id = e.id
         LEFT JOIN events src ON src.id = d.snapshot_source_id
         WHERE {which} AND (?2 IS NULL OR e.token_name = ?2)
         ORDER BY e.id LIMIT ?3",
        qualified_device_columns("d")
    )
}

impl Store {
    /// Events with `id > after`, oldest first, each with the device as stored when the
    /// event was written (its snapshot; the current row if there is none).
    pub fn events_after(
        &self,
        after: i64,
        token: Option<&str>,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.events_of(after, token, None, limit)
    }

    /// [`Store::events_after`], only the events of one serial number when `serial` is
    /// given (matched in SQL: the rows of other devices are never decoded).
    pub fn events_of(
        &self,
        after: i64,
        token: Option<&str>,
        serial: Option<&str>,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.events_of(after, token, serial, limit);
        }
        let mut stmt = self
            .conn()?
            .prepare_cached(&events_sql(serial.is_some()))
            .map_err(self.err("read events"))?;
        let rows = stmt
            .query_map(params![after, token, limit as i64, serial], |r| {
                let kind_text: String = r.get(3)?;
                let kind = EventKind::parse(&kind_text).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        3,
                        rusqlite::types::Type::Text,
                        format!("unknown event kind {kind_text:?}").into(),
                    )
                })?;
                let changes: Option<String> = r.get(4)?;
                let snapshot: String = r.get(6)?;
                match r.get_ref(7)?.as_str_or_null()? {
                    Some("profile") => return profile_event(r, kind, &snapshot),
                    Some(_) => {
                        let key = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(5)?);
                        return Ok(org_event(key, kind, changes, &snapshot));
                    }
                    None => {}
                }
                let device = if snapshot.is_empty() {
                    // Kept by a later event; else the row, unless the row has changed
                    // since and the event that kept it is gone (pruned).
                    let source: Option<i64> = r.get(10)?;
                    match (r.get_ref(9)?.as_str_or_null()?, r.get_ref(11)?) {
                        (Some(kept), _) => decode_snapshot(kept),
                        (None, rusqlite::types::ValueRef::Null) => None,
                        (None, _) if source.is_some() => None,
                        (None, _) => Some(device_from_row(r, 11)?),
                    }
                } else {
                    decode_snapshot(&snapshot)
                };
                let changes = match (changes, &device, kind) {
                    (Some(text), _, _) => serde_json::from_str(&text).unwrap_or(Value::Null),
                    (None, Some(d), EventKind::Added) => crate::events::addition_changes(d),
                    (None, Some(d), EventKind::Deleted) => crate::events::removal_changes(d),
                    (None, _, _) => Value::Null,
                };
                Ok(StoredEvent {
                    id: r.get(0)?,
                    token_name: r.get(1)?,
                    serial_number: r.get(2)?,
                    kind,
                    changes,
                    occurred_at: r.get(5)?,
                    scope: EventScope::Device,
                    device,
                    org_device: None,
                    reason: r
                        .get::<_, Option<String>>(8)?
                        .as_deref()
                        .and_then(Reason::parse),
                    assignment: None,
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("read events"))
    }

    /// Events per token.
    pub fn event_counts_by_token(&self) -> Result<Vec<(String, u64)>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.event_counts_by_token();
        }
        let mut stmt = self
            .conn()?
            .prepare("SELECT token_name, COUNT(*) FROM events GROUP BY 1 ORDER BY 1")
            .map_err(self.err("count events"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("count events"))
    }

    /// Number of events, optionally per kind, for a token.
    pub fn event_count(&self, token: Option<&str>) -> Result<u64, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.event_count(token);
        }
        self.conn()?
            .query_row(
                "SELECT COUNT(*) FROM events WHERE (?1 IS NULL OR token_name = ?1)",
                [token],
                |r| r.get::<_, i64>(0).map(|n| n as u64),
            )
            .map_err(self.err("count events"))
    }

    /// The highest event id (0 when none).
    pub fn max_event_id(&self) -> Result<i64, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.max_event_id();
        }
        self.conn()?
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))
            .map_err(self.err("read events"))
    }
}
