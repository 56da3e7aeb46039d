//! The schema: migrations applied in order against `PRAGMA user_version`, never edited
//! once shipped (append a new one).

use rusqlite::TransactionBehavior;

use super::{Store, StoreError};

/// Schema migrations, applied in order against `PRAGMA user_version`.
/// Never edit one that has shipped; append a new one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: devices, events, per-token sync state, sink cursors.
    r#"
    CREATE TABLE devices (
        -- Stable (an alias of the rowid survives VACUUM): fetch_seen refers to it.
        id                   INTEGER PRIMARY KEY,
        token_name           TEXT NOT NULL,
        serial_number        TEXT NOT NULL,
        model                TEXT,
        description          TEXT,
        color                TEXT,
        asset_tag            TEXT,
        profile_status       TEXT,
        profile_uuid         TEXT,
        profile_assign_time  TEXT,
        profile_push_time    TEXT,
        device_assigned_date TEXT,
        device_assigned_by   TEXT,
        os                   TEXT,
        device_family        TEXT,
        -- Apple fields beyond the named columns, as sent (NULL when none). Together with
        -- the columns this is the device's raw JSON.
        extra_json           TEXT,
        -- op_date of the newest sync record applied; older records are ignored.
        last_op_date         TEXT,
        first_seen_at        TEXT NOT NULL,
        updated_at           TEXT NOT NULL,
        deleted_at           TEXT,
        -- A rowid table with the key in its own index: Apple's serials arrive in random
        -- order, and random inserts into a small index are far cheaper than into a
        -- WITHOUT ROWID table whose B-tree holds whole rows (measured: 2.4x, BENCHMARKS.md).
        UNIQUE (token_name, serial_number)
    );
    CREATE INDEX devices_alive ON devices (token_name, deleted_at);

    -- Which devices the current full fetch of a token has returned so far: a bitmap of
    -- device ids, 16,384 per chunk. A completed fetch marks every other device of the
    -- token deleted (reconciliation) and clears the token's chunks. A bitmap rather than a
    -- mark on each device row: a re-fetch of a million unchanged devices then rewrites
    -- about 60 small rows per page instead of a thousand random device rows (BENCHMARKS.md).
    CREATE TABLE fetch_seen (
        token_name TEXT NOT NULL,
        fetch_run  INTEGER NOT NULL,
        chunk      INTEGER NOT NULL,
        bits       BLOB NOT NULL,
        UNIQUE (token_name, fetch_run, chunk)
    );

    CREATE TABLE events (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        token_name    TEXT NOT NULL,
        serial_number TEXT NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('added', 'modified', 'deleted')),
        -- `modified` events: {"field": [old, new]} for the changed fields. NULL for
        -- `added`/`deleted`, whose changes are every field of device_json ([null, value]
        -- and [value, null]) and are derived from it when read: storing them twice
        -- doubled the size of a first fetch's events (BENCHMARKS.md).
        changes       TEXT,
        occurred_at   TEXT NOT NULL,
        -- The device the event describes, as stored right after it (for `deleted`, the
        -- last record before it left): [serial_number, the named columns in order,
        -- extra_json], so an event delivered or replayed days later carries the record it
        -- describes, not a later one.
        device_json   TEXT NOT NULL
    );
    -- By token only: per-token inserts land at the end of the index. An index on the serial
    -- number would take a random insert per event (the events of a page touch hundreds of
    -- index pages); a device's history scans its token's events instead.
    CREATE INDEX events_token ON events (token_name);

    CREATE TABLE sync_state (
        token_name      TEXT PRIMARY KEY,
        phase           TEXT NOT NULL DEFAULT 'fetch' CHECK (phase IN ('fetch', 'sync')),
        cursor          TEXT,
        cursor_at       TEXT,
        fetch_run       INTEGER NOT NULL DEFAULT 1,
        fetched_until   TEXT,
        last_run_at     TEXT,
        last_success_at TEXT,
        last_error      TEXT,
        last_error_kind TEXT,
        last_error_at   TEXT
    );

    -- Per token: the MDM server Apple's GET /account reports (the server_uuid guards
    -- against mixing two servers' devices under one name), and which token-expiry
    -- warning was last logged, so each threshold is logged once (see account.rs).
    CREATE TABLE accounts (
        token_name         TEXT PRIMARY KEY,
        server_name        TEXT,
        server_uuid        TEXT,
        org_name           TEXT,
        org_type           TEXT,    -- Apple's value: 'org' (ABM) or 'edu' (ASM)
        org_id             TEXT,
        admin_id           TEXT,
        page_limit_max     INTEGER, -- smallest urls[].limit.maximum of fetch and sync
        consumer_key       TEXT,    -- identifies the server's token; not a secret
        checked_at         TEXT,    -- when GET /account last answered
        token_expiry       TEXT,    -- expiry of the token the warning below is about
        expiry_warned_days INTEGER  -- last threshold (30, 14, 7, 3, 1) warned about
    );

    CREATE TABLE sink_cursors (
        sink_name     TEXT PRIMARY KEY,
        last_event_id INTEGER NOT NULL DEFAULT 0,
        -- Delivery health, for `adesync sinks`, `status` and /metrics (see sinks/mod.rs).
        last_delivered_at TEXT,
        last_error        TEXT,
        last_error_at     TEXT,
        -- Set when the receiver refused a batch for good (a 4xx): the sink waits, so
        -- nothing is skipped, until `adesync sinks resume` clears it.
        parked_at         TEXT,
        -- The receiver's Retry-After: no delivery to this sink before then.
        retry_at          TEXT
    );
    "#,
    // 2: periodic full re-fetch. When the last full fetch completed and how many changes
    // it found (on a mirror that was already complete: what the sync cursor had missed);
    // the running count of the fetch in progress commits with each of its pages.
    r#"
    ALTER TABLE sync_state ADD COLUMN last_full_fetch_at TEXT;
    ALTER TABLE sync_state ADD COLUMN last_full_fetch_changes INTEGER;
    ALTER TABLE sync_state ADD COLUMN fetch_changes INTEGER NOT NULL DEFAULT 0;
    UPDATE sync_state SET last_full_fetch_at = last_success_at WHERE phase = 'sync';
    "#,
    // 3: the organisation's inventory from the Apple School/Business Manager API
    // (docs/apple-business-api.md): devices, MDM servers, AppleCare coverage, the state of
    // each account's walk, and the `inventory` view joining it with the ADE mirror.
    // Organisation events share the events table (one id sequence for every sink);
    // `scope` tells them apart.
    r#"
    -- NULL: an ADE device event; 'org_device': an organisation device event, whose
    -- token_name is the account's name, whose kind 'deleted' is the JSON type
    -- org_device.removed, and whose device_json is the device as a JSON object.
    ALTER TABLE events ADD COLUMN scope TEXT;

    CREATE TABLE org_devices (
        id                                INTEGER PRIMARY KEY,
        account_name                      TEXT NOT NULL,
        serial_number                     TEXT NOT NULL,
        -- Apple's attributes, one column each (lists as JSON text, booleans 0/1).
        added_to_org_date_time            TEXT,
        released_from_org_date_time       TEXT,
        updated_date_time                 TEXT,
        device_model                      TEXT,
        product_family                    TEXT,
        product_type                      TEXT,
        device_capacity                   TEXT,
        part_number                       TEXT,
        order_number                      TEXT,
        order_date_time                   TEXT,
        color                             TEXT,
        status                            TEXT,
        imei                              TEXT,
        meid                              TEXT,
        eid                               TEXT,
        wifi_mac_address                  TEXT,
        bluetooth_mac_address             TEXT,
        ethernet_mac_address              TEXT,
        purchase_source_type              TEXT,
        purchase_source_id                TEXT,
        is_mdm_migration_capable          INTEGER,
        mdm_migration_status              TEXT,
        mdm_migration_deadline_date_time  TEXT,
        -- Attributes Apple adds later, as sent (NULL when none).
        extra_json                        TEXT,
        -- The MDM server whose device list holds it (NULL: unassigned).
        assigned_server_id                TEXT,
        assigned_server_name              TEXT,
        -- A digest of the columns above: an unchanged device is recognised without
        -- reading its row.
        content_hash                      INTEGER NOT NULL,
        first_seen_at                     TEXT NOT NULL,
        updated_at                        TEXT NOT NULL,
        -- Set when a complete walk no longer lists it; NULL while Apple lists it.
        removed_at                        TEXT,
        -- When its AppleCare coverage was last asked for.
        applecare_checked_at              TEXT,
        UNIQUE (account_name, serial_number)
    );
    -- The listed devices of an account: what a complete walk checks for removals.
    CREATE INDEX org_devices_listed ON org_devices (account_name) WHERE removed_at IS NULL;

    CREATE TABLE mdm_servers (
        account_name      TEXT NOT NULL,
        id                TEXT NOT NULL,
        server_name       TEXT,
        server_type       TEXT,
        status            TEXT,
        device_count      INTEGER,
        created_date_time TEXT,
        updated_date_time TEXT,
        extra_json        TEXT,
        seen_at           TEXT NOT NULL,
        -- Set when Apple no longer lists it.
        removed_at        TEXT,
        PRIMARY KEY (account_name, id)
    );

    CREATE TABLE applecare_coverage (
        account_name              TEXT NOT NULL,
        serial_number             TEXT NOT NULL,
        coverage_id               TEXT NOT NULL,
        status                    TEXT,
        payment_type              TEXT,
        description               TEXT,
        start_date_time           TEXT,
        end_date_time             TEXT,
        is_renewable              INTEGER,
        is_canceled               INTEGER,
        contract_cancel_date_time TEXT,
        agreement_number          TEXT,
        extra_json                TEXT,
        fetched_at                TEXT NOT NULL,
        PRIMARY KEY (account_name, serial_number, coverage_id)
    );

    -- Each account's walk: first every MDM server's device list (staged below, server
    -- by server and page by page), then orgDevices page by page. The position commits
    -- with each page, so a crash resumes the walk instead of restarting it.
    CREATE TABLE org_walks (
        account_name      TEXT PRIMARY KEY,
        walk_run          INTEGER NOT NULL DEFAULT 1,
        phase             TEXT NOT NULL DEFAULT 'servers' CHECK (phase IN ('servers', 'devices')),
        server_index      INTEGER NOT NULL DEFAULT 0,
        cursor            TEXT,
        last_run_at       TEXT,
        last_success_at   TEXT,
        last_complete_at  TEXT,
        last_walk_devices INTEGER,
        last_error        TEXT,
        last_error_kind   TEXT,
        last_error_at     TEXT,
        rate_limited      INTEGER NOT NULL DEFAULT 0
    );

    -- The walk in progress: which server each serial's device list named.
    CREATE TABLE org_server_devices (
        account_name  TEXT NOT NULL,
        serial_number TEXT NOT NULL,
        server_id     TEXT NOT NULL,
        PRIMARY KEY (account_name, serial_number)
    ) WITHOUT ROWID;

    -- One row per organisation device: what Apple's organisation knows, which server
    -- holds it, and whether (and under which token) the ADE mirror has it.
    CREATE VIEW inventory AS
    SELECT o.account_name,
           o.serial_number,
           o.status AS org_status,
           o.product_family,
           o.device_model,
           o.assigned_server_id,
           o.assigned_server_name,
           o.removed_at AS org_removed_at,
           d.token_name,
           d.profile_status,
           d.profile_uuid,
           d.token_name IS NOT NULL AS mirrored
      FROM org_devices o
      LEFT JOIN devices d
        ON d.serial_number = o.serial_number AND d.deleted_at IS NULL;
    "#,
    // 4: protocol version 10 (docs/apple-dep-api.md §1.1): its fields get columns of their
    // own, moved out of extra_json for the devices already stored (lists as JSON text, a
    // plain string as a one-element list; booleans 0/1); what a replacement device
    // replaced; each event's reason; organisation devices found by serial.
    r#"
    ALTER TABLE devices ADD COLUMN imei TEXT;
    ALTER TABLE devices ADD COLUMN meid TEXT;
    ALTER TABLE devices ADD COLUMN eid TEXT;
    ALTER TABLE devices ADD COLUMN wifi_mac_address TEXT;
    ALTER TABLE devices ADD COLUMN bluetooth_mac_address TEXT;
    ALTER TABLE devices ADD COLUMN ethernet_mac_address TEXT;
    ALTER TABLE devices ADD COLUMN is_replacement_device INTEGER;
    ALTER TABLE devices ADD COLUMN mdm_migration_deadline TEXT;
    ALTER TABLE devices ADD COLUMN released_by_replacement INTEGER;
    ALTER TABLE devices ADD COLUMN original_device_serial_number TEXT;
    ALTER TABLE devices ADD COLUMN replacement_date TEXT;
    ALTER TABLE devices ADD COLUMN replacement_checked_at TEXT;
    UPDATE devices SET
        imei = CASE json_type(extra_json, '$.imei') WHEN 'array' THEN json_extract(extra_json, '$.imei') WHEN 'text' THEN CASE WHEN json_extract(extra_json, '$.imei') = '' THEN '' ELSE json_array(json_extract(extra_json, '$.imei')) END WHEN 'null' THEN NULL ELSE json_extract(extra_json, '$.imei') END,
        meid = CASE json_type(extra_json, '$.meid') WHEN 'array' THEN json_extract(extra_json, '$.meid') WHEN 'text' THEN CASE WHEN json_extract(extra_json, '$.meid') = '' THEN '' ELSE json_array(json_extract(extra_json, '$.meid')) END WHEN 'null' THEN NULL ELSE json_extract(extra_json, '$.meid') END,
        eid = json_extract(extra_json, '$.eid'),
        wifi_mac_address = CASE json_type(extra_json, '$.wifi_mac_address') WHEN 'array' THEN json_extract(extra_json, '$.wifi_mac_address') WHEN 'text' THEN CASE WHEN json_extract(extra_json, '$.wifi_mac_address') = '' THEN '' ELSE json_array(json_extract(extra_json, '$.wifi_mac_address')) END WHEN 'null' THEN NULL ELSE json_extract(extra_json, '$.wifi_mac_address') END,
        bluetooth_mac_address = CASE json_type(extra_json, '$.bluetooth_mac_address') WHEN 'array' THEN json_extract(extra_json, '$.bluetooth_mac_address') WHEN 'text' THEN CASE WHEN json_extract(extra_json, '$.bluetooth_mac_address') = '' THEN '' ELSE json_array(json_extract(extra_json, '$.bluetooth_mac_address')) END WHEN 'null' THEN NULL ELSE json_extract(extra_json, '$.bluetooth_mac_address') END,
        ethernet_mac_address = CASE json_type(extra_json, '$.ethernet_mac_address') WHEN 'array' THEN json_extract(extra_json, '$.ethernet_mac_address') WHEN 'text' THEN CASE WHEN json_extract(extra_json, '$.ethernet_mac_address') = '' THEN '' ELSE json_array(json_extract(extra_json, '$.ethernet_mac_address')) END WHEN 'null' THEN NULL ELSE json_extract(extra_json, '$.ethernet_mac_address') END,
        is_replacement_device = CASE json_type(extra_json, '$.is_replacement_device') WHEN 'true' THEN 1 WHEN 'false' THEN 0 WHEN 'text' THEN CASE json_extract(extra_json, '$.is_replacement_device') WHEN 'true' THEN 1 WHEN 'false' THEN 0 ELSE json_extract(extra_json, '$.is_replacement_device') END ELSE json_extract(extra_json, '$.is_replacement_device') END,
        mdm_migration_deadline = json_extract(extra_json, '$.mdm_migration_deadline'),
        released_by_replacement = CASE json_type(extra_json, '$.released_by_replacement') WHEN 'true' THEN 1 WHEN 'false' THEN 0 WHEN 'text' THEN CASE json_extract(extra_json, '$.released_by_replacement') WHEN 'true' THEN 1 WHEN 'false' THEN 0 ELSE json_extract(extra_json, '$.released_by_replacement') END ELSE json_extract(extra_json, '$.released_by_replacement') END
    WHERE extra_json IS NOT NULL;
    UPDATE devices SET extra_json = NULLIF(json_remove(extra_json, '$.imei', '$.meid', '$.eid', '$.wifi_mac_address', '$.bluetooth_mac_address', '$.ethernet_mac_address', '$.is_replacement_device', '$.mdm_migration_deadline', '$.released_by_replacement'), '{}')
    WHERE extra_json IS NOT NULL;
    CREATE INDEX devices_original ON devices (original_device_serial_number)
        WHERE original_device_serial_number IS NOT NULL;
    -- Replacement devices whose details were not asked for yet: a no-op sync finds none
    -- without reading the table.
    CREATE INDEX devices_replacements_due ON devices (token_name)
        WHERE is_replacement_device = 1 AND replacement_checked_at IS NULL;
    CREATE INDEX org_devices_serial ON org_devices (serial_number);
    -- What happened to the device (assigned, returned, unassigned, released, replaced,
    -- profile_assigned, profile_pushed, profile_removed, updated); NULL for events written
    -- before this column, whose reason is derived when they are read.
    ALTER TABLE events ADD COLUMN reason TEXT;
    "#,
    // 5: enrollment profile assignment (docs/apple-dep-api.md §4.9): each token's
    // definition of each configured profile, each device's last assignment and what Apple
    // answered, and where each token's assignment pass stands.
    r#"
    CREATE TABLE profiles (
        token_name   TEXT NOT NULL,
        profile_name TEXT NOT NULL,
        profile_uuid TEXT NOT NULL,
        -- SHA-256 of the profile file when it was defined: a change defines it again.
        file_hash    TEXT NOT NULL,
        defined_at   TEXT NOT NULL,
        PRIMARY KEY (token_name, profile_name)
    );

    CREATE TABLE profile_assignments (
        token_name    TEXT NOT NULL,
        serial_number TEXT NOT NULL,
        profile_name  TEXT NOT NULL,
        profile_uuid  TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('SUCCESS', 'NOT_ACCESSIBLE', 'FAILED', 'THROTTLED')),
        attempted_at  TEXT NOT NULL,
        -- FAILED and THROTTLED: not tried again before this.
        retry_after   TEXT,
        -- Calls for this device and profile so far.
        attempts      INTEGER NOT NULL DEFAULT 1,
        PRIMARY KEY (token_name, serial_number)
    ) WITHOUT ROWID;

    -- The events and the full fetch each token's last assignment pass took into account.
    CREATE TABLE assign_state (
        token_name         TEXT PRIMARY KEY,
        last_event_id      INTEGER NOT NULL DEFAULT 0,
        last_full_fetch_at TEXT,
        last_run_at        TEXT
    );
    "#,
    // 6: a cheaper write path (BENCHMARKS.md). Each device row keeps a digest of its
    // Apple fields, so an unchanged device is recognised without reading them. An `added`
    // event stores no snapshot of its own (device_json is ''): the row names it in
    // snapshot_event_id and is its snapshot until the row changes. Then the row's old
    // content travels with the event that changes it (its previous_json), and the row
    // names that event in snapshot_source_id: the change appends, it never rewrites an
    // old event. Rows stored before this migration have none of it (NULL) and are
    // compared field by field, once.
    r#"
    ALTER TABLE devices ADD COLUMN content_hash INTEGER;
    ALTER TABLE devices ADD COLUMN snapshot_event_id INTEGER;
    ALTER TABLE devices ADD COLUMN snapshot_source_id INTEGER;
    ALTER TABLE events ADD COLUMN previous_json TEXT;

    -- Every event with its device snapshot resolved: the stored one; for an `added` event
    -- that defers, the row's old content kept with a later event, or the row itself in
    -- the same positional form: each protocol-10 cell the JSON text of the value, as
    -- device_row.rs reads the column back (`|| ''` keeps json_quote's result a string
    -- inside json_array instead of JSON).
    CREATE VIEW events_with_device AS
    SELECT e.id, e.token_name, e.serial_number, e.kind, e.reason, e.changes, e.occurred_at,
           e.scope,
           CASE WHEN e.device_json <> '' THEN e.device_json
                WHEN src.previous_json IS NOT NULL THEN src.previous_json
                WHEN d.id IS NULL OR d.snapshot_source_id IS NOT NULL THEN NULL
           ELSE json_array(d.serial_number, d.model, d.description, d.color, d.asset_tag,
                    d.profile_status, d.profile_uuid, d.profile_assign_time,
                    d.profile_push_time, d.device_assigned_date, d.device_assigned_by, d.os,
                    d.device_family, d.extra_json,
                    CASE WHEN typeof(d.imei) = 'text' AND substr(d.imei, 1, 1) = '[' AND json_valid(d.imei) THEN d.imei WHEN typeof(d.imei) = 'text' THEN json_quote(d.imei) || '' ELSE CAST(d.imei AS TEXT) END,
                    CASE WHEN typeof(d.meid) = 'text' AND substr(d.meid, 1, 1) = '[' AND json_valid(d.meid) THEN d.meid WHEN typeof(d.meid) = 'text' THEN json_quote(d.meid) || '' ELSE CAST(d.meid AS TEXT) END,
                    CASE typeof(d.eid) WHEN 'text' THEN json_quote(d.eid) || '' WHEN 'integer' THEN CAST(d.eid AS TEXT) END,
                    CASE WHEN typeof(d.wifi_mac_address) = 'text' AND substr(d.wifi_mac_address, 1, 1) = '[' AND json_valid(d.wifi_mac_address) THEN d.wifi_mac_address WHEN typeof(d.wifi_mac_address) = 'text' THEN json_quote(d.wifi_mac_address) || '' ELSE CAST(d.wifi_mac_address AS TEXT) END,
                    CASE WHEN typeof(d.bluetooth_mac_address) = 'text' AND substr(d.bluetooth_mac_address, 1, 1) = '[' AND json_valid(d.bluetooth_mac_address) THEN d.bluetooth_mac_address WHEN typeof(d.bluetooth_mac_address) = 'text' THEN json_quote(d.bluetooth_mac_address) || '' ELSE CAST(d.bluetooth_mac_address AS TEXT) END,
                    CASE WHEN typeof(d.ethernet_mac_address) = 'text' AND substr(d.ethernet_mac_address, 1, 1) = '[' AND json_valid(d.ethernet_mac_address) THEN d.ethernet_mac_address WHEN typeof(d.ethernet_mac_address) = 'text' THEN json_quote(d.ethernet_mac_address) || '' ELSE CAST(d.ethernet_mac_address AS TEXT) END,
                    CASE typeof(d.is_replacement_device) WHEN 'integer' THEN CASE d.is_replacement_device WHEN 0 THEN 'false' ELSE 'true' END WHEN 'text' THEN json_quote(d.is_replacement_device) || '' END,
                    CASE typeof(d.mdm_migration_deadline) WHEN 'text' THEN json_quote(d.mdm_migration_deadline) || '' WHEN 'integer' THEN CAST(d.mdm_migration_deadline AS TEXT) END,
                    CASE typeof(d.released_by_replacement) WHEN 'integer' THEN CASE d.released_by_replacement WHEN 0 THEN 'false' ELSE 'true' END WHEN 'text' THEN json_quote(d.released_by_replacement) || '' END)
           END AS device_json
      FROM events e
      LEFT JOIN devices d ON e.device_json = '' AND e.scope IS NULL
           AND d.token_name = e.token_name AND d.serial_number = e.serial_number
           AND d.snapshot_event_id = e.id
      LEFT JOIN events src ON src.id = d.snapshot_source_id;
    "#,
    // 7: a cheaper write path, continued (BENCHMARKS.md). The index of every row by
    // (token_name, deleted_at) cost each new device a second index insert and each
    // deletion a random index change; what it answered comes from the key index (a
    // token's rows) and the small index of deleted rows below (which of them are gone).
    r#"
    DROP INDEX devices_alive;
    CREATE INDEX devices_gone ON devices (token_name, deleted_at) WHERE deleted_at IS NOT NULL;
    "#,
    // 8: a device's history without reading every event (`device SERIAL`, `events
    // --serial`), where migration 1 read its token's events. Only the events that carry
    // their own snapshot are indexed by serial: a deferred `added` event (device_json '',
    // the event of nearly every device a new token's first fetch stores) is found through
    // the row that names it (`snapshot_event_id`). So a first fetch inserts next to
    // nothing into this index; later passes one entry per modification or deletion, and
    // each organisation or profile event one.
    r#"
    CREATE INDEX events_serial ON events (serial_number) WHERE device_json <> '';
    "#,
];

impl Store {
    pub(super) fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let version: i64 = self
            .conn()?
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err("read schema version"))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path,
                found: version,
                known,
            });
        }
        // Migration 1 changed before the first release (devices.id, fetch_seen, events'
        // snapshots); a database made by an earlier build says version 1 but lacks them.
        if version >= 1 {
            let current: bool = self
                .conn()?
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'fetch_seen')",
                    [],
                    |r| r.get(0),
                )
                .map_err(self.err("read schema"))?;
            if !current {
                return Err(StoreError::PreRelease { path });
            }
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self
                .conn_mut()?
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    action: "migrate",
                    source,
                })?;
            // Another process opening the same new database (the daemon and a CLI
            // command at once) may have applied it while this one waited for the lock.
            let current: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    action: "migrate",
                    source,
                })?;
            if current > i as i64 {
                continue;
            }
            tx.execute_batch(sql)
                .and_then(|_| tx.pragma_update(None, "user_version", (i + 1) as i64))
                .and_then(|_| tx.commit())
                .map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    action: "migrate",
                    source,
                })?;
        }
        Ok(())
    }
}
