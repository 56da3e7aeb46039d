//! The PostgreSQL twins of the SQLite queries and small writes outside a page: sync
//! state, accounts, replacement details, devices and events as the CLI, the listener and
//! the syncer read them. Same SQL where the dialects agree; `$n` for `?n`.

use serde_json::Value;

use super::super::accounts::{token_rows_only, TOKEN_TABLES};
use super::super::devices::in_key_chunks;
use super::super::events::{decode_snapshot, org_event};
use super::super::{
    CursorState, DeviceFilter, SinkCursor, StoreError, StoredAccount, StoredDevice, SyncState,
    TokenFootprint,
};
use super::write::{device_from_row, upsert_state, PG_DEVICE_COLUMNS, PG_DEVICE_COLUMN_COUNT};
use super::Pg;
use crate::events::{EventScope, StoredEvent};
use crate::model::{EventKind, Phase, Reason};

const ACCOUNT_COLUMNS: &str = "token_name, server_name, server_uuid, org_name, org_type, \
    org_id, admin_id, page_limit_max, consumer_key, checked_at, token_expiry, expiry_warned_days";

fn account_from_row(r: &postgres::Row) -> StoredAccount {
    StoredAccount {
        token_name: r.get(0),
        server_name: r.get(1),
        server_uuid: r.get(2),
        org_name: r.get(3),
        org_type: r.get(4),
        org_id: r.get(5),
        admin_id: r.get(6),
        page_limit_max: r.get::<_, Option<i64>>(7).map(|n| n as u32),
        consumer_key: r.get(8),
        checked_at: r.get(9),
        token_expiry: r.get(10),
        expiry_warned_days: r.get(11),
    }
}

impl Pg {
    pub(crate) fn set_cursor(
        &mut self,
        token: &str,
        next: &CursorState,
        now: &str,
    ) -> Result<(), StoreError> {
        let err = self.err("store cursor");
        upsert_state(self.c(), token, next, None, now).map_err(err)
    }

    pub(crate) fn sync_state(&mut self, token: &str) -> Result<SyncState, StoreError> {
        let row = self
            .c()
            .query_opt(
                "SELECT phase, cursor, fetch_run, cursor_at, fetched_until, last_run_at,
                        last_success_at, last_error, last_error_kind, last_error_at,
                        last_full_fetch_at, last_full_fetch_changes
                 FROM sync_state WHERE token_name = $1",
                &[&token],
            )
            .map_err(self.err("read sync state"))?;
        Ok(match row {
            Some(r) => SyncState {
                token_name: token.to_owned(),
                cursor: CursorState {
                    phase: Phase::parse(&r.get::<_, String>(0)),
                    cursor: r.get(1),
                    fetch_run: r.get(2),
                },
                cursor_at: r.get(3),
                fetched_until: r.get(4),
                last_run_at: r.get(5),
                last_success_at: r.get(6),
                last_error: r.get(7),
                last_error_kind: r.get(8),
                last_error_at: r.get(9),
                last_full_fetch_at: r.get(10),
                last_full_fetch_changes: r.get(11),
            },
            None => SyncState::new(token),
        })
    }

    pub(crate) fn sync_states(&mut self) -> Result<Vec<SyncState>, StoreError> {
        let names: Vec<String> = self
            .c()
            .query("SELECT token_name FROM sync_state ORDER BY token_name", &[])
            .map_err(self.err("list sync state"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        names.iter().map(|n| self.sync_state(n)).collect()
    }

    pub(crate) fn record_run_start(&mut self, token: &str, now: &str) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO sync_state (token_name, last_run_at) VALUES ($1, $2)
                 ON CONFLICT (token_name) DO UPDATE SET last_run_at = excluded.last_run_at",
                &[&token, &now],
            )
            .map(drop)
            .map_err(self.err("record run start"))
    }

    pub(crate) fn record_run_end(
        &mut self,
        token: &str,
        error: Option<(&str, &str)>,
        now: &str,
    ) -> Result<(), StoreError> {
        let result = match error {
            None => self.c().execute(
                "INSERT INTO sync_state (token_name, last_success_at) VALUES ($1, $2)
                 ON CONFLICT (token_name) DO UPDATE SET last_success_at = excluded.last_success_at,
                     last_error = NULL, last_error_kind = NULL, last_error_at = NULL",
                &[&token, &now],
            ),
            Some((kind, message)) => self.c().execute(
                "INSERT INTO sync_state (token_name, last_error, last_error_kind, last_error_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (token_name) DO UPDATE SET last_error = excluded.last_error,
                     last_error_kind = excluded.last_error_kind, last_error_at = excluded.last_error_at",
                &[&token, &message, &kind, &now],
            ),
        };
        result.map(drop).map_err(self.err("record run result"))
    }

