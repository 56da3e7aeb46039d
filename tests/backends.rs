//! The storage conformance battery: every scenario runs on SQLite and on PostgreSQL (one
//! suite, every backend), and PostgreSQL's own guarantees (event ids visible in order
//! under concurrent writers, a connection cut mid-page, migrations raced by several
//! processes). The PostgreSQL cases need `ADESYNC_TEST_POSTGRES_URL` (`.ci/run` starts a
//! throwaway server and sets it); without it they say they were skipped, by name.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use adesync::model::Phase;
use adesync::store::{DeviceFilter, Store};
use adesync::syncer::run_token;
use adesync_mock::{Endpoint, Fault, FaultKind, MockConfig};

use crate::common::{
    adesync, assert_mirrors, empty_store, event_counts, fresh_postgres_database, kill_after,
    postgres_url, run_once, runtime, Backend, Env,
};
use crate::on_both_backends;

fn env(rt: &tokio::runtime::Runtime, b: Backend, devices: usize, page_size: u32) -> Env {
    rt.block_on(Env::on(
        b,
        MockConfig {
            devices,
            ..Default::default()
        },
        page_size,
        "",
    ))
}

fn sync(rt: &tokio::runtime::Runtime, env: &Env) -> adesync::syncer::RunSummary {
    let config = env.config();
    rt.block_on(run_token(&config, &config.tokens[0], None))
        .expect("sync succeeds")
}

on_both_backends!(
    a_first_fetch_mirrors_every_device_with_one_added_event_each,
    changes_become_exactly_those_events_and_a_re_run_emits_nothing,
    an_expired_cursor_re_fetches_and_reconciles_without_duplicates,
    a_serial_repeated_in_a_sync_page_resolves_to_its_latest_record,
    a_sigkill_mid_fetch_loses_and_doubles_nothing,
    the_cli_reads_devices_and_events_the_same_on_both,
    forgetting_a_token_deletes_its_rows_and_nothing_else,
    events_reach_a_sink_once_each_in_id_order,
    odd_values_read_back_exactly,
    random_histories_match_the_one_rule_and_no_snapshot_drifts,
);

/// A small deterministic generator (xorshift64*), so a failing history can be replayed by
/// its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.below(of.len())]
    }
}

/// What the mirror holds for one serial, by the model.
#[derive(Clone)]
struct Held {
    device: adesync::model::Device,
    deleted: bool,
    last_op_date: Option<String>,
}

/// An event by the model: serial, kind, reason, the snapshot it must carry, and for
/// `modified` the changes.
type Expected = (
    String,
    adesync::model::EventKind,
    Option<adesync::model::Reason>,
    serde_json::Value,
    Option<serde_json::Value>,
);

