//! `adesync store copy`: an SQLite mirror moved into an empty PostgreSQL database in one
//! transaction, so an admin moves without a full re-fetch and receivers never see an event
//! twice: device rows keep their ids (an unfinished fetch's `fetch_seen` bitmaps name them),
//! events keep their ids and carry their snapshots resolved (`events_with_device`), and the
//! cursors, accounts, sink cursors, profile assignment and the organisation's inventory
//! come along as they are.

use rusqlite::Connection;

use super::super::device_row::{device_from_row, DEVICE_COLUMNS};
use super::super::StoreError;
use super::write::{field_cells, pg_extra_json, v10_cells};
use super::Pg;

/// What a copy moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Device rows.
    pub devices: u64,
    /// Events (ADE, profile assignment and organisation device events).
    pub events: u64,
    /// Tokens' sync state rows.
    pub sync_states: u64,
    /// Tokens' account rows.
    pub accounts: u64,
    /// Sinks' cursors.
    pub sink_cursors: u64,
    /// An unfinished full fetch's bitmaps.
    pub fetch_seen: u64,
    /// Profile definitions.
    pub profiles: u64,
    /// Devices' last profile assignments.
    pub assignments: u64,
    /// Organisation accounts' walk states.
    pub org_accounts: u64,
    /// Organisation devices.
    pub org_devices: u64,
    /// MDM servers.
    pub mdm_servers: u64,
    /// AppleCare coverages.
    pub applecare_coverages: u64,
}

/// Rows per read from SQLite and per statement into PostgreSQL.
const CHUNK: i64 = 5_000;

fn lite<'a>(
    path: &'a std::path::Path,
    action: &'static str,
) -> impl Fn(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        action,
        source,
    }
}