    pub(crate) fn account(&mut self, token: &str) -> Result<Option<StoredAccount>, StoreError> {
        Ok(self
            .c()
            .query_opt(
                &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE token_name = $1"),
                &[&token],
            )
            .map_err(self.err("read account"))?
            .as_ref()
            .map(account_from_row))
    }

    pub(crate) fn accounts(&mut self) -> Result<Vec<StoredAccount>, StoreError> {
        Ok(self
            .c()
            .query(
                &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY token_name"),
                &[],
            )
            .map_err(self.err("read accounts"))?
            .iter()
            .map(account_from_row)
            .collect())
    }

    pub(crate) fn save_account(&mut self, a: &StoredAccount) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO accounts (token_name, server_name, server_uuid, org_name, org_type,
                     org_id, admin_id, page_limit_max, consumer_key, checked_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (token_name) DO UPDATE SET
                     server_name = excluded.server_name, server_uuid = COALESCE(excluded.server_uuid, accounts.server_uuid),
                     org_name = excluded.org_name, org_type = excluded.org_type,
                     org_id = excluded.org_id, admin_id = excluded.admin_id,
                     page_limit_max = excluded.page_limit_max,
                     consumer_key = excluded.consumer_key, checked_at = excluded.checked_at",
                &[
                    &a.token_name,
                    &a.server_name,
                    &a.server_uuid,
                    &a.org_name,
                    &a.org_type,
                    &a.org_id,
                    &a.admin_id,
                    &a.page_limit_max.map(i64::from),
                    &a.consumer_key,
                    &a.checked_at,
                ],
            )
            .map(drop)
            .map_err(self.err("store account"))
    }

    pub(crate) fn set_expiry_warning(
        &mut self,
        token: &str,
        expiry: &str,
        warned_days: Option<i64>,
    ) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO accounts (token_name, token_expiry, expiry_warned_days)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (token_name) DO UPDATE SET token_expiry = excluded.token_expiry,
                     expiry_warned_days = excluded.expiry_warned_days",
                &[&token, &expiry, &warned_days],
            )
            .map(drop)
            .map_err(self.err("store expiry warning"))
    }

    pub(crate) fn has_devices(&mut self, token: &str) -> Result<bool, StoreError> {
        Ok(self
            .c()
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM devices WHERE token_name = $1)",
                &[&token],
            )
            .map_err(self.err("count devices"))?
            .get(0))
    }

    pub(crate) fn replacements_due(
        &mut self,
        token: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .c()
            .query(
                "SELECT serial_number FROM devices
                 WHERE token_name = $1 AND is_replacement_device
                   AND replacement_checked_at IS NULL AND deleted_at IS NULL
                 LIMIT $2",
                &[&token, &(limit as i64)],
            )
            .map_err(self.err("read replacement devices"))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub(crate) fn save_replacement(
        &mut self,
        token: &str,
        serial: &str,
        original: Option<(&str, Option<&str>)>,
        now: &str,
    ) -> Result<(), StoreError> {
        let (original, date) = original.unzip();
        self.c()
            .execute(
                "UPDATE devices SET original_device_serial_number = $3, replacement_date = $4,
                     replacement_checked_at = $5
                 WHERE token_name = $1 AND serial_number = $2",
                &[&token, &serial, &original, &date.flatten(), &now],
            )
            .map(drop)
            .map_err(self.err("store replacement details"))
    }

    #[allow(clippy::type_complexity)]
    pub(crate) fn replacement_links(
        &mut self,
        serial: &str,
    ) -> Result<(Option<(String, Option<String>)>, Vec<String>), StoreError> {
        let replaced = self
            .c()
            .query_opt(
                "SELECT original_device_serial_number, replacement_date FROM devices
                 WHERE serial_number = $1 AND original_device_serial_number IS NOT NULL LIMIT 1",
                &[&serial],
            )
            .map_err(self.err("read replacement details"))?
            .map(|r| (r.get(0), r.get(1)));
        let by = self
            .c()
            .query(
                "SELECT serial_number FROM devices WHERE original_device_serial_number = $1 ORDER BY 1",
                &[&serial],
            )
            .map_err(self.err("read replacement details"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok((replaced, by))
    }

    pub(crate) fn device_counts(&mut self, token: &str) -> Result<(u64, u64), StoreError> {
        let r = self
            .c()
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE deleted_at IS NULL), COUNT(*) FILTER (WHERE deleted_at IS NOT NULL)
                 FROM devices WHERE token_name = $1",
                &[&token],
            )
            .map_err(self.err("count devices"))?;
        Ok((r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
    }

    pub(crate) fn profile_status_counts(
        &mut self,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        Ok(self
            .c()
            .query(
                "SELECT token_name, COALESCE(profile_status, 'unknown'), COUNT(*) FROM devices
                 WHERE deleted_at IS NULL GROUP BY 1, 2 ORDER BY 1, 2",
                &[],
            )
            .map_err(self.err("count devices"))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
            .collect())
    }

    /// Stored devices matching `filter`, by token then serial, in chunks by key (see the
    /// SQLite twin: no read stays open for a slow consumer).
    pub(crate) fn for_each_device<E: From<StoreError>>(
        &mut self,
        filter: &DeviceFilter,
        f: impl FnMut(StoredDevice) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut sql = format!(
            "SELECT token_name, {PG_DEVICE_COLUMNS}, first_seen_at, updated_at, deleted_at FROM devices WHERE true"
        );
        let mut args: Vec<String> = Vec::new();
        let mut add = |sql: &mut String, v: String, cond: &str| {
            args.push(v);
            sql.push_str(&cond.replace('#', &format!("${}", args.len())));
        };
        if let Some(t) = &filter.token {
            add(&mut sql, t.clone(), " AND token_name = #");
        }
        if let Some(s) = &filter.serial {
            add(&mut sql, s.clone(), " AND serial_number = #");
        }
        if let Some(s) = &filter.profile_status {
            add(&mut sql, s.clone(), " AND profile_status = #");
        }
        if let Some(s) = &filter.model {
            add(&mut sql, s.clone(), " AND lower(model) = lower(#)");
        }
        if let Some(s) = &filter.family {
            add(&mut sql, s.clone(), " AND lower(device_family) = lower(#)");
        }
        if let Some(s) = &filter.imei {
            add(&mut sql, format!("\"{s}\""), " AND strpos(imei, #) > 0");
        }
        match filter.deleted {
            None => sql.push_str(" AND deleted_at IS NULL"),
            Some(true) => sql.push_str(" AND deleted_at IS NOT NULL"),
            Some(false) => {}
        }
        let k = args.len();
        let first_sql = format!("{sql} ORDER BY token_name, serial_number LIMIT ${}", k + 1);
        let next_sql = format!(
            "{sql} AND (token_name, serial_number) > (${}, ${})
             ORDER BY token_name, serial_number LIMIT ${}",
            k + 1,
            k + 2,
            k + 3
        );
        in_key_chunks(filter.limit, f, |after, want| {
            let want = want as i64;
            let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = args
                .iter()
                .map(|a| a as &(dyn postgres::types::ToSql + Sync))
                .collect();
            let sql = match after {
                Some((t, s)) => {
                    params.push(t);
                    params.push(s);
                    &next_sql
                }
                None => &first_sql,
            };
            params.push(&want);
            let err = self.err("list devices");
            let rows = self.c().query(sql.as_str(), &params).map_err(err)?;
            rows.iter()
                .map(|r| {
                    Ok(StoredDevice {
                        token_name: r.try_get(0)?,
                        device: device_from_row(r, 1)?,
                        first_seen_at: r.try_get(PG_DEVICE_COLUMN_COUNT + 1)?,
                        updated_at: r.try_get(PG_DEVICE_COLUMN_COUNT + 2)?,
                        deleted_at: r.try_get(PG_DEVICE_COLUMN_COUNT + 3)?,
                    })
                })
                .collect::<Result<Vec<_>, postgres::Error>>()
                .map_err(self.err("list devices"))
        })
    }

    /// Events after `after`, oldest first (see `Store::events_of`).
    pub(crate) fn events_of(
        &mut self,
        after: i64,
        token: Option<&str>,
        serial: Option<&str>,
        limit: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = self
            .c()
            .query(
                "SELECT id, token_name, serial_number, kind, changes::text, occurred_at,
                        device_json::text, scope, reason
                 FROM events
                 WHERE id > $1 AND ($2::text IS NULL OR token_name = $2)
                   AND ($3::text IS NULL OR serial_number = $3)
                 ORDER BY id LIMIT $4",
                &[
                    &after,
                    &token,
                    &serial,
                    &(limit.min(i64::MAX as u64) as i64),
                ],
            )
            .map_err(self.err("read events"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let kind_text: String = r.get(3);
            let Some(kind) = EventKind::parse(&kind_text) else {
                continue;
            };
            let changes: Option<String> = r.get(4);
            let snapshot: String = r.get(6);
            if r.get::<_, Option<&str>>(7) == Some("profile") {
                out.push(StoredEvent {
                    id: r.get(0),
                    token_name: r.get(1),
                    serial_number: r.get(2),
                    kind,
                    changes: Value::Object(Default::default()),
                    occurred_at: r.get(5),
                    scope: EventScope::Profile,
                    device: None,
                    org_device: None,
                    reason: None,
                    assignment: serde_json::from_str(&snapshot).ok(),
                });
                continue;
            }
            if r.get::<_, Option<&str>>(7) == EventScope::OrgDevice.stored() {
                let key = (r.get(0), r.get(1), r.get(2), r.get(5));
                out.push(org_event(key, kind, changes, &snapshot));
                continue;
            }
            let device = decode_snapshot(&snapshot);
            let changes = match (changes, &device, kind) {
                (Some(text), _, _) => serde_json::from_str(&text).unwrap_or(Value::Null),
                (None, Some(d), EventKind::Added) => crate::events::addition_changes(d),
                (None, Some(d), EventKind::Deleted) => crate::events::removal_changes(d),
                (None, _, _) => Value::Null,
            };
            out.push(StoredEvent {
                id: r.get(0),
                token_name: r.get(1),
                serial_number: r.get(2),
                kind,
                changes,
                occurred_at: r.get(5),
                scope: EventScope::Device,
                device,
                org_device: None,
                reason: r
                    .get::<_, Option<String>>(8)
                    .as_deref()
                    .and_then(Reason::parse),
                assignment: None,
            });
        }
        Ok(out)
    }

    pub(crate) fn event_counts_by_token(&mut self) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .c()
            .query(
                "SELECT token_name, COUNT(*) FROM events GROUP BY 1 ORDER BY 1",
                &[],
            )
            .map_err(self.err("count events"))?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    pub(crate) fn event_count(&mut self, token: Option<&str>) -> Result<u64, StoreError> {
        Ok(self
            .c()
            .query_one(
                "SELECT COUNT(*) FROM events WHERE ($1::text IS NULL OR token_name = $1)",
                &[&token],
            )
            .map_err(self.err("count events"))?
            .get::<_, i64>(0) as u64)
    }

    pub(crate) fn max_event_id(&mut self) -> Result<i64, StoreError> {
        Ok(self
            .c()
            .query_one("SELECT COALESCE(MAX(id), 0) FROM events", &[])
            .map_err(self.err("read events"))?
            .get(0))
    }

    /// How many rows `token` has in each per-token table.
    pub(crate) fn token_footprint(&mut self, token: &str) -> Result<TokenFootprint, StoreError> {
        let mut count = |table: &str| -> Result<u64, StoreError> {
            let err = self.err("count a token's rows");
            Ok(self
                .c()
                .query_one(
                    &format!(
                        "SELECT COUNT(*) FROM {table} WHERE token_name = $1{}",
                        token_rows_only(table)
                    ),
                    &[&token],
                )
                .map_err(err)?
                .get::<_, i64>(0) as u64)
        };
        Ok(TokenFootprint {
            devices: count("devices")?,
            events: count("events")?,
            sync_state: count("sync_state")?,
            account: count("accounts")?,
        })
    }

    /// Deletes every row of `token` in one transaction (see the SQLite twin).
    pub(crate) fn purge_token(&mut self, token: &str) -> Result<TokenFootprint, StoreError> {
        let deleted = self.in_tx("forget a token", |tx| {
            let mut deleted = [0u64; TOKEN_TABLES.len()];
            for (i, table) in TOKEN_TABLES.iter().enumerate() {
                deleted[i] = tx.execute(
                    &format!(
                        "DELETE FROM {table} WHERE token_name = $1{}",
                        token_rows_only(table)
                    ),
                    &[&token],
                )?;
            }
            tx.execute("DELETE FROM fetch_seen WHERE token_name = $1", &[&token])?;
            Ok(deleted)
        })?;
        Ok(TokenFootprint {
            events: deleted[0],
            devices: deleted[1],
            sync_state: deleted[2],
            account: deleted[3],
        })
    }

    /// Every token name that has rows in any per-token table, sorted.
    pub(crate) fn stored_token_names(&mut self) -> Result<Vec<String>, StoreError> {
        let sql = TOKEN_TABLES
            .iter()
            .map(|t| format!("SELECT DISTINCT token_name FROM {t}"))
            .collect::<Vec<_>>()
            .join(" UNION ")
            + " ORDER BY 1";
        Ok(self
            .c()
            .query(sql.as_str(), &[])
            .map_err(self.err("list stored tokens"))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

/// Event delivery (the SQLite twins are in `store/sink_cursors.rs`).
impl Pg {
    pub(crate) fn sink_state(&mut self, sink: &str) -> Result<SinkCursor, StoreError> {
        Ok(self
            .c()
            .query_opt(
                "SELECT last_event_id, last_delivered_at, last_error, last_error_at, parked_at, retry_at
                 FROM sink_cursors WHERE sink_name = $1",
                &[&sink],
            )
            .map_err(self.err("read sink state"))?
            .map(|r| SinkCursor {
                cursor: r.get(0),
                last_delivered_at: r.get(1),
                last_error: r.get(2),
                last_error_at: r.get(3),
                parked_at: r.get(4),
                retry_at: r.get(5),
            })
            .unwrap_or_default())
    }

    pub(crate) fn advance_sink_cursor(
        &mut self,
        sink: &str,
        from: i64,
        to: i64,
        now: &str,
    ) -> Result<bool, StoreError> {
        self.in_tx("store sink cursor", |tx| {
            tx.execute(
                "INSERT INTO sink_cursors (sink_name) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&sink],
            )?;
            let n = tx.execute(
                "UPDATE sink_cursors SET last_event_id = $3, last_delivered_at = $4,
                     last_error = NULL, last_error_at = NULL, retry_at = NULL
                 WHERE sink_name = $1 AND last_event_id = $2 AND parked_at IS NULL",
                &[&sink, &from, &to, &now],
            )?;
            Ok(n == 1)
        })
    }

    pub(crate) fn record_sink_error(
        &mut self,
        sink: &str,
        error: &str,
        now: &str,
        retry_at: Option<&str>,
    ) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO sink_cursors (sink_name, last_error, last_error_at, retry_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (sink_name) DO UPDATE SET last_error = excluded.last_error,
                     last_error_at = excluded.last_error_at, retry_at = excluded.retry_at",
                &[&sink, &error, &now, &retry_at],
            )
            .map(drop)
            .map_err(self.err("record sink error"))
    }

    pub(crate) fn park_sink(
        &mut self,
        sink: &str,
        error: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO sink_cursors (sink_name, last_error, last_error_at, parked_at)
                 VALUES ($1, $2, $3, $3)
                 ON CONFLICT (sink_name) DO UPDATE SET last_error = excluded.last_error,
                     last_error_at = excluded.last_error_at, parked_at = excluded.parked_at,
                     retry_at = NULL",
                &[&sink, &error, &now],
            )
            .map(drop)
            .map_err(self.err("park sink"))
    }

    pub(crate) fn resume_sink(&mut self, sink: &str) -> Result<bool, StoreError> {
        let was_parked = self.sink_state(sink)?.parked_at.is_some();
        self.c()
            .execute(
                "UPDATE sink_cursors SET parked_at = NULL, retry_at = NULL WHERE sink_name = $1",
                &[&sink],
            )
            .map_err(self.err("resume sink"))?;
        Ok(was_parked)
    }

    pub(crate) fn rewind_sink(&mut self, sink: &str, cursor: i64) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO sink_cursors (sink_name, last_event_id) VALUES ($1, $2)
                 ON CONFLICT (sink_name) DO UPDATE SET last_event_id = excluded.last_event_id",
                &[&sink, &cursor],
            )
            .map(drop)
            .map_err(self.err("rewind sink cursor"))
    }

    pub(crate) fn pending_events(
        &mut self,
        cursor: i64,
    ) -> Result<(u64, Option<String>), StoreError> {
        let r = self
            .c()
            .query_one(
                "SELECT COUNT(*), (SELECT occurred_at FROM events WHERE id > $1 ORDER BY id LIMIT 1)
                   FROM events WHERE id > $1",
                &[&cursor],
            )
            .map_err(self.err("count pending events"))?;
        Ok((r.get::<_, i64>(0) as u64, r.get(1)))
    }

    pub(crate) fn min_event_id(&mut self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .c()
            .query_one("SELECT MIN(id) FROM events", &[])
            .map_err(self.err("read events"))?
            .get(0))
    }

    pub(crate) fn prune_events(
        &mut self,
        delivered_through: i64,
        older_than: &str,
    ) -> Result<u64, StoreError> {
        const BATCH: i64 = 1000;
        let mut total = 0;
        loop {
            let n = self
                .c()
                .execute(
                    "DELETE FROM events WHERE id IN (
                         SELECT id FROM events WHERE id <= $1 ORDER BY id LIMIT $3)
                     AND occurred_at < $2",
                    &[&delivered_through, &older_than, &BATCH],
                )
                .map_err(self.err("prune events"))?;
            total += n;
            if (n as i64) < BATCH {
                return Ok(total);
            }
        }
    }
}