/// Random histories, each page written on its own: a first fetch with serials repeated
/// across pages and deletions among them, syncs with additions, modifications, deletions,
/// records that change nothing and stale records, full re-fetches that reconcile what they
/// no longer return, now and then a value in a shape Apple does not document (so the
/// event keeps its own snapshot instead of deferring to the row). A model applies each
/// record with the one rule (`events::decide`, `events::reason`) and no storage at all.
/// After every page the new events are the model's (kind, reason, serial, snapshot,
/// changes) and the rows are the model's; at the end every event still carries the
/// snapshot it had when it was written, whatever happened to its row since (the deferred
/// snapshots of `added` events, the old content kept by the change after them), and each
/// serial's history (`device SERIAL`), from any event on and by token, is exactly its
/// events. Both write paths of a fetch page are taken: the one that inserts first
/// (`expect_new`, a first fetch) and the one that looks rows up first. A second token,
/// sorting before the first, holds some of the same serials.
/// `ADESYNC_TEST_HISTORIES=N` runs N seeds instead of 8 (a longer search).
fn random_histories_match_the_one_rule_and_no_snapshot_drifts(b: Backend) {
    let histories = std::env::var("ADESYNC_TEST_HISTORIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8u64);
    let mut seen = HashMap::new();
    for seed in 1..=histories {
        random_history(b, seed, &mut seen);
    }
    // Every case happened (in the default 8 seeds as in any longer search; fewer seeds
    // may not show them all).
    for case in [
        "fetch added",
        "fetch added, own snapshot",
        "fetch modified",
        "fetch unchanged",
        "fetch revived",
        "fetch deleted",
        "fetch gone",
        "reconciled",
        "first fetch repeat",
        "sync added",
        "sync revived",
        "sync modified",
        "sync unchanged",
        "sync deleted",
        "sync gone",
        "sync stale",
    ] {
        assert!(
            histories < 8 || seen.get(case).copied().unwrap_or(0) > 0,
            "{case} never happened: {seen:?}"
        );
    }
}

/// The model's device leaving the server: marked deleted, a `deleted` event with it as
/// its snapshot.
fn leave(serial: &str, h: &mut Held, why: adesync::model::Reason) -> Expected {
    h.deleted = true;
    (
        serial.to_owned(),
        adesync::model::EventKind::Deleted,
        Some(why),
        h.device.to_json(),
        None,
    )
}

fn random_history(b: Backend, seed: u64, seen: &mut HashMap<&'static str, usize>) {
    use adesync::events::{decide, diff, reason, Decision, Known, ReasonContext};
    use adesync::model::{Device, DeviceRecord, EventKind, OpType};
    use adesync::store::{prepare, CursorState, PageWrite};
    use std::collections::BTreeMap;

    let (_dir, mut store) = empty_store(b);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xA24B_AED4_963E_E407));
    let serials: Vec<String> = (0..80).map(|i| format!("R{seed}S{i:02}")).collect();
    let mut model: BTreeMap<String, Held> = BTreeMap::new();
    // Every event read so far, by id: its serial, kind and snapshot when first read.
    let mut seen_events: BTreeMap<i64, (String, EventKind, serde_json::Value)> = BTreeMap::new();
    let snapshot = |e: &adesync::store::StoredEvent| {
        e.device.as_ref().map(Device::to_json).unwrap_or_default()
    };
    let mut clock = 0u32;
    let mut cursor = 0u32;

    let device = |rng: &mut Rng, serial: &str| {
        let mut d = Device {
            serial_number: serial.to_owned(),
            model: Some(rng.pick(&["iPad Air", "iPhone 15"]).into()),
            color: Some(rng.pick(&["BLACK", "SILVER"]).into()),
            profile_status: Some(rng.pick(&["empty", "assigned", "pushed"]).into()),
            asset_tag: rng.chance(30).then(|| "AT-1".to_owned()),
            os: Some("iOS".into()),
            ..Device::default()
        };
        if rng.chance(50) {
            d.extra.insert(
                "imei".into(),
                serde_json::json!([rng.pick(&["3581", "3582"])]),
            );
        }
        if rng.chance(30) {
            d.extra.insert(
                "released_by_replacement".into(),
                serde_json::json!(rng.chance(50)),
            );
        }
        if rng.chance(20) {
            d.extra.insert(
                "future_field".into(),
                serde_json::json!({"x": rng.below(2)}),
            );
        }
        // Text where Apple documents a boolean: the row cannot be the event's snapshot,
        // which the event then keeps itself (it still reads back the same).
        if rng.chance(10) {
            d.extra
                .insert("is_replacement_device".into(), serde_json::json!("yes"));
        }
        d
    };

    // Another token, sorting before this one, holds some of the same serials.
    let other: Vec<DeviceRecord> = serials
        .iter()
        .step_by(7)
        .map(|s| DeviceRecord {
            op_type: None,
            op_date: None,
            device: device(&mut rng, s),
        })
        .collect();
    store
        .apply_page(&PageWrite {
            token: "aaa",
            kind: Phase::Fetch,
            records: &other,
            next: CursorState {
                phase: Phase::Sync,
                cursor: Some("o1".into()),
                fetch_run: 1,
            },
            fetched_until: None,
            completes_fetch: true,
            now: "2026-03-01T00:00:00Z",
            unreadable: &[],
            expect_new: true,
            prepared: None,
        })
        .unwrap();
    for e in store.events_after(0, None, 10_000).unwrap() {
        seen_events.insert(e.id, (e.serial_number.clone(), e.kind, snapshot(&e)));
    }
    let mut last_event = seen_events.keys().copied().max().unwrap_or(0);

    for round in 0..7 {
        // Rounds 0, 3 and 6 are full fetches (round 0 the first, into an empty store);
        // the others syncs.
        let fetch = round % 3 == 0;
        let run = (round / 3 + 1) as i64;
        let pages = 2 + rng.below(4);
        // The full fetch returns most serials, a few of them on more than one page.
        let mut returned: Vec<usize> = (0..serials.len()).filter(|_| rng.chance(80)).collect();
        let mut fetched_alive = std::collections::HashSet::new();
        let mut fetched = std::collections::HashSet::new();
        for p in 0..pages {
            let mut records = Vec::new();
            let mut on_page = std::collections::HashSet::new();
            // Now and then a page longer than one multi-row INSERT statement of rows
            // (40 rows).
            let size = if rng.chance(20) {
                40 + rng.below(50)
            } else {
                1 + rng.below(8)
            };
            for _ in 0..size {
                let i = if fetch && !returned.is_empty() && !rng.chance(15) {
                    returned.swap_remove(rng.below(returned.len()))
                } else {
                    rng.below(serials.len())
                };
                if !on_page.insert(i) {
                    continue;
                }
                let serial = &serials[i];
                let op_type = if fetch {
                    rng.chance(8).then_some(OpType::Deleted)
                } else {
                    Some(match rng.below(10) {
                        0..=2 => OpType::Added,
                        3..=6 => OpType::Modified,
                        _ => OpType::Deleted,
                    })
                };
                // Sync records carry a time; one in eight is older than every other (stale
                // wherever a newer one was applied).
                let op_date = (!fetch).then(|| {
                    clock += 1;
                    if rng.chance(12) {
                        "2020-01-01T00:00:00Z".to_owned()
                    } else {
                        format!("2026-02-01T00:{:02}:{:02}Z", clock / 60, clock % 60)
                    }
                });
                // The stored record again now and then, so that nothing is written for it.
                let mut d = match model.get(serial) {
                    Some(h) if rng.chance(25) => h.device.clone(),
                    _ => device(&mut rng, serial),
                };
                d.serial_number = serial.clone();
                records.push(DeviceRecord {
                    op_type,
                    op_date,
                    device: d,
                });
            }
            let completes = fetch && p == pages - 1;
            cursor += 1;
            let prepared = prepare(&records);
            let page = PageWrite {
                token: "acme",
                kind: if fetch { Phase::Fetch } else { Phase::Sync },
                records: &records,
                next: CursorState {
                    phase: if fetch && !completes {
                        Phase::Fetch
                    } else {
                        Phase::Sync
                    },
                    cursor: Some(format!("c{cursor}")),
                    fetch_run: run,
                },
                fetched_until: None,
                completes_fetch: completes,
                now: "2026-03-01T00:00:00Z",
                unreadable: &[],
                expect_new: fetch && run == 1,
                prepared: rng.chance(50).then_some(prepared.as_slice()),
            };

            // The model, record by record, then the reconciliation a completed fetch does.
            let mut expected: Vec<Expected> = Vec::new();
            for r in &records {
                let serial = &r.device.serial_number;
                let held = model.get(serial).cloned();
                let known = held.as_ref().map(|h| Known {
                    device: Some(&h.device),
                    last_op_date: h.last_op_date.as_deref(),
                    deleted: h.deleted,
                });
                let decision = decide(known, r);
                let case = match (&decision, fetch) {
                    (Decision::Stale, _) => "sync stale",
                    (Decision::AlreadyGone, true) => "fetch gone",
                    (Decision::AlreadyGone, false) => "sync gone",
                    (Decision::Unchanged, true) => "fetch unchanged",
                    (Decision::Unchanged, false) => "sync unchanged",
                    (Decision::Added { revived: true }, true) => "fetch revived",
                    (Decision::Added { revived: true }, false) => "sync revived",
                    (Decision::Added { .. }, true) => "fetch added",
                    (Decision::Added { .. }, false) => "sync added",
                    (Decision::Modified(_), true) => "fetch modified",
                    (Decision::Modified(_), false) => "sync modified",
                    (Decision::Deleted, true) => "fetch deleted",
                    (Decision::Deleted, false) => "sync deleted",
                };
                *seen.entry(case).or_default() += 1;
                if matches!(decision, Decision::Added { .. })
                    && r.device.extra.contains_key("is_replacement_device")
                {
                    *seen
                        .entry(if fetch {
                            "fetch added, own snapshot"
                        } else {
                            "sync added, own snapshot"
                        })
                        .or_default() += 1;
                }
                if fetch && run == 1 && !fetched.insert(serial.clone()) {
                    *seen.entry("first fetch repeat").or_default() += 1;
                }
                let why = reason(
                    &decision,
                    held.as_ref().map(|h| &h.device),
                    &r.device,
                    ReasonContext::default(),
                );
                let op_date = r
                    .op_date
                    .clone()
                    .or_else(|| held.as_ref().and_then(|h| h.last_op_date.clone()));
                match decision {
                    Decision::Stale => {}
                    Decision::AlreadyGone | Decision::Unchanged => {
                        if let Some(h) = model.get_mut(serial) {
                            h.last_op_date = op_date;
                        }
                    }
                    Decision::Added { .. } | Decision::Modified(_) => {
                        let changes = match &decision {
                            Decision::Modified(_) => {
                                Some(diff(&held.as_ref().unwrap().device, &r.device).into())
                            }
                            _ => None,
                        };
                        let kind = decision.event_kind().unwrap();
                        expected.push((
                            serial.clone(),
                            kind,
                            Some(why),
                            r.device.to_json(),
                            changes,
                        ));
                        model.insert(
                            serial.clone(),
                            Held {
                                device: r.device.clone(),
                                deleted: false,
                                last_op_date: op_date,
                            },
                        );
                    }
                    Decision::Deleted => {
                        let h = model.get_mut(serial).unwrap();
                        if let Some(v) = r.device.extra.get("released_by_replacement") {
                            if v.is_boolean() {
                                h.device
                                    .extra
                                    .insert("released_by_replacement".into(), v.clone());
                            }
                        }
                        h.last_op_date = op_date;
                        expected.push(leave(serial, h, why));
                    }
                }
                if fetch {
                    let alive = model.get(serial).is_some_and(|h| !h.deleted);
                    if alive {
                        fetched_alive.insert(serial.clone());
                    } else {
                        fetched_alive.remove(serial);
                    }
                }
            }
            let from_records = expected.len();
            if completes {
                for (serial, h) in model.iter_mut() {
                    if !h.deleted && !fetched_alive.contains(serial) {
                        let why = reason(
                            &Decision::Deleted,
                            Some(&h.device),
                            &h.device,
                            ReasonContext::default(),
                        );
                        expected.push(leave(serial, h, why));
                        *seen.entry("reconciled").or_default() += 1;
                    }
                }
            }

            store.apply_page(&page).unwrap();

            let what = format!("seed {seed}, round {round}, page {p}");
            let new = store.events_after(last_event, None, 10_000).unwrap();
            let mut got: Vec<Expected> = new
                .iter()
                .map(|e| {
                    let changes = (e.kind == EventKind::Modified).then(|| e.changes.clone());
                    (
                        e.serial_number.clone(),
                        e.kind,
                        e.reason,
                        snapshot(e),
                        changes,
                    )
                })
                .collect();
            assert_eq!(
                got.len(),
                expected.len(),
                "{what}: events {got:#?} against {expected:#?}"
            );
            assert!(new.iter().all(|e| e.token_name == "acme"), "{what}");
            // The reconciliation's deletions in any order; the records' events in theirs.
            got[from_records..].sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(g, e, "{what}: event {i}");
            }
            for e in &new {
                seen_events.insert(e.id, (e.serial_number.clone(), e.kind, snapshot(e)));
                last_event = last_event.max(e.id);
            }

            // The rows: every serial the model holds, deleted or not, with its fields.
            let rows = store
                .devices(&DeviceFilter {
                    token: Some("acme".into()),
                    deleted: Some(false),
                    ..DeviceFilter::default()
                })
                .unwrap();
            assert_eq!(rows.len(), model.len(), "{what}: rows");
            for row in rows {
                let h = &model[&row.device.serial_number];
                assert_eq!(row.device.to_json(), h.device.to_json(), "{what}: row");
                assert_eq!(row.deleted_at.is_some(), h.deleted, "{what}: deleted");
            }
        }
    }

    // No snapshot drifted: each event reads as it did when it was written.
    let all = store.events_after(0, None, 100_000).unwrap();
    assert_eq!(all.len(), seen_events.len(), "seed {seed}");
    for e in &all {
        assert_eq!(
            seen_events[&e.id],
            (e.serial_number.clone(), e.kind, snapshot(e)),
            "seed {seed}: event {} changed since it was written",
            e.id
        );
    }
    // One serial's history (`device SERIAL`) is exactly its events, from any event on,
    // of both tokens or of one.
    let ids = |events: Vec<adesync::store::StoredEvent>| -> Vec<i64> {
        events.iter().map(|e| e.id).collect()
    };
    for serial in &serials {
        let mine: Vec<&adesync::store::StoredEvent> =
            all.iter().filter(|e| &e.serial_number == serial).collect();
        for after in std::iter::once(0).chain(mine.iter().map(|e| e.id)) {
            let want: Vec<i64> = mine.iter().map(|e| e.id).filter(|id| *id > after).collect();
            let history = ids(store.events_of(after, None, Some(serial), 100_000).unwrap());
            assert_eq!(
                history, want,
                "seed {seed}: history of {serial} after {after}"
            );
        }
        for token in ["acme", "aaa"] {
            let want: Vec<i64> = mine
                .iter()
                .filter(|e| e.token_name == token)
                .map(|e| e.id)
                .collect();
            let history = ids(store
                .events_of(0, Some(token), Some(serial), 100_000)
                .unwrap());
            assert_eq!(history, want, "seed {seed}: {serial} in {token}");
        }
    }
}

