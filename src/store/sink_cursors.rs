//! The SQL behind event delivery: each sink's cursor and health (`sink_cursors`), and
//! retention of delivered events.
//!
//! Key invariant: a sink's cursor only moves forward from the value the deliverer read
//! ([`Store::advance_sink_cursor`] is a compare-and-set), so a replay that rewinds it or a
//! second process delivering the same sink is noticed instead of silently overwritten,
//! and [`Store::prune_events`] never deletes an event some configured sink still needs.

use rusqlite::{params, OptionalExtension};

use super::{Store, StoreError};

/// A sink's stored delivery state. A sink never delivered to has the default (cursor 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkCursor {
    /// The last event id the sink acknowledged; it receives ids above it next.
    pub cursor: i64,
    /// When a batch was last acknowledged.
    pub last_delivered_at: Option<String>,
    /// Why the last pass failed; cleared by the next successful batch.
    pub last_error: Option<String>,
    /// When it failed.
    pub last_error_at: Option<String>,
    /// Set while parked (the receiver refused a batch for good); delivery waits for
    /// `adesync sinks resume`.
    pub parked_at: Option<String>,
    /// No delivery before this time (the receiver's `Retry-After`).
    pub retry_at: Option<String>,
}

impl Store {
    /// A sink's delivery state (the default when it never delivered).
    pub fn sink_state(&self, sink: &str) -> Result<SinkCursor, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.sink_state(sink);
        }
        self.conn()?
            .query_row(
                "SELECT last_event_id, last_delivered_at, last_error, last_error_at, parked_at, retry_at
                 FROM sink_cursors WHERE sink_name = ?1",
                [sink],
                |r| {
                    Ok(SinkCursor {
                        cursor: r.get(0)?,
                        last_delivered_at: r.get(1)?,
                        last_error: r.get(2)?,
                        last_error_at: r.get(3)?,
                        parked_at: r.get(4)?,
                        retry_at: r.get(5)?,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(self.err("read sink state"))
    }

    /// Moves a sink's cursor from `from` to `to` after the receiver acknowledged the
    /// events in between, and clears its error. Returns false, changing nothing, when the
    /// cursor is no longer `from` (rewound by a replay, moved by another process) or the
    /// sink was parked meanwhile: the caller stops its pass and the next one re-reads.
    pub fn advance_sink_cursor(
        &mut self,
        sink: &str,
        from: i64,
        to: i64,
        now: &str,
    ) -> Result<bool, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.advance_sink_cursor(sink, from, to, now);
        }
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            action: "store sink cursor",
            source,
        };
        let tx = self.conn_mut()?.transaction().map_err(wrap)?;
        tx.execute(
            "INSERT OR IGNORE INTO sink_cursors (sink_name) VALUES (?1)",
            [sink],
        )
        .and_then(|_| {
            tx.execute(
                "UPDATE sink_cursors SET last_event_id = ?3, last_delivered_at = ?4,
                     last_error = NULL, last_error_at = NULL, retry_at = NULL
                 WHERE sink_name = ?1 AND last_event_id = ?2 AND parked_at IS NULL",
                params![sink, from, to, now],
            )
        })
        .and_then(|n| tx.commit().map(|_| n == 1))
        .map_err(wrap)
    }

    /// Records a failed delivery pass; `retry_at` defers the next one (Retry-After).
    pub fn record_sink_error(
        &mut self,
        sink: &str,
        error: &str,
        now: &str,
        retry_at: Option<&str>,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.record_sink_error(sink, error, now, retry_at);
        }
        self.conn()?
            .execute(
                "INSERT INTO sink_cursors (sink_name, last_error, last_error_at, retry_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (sink_name) DO UPDATE SET last_error = excluded.last_error,
                     last_error_at = excluded.last_error_at, retry_at = excluded.retry_at",
                params![sink, error, now, retry_at],
            )
            .map(drop)
            .map_err(self.err("record sink error"))
    }

    /// Parks a sink: the receiver refused a batch for good, so delivery stops (keeping
    /// order) until [`Store::resume_sink`].
    pub fn park_sink(&mut self, sink: &str, error: &str, now: &str) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.park_sink(sink, error, now);
        }
        self.conn()?
            .execute(
                "INSERT INTO sink_cursors (sink_name, last_error, last_error_at, parked_at)
                 VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (sink_name) DO UPDATE SET last_error = excluded.last_error,
                     last_error_at = excluded.last_error_at, parked_at = excluded.parked_at,
                     retry_at = NULL",
                params![sink, error, now],
            )
            .map(drop)
            .map_err(self.err("park sink"))
    }

    /// Un-parks a sink and drops any Retry-After wait; the next pass delivers again.
    /// Returns whether it was parked.
    pub fn resume_sink(&mut self, sink: &str) -> Result<bool, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.resume_sink(sink);
        }
        let was_parked = self.sink_state(sink)?.parked_at.is_some();
        self.conn()?
            .execute(
                "UPDATE sink_cursors SET parked_at = NULL, retry_at = NULL WHERE sink_name = ?1",
                [sink],
            )
            .map_err(self.err("resume sink"))?;
        Ok(was_parked)
    }

    /// Sets a sink's cursor back so that events after `cursor` are delivered again (replay).
    pub fn rewind_sink(&mut self, sink: &str, cursor: i64) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.rewind_sink(sink, cursor);
        }
        self.conn()?
            .execute(
                "INSERT INTO sink_cursors (sink_name, last_event_id) VALUES (?1, ?2)
                 ON CONFLICT (sink_name) DO UPDATE SET last_event_id = excluded.last_event_id",
                params![sink, cursor],
            )
            .map(drop)
            .map_err(self.err("rewind sink cursor"))
    }

    /// Events after `cursor`: how many, and when the oldest of them was written.
    pub fn pending_events(&self, cursor: i64) -> Result<(u64, Option<String>), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.pending_events(cursor);
        }
        let count: i64 = self
            .conn()?
            .query_row("SELECT COUNT(*) FROM events WHERE id > ?1", [cursor], |r| {
                r.get(0)
            })
            .map_err(self.err("count pending events"))?;
        let oldest: Option<String> = self
            .conn()?
            .query_row(
                "SELECT occurred_at FROM events WHERE id > ?1 ORDER BY id LIMIT 1",
                [cursor],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err("count pending events"))?;
        Ok((count as u64, oldest))
    }

    /// The smallest stored event id (None when there are no events).
    pub fn min_event_id(&self) -> Result<Option<i64>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.min_event_id();
        }
        self.conn()?
            .query_row("SELECT MIN(id) FROM events", [], |r| r.get(0))
            .map_err(self.err("read events"))
    }

    /// Deletes events with `id <= delivered_through` written before `older_than` (a
    /// timestamp in the stored format). Works in small batches from the oldest id, so the
    /// write lock is never held for long and a pass with nothing to prune reads one batch.
    /// Returns how many were deleted.
    pub fn prune_events(
        &mut self,
        delivered_through: i64,
        older_than: &str,
    ) -> Result<u64, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.prune_events(delivered_through, older_than);
        }
        const BATCH: i64 = 1000;
        let mut total = 0;
        loop {
            // Ids and times grow together, so when the oldest batch has nothing old enough
            // nothing later has either.
            let n = self
                .conn()?
                .execute(
                    "DELETE FROM events WHERE id IN (
                         SELECT id FROM events WHERE id <= ?1 ORDER BY id LIMIT ?3)
                     AND occurred_at < ?2",
                    params![delivered_through, older_than, BATCH],
                )
                .map_err(self.err("prune events"))?;
            total += n as u64;
            if (n as i64) < BATCH {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Device, DeviceRecord, OpType, Phase};
    use crate::store::{CursorState, PageWrite};
    use serde_json::Value;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("x.db")).unwrap();
        (dir, s)
    }

    fn write(s: &mut Store, records: &[DeviceRecord], now: &str) {
        s.apply_page(&PageWrite {
            token: "acme",
            kind: Phase::Sync,
            records,
            next: CursorState {
                phase: Phase::Sync,
                cursor: Some("c".into()),
                fetch_run: 1,
            },
            fetched_until: None,
            completes_fetch: false,
            now,
            unreadable: &[],
            expect_new: false,
            prepared: None,
        })
        .unwrap();
    }

    fn rec(op: OpType, date: &str, color: &str) -> DeviceRecord {
        let mut device = Device {
            serial_number: "A".into(),
            model: Some("iPad".into()),
            color: Some(color.into()),
            ..Device::default()
        };
        device.extra.insert("imei".into(), serde_json::json!(["1"]));
        DeviceRecord {
            op_type: Some(op),
            op_date: Some(date.into()),
            device,
        }
    }

    #[test]
    fn each_event_carries_the_device_as_it_was_then() {
        let (_d, mut s) = open();
        let t = "2026-01-01T00:00:00.000Z";
        let mut red = rec(OpType::Added, "2026-01-01T00:00:00Z", "red");
        red.device.extra.insert("note".into(), Value::Null);
        let blue = rec(OpType::Modified, "2026-01-02T00:00:00Z", "blue");
        write(&mut s, std::slice::from_ref(&red), t);
        write(&mut s, std::slice::from_ref(&blue), t);
        write(
            &mut s,
            &[rec(OpType::Deleted, "2026-01-03T00:00:00Z", "blue")],
            t,
        );
        let evs = s.events_after(0, None, 10).unwrap();
        let kinds: Vec<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["added", "modified", "deleted"]);
        // Every field, extras included: the added event still shows red although the
        // device is blue now; the deleted one shows the last known record.
        let devices: Vec<&Device> = evs.iter().map(|e| e.device.as_ref().unwrap()).collect();
        assert_eq!(devices, [&red.device, &blue.device, &blue.device]);
        // Only the modified event stores its changes; the added and deleted events derive
        // theirs from the snapshot: every field, extras included.
        let stored: i64 = s
            .conn()
            .unwrap()
            .query_row("SELECT COUNT(changes) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 1);
        assert_eq!(evs[0].changes["color"], serde_json::json!([null, "red"]));
        assert_eq!(evs[0].changes["imei"], serde_json::json!([null, ["1"]]));
        assert_eq!(evs[0].changes["note"], serde_json::json!([null, null]));
        assert_eq!(
            evs[1].changes,
            serde_json::json!({"color": ["red", "blue"], "note": [null, null]})
        );
        assert_eq!(evs[2].changes["model"], serde_json::json!(["iPad", null]));
        assert_eq!(evs[2].changes["imei"], serde_json::json!([["1"], null]));
    }

    #[test]
    fn the_cursor_moves_only_from_the_value_read() {
        let (_d, mut s) = open();
        let now = "2026-01-01T00:00:00.000Z";
        assert_eq!(s.sink_state("x").unwrap(), SinkCursor::default());
        s.record_sink_error("x", "down", now, None).unwrap();
        assert!(s.advance_sink_cursor("x", 0, 5, now).unwrap());
        let st = s.sink_state("x").unwrap();
        assert_eq!((st.cursor, st.last_error), (5, None));
        // A replay rewound it: a deliverer that read 5 must not overwrite.
        s.rewind_sink("x", 2).unwrap();
        assert!(!s.advance_sink_cursor("x", 5, 9, now).unwrap());
        assert_eq!(s.sink_state("x").unwrap().cursor, 2);
        // Parked sinks do not move until resumed.
        s.park_sink("x", "400", now).unwrap();
        assert!(!s.advance_sink_cursor("x", 2, 3, now).unwrap());
        assert!(s.resume_sink("x").unwrap());
        assert!(s.advance_sink_cursor("x", 2, 3, now).unwrap());
        assert!(!s.resume_sink("x").unwrap());
    }

    #[test]
    fn pruning_keeps_recent_and_undelivered_events() {
        let (_d, mut s) = open();
        for (i, day) in ["01", "02", "03", "04"].iter().enumerate() {
            let now = format!("2026-01-{day}T00:00:00.000Z");
            let color = format!("c{i}");
            write(
                &mut s,
                &[rec(
                    OpType::Modified,
                    &format!("2026-01-{day}T00:00:00Z"),
                    &color,
                )],
                &now,
            );
        }
        assert_eq!(s.pending_events(0).unwrap().0, 4);
        // Delivered through 3; older than Jan 3: events 1 and 2 go.
        assert_eq!(s.prune_events(3, "2026-01-03T00:00:00.000Z").unwrap(), 2);
        // Old enough but undelivered (4 > 1): kept.
        assert_eq!(s.prune_events(1, "2027-01-01T00:00:00.000Z").unwrap(), 0);
        let ids: Vec<i64> = s
            .events_after(0, None, 10)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [3, 4]);
        assert_eq!(s.min_event_id().unwrap(), Some(3));
        let (n, oldest) = s.pending_events(3).unwrap();
        assert_eq!(
            (n, oldest.as_deref()),
            (1, Some("2026-01-04T00:00:00.000Z"))
        );
    }
}