impl Pg {
    /// Copies the mirror in `from` (an SQLite store at `path`) into this database, which
    /// must hold no mirror yet. One transaction: all of it or nothing.
    pub(crate) fn copy_from_sqlite(
        &mut self,
        from: &Connection,
        path: &std::path::Path,
    ) -> Result<CopyReport, StoreError> {
        let shown = self.shown.clone();
        let pgerr = |action| self.err(action);
        let (e_check, e_begin, e_dev, e_ev, e_rest, e_commit) = (
            pgerr("check the target is empty"),
            pgerr("begin the copy"),
            pgerr("copy devices"),
            pgerr("copy events"),
            pgerr("copy sync state, accounts and sink cursors"),
            pgerr("commit the copy"),
        );
        let mut tx = self.c().transaction().map_err(e_begin)?;
        let held: i64 = match tx.query_one(
            "SELECT (SELECT count(*) FROM devices) + (SELECT count(*) FROM events)
                  + (SELECT count(*) FROM sync_state) + (SELECT count(*) FROM sink_cursors)
                  + (SELECT count(*) FROM profile_assignments) + (SELECT count(*) FROM assign_state)
                  + (SELECT count(*) FROM org_devices) + (SELECT count(*) FROM org_walks)",
            &[],
        ) {
            Ok(r) => r.get(0),
            Err(e) => return Err(e_check(e)),
        };
        if held > 0 {
            return Err(StoreError::PostgresConfig {
                url: shown.clone(),
                reason: "already holds a mirror (devices, events, sync state or sink cursors); copy only into an empty database, or a new schema (options=-c search_path=NAME in the URL)".into(),
            });
        }
        let mut report = CopyReport::default();
        let read = lite(path, "read the mirror to copy");

        // Devices, by id, keeping ids.
        let mut last = 0i64;
        loop {
            let mut stmt = from
                .prepare_cached(&format!(
                    "SELECT id, token_name, first_seen_at, updated_at, deleted_at, last_op_date,
                            content_hash, original_device_serial_number, replacement_date,
                            replacement_checked_at, {DEVICE_COLUMNS}
                     FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .map_err(&read)?;
            let mut text: Vec<Vec<Option<String>>> = (0..30).map(|_| Vec::new()).collect();
            let mut ids: Vec<i64> = Vec::new();
            let mut hashes: Vec<Option<i64>> = Vec::new();
            let mut flags: Vec<Vec<Option<bool>>> = vec![Vec::new(), Vec::new()];
            let mut rows = stmt.query([last, CHUNK]).map_err(&read)?;
            while let Some(r) = rows.next().map_err(&read)? {
                let d = device_from_row(r, 10).map_err(&read)?;
                let mut cells = v10_cells(&d);
                let fields = field_cells(&d, &mut cells.odd);
                let sqlite_extra: Option<String> = r.get(10 + 13).map_err(&read)?;
                ids.push(r.get(0).map_err(&read)?);
                hashes.push(r.get(6).map_err(&read)?);
                let mut col = 0;
                let mut put = |v: Option<String>| {
                    text[col].push(v);
                    col += 1;
                };
                put(Some(r.get(1).map_err(&read)?));
                for i in [2, 3, 4, 5, 7, 8, 9] {
                    put(r.get(i).map_err(&read)?);
                }
                put(Some(d.serial_number.clone()));
                for f in fields {
                    put(f);
                }
                put(pg_extra_json(sqlite_extra.as_deref(), &cells.odd));
                for t in cells.text {
                    put(t);
                }
                for (i, b) in cells.flags.into_iter().enumerate() {
                    flags[i].push(b);
                }
            }
            drop(rows);
            if ids.is_empty() {
                break;
            }
            last = *ids.last().expect("not empty");
            report.devices += ids.len() as u64;
            let mut args: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&ids];
            args.extend(
                text.iter()
                    .take(29)
                    .map(|v| v as &(dyn postgres::types::ToSql + Sync)),
            );
            args.extend(
                flags
                    .iter()
                    .map(|v| v as &(dyn postgres::types::ToSql + Sync)),
            );
            args.push(&hashes);
            if let Err(e) = tx.execute(
                "INSERT INTO devices (id, token_name, first_seen_at, updated_at, deleted_at,
                     last_op_date, original_device_serial_number, replacement_date,
                     replacement_checked_at, serial_number, model, description, color, asset_tag,
                     profile_status, profile_uuid, profile_assign_time, profile_push_time,
                     device_assigned_date, device_assigned_by, os, device_family, extra_json,
                     imei, meid, eid, wifi_mac_address, bluetooth_mac_address,
                     ethernet_mac_address, mdm_migration_deadline, is_replacement_device,
                     released_by_replacement, content_hash)
                 SELECT u.id, u.t, u.fs, u.up, u.del, u.op, u.orig, u.rd, u.rc, u.sn, u.m, u.de,
                        u.co, u.at, u.ps, u.pu, u.pat, u.ppt, u.dad, u.dab, u.os, u.fam,
                        u.ex::json, u.imei, u.meid, u.eid, u.wifi, u.bt, u.eth, u.dl, u.repl,
                        u.rel, u.h
                   FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[],
                               $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                               $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                               $16::text[], $17::text[], $18::text[], $19::text[], $20::text[],
                               $21::text[], $22::text[], $23::text[], $24::text[], $25::text[],
                               $26::text[], $27::text[], $28::text[], $29::text[], $30::text[],
                               $31::bool[], $32::bool[], $33::int8[])
                     AS u(id, t, fs, up, del, op, orig, rd, rc, sn, m, de, co, at, ps, pu, pat,
                          ppt, dad, dab, os, fam, ex, imei, meid, eid, wifi, bt, eth, dl, repl,
                          rel, h)",
                &args,
            ) {
                return Err(e_dev(e));
            }
        }