/// Values Apple may send that a column cannot hold as they are — a NUL character (which
/// PostgreSQL's text refuses), a number where text is documented, a string that looks like
/// a list — come back exactly, from the row and from the event.
fn odd_values_read_back_exactly(b: Backend) {
    use adesync::model::{Device, DeviceRecord};
    use adesync::store::{CursorState, PageWrite};
    let (_dir, mut store) = empty_store(b);
    let mut d = Device {
        serial_number: "ODD1".into(),
        model: Some("iPad".into()),
        asset_tag: Some("tag\u{0}with NUL".into()),
        ..Device::default()
    };
    d.extra.insert("eid".into(), serde_json::json!("89\u{0}01"));
    d.extra
        .insert("imei".into(), serde_json::json!("[\"not a list\"]"));
    d.extra
        .insert("mdm_migration_deadline".into(), serde_json::json!(42));
    d.extra
        .insert("is_replacement_device".into(), serde_json::json!("yes"));
    d.extra
        .insert("future_field".into(), serde_json::json!({"a": "b\u{0}c"}));
    let records = vec![DeviceRecord {
        device: d.clone(),
        op_type: None,
        op_date: None,
    }];
    store
        .apply_page(&PageWrite {
            token: "t",
            kind: Phase::Fetch,
            records: &records,
            next: CursorState {
                phase: Phase::Fetch,
                cursor: Some("c1".into()),
                fetch_run: 1,
            },
            fetched_until: None,
            completes_fetch: false,
            now: "2026-01-01T00:00:00Z",
            unreadable: &[],
            expect_new: true,
            prepared: None,
        })
        .unwrap();
    let stored = store.devices(&DeviceFilter::default()).unwrap();
    assert_eq!(stored.len(), 1);
    let row = stored[0].device.to_json();
    if b == Backend::Postgres {
        assert_eq!(row, d.to_json(), "the row");
    } else {
        // SQLite's protocol-10 columns keep SQLite's types (a known limit: the event keeps
        // such a record exactly, below); the NULs and the extra fields survive.
        for k in [
            "asset_tag",
            "eid",
            "future_field",
            "model",
            "is_replacement_device",
        ] {
            assert_eq!(row[k], d.to_json()[k], "{k}");
        }
    }
    let events = store.events_after(0, None, 10).unwrap();
    assert_eq!(
        events[0].device.as_ref().map(|e| e.to_json()),
        Some(d.to_json()),
        "the event"
    );
}

/// Event delivery reads the same on both backends: every event reaches a sink once, in
/// id order, and its cursor ends at the last id.
fn events_reach_a_sink_once_each_in_id_order(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(Env::on(
        b,
        MockConfig {
            devices: 500,
            ..Default::default()
        },
        200,
        "[[sinks]]\nname = \"file\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n",
    ));
    let out = rt.block_on(run_once(&env));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serials = env.mock.serials();
    env.mock.modify_devices(&serials[0..30]);
    env.mock.delete_devices(&serials[40..45]);
    let out = rt.block_on(run_once(&env));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let delivered = delivered_ids(&env.path("events.jsonl"));
    assert_eq!(delivered, (1..=535).collect::<Vec<i64>>());
    let store = env.store();
    assert_eq!(store.sink_state("file").unwrap().cursor, 535);
    assert_eq!(store.pending_events(535).unwrap().0, 0);
}

/// The event ids in a jsonl sink's file, in file order: its whole lines. What follows
/// the last newline is a line still being written, or one a SIGKILL cut short (its batch
/// was not recorded as delivered, so it is sent again); every whole line must parse.
fn delivered_ids(path: &std::path::Path) -> Vec<i64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"]
                .as_i64()
                .or_else(|| v["id"].as_str()?.parse().ok())
                .unwrap()
        })
        .collect()
}

fn a_first_fetch_mirrors_every_device_with_one_added_event_each(b: Backend) {
    let rt = runtime();
    let env = env(&rt, b, 2500, 1000);
    let s = sync(&rt, &env);
    assert_eq!(env.mock.count_requests(Endpoint::FetchDevices), 3);
    // One sync follows the completed fetch to pick up changes made during it.
    assert_eq!(env.mock.count_requests(Endpoint::SyncDevices), 1);
    assert_eq!(env.mock.count_requests(Endpoint::Session), 1);
    assert_eq!(s.stats.added, 2500);
    assert_eq!((s.stats.modified, s.stats.deleted), (0, 0));
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    assert_eq!(event_counts(&store), (2500, 0, 0));
    let state = store.sync_state("acme").unwrap();
    assert_eq!(state.cursor.phase, Phase::Sync);
    assert!(state.last_success_at.is_some() && state.last_error.is_none());
    assert!(state.last_full_fetch_at.is_some());
    assert_eq!(store.device_counts("acme").unwrap(), (2500, 0));
    // Ids start at 1 and have no gaps.
    let ids: Vec<i64> = store
        .events_after(0, None, 10_000)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, (1..=2500).collect::<Vec<i64>>());
    assert_eq!(store.max_event_id().unwrap(), 2500);
}