        // Every event by id, snapshots resolved.
        let mut last = 0i64;
        loop {
            let mut stmt = from
                .prepare_cached(
                    "SELECT id, token_name, serial_number, kind, changes, occurred_at,
                            COALESCE(device_json, 'null'), reason, scope
                     FROM events_with_device WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(&read)?;
            let mut ids: Vec<i64> = Vec::new();
            let mut cols: Vec<Vec<Option<String>>> = (0..8).map(|_| Vec::new()).collect();
            let mut rows = stmt.query([last, CHUNK]).map_err(&read)?;
            while let Some(r) = rows.next().map_err(&read)? {
                ids.push(r.get(0).map_err(&read)?);
                for (i, col) in cols.iter_mut().enumerate() {
                    col.push(r.get(i + 1).map_err(&read)?);
                }
            }
            drop(rows);
            if ids.is_empty() {
                break;
            }
            last = *ids.last().expect("not empty");
            report.events += ids.len() as u64;
            if let Err(e) = tx.execute(
                "INSERT INTO events (id, token_name, serial_number, kind, changes, occurred_at,
                     device_json, reason, scope)
                 SELECT u.id, u.t, u.s, u.k, u.c::json, u.o, u.d::json, u.r, u.sc
                   FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[],
                               $6::text[], $7::text[], $8::text[], $9::text[])
                     AS u(id, t, s, k, c, o, d, r, sc)",
                &[
                    &ids, &cols[0], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5], &cols[6],
                    &cols[7],
                ],
            ) {
                return Err(e_ev(e));
            }
        }
        // The next id continues after every id SQLite ever gave (AUTOINCREMENT's counter
        // too), so no receiver ever sees an id twice.
        let next: i64 = from
            .query_row(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),
                            COALESCE((SELECT MAX(id) FROM events), 0)) + 1",
                [],
                |r| r.get(0),
            )
            .map_err(&read)?;

        // The small tables, row by row.
        let rest = (|| -> Result<(), postgres::Error> {
            tx.execute(
                "UPDATE event_ids SET next_id = GREATEST(next_id, $1)",
                &[&next],
            )?;
            tx.execute(
                "SELECT setval(pg_get_serial_sequence('devices', 'id'),
                               GREATEST((SELECT max(id) FROM devices), 1))",
                &[],
            )?;
            Ok(())
        })();
        if let Err(e) = rest {
            return Err(e_rest(e));
        }
        let copy_table = |tx: &mut postgres::Transaction<'_>,
                          table: &str,
                          columns: &[(&str, &str)]|
         -> Result<u64, StoreError> {
            let names: Vec<&str> = columns.iter().map(|(c, _)| *c).collect();
            let mut stmt = from
                .prepare(&format!("SELECT {} FROM {table}", names.join(", ")))
                .map_err(&read)?;
            let placeholders: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| format!("${}::{ty}", i + 1))
                .collect();
            let insert = format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                names.join(", "),
                placeholders.join(", ")
            );
            let mut n = 0;
            let mut rows = stmt.query([]).map_err(&read)?;
            while let Some(r) = rows.next().map_err(&read)? {
                let mut values: Vec<Box<dyn postgres::types::ToSql + Sync>> = Vec::new();
                for (i, (_, ty)) in columns.iter().enumerate() {
                    values.push(match *ty {
                        "int8" => Box::new(r.get::<_, Option<i64>>(i).map_err(&read)?),
                        "bytea" => Box::new(r.get::<_, Option<Vec<u8>>>(i).map_err(&read)?),
                        // PostgreSQL's text refuses a NUL, which SQLite may hold.
                        _ => Box::new(
                            r.get::<_, Option<String>>(i)
                                .map_err(&read)?
                                .map(|t| t.replace('\0', "\u{fffd}")),
                        ),
                    });
                }
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    values.iter().map(|v| v.as_ref()).collect();
                tx.execute(insert.as_str(), &refs)
                    .map_err(|source| StoreError::Postgres {
                        url: shown.clone(),
                        action: "copy sync state, accounts and sink cursors",
                        source,
                    })?;
                n += 1;
            }
            Ok(n)
        };
        let t = "text";
        let i = "int8";
        report.sync_states = copy_table(
            &mut tx,
            "sync_state",
            &[
                ("token_name", t),
                ("phase", t),
                ("cursor", t),
                ("cursor_at", t),
                ("fetch_run", i),
                ("fetched_until", t),
                ("last_run_at", t),
                ("last_success_at", t),
                ("last_error", t),
                ("last_error_kind", t),
                ("last_error_at", t),
                ("last_full_fetch_at", t),
                ("last_full_fetch_changes", i),
                ("fetch_changes", i),
            ],
        )?;
        report.accounts = copy_table(
            &mut tx,
            "accounts",
            &[
                ("token_name", t),
                ("server_name", t),
                ("server_uuid", t),
                ("org_name", t),
                ("org_type", t),
                ("org_id", t),
                ("admin_id", t),
                ("page_limit_max", i),
                ("consumer_key", t),
                ("checked_at", t),
                ("token_expiry", t),
                ("expiry_warned_days", i),
            ],
        )?;
        report.sink_cursors = copy_table(
            &mut tx,
            "sink_cursors",
            &[
                ("sink_name", t),
                ("last_event_id", i),
                ("last_delivered_at", t),
                ("last_error", t),
                ("last_error_at", t),
                ("parked_at", t),
                ("retry_at", t),
            ],
        )?;
        report.fetch_seen = copy_table(
            &mut tx,
            "fetch_seen",
            &[
                ("token_name", t),
                ("fetch_run", i),
                ("chunk", i),
                ("bits", "bytea"),
            ],
        )?;
        report.profiles = copy_table(
            &mut tx,
            "profiles",
            &[
                ("token_name", t),
                ("profile_name", t),
                ("profile_uuid", t),
                ("file_hash", t),
                ("defined_at", t),
            ],
        )?;
        report.assignments = copy_table(
            &mut tx,
            "profile_assignments",
            &[
                ("token_name", t),
                ("serial_number", t),
                ("profile_name", t),
                ("profile_uuid", t),
                ("status", t),
                ("attempted_at", t),
                ("retry_after", t),
                ("attempts", i),
            ],
        )?;
        copy_table(
            &mut tx,
            "assign_state",
            &[
                ("token_name", t),
                ("last_event_id", i),
                ("last_full_fetch_at", t),
                ("last_run_at", t),
            ],
        )?;
        let org = super::org::copy_org_from_sqlite(&mut tx, from, &read, &|source| {
            StoreError::Postgres {
                url: shown.clone(),
                action: "copy the organisation's inventory",
                source,
            }
        })?;
        report.org_devices = org.devices;
        report.applecare_coverages = org.coverages;
        let json = "text::json";
        report.mdm_servers = copy_table(
            &mut tx,
            "mdm_servers",
            &[
                ("account_name", t),
                ("id", t),
                ("server_name", t),
                ("server_type", t),
                ("status", t),
                ("device_count", i),
                ("created_date_time", t),
                ("updated_date_time", t),
                ("extra_json", json),
                ("seen_at", t),
                ("removed_at", t),
            ],
        )?;
        report.org_accounts = copy_table(
            &mut tx,
            "org_walks",
            &[
                ("account_name", t),
                ("walk_run", i),
                ("phase", t),
                ("server_index", i),
                ("cursor", t),
                ("last_run_at", t),
                ("last_success_at", t),
                ("last_complete_at", t),
                ("last_walk_devices", i),
                ("last_error", t),
                ("last_error_kind", t),
                ("last_error_at", t),
                ("rate_limited", i),
            ],
        )?;
        copy_table(
            &mut tx,
            "org_server_devices",
            &[("account_name", t), ("serial_number", t), ("server_id", t)],
        )?;
        tx.commit().map_err(e_commit)?;
        Ok(report)
    }
}