fn changes_become_exactly_those_events_and_a_re_run_emits_nothing(b: Backend) {
    let rt = runtime();
    let env = env(&rt, b, 300, 100);
    sync(&rt, &env);
    let serials = env.mock.serials();
    let added = env.mock.add_devices(10);
    assert_eq!(env.mock.modify_devices(&serials[0..7]), 7);
    assert_eq!(env.mock.delete_devices(&serials[100..105]), 5);
    let before = env.store().max_event_id().unwrap();
    env.mock.clear_requests();
    let s = sync(&rt, &env);
    assert_eq!(
        (s.stats.added, s.stats.modified, s.stats.deleted),
        (10, 7, 5)
    );
    assert_eq!(
        env.mock.count_requests(Endpoint::FetchDevices),
        0,
        "no re-fetch"
    );
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    let events = store.events_after(before, None, 1000).unwrap();
    assert_eq!(events.len(), 22);
    for e in &events {
        match e.kind.as_str() {
            "added" => assert!(added.contains(&e.serial_number)),
            "deleted" => {
                assert!(serials[100..105].contains(&e.serial_number));
                // A deletion carries the last record it had.
                assert_eq!(
                    e.device.as_ref().map(|d| d.serial_number.as_str()),
                    Some(e.serial_number.as_str())
                );
            }
            "modified" => {
                assert!(serials[0..7].contains(&e.serial_number));
                for (field, pair) in e.changes.as_object().unwrap() {
                    assert_ne!(pair[0], pair[1], "{field} did not change");
                }
            }
            other => panic!("unexpected kind {other}"),
        }
    }
    let deleted = store
        .devices(&DeviceFilter {
            deleted: Some(true),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(deleted.len(), 5);
    // Nothing changed: only a sync call, and nothing is written.
    env.mock.clear_requests();
    let s = sync(&rt, &env);
    assert_eq!(s.stats.events(), 0);
    assert_eq!(env.mock.count_requests(Endpoint::FetchDevices), 0);
    assert_eq!(env.mock.count_requests(Endpoint::SyncDevices), 1);
    assert_eq!(env.store().max_event_id().unwrap(), before + 22);
}

fn an_expired_cursor_re_fetches_and_reconciles_without_duplicates(b: Backend) {
    let rt = runtime();
    let env = env(&rt, b, 1200, 500);
    sync(&rt, &env);
    let serials = env.mock.serials();
    env.mock.remove_silently(&serials[10..13]);
    env.mock.modify_devices(&serials[20..24]);
    env.mock.add_devices(2);
    env.mock.advance_clock(chrono::Duration::days(8));
    env.mock.clear_requests();
    let s = sync(&rt, &env);
    assert!(s.fetched);
    assert!(env.mock.count_requests(Endpoint::FetchDevices) >= 3);
    assert_eq!(
        (s.stats.added, s.stats.modified, s.stats.deleted),
        (2, 4, 3)
    );
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    assert_eq!(event_counts(&store), (1202, 4, 3));
    assert_eq!(store.device_counts("acme").unwrap(), (1199, 3));
}

fn a_serial_repeated_in_a_sync_page_resolves_to_its_latest_record(b: Backend) {
    let rt = runtime();
    let env = env(&rt, b, 50, 100);
    sync(&rt, &env);
    let serials = env.mock.serials();
    env.mock.modify_devices(&serials[0..3]);
    env.mock.push_fault(
        Endpoint::SyncDevices,
        Fault {
            times: 1,
            kind: FaultKind::DuplicateSerial,
        },
    );
    let s = sync(&rt, &env);
    assert_eq!(s.stats.modified, 3);
    assert_mirrors(&env.store(), &env.mock);
}

/// Nothing lost, nothing doubled: a fetch killed with SIGKILL several times, then run to
/// completion; after every kill the store is a prefix (one `added` event per device).
fn a_sigkill_mid_fetch_loses_and_doubles_nothing(b: Backend) {
    let rt = runtime();
    let env = env(&rt, b, 60_000, 1000);
    let mut kills = 0;
    for delay_ms in [300u64, 600, 900, 1200] {
        let mut cmd = adesync(&env);
        cmd.args(["run", "--once"]);
        kills += rt.block_on(kill_after(cmd, Duration::from_millis(delay_ms))) as usize;
        let store = env.store();
        let (added, modified, deleted) = event_counts(&store);
        let stored = store.device_counts("acme").unwrap().0 as usize;
        assert_eq!(added, stored, "after a kill at {delay_ms} ms");
        assert_eq!((modified, deleted), (0, 0));
    }
    assert!(kills >= 2, "finished too fast to be killed ({kills} kills)");
    let out = rt.block_on(run_once(&env));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    let events = store.events_after(0, None, 200_000).unwrap();
    assert_eq!(events.len(), 60_000);
    let unique: HashSet<_> = events.iter().map(|e| e.serial_number.clone()).collect();
    assert_eq!(unique.len(), 60_000);
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order");
}

/// The CLI's JSON of devices and events, bookkeeping times aside.
fn cli_view(
    rt: &tokio::runtime::Runtime,
    command: impl Fn(&[&str]) -> std::process::Command,
) -> (String, String) {
    let read = |args: &[&str]| {
        let out = rt.block_on(crate::common::output(command(args)));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for v in &mut lines {
            let m = v.as_object_mut().unwrap();
            for k in [
                "first_seen_at",
                "updated_at",
                "deleted_at",
                "occurred_at",
                "time",
            ] {
                m.remove(k);
            }
        }
        serde_json::to_string_pretty(&lines).unwrap()
    };
    (
        read(&["devices", "--all", "--format", "json"]),
        read(&["events", "--format", "json"]),
    )
}

fn the_cli_reads_devices_and_events_the_same_on_both(b: Backend) {
    let rt = runtime();
    // One simulator synced into this backend and into an SQLite file beside it, step by
    // step: the CLI must show the same devices and events from both.
    let env = env(&rt, b, 400, 150);
    let twin_config = env.path("twin.toml");
    std::fs::write(
        &twin_config,
        std::fs::read_to_string(&env.config_path).unwrap().replace(
            &format!("database = \"{}\"", env.database),
            "database = \"twin.db\"",
        ),
    )
    .unwrap();
    let twin = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        c.arg("--config").arg(&twin_config).args(args);
        c
    };
    let both = || {
        sync(&rt, &env);
        let out = rt.block_on(crate::common::output(twin(&["run", "--once"])));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    both();
    let serials = env.mock.serials();
    env.mock.modify_devices(&serials[0..20]);
    env.mock.delete_devices(&serials[50..53]);
    env.mock.add_devices(4);
    both();
    let got = cli_view(&rt, |args| {
        let mut c = adesync(&env);
        c.args(args);
        c
    });
    let want = cli_view(&rt, twin);
    assert_eq!(got.0, want.0, "devices differ from SQLite's");
    assert_eq!(got.1, want.1, "events differ from SQLite's");
    assert!(got.1.contains("modified"), "the scenario changes devices");
}

fn forgetting_a_token_deletes_its_rows_and_nothing_else(b: Backend) {
    let rt = runtime();
    let env = env(&rt, b, 120, 100);
    sync(&rt, &env);
    let mut store = env.store();
    assert_eq!(store.stored_token_names().unwrap(), vec!["acme".to_owned()]);
    let before = store.token_footprint("acme").unwrap();
    assert_eq!((before.devices, before.events), (120, 120));
    let gone = store.purge_token("acme").unwrap();
    assert_eq!(gone, before);
    assert!(store.token_footprint("acme").unwrap().is_empty());
    assert!(store.stored_token_names().unwrap().is_empty());
}

/// With several tokens committing at once, a reader that follows the events by id never
/// sees a later id before an earlier one commits: it reads contiguous ids only, each once.
#[test]
fn postgres_event_ids_become_visible_in_order_under_concurrent_writers() {
    if postgres_url("postgres_event_ids_become_visible_in_order_under_concurrent_writers").is_none()
    {
        return;
    }
    use adesync::model::{Device, DeviceRecord};
    use adesync::store::{CursorState, PageWrite};
    let url = fresh_postgres_database();
    let db = adesync::config::Database::postgres(&url, None).unwrap();
    drop(Store::open(&db).unwrap());
    const WRITERS: usize = 4;
    const PAGES: usize = 40;
    const PER_PAGE: usize = 50;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (db, done) = (db.clone(), done.clone());
            std::thread::spawn(move || {
                let mut store = Store::open(&db).unwrap();
                let token = format!("t{w}");
                for p in 0..PAGES {
                    let records: Vec<DeviceRecord> = (0..PER_PAGE)
                        .map(|i| DeviceRecord {
                            device: Device {
                                serial_number: format!("S{w}-{p}-{i}"),
                                model: Some("iPad".into()),
                                ..Device::default()
                            },
                            op_type: None,
                            op_date: None,
                        })
                        .collect();
                    store
                        .apply_page(&PageWrite {
                            token: &token,
                            kind: Phase::Fetch,
                            records: &records,
                            next: CursorState {
                                phase: Phase::Fetch,
                                cursor: Some(format!("c{p}")),
                                fetch_run: 1,
                            },
                            fetched_until: None,
                            completes_fetch: false,
                            now: "2026-01-01T00:00:00Z",
                            unreadable: &[],
                            expect_new: false,
                            prepared: None,
                        })
                        .unwrap();
                }
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        })
        .collect();
    // The reader: follows by id like a sink, and checks each read continues exactly
    // where the last ended.
    let reader = Store::open(&db).unwrap();
    let mut last = 0i64;
    let mut reads = 0;
    let total = (WRITERS * PAGES * PER_PAGE) as i64;
    while last < total {
        // Whether every writer had committed before this read: then an empty read is the end.
        let finished = done.load(std::sync::atomic::Ordering::SeqCst) == WRITERS;
        let batch = reader.events_after(last, None, 500).unwrap();
        for e in &batch {
            assert_eq!(
                e.id,
                last + 1,
                "id {} seen before {} was visible",
                e.id,
                last + 1
            );
            last = e.id;
        }
        reads += 1;
        if batch.is_empty() && finished {
            break;
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(
        last, total,
        "every event read once, in order ({reads} reads)"
    );
}

/// Replicas starting together on an empty database migrate it once: the advisory lock
/// serialises them and every one of them opens.
#[test]
fn postgres_migrations_raced_by_several_processes_apply_once() {
    if postgres_url("postgres_migrations_raced_by_several_processes_apply_once").is_none() {
        return;
    }
    let url = fresh_postgres_database();
    let db = adesync::config::Database::postgres(&url, None).unwrap();
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || Store::open(&db).map(|s| s.schema_version().unwrap()))
        })
        .collect();
    let versions: Vec<i64> = opens
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    assert!(
        versions.iter().all(|v| *v == versions[0] && *v >= 1),
        "{versions:?}"
    );
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let rows: i64 = c
        .query_one("SELECT count(*) FROM adesync_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, versions[0]);
}

/// The tables an admin queries have the same names and columns on both backends.
#[test]
fn postgres_tables_and_columns_match_sqlite() {
    if postgres_url("postgres_tables_and_columns_match_sqlite").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("a.db");
    drop(Store::open(&sqlite).unwrap());
    let lite = rusqlite::Connection::open(&sqlite).unwrap();
    let url = fresh_postgres_database();
    drop(Store::open(adesync::config::Database::postgres(&url, None).unwrap()).unwrap());
    let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    for table in [
        "devices",
        "events",
        "sync_state",
        "accounts",
        "sink_cursors",
        "fetch_seen",
    ] {
        let mut want: Vec<String> = lite
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut got: Vec<String> = pg
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1",
                &[&table],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "columns of {table}");
    }
    // The README's example query runs as written.
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM events_with_device WHERE kind = 'added'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// A connection cut mid-page (the server ends the session while a fetch is writing)
/// leaves no half-written page: the run fails naming the database, and the next run
/// finishes with every device once and every event once.
#[test]
fn postgres_a_connection_cut_mid_page_leaves_nothing_half_written() {
    if postgres_url("postgres_a_connection_cut_mid_page_leaves_nothing_half_written").is_none() {
        return;
    }
    let rt = runtime();
    let env = env(&rt, Backend::Postgres, 40_000, 500);
    let mut cmd = adesync(&env);
    cmd.args(["run", "--once"]);
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Cut every adesync session of this database once devices are being written.
    let base = std::env::var("ADESYNC_TEST_POSTGRES_URL").unwrap();
    let mut admin = postgres::Client::connect(&base, postgres::NoTls).unwrap();
    let schema = env
        .database
        .rsplit("search_path%3D")
        .next()
        .unwrap()
        .to_owned();
    let started = std::time::Instant::now();
    let mut cut = 0u64;
    while started.elapsed() < Duration::from_secs(20) {
        let written: i64 = admin
            .query_one(&format!("SELECT count(*) FROM {schema}.devices"), &[])
            .map(|r| r.get(0))
            .unwrap_or(0);
        if written > 2000 {
            cut = admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    &[&schema],
                )
                .unwrap()
                .len() as u64;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(cut > 0, "no session to cut");
    assert!(!out.status.success(), "the run survived the cut: {stderr}");
    assert!(stderr.contains("database postgres://"), "{stderr}");
    // What committed is a prefix: one added event per stored device.
    let store = env.store();
    let (added, ..) = event_counts(&store);
    assert_eq!(added as u64, store.device_counts("acme").unwrap().0);
    drop(store);
    let out = rt.block_on(run_once(&env));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    let events = store.events_after(0, None, 100_000).unwrap();
    let mut per_serial: HashMap<&str, usize> = HashMap::new();
    for e in &events {
        *per_serial.entry(e.serial_number.as_str()).or_default() += 1;
    }
    assert_eq!(per_serial.len(), 40_000);
    assert!(per_serial.values().all(|n| *n == 1));
}

/// Two `run --once` against one PostgreSQL mirror: the second leaves the token the
/// first is syncing alone (it says who has it, and exits 0), and nothing is doubled.
#[test]
fn postgres_a_token_being_synced_is_left_to_its_replica() {
    if postgres_url("postgres_a_token_being_synced_is_left_to_its_replica").is_none() {
        return;
    }
    let rt = runtime();
    let env = env(&rt, Backend::Postgres, 50_000, 500);
    let mut first = adesync(&env);
    first
        .args(["run", "--once"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut first = first.spawn().unwrap();
    let started = std::time::Instant::now();
    while env.store().device_counts("acme").unwrap().0 == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "first run never wrote"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = adesync(&env);
    second.args(["run", "--once"]).env("RUST_LOG", "info");
    let second = rt.block_on(crate::common::output(second));
    let first_done = first.try_wait().unwrap().is_some();
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{log}");
    if !first_done {
        assert!(
            log.contains("another replica is syncing this token"),
            "{log}"
        );
        assert!(log.contains("held_by="), "{log}");
    }
    assert!(first.wait().unwrap().success());
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    assert_eq!(event_counts(&store), (50_000, 0, 0));
}

/// A pass lets go of its token as it ends: straight after its store is dropped (where the
/// syncer drops it, on a blocking task), no session holds the token, and the next pass
/// takes it. The server frees a closed connection's locks only once it notices the
/// socket closed, which made a second sync straight after the first skip the token as
/// held by another replica.
#[test]
fn postgres_a_token_is_free_again_as_soon_as_its_pass_ends() {
    if postgres_url("postgres_a_token_is_free_again_as_soon_as_its_pass_ends").is_none() {
        return;
    }
    let db = adesync::config::Database::postgres(&fresh_postgres_database(), None).unwrap();
    let watcher = Store::open(db.clone()).unwrap();
    let acme = ["acme".to_owned()];
    let rt = runtime();
    for round in 0..50 {
        let db = db.clone();
        let taken = rt.block_on(async move {
            tokio::task::spawn_blocking(move || {
                let mut store = Store::open(db).unwrap();
                let mine = store.own_token("acme").unwrap();
                let again = store.own_token("acme").unwrap();
                drop(store);
                (mine, again)
            })
            .await
            .unwrap()
        });
        assert_eq!(taken, (None, None), "round {round}: the token was free");
        assert_eq!(
            watcher.token_holders(&acme).unwrap(),
            Vec::new(),
            "round {round}: still held once its store was dropped"
        );
    }
}

/// Writes a config of `tokens` tokens (t01, t02, ...) at the simulator, all with the same
/// token file, into the env's folder, for replica `name` (its application_name).
fn replica_config(env: &Env, name: &str, tokens: usize) -> std::path::PathBuf {
    let mut text = format!(
        "database = \"{}&application_name={name}\"\nschedule = \"10s\"\n\
         [retry]\nmax_attempts = 3\ninitial_delay = \"100ms\"\nmax_delay = \"100ms\"\n",
        env.database.replace(
            &format!(
                "application_name={}&",
                env.database.rsplit("search_path%3D").next().unwrap()
            ),
            ""
        )
    );
    text.push_str(&format!(
        "[[sinks]]\nname = \"all\"\ntype = \"jsonl\"\npath = \"{name}-events.jsonl\"\n"
    ));
    for t in 1..=tokens {
        text.push_str(&format!(
            "[[tokens]]\nname = \"t{t:02}\"\ntoken_file = \"acme.json\"\napi_url = \"{}\"\npage_size = 100\n",
            env.mock.base_url()
        ));
    }
    let path = env.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Three replicas sync 12 tokens from one simulator into one PostgreSQL mirror; the one
/// holding tokens mid-fetch is killed with SIGKILL. The others take its tokens over within
/// a schedule interval (plus the moment the server needs to see the connection gone),
/// and in the end every device of every token is stored once with exactly one event.
#[test]
fn postgres_three_replicas_share_the_tokens_and_survive_a_sigkill() {
    if postgres_url("postgres_three_replicas_share_the_tokens_and_survive_a_sigkill").is_none() {
        return;
    }
    const TOKENS: usize = 12;
    const DEVICES: usize = 4000;
    let rt = runtime();
    let env = env(&rt, Backend::Postgres, DEVICES, 100);
    let tokens: Vec<String> = (1..=TOKENS).map(|t| format!("t{t:02}")).collect();
    let start = |name: &str| {
        let config = replica_config(&env, name, TOKENS);
        std::process::Command::new(env!("CARGO_BIN_EXE_adesync"))
            .arg("--config")
            .arg(&config)
            .args(["run"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(crate::common::KillOnDrop)
            .unwrap()
    };
    let mut replicas: Vec<(String, crate::common::KillOnDrop)> =
        ["replica-a", "replica-b", "replica-c"]
            .iter()
            .map(|n| (n.to_string(), start(n)))
            .collect();
    let store = env.store();
    // Wait until some replica holds tokens mid-fetch, and kill the one holding the most.
    let started = std::time::Instant::now();
    let (victim, victim_tokens) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no replica ever held a token"
        );
        let holders = store.token_holders(&tokens).unwrap();
        let mut by: HashMap<String, Vec<String>> = HashMap::new();
        for (t, h) in holders {
            let name = h.split(' ').next().unwrap().to_owned();
            by.entry(name).or_default().push(t);
        }
        if let Some((name, held)) = by.into_iter().max_by_key(|(_, v)| v.len()) {
            break (name, held);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let killed_at = std::time::Instant::now();
    let i = replicas.iter().position(|(n, _)| *n == victim).unwrap();
    let (_, mut child) = replicas.remove(i);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // Every token ends synced by a survivor: the killed replica's tokens after takeover.
    let mut takeover = None;
    let done = loop {
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "the tokens of {victim} ({victim_tokens:?}) were not taken over"
        );
        let holders = store.token_holders(&victim_tokens).unwrap();
        if takeover.is_none() && holders.iter().any(|(_, h)| !h.starts_with(&victim)) {
            takeover = Some(killed_at.elapsed());
        }
        let states = store.sync_states().unwrap();
        let synced = tokens
            .iter()
            .filter(|t| {
                states
                    .iter()
                    .any(|s| &s.token_name == *t && s.cursor.phase == Phase::Sync)
                    && store.device_counts(t).unwrap().0 == DEVICES as u64
            })
            .count();
        if synced == TOKENS {
            break killed_at.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Every event reaches the sink: one replica at a time delivers it, each in id order,
    // and together they skip no id (the killed one may have sent a batch again: at least
    // once).
    let last = store.max_event_id().unwrap();
    let files: Vec<std::path::PathBuf> = ["replica-a", "replica-b", "replica-c"]
        .iter()
        .map(|n| env.path(&format!("{n}-events.jsonl")))
        .collect();
    let delivered = loop {
        let mut all: Vec<i64> = files.iter().flat_map(|f| delivered_ids(f)).collect();
        all.sort_unstable();
        all.dedup();
        if all.len() as i64 == last || killed_at.elapsed() > Duration::from_secs(90) {
            break all;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        delivered,
        (1..=last).collect::<Vec<i64>>(),
        "an id was skipped"
    );
    for f in &files {
        let ids = delivered_ids(f);
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{} out of order",
            f.display()
        );
    }
    for (_, mut c) in replicas {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &c.0.id().to_string()])
            .status();
        c.0.wait().unwrap();
    }
    eprintln!(
        "replicas: {victim} killed holding {} token(s); first taken over after {:?}, all {TOKENS} synced {:?} after the kill",
        victim_tokens.len(),
        takeover,
        done
    );
    let truth = crate::common::truth(&env.mock);
    let events = store.events_after(0, None, 1_000_000).unwrap();
    let mut per_device: HashMap<(String, String), usize> = HashMap::new();
    for e in &events {
        assert_eq!(e.kind.as_str(), "added", "{e:?}");
        *per_device
            .entry((e.token_name.clone(), e.serial_number.clone()))
            .or_default() += 1;
    }
    assert_eq!(
        per_device.len(),
        TOKENS * DEVICES,
        "every device of every token"
    );
    assert!(per_device.values().all(|n| *n == 1), "one event each");
    for t in &tokens {
        assert_eq!(crate::common::stored(&store, t), truth, "token {t}");
    }
}

/// While another connection holds a token, `run` leaves it alone, and `status` and
/// `/metrics` name the holder; once it lets go, the next run syncs it.
#[test]
fn postgres_status_and_metrics_name_the_replica_syncing_a_token() {
    if postgres_url("postgres_status_and_metrics_name_the_replica_syncing_a_token").is_none() {
        return;
    }
    let rt = runtime();
    let port = crate::common::free_port();
    let env = rt.block_on(Env::on(
        Backend::Postgres,
        MockConfig {
            devices: 300,
            ..Default::default()
        },
        100,
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    ));
    let replica = crate::common::application_name(&env.database);
    let mut holder = env.store();
    assert_eq!(holder.own_token("acme").unwrap(), None, "free at first");
    let out = rt.block_on(run_once(&env));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.store().device_counts("acme").unwrap(),
        (0, 0),
        "left alone"
    );
    let mut status = adesync(&env);
    status.args(["status", "--format", "json"]);
    let out = rt.block_on(crate::common::output(status));
    let line: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    let by = line["synced_by"].as_str().unwrap_or_default().to_owned();
    assert!(by.starts_with(&replica), "{line}");
    let mut status = adesync(&env);
    status.arg("status");
    let out = rt.block_on(crate::common::output(status));
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme: being synced now by"));
    // The daemon leaves it alone too, and says who has it.
    let mut daemon = adesync(&env)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(crate::common::KillOnDrop)
        .unwrap();
    let metrics = crate::common::metrics_once_they_show(&rt, port, "adesync_token_synced_by");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status();
    daemon.0.wait().unwrap();
    assert!(
        metrics.contains(&format!(
            "adesync_token_synced_by{{token=\"acme\",replica=\"{replica}\"}} 1"
        )),
        "{metrics}"
    );
    assert_eq!(env.store().device_counts("acme").unwrap(), (0, 0));
    drop(holder);
    let out = rt.block_on(run_once(&env));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_mirrors(&env.store(), &env.mock);
}

/// `store copy` moves an SQLite mirror into PostgreSQL: the CLI shows the same devices and
/// events (same ids) from both, the sink cursors come along, the next sync continues from
/// the copied cursor (no re-fetch) with ids after the copied ones, and a second copy into
/// the same database is refused.
#[test]
fn postgres_store_copy_moves_a_mirror_without_a_re_fetch() {
    if postgres_url("postgres_store_copy_moves_a_mirror_without_a_re_fetch").is_none() {
        return;
    }
    let rt = runtime();
    let env = rt.block_on(Env::on(
        Backend::Sqlite,
        MockConfig {
            devices: 3000,
            ..Default::default()
        },
        500,
        "[[sinks]]\nname = \"file\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n",
    ));
    let run = |config: &std::path::Path| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        c.arg("--config").arg(config).args(["run", "--once"]);
        let out = rt.block_on(crate::common::output(c));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&env.config_path);
    let serials = env.mock.serials();
    env.mock.modify_devices(&serials[0..20]);
    env.mock.delete_devices(&serials[100..103]);
    run(&env.config_path);
    let sqlite_view = cli_view(&rt, |args| {
        let mut c = adesync(&env);
        c.args(args);
        c
    });
    let url = fresh_postgres_database();
    let copy = |url: &str| {
        let mut c = adesync(&env);
        c.args(["store", "copy", "--to", url]);
        rt.block_on(crate::common::output(c))
    };
    let out = copy(&url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("copied 3000 devices, 3023 events"), "{said}");
    // The PostgreSQL side, without the sink: the run after the copy delivers nothing, so the
    // copied sink cursor is read as it came.
    let pg_config = env.path("pg.toml");
    std::fs::write(
        &pg_config,
        std::fs::read_to_string(&env.config_path)
            .unwrap()
            .replace(
                "database = \"adesync.db\"",
                &format!("database = \"{url}\""),
            )
            .replace(
                "[[sinks]]\nname = \"file\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n",
                "",
            ),
    )
    .unwrap();
    let pg = |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        c.arg("--config").arg(&pg_config).args(args);
        c
    };
    let pg_view = cli_view(&rt, pg);
    assert_eq!(pg_view.0, sqlite_view.0, "devices differ after the copy");
    assert_eq!(pg_view.1, sqlite_view.1, "events differ after the copy");
    let target = adesync::config::Database::postgres(&url, None).unwrap();
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let cursor: i64 = c
        .query_one(
            "SELECT last_event_id FROM sink_cursors WHERE sink_name = 'file'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(cursor, 3023, "the sink's cursor came along");
    // The next sync continues from the copied cursor.
    env.mock.modify_devices(&serials[200..205]);
    env.mock.clear_requests();
    run(&pg_config);
    assert_eq!(
        env.mock.count_requests(Endpoint::FetchDevices),
        0,
        "no re-fetch"
    );
    let store = Store::open(&target).unwrap();
    let new = store.events_after(3023, None, 100).unwrap();
    assert_eq!(new.len(), 5);
    assert_eq!(new[0].id, 3024);
    assert!(new.iter().all(|e| e.kind.as_str() == "modified"));
    assert_mirrors(&store, &env.mock);
    // A database that holds a mirror is not copied into.
    let out = copy(&url);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds a mirror"), "{err}");
}

/// `store copy` carries profile assignment along: the definitions, each device's last
/// assignment, where the pass stands and the profile events, so nothing is assigned or
/// announced twice after the move.
#[test]
fn postgres_store_copy_keeps_profile_assignments() {
    if postgres_url("postgres_store_copy_keeps_profile_assignments").is_none() {
        return;
    }
    let rt = runtime();
    let env = rt.block_on(Env::on(
        Backend::Sqlite,
        MockConfig {
            devices: 200,
            ..Default::default()
        },
        100,
        "[[profiles]]\nname = \"all\"\nfile = \"all.json\"\n[[assign]]\nprofile = \"all\"\n",
    ));
    std::fs::write(
        env.path("all.json"),
        r#"{"profile_name":"All","url":"https://mdm.example.com/enroll"}"#,
    )
    .unwrap();
    let out = rt.block_on(run_once(&env));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lite = rusqlite::Connection::open(env.path("adesync.db")).unwrap();
    let one = |sql: &str| -> i64 { lite.query_row(sql, [], |r| r.get(0)).unwrap() };
    let assignments = one("SELECT count(*) FROM profile_assignments");
    let profile_events = one("SELECT count(*) FROM events WHERE scope = 'profile'");
    let pass = one("SELECT last_event_id FROM assign_state");
    let last = one("SELECT max(id) FROM events");
    assert!(
        assignments > 0 && profile_events > 0,
        "the scenario assigns"
    );
    let url = fresh_postgres_database();
    let mut c = adesync(&env);
    c.args(["store", "copy", "--to", &url]);
    let out = rt.block_on(crate::common::output(c));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut one = |sql: &str| -> i64 { pg.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(one("SELECT count(*) FROM profile_assignments"), assignments);
    assert_eq!(
        one("SELECT count(*) FROM events WHERE scope = 'profile'"),
        profile_events
    );
    assert_eq!(one("SELECT last_event_id FROM assign_state"), pass);
    assert_eq!(one("SELECT count(*) FROM profiles"), 1);
    assert_eq!(one("SELECT next_id FROM event_ids"), last + 1);
    let target = adesync::config::Database::postgres(&url, None).unwrap();
    let store = Store::open(&target).unwrap();
    let profile = store
        .events_after(0, None, 100_000)
        .unwrap()
        .into_iter()
        .find(|e| e.scope == adesync::events::EventScope::Profile)
        .unwrap();
    assert_eq!(
        adesync::events::event_json(&profile)["type"],
        "profile.assigned"
    );
}

/// The token's lock is the fence for everything a pass writes after its pages: replacement
/// details and profile assignment go through the connection that holds it, so once that
/// connection is gone (and another replica may hold the token) they fail instead of
/// landing beside the new owner's.
#[test]
fn postgres_writes_after_the_pages_fail_once_the_token_connection_is_gone() {
    if postgres_url("postgres_writes_after_the_pages_fail_once_the_token_connection_is_gone")
        .is_none()
    {
        return;
    }
    let url = fresh_postgres_database();
    let db = adesync::config::Database::postgres(&url, None).unwrap();
    let mut owner = Store::open(&db).unwrap();
    assert_eq!(owner.own_token("acme").unwrap(), None);
    let pass = adesync::syncer::PassStore::owned(db.clone(), owner);
    pass.with(|s| s.finish_assign_pass("acme", 1, None, "2026-01-01T00:00:00Z"))
        .unwrap();
    // The server ends the owner's session (a restart, a cut network).
    let schema = url.rsplit("search_path%3D").next().unwrap().to_owned();
    assert!(crate::common::terminate_sessions(&schema) >= 1);
    std::thread::sleep(Duration::from_millis(200));
    // Another replica takes the token over...
    let mut next = Store::open(&db).unwrap();
    assert_eq!(
        next.own_token("acme").unwrap(),
        None,
        "the lock went with the session"
    );
    // ...and the old pass can write nothing more.
    assert!(pass
        .with(|s| s.finish_assign_pass("acme", 99, None, "2026-01-01T00:00:01Z"))
        .is_err());
    assert_eq!(next.assign_state("acme").unwrap().last_event_id, 1);
}

/// Before the first sync, a PostgreSQL database adesync never set up reads like a missing
/// SQLite file: `devices` says to run a sync first, `status` says every token never synced.
#[test]
fn postgres_a_database_never_set_up_reads_as_no_mirror_yet() {
    if postgres_url("postgres_a_database_never_set_up_reads_as_no_mirror_yet").is_none() {
        return;
    }
    let rt = runtime();
    let env = env(&rt, Backend::Postgres, 10, 100);
    let run = |args: &[&str]| {
        let mut c = adesync(&env);
        c.args(args);
        rt.block_on(crate::common::output(c))
    };
    let out = run(&["devices"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run `adesync run --once` first"), "{err}");
    let out = run(&["status", "--format", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(r#""phase":"new""#),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
