//! Organisation walks against the bundled simulator: the mirror equals the simulator's
//! truth, changes give exactly one event each, an unchanged re-walk writes nothing, a
//! crash or an interrupted walk loses, doubles and removes nothing, accounts stay apart.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use adesync::config::Config;
use adesync::events::EventScope;
use adesync::model::EventKind;
use adesync::orgapi::device::ORG_COLUMNS;
use adesync::store::{OrgDeviceFilter, Store, StoredEvent};
use adesync::syncer::{run_all_once, OrgSyncError};
use adesync_mock::{
    Credentials, Fault, FaultKind, MockConfig, MockHandle, OrgAccountConfig, OrgEndpoint, OrgQuirks,
};
use serde_json::Value;

use super::common::{
    empty_store, fresh_postgres_database, output, runtime, write_token, Backend, KillOnDrop,
};
use crate::on_both_backends;

on_both_backends!(
    a_walk_mirrors_the_organisation_with_one_event_per_device_and_a_rewalk_writes_nothing,
    changes_give_exactly_one_event_each_with_what_changed,
    an_interrupted_walk_removes_nothing_and_the_next_complete_one_removes_once,
    two_accounts_stay_apart,
    applecare_coverage_is_fetched_once_per_refresh_and_a_429_is_waited_out,
    sigkill_during_a_walk_loses_and_doubles_nothing,
    org_devices_and_device_show_the_inventory,
    a_walk_stuck_on_a_cursor_starts_the_list_again_and_a_vanished_server_is_skipped,
);

pub struct OrgEnv {
    pub dir: tempfile::TempDir,
    pub mock: MockHandle,
    pub config_path: PathBuf,
    /// The config's `database`: a file name in `dir`, or a PostgreSQL URL.
    pub database: String,
}

impl OrgEnv {
    /// [`OrgEnv::on`] SQLite.
    pub async fn new(ade: usize, accounts: Vec<OrgAccountConfig>, extra: &str) -> OrgEnv {
        Self::on(Backend::Sqlite, ade, accounts, extra).await
    }

    /// A simulator with `ade` ADE devices and one organisation account per entry of
    /// `accounts`; a config with the token "acme" and accounts "org0", "org1", …, keeping
    /// the mirror on `backend`.
    pub async fn on(
        backend: Backend,
        ade: usize,
        accounts: Vec<OrgAccountConfig>,
        extra: &str,
    ) -> OrgEnv {
        let n = accounts.len();
        let mock = adesync_mock::start(MockConfig {
            devices: ade,
            org_accounts: accounts,
            ..Default::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_token(&dir.path().join("acme.json"), &Credentials::depsim(), 365);
        let database = match backend {
            Backend::Sqlite => "adesync.db".to_owned(),
            Backend::Postgres => tokio::task::spawn_blocking(fresh_postgres_database)
                .await
                .unwrap(),
        };
        let mut text = format!(
            "database = \"{database}\"\n{extra}\n\
             [retry]\nmax_attempts = 3\ninitial_delay = \"100ms\"\nmax_delay = \"100ms\"\n\
             [[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\napi_url = \"{}\"\n",
            mock.base_url()
        );
        for i in 0..n {
            let info = mock.org_account(i);
            let key = dir.path().join(format!("org{i}.pem"));
            std::fs::write(&key, &info.private_key_pem).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            text.push_str(&format!(
                "[[org_accounts]]\nname = \"org{i}\"\nclient_id = \"{}\"\nkey_id = \"{}\"\nprivate_key_file = \"org{i}.pem\"\napi_url = \"{}\"\ntoken_url = \"{}\"\nrequests_per_second = 100\npage_size = 100\n",
                info.client_id,
                info.key_id,
                mock.base_url(),
                mock.org_token_url()
            ));
        }
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, text).unwrap();
        OrgEnv {
            dir,
            mock,
            config_path,
            database,
        }
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).unwrap()
    }

    /// The store the config names (on PostgreSQL: call it off the async runtime).
    pub fn store(&self) -> Store {
        if adesync::config::Database::is_url(&self.database) {
            Store::open(adesync::config::Database::postgres(&self.database, None).unwrap()).unwrap()
        } else {
            Store::open(self.dir.path().join(&self.database)).unwrap()
        }
    }

    /// The one number `sql` selects, run on the mirror's own database as an admin would.
    pub fn count(&self, sql: &str) -> i64 {
        if adesync::config::Database::is_url(&self.database) {
            let mut c = postgres::Client::connect(&self.database, postgres::NoTls).unwrap();
            c.query_one(sql, &[]).unwrap().get(0)
        } else {
            rusqlite::Connection::open(self.dir.path().join(&self.database))
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap()
        }
    }

    pub async fn run(&self) -> adesync::syncer::OnceReport {
        run_all_once(&self.config(), None).await
    }
}

pub fn account(devices: usize, seed: u64) -> OrgAccountConfig {
    OrgAccountConfig {
        devices,
        ..OrgAccountConfig::business(seed)
    }
}

/// Apple's attribute of a column, from the simulator's documented-shape attributes.
fn truth_value(attrs: &Value, attr: &str) -> Value {
    let v = attrs.get(attr).cloned().unwrap_or(Value::Null);
    match (attr, v) {
        // The mirror keeps MAC addresses as lists (docs/apple-business-api.md §4).
        ("wifiMacAddress" | "bluetoothMacAddress", Value::String(s)) => {
            Value::Array(vec![s.into()])
        }
        (_, v) => v,
    }
}

/// Asserts the account's stored devices equal the simulator's truth, column by column.
fn assert_org_mirrors(store: &Store, mock: &MockHandle, i: usize) {
    let truth = mock.org_devices(i);
    let stored = store
        .org_devices(&OrgDeviceFilter {
            accounts: vec![format!("org{i}")],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(stored.len(), truth.len(), "device count of org{i}");
    let servers: HashMap<String, String> = mock
        .org_servers(i)
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    for (s, t) in stored.iter().zip(&truth) {
        assert_eq!(s.device.serial_number, t.serial);
        assert_eq!(s.device.server_id, t.server, "server of {}", t.serial);
        assert_eq!(
            s.device.server_name,
            t.server.as_ref().map(|id| servers[id].clone())
        );
        for ((col, attr, _), v) in ORG_COLUMNS.iter().zip(&s.device.values) {
            if *attr == "purchaseSourceId" {
                continue; // checked below: either name
            }
            assert_eq!(
                v,
                &truth_value(&t.attributes, attr),
                "{col} of {}",
                t.serial
            );
        }
        let source = t
            .attributes
            .get("purchaseSourceId")
            .or(t.attributes.get("purchaseSourceUid"))
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(s.device.get("purchase_source_id"), Some(&source));
    }
}

/// The next walk of org0 gets `page - 1` pages of devices, then `fault` (`times` times)
/// in place of page `page`.
fn fault_the_walk_at_page(env: &OrgEnv, page: usize, kind: FaultKind, times: u32) {
    for _ in 1..page {
        env.mock.push_org_fault(
            0,
            OrgEndpoint::OrgDevices,
            Fault {
                times: 1,
                kind: FaultKind::Delay(Duration::ZERO),
            },
        );
    }
    env.mock
        .push_org_fault(0, OrgEndpoint::OrgDevices, Fault { times, kind });
}

/// The next walk of org0 gets two pages of devices, then errors on the third past every
/// retry.
fn fail_the_walk_at_page_3(env: &OrgEnv) {
    let error = FaultKind::Status {
        status: 500,
        body: String::new(),
        headers: vec![],
    };
    fault_the_walk_at_page(env, 3, error, 3);
}

fn org_events(store: &Store) -> Vec<StoredEvent> {
    store
        .events_after(0, None, 1 << 40)
        .unwrap()
        .into_iter()
        .filter(|e| e.scope == EventScope::OrgDevice)
        .collect()
}

fn counts(evs: &[StoredEvent]) -> (usize, usize, usize) {
    let n = |k| evs.iter().filter(|e| e.kind == k).count();
    (
        n(EventKind::Added),
        n(EventKind::Modified),
        n(EventKind::Deleted),
    )
}

fn max_updated(store: &Store) -> String {
    store
        .org_devices(&OrgDeviceFilter {
            include_removed: true,
            ..Default::default()
        })
        .unwrap()
        .iter()
        .map(|d| d.updated_at.clone())
        .max()
        .unwrap_or_default()
}

fn a_walk_mirrors_the_organisation_with_one_event_per_device_and_a_rewalk_writes_nothing(
    b: Backend,
) {
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(b, 50, vec![account(250, 1)], ""));
    let report = rt.block_on(env.run());
    assert!(
        report.failed.is_empty() && report.org_failed.is_empty(),
        "{report:?}"
    );
    let s = &report.org_ok[0];
    assert!(s.complete);
    assert_eq!(s.devices, 300);
    assert_eq!(s.stats.added, 300);
    let store = env.store();
    assert_org_mirrors(&store, &env.mock, 0);
    let evs = org_events(&store);
    assert_eq!(
        counts(&evs),
        (300, 0, 0),
        "one event per device, never added + modified"
    );
    // Each event carries the device's server.
    let truth: BTreeMap<String, Option<String>> = env
        .mock
        .org_devices(0)
        .into_iter()
        .map(|t| (t.serial, t.server))
        .collect();
    for e in &evs {
        let j = adesync::events::event_json(e);
        assert_eq!(j["type"], "org_device.added");
        assert_eq!(j["account"], "org0");
        assert_eq!(
            j["device"]["assigned_server_id"]
                .as_str()
                .map(str::to_owned),
            truth[&e.serial_number]
        );
    }
    // The inventory view joins the ADE mirror: the 50 ADE devices are mirrored by "acme".
    let mirrored =
        env.count("SELECT COUNT(*) FROM inventory WHERE mirrored AND token_name = 'acme'");
    assert_eq!(mirrored, 50);

    // Identical data: no event, no row written.
    let before = max_updated(&store);
    let report = rt.block_on(env.run());
    assert!(report.org_failed.is_empty());
    assert_eq!(report.org_ok[0].stats.unchanged, 300);
    assert_eq!(org_events(&env.store()).len(), 300);
    assert_eq!(max_updated(&env.store()), before, "no row rewritten");

    // A difference of shape alone (a string for a one-element list, the other name of
    // purchaseSourceId) is no change.
    env.mock.set_org_quirks(
        0,
        OrgQuirks {
            list_values_as_strings: false,
            purchase_source_uid: true,
            future_field: false,
        },
    );
    rt.block_on(env.run());
    assert_eq!(
        org_events(&env.store()).len(),
        300,
        "no event for a change of shape"
    );
}

fn changes_give_exactly_one_event_each_with_what_changed(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(b, 20, vec![account(180, 2)], ""));
    rt.block_on(env.run());
    let servers = env.mock.org_servers(0);
    let other = servers
        .iter()
        .find(|s| s.name == "Other MDM")
        .unwrap()
        .id
        .clone();
    // Devices chosen so each change is one: moved ones were not on "Other MDM", unassigned
    // ones were assigned.
    let truth = env.mock.org_devices(0);
    let pick = |f: &dyn Fn(&adesync_mock::OrgDeviceTruth) -> bool, n: usize, skip: &[String]| {
        truth
            .iter()
            .filter(|t| f(t) && !skip.contains(&t.serial))
            .take(n)
            .map(|t| t.serial.clone())
            .collect::<Vec<String>>()
    };
    let assigned_elsewhere = |t: &adesync_mock::OrgDeviceTruth| {
        t.server.is_some() && t.server.as_deref() != Some(other.as_str())
    };
    let move_other = pick(&assigned_elsewhere, 2, &[]);
    let unassign = pick(&assigned_elsewhere, 2, &move_other);
    let taken: Vec<String> = move_other.iter().chain(&unassign).cloned().collect();
    let modify = pick(&|_| true, 3, &taken);
    let taken: Vec<String> = taken.iter().chain(&modify).cloned().collect();
    let release = pick(&|_| true, 2, &taken);
    let (modify, release, move_other, unassign) =
        (&modify[..], &release[..], &move_other[..], &unassign[..]);
    env.mock.modify_org_devices(0, modify);
    env.mock.release_org_devices(0, release);
    env.mock.assign_org_devices(0, move_other, Some(&other));
    env.mock.assign_org_devices(0, unassign, None);
    let added = env.mock.add_org_devices(0, 4, None);
    let before = org_events(&env.store()).len();
    let report = rt.block_on(env.run());
    assert!(report.org_failed.is_empty(), "{report:?}");
    let store = env.store();
    assert_org_mirrors(&store, &env.mock, 0);
    let evs: Vec<StoredEvent> = org_events(&store).into_iter().skip(before).collect();
    let by_serial: HashMap<&str, &StoredEvent> =
        evs.iter().map(|e| (e.serial_number.as_str(), e)).collect();
    assert_eq!(by_serial.len(), evs.len(), "one event per device");
    for s in &added {
        assert_eq!(by_serial[s.as_str()].kind, EventKind::Added);
    }
    for s in release {
        let e = by_serial[s.as_str()];
        assert_eq!(e.kind, EventKind::Deleted);
        assert_eq!(adesync::events::event_json(e)["type"], "org_device.removed");
    }
    for s in modify {
        assert_eq!(by_serial[s.as_str()].kind, EventKind::Modified);
    }
    for s in move_other {
        let e = by_serial[s.as_str()];
        assert_eq!(e.kind, EventKind::Modified);
        assert_eq!(
            e.changes["assigned_server_id"][1],
            Value::String(other.clone())
        );
    }
    for s in unassign {
        let e = by_serial[s.as_str()];
        assert_eq!(e.changes["assigned_server_id"][1], Value::Null);
        assert_eq!(
            e.changes["status"],
            serde_json::json!(["ASSIGNED", "UNASSIGNED"])
        );
    }
    assert_eq!(counts(&evs), (4, 3 + 2 + 2, 2));
    // Removed devices stay, marked.
    let removed = store
        .org_devices(&OrgDeviceFilter {
            include_removed: true,
            serial: Some(release[0].clone()),
            ..Default::default()
        })
        .unwrap();
    assert!(removed[0].removed_at.is_some());
    // Every event validates against the published schema.
    let v = super::common::schema();
    for e in org_events(&store) {
        super::common::assert_valid(&v, &adesync::events::event_json(&e));
    }
}

fn an_interrupted_walk_removes_nothing_and_the_next_complete_one_removes_once(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(b, 0, vec![account(500, 3)], ""));
    rt.block_on(env.run());
    let gone = env.mock.pick_org_devices(0, 5);
    env.mock.release_org_devices(0, &gone);
    // Page 3 of the walk fails past every retry.
    fail_the_walk_at_page_3(&env);
    let report = rt.block_on(env.run());
    assert_eq!(report.org_failed.len(), 1);
    assert!(matches!(report.org_failed[0].1, OrgSyncError::Api(_)));
    let store = env.store();
    assert_eq!(
        counts(&org_events(&store)).2,
        0,
        "an interrupted walk removes nothing"
    );
    let walk = store.org_walk("org0").unwrap();
    assert!(walk.cursor.is_some(), "the walk resumes where it stopped");
    let status = adesync::status::org_statuses(&env.config(), &store, chrono::Utc::now()).unwrap();
    assert!(
        status[0].attention[0].contains("retried automatically"),
        "{:?}",
        status[0].attention
    );

    let report = rt.block_on(env.run());
    assert!(report.org_failed.is_empty(), "{report:?}");
    let evs = org_events(&env.store());
    let removed: Vec<&str> = evs
        .iter()
        .filter(|e| e.kind == EventKind::Deleted)
        .map(|e| e.serial_number.as_str())
        .collect();
    let mut want: Vec<&str> = gone.iter().map(String::as_str).collect();
    let mut got = removed.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(counts(&evs).0, 500, "no device added twice");
    assert_org_mirrors(&env.store(), &env.mock, 0);
}

fn two_accounts_stay_apart(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(b, 10, vec![account(120, 4), account(80, 5)], ""));
    let report = rt.block_on(env.run());
    assert!(report.org_failed.is_empty(), "{report:?}");
    assert_eq!(report.org_ok.len(), 2);
    let store = env.store();
    assert_org_mirrors(&store, &env.mock, 0);
    assert_org_mirrors(&store, &env.mock, 1);
    let evs = org_events(&store);
    let per: BTreeMap<String, usize> = evs.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.token_name.clone()).or_default() += 1;
        m
    });
    assert_eq!(per["org0"], 130);
    assert_eq!(per["org1"], 90);
    // Each account's requests carried its own token.
    assert!(env.mock.org_stats(0).tokens_issued >= 1);
    assert!(env.mock.org_stats(1).tokens_issued >= 1);
}

fn applecare_coverage_is_fetched_once_per_refresh_and_a_429_is_waited_out(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(b, 0, vec![account(40, 6)], ""));
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("page_size = 100\n", "page_size = 100\napplecare = true\n");
    std::fs::write(&env.config_path, text).unwrap();
    env.mock.push_org_fault(
        0,
        OrgEndpoint::AppleCare,
        Fault {
            times: 1,
            kind: FaultKind::Status {
                status: 429,
                body: String::new(),
                headers: vec![("Retry-After".into(), "1".into())],
            },
        },
    );
    let report = rt.block_on(env.run());
    assert!(report.org_failed.is_empty(), "{report:?}");
    assert_eq!(report.org_ok[0].applecare, 40);
    assert_eq!(report.org_ok[0].rate_limited, 1);
    let store = env.store();
    assert_eq!(store.org_counts("org0").unwrap().applecare_checked, 40);
    let serial = env.mock.org_devices(0)[0].serial.clone();
    let coverage = store.applecare_of("org0", &serial).unwrap();
    assert!(!coverage.is_empty());
    assert!(coverage.iter().any(|c| c["description"].is_string()));
    // After the 429, no request of the account came before its Retry-After had passed.
    let reqs = env.mock.org_requests(0);
    let i = reqs.iter().position(|r| r.status == 429).unwrap();
    let gap = reqs[i + 1].received.duration_since(reqs[i].received);
    assert!(gap >= Duration::from_millis(950), "{gap:?}");
    // Within applecare_refresh nothing is asked again.
    let report = rt.block_on(env.run());
    assert_eq!(report.org_ok[0].applecare, 0);
}

/// Nothing lost, nothing doubled: the `adesync` process killed with SIGKILL during a walk
/// of 30,000 devices, several times, then run to completion: exactly one `added` event per
/// device, and the mirror equals the simulator.
fn sigkill_during_a_walk_loses_and_doubles_nothing(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(b, 0, vec![account(30_000, 7)], ""));
    // Only the account: the token would finish at once anyway.
    let mut kills = 0;
    for delay_ms in [300u64, 600, 900, 1200] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        cmd.arg("--config")
            .arg(&env.config_path)
            .args(["run", "--once", "--token", "org0"])
            .env("RUST_LOG", "warn");
        kills += rt.block_on(crate::common::kill_after(
            cmd,
            Duration::from_millis(delay_ms),
        )) as usize;
        let store = env.store();
        let (added, modified, removed) = counts(&org_events(&store));
        let stored = store.org_counts("org0").unwrap().devices as usize;
        assert_eq!(added, stored, "after a kill at {delay_ms} ms");
        assert_eq!((modified, removed), (0, 0));
    }
    assert!(
        kills >= 2,
        "the walk finished too fast to be killed ({kills} kills)"
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
    cmd.arg("--config")
        .arg(&env.config_path)
        .args(["run", "--once", "--token", "org0"]);
    let out = rt.block_on(output(cmd));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = env.store();
    assert_eq!(counts(&org_events(&store)), (30_000, 0, 0));
    assert_org_mirrors(&store, &env.mock, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_account_is_named_while_the_token_still_syncs_and_its_events_reach_sinks() {
    let env = OrgEnv::new(30, vec![account(20, 8)], "").await;
    // The account's key is a valid P-256 key, but not the one Apple knows.
    let other = openssl::ec::EcKey::generate(
        &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
    )
    .unwrap();
    std::fs::write(
        env.dir.path().join("org0.pem"),
        other.private_key_to_pem().unwrap(),
    )
    .unwrap();
    let mut text = std::fs::read_to_string(&env.config_path).unwrap();
    text.push_str("[[sinks]]\nname = \"file\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n");
    std::fs::write(&env.config_path, text).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
    cmd.arg("--config")
        .arg(&env.config_path)
        .args(["run", "--once"]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("organisation account \"org0\""), "{err}");
    assert!(err.contains("does not match this API account"), "{err}");
    let lines = std::fs::read_to_string(env.dir.path().join("events.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        30,
        "the token's events were delivered"
    );
    // status names it and says an administrator must act.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
    cmd.arg("--config").arg(&env.config_path).arg("status");
    let out = output(cmd).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("org account org0: parked until an administrator acts"),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_readable_by_everyone_or_missing_is_a_config_error_before_anything_else() {
    let env = OrgEnv::new(5, vec![account(5, 9)], "").await;
    let key = env.dir.path().join("org0.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_file(env.dir.path().join("adesync.db")).ok();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
    cmd.arg("--config")
        .arg(&env.config_path)
        .args(["run", "--once"]);
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("org_accounts[0].private_key_file"), "{err}");
    assert!(
        !env.dir.path().join("adesync.db").exists(),
        "no database made"
    );
    assert_eq!(env.mock.org_stats(0).token_requests, 0, "no request made");
    std::fs::remove_file(&key).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
    cmd.arg("--config")
        .arg(&env.config_path)
        .arg("check-config");
    let out = output(cmd).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

fn org_devices_and_device_show_the_inventory(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(b, 10, vec![account(30, 10)], ""));
    rt.block_on(env.run());
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        cmd.arg("--config").arg(&env.config_path).args(args);
        cmd
    };
    let out = rt.block_on(output(run(&[
        "org-devices",
        "--unassigned",
        "--format",
        "json",
    ])));
    assert!(out.status.success());
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want = env
        .mock
        .org_devices(0)
        .iter()
        .filter(|t| t.server.is_none())
        .count();
    assert_eq!(rows.len(), want);
    assert!(rows.iter().all(|r| r["assigned_server_id"].is_null()));
    let out = rt.block_on(output(run(&["org-devices", "--format", "csv"])));
    let csv = String::from_utf8_lossy(&out.stdout);
    assert_eq!(csv.lines().count(), 41);
    assert!(csv.lines().next().unwrap().contains("ethernet_mac_address"));
    // A serial both mirrored by the token and known to the organisation: both sides.
    let serial = env.mock.serials()[0].clone();
    let out = rt.block_on(output(run(&["device", &serial])));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("(token acme)"), "{text}");
    assert!(
        text.contains("in the organisation (account org0)"),
        "{text}"
    );
    assert!(text.contains("org_device.added"), "{text}");
    let out = rt.block_on(output(run(&["status"])));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("org_account"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_walks_accounts_and_reports_them_in_metrics_and_healthz() {
    let port = super::common::free_port();
    let env = OrgEnv::new(
        20,
        vec![account(60, 11)],
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await;
    let child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_adesync"))
            .arg("--config")
            .arg(&env.config_path)
            .arg("run")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let db = env.dir.path().join("adesync.db");
    let mut walked = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Store::open_read_only(&db)
            .and_then(|s| s.org_counts("org0"))
            .is_ok_and(|c| c.devices == 80)
        {
            walked = true;
            break;
        }
    }
    assert!(walked, "the daemon walked the account");
    let base = format!("http://127.0.0.1:{port}");
    let mut text = String::new();
    for _ in 0..30 {
        text = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("adesync_org_devices{account=\"org0\",state=\"listed\"} 80") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        text.contains("adesync_org_devices{account=\"org0\",state=\"listed\"} 80"),
        "{text}"
    );
    assert!(text.contains("adesync_org_last_complete_walk_timestamp_seconds{account=\"org0\"}"));
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200, "{}", health.text().await.unwrap());
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut child = child;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_accounts_test_says_what_apple_answered() {
    let env = OrgEnv::new(0, vec![account(5, 12)], "").await;
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        cmd.arg("--config").arg(&env.config_path).args(args);
        cmd
    };
    let out = output(run(&["org-accounts", "test", "org0"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Apple issued an access token"), "{text}");
    assert!(text.contains("business.api"), "{text}");
    assert_eq!(env.mock.org_stats(0).tokens_issued, 1);
    // The list shows the account and that its key is usable.
    let out = output(run(&["org-accounts", "--format", "json"])).await;
    let row: Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(row["account"], "org0");
    assert_eq!(row["key"], "ok");
    // Another key: Apple's answer, and what to check.
    let other = openssl::ec::EcKey::generate(
        &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
    )
    .unwrap();
    std::fs::write(
        env.dir.path().join("org0.pem"),
        other.private_key_to_pem().unwrap(),
    )
    .unwrap();
    let out = output(run(&["org-accounts", "test", "org0"])).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid_client"), "{err}");
    assert!(!err.contains("BEGIN EC PRIVATE KEY"));
    let out = output(run(&["org-accounts", "test", "nope"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("configured: org0"));
}

fn a_walk_stuck_on_a_cursor_starts_the_list_again_and_a_vanished_server_is_skipped(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(b, 0, vec![account(500, 13)], ""));
    // Page 2 answers with the cursor it was sent: this run fails...
    fault_the_walk_at_page(&env, 2, FaultKind::SameCursor, 1);
    let report = rt.block_on(env.run());
    assert!(
        matches!(report.org_failed[0].1, OrgSyncError::SameCursor(_)),
        "{report:?}"
    );
    // ...and the next starts the device list again instead of failing at that cursor.
    assert!(env.store().org_walk("org0").unwrap().cursor.is_none());
    // A server's device list that is gone (404) counts as empty; the walk completes.
    env.mock.push_org_fault(
        0,
        OrgEndpoint::ServerDevices,
        Fault {
            times: 1,
            kind: FaultKind::Status {
                status: 404,
                body: String::new(),
                headers: vec![],
            },
        },
    );
    let report = rt.block_on(env.run());
    assert!(report.org_failed.is_empty(), "{report:?}");
    assert!(report.org_ok[0].complete);
    assert_eq!(counts(&org_events(&env.store())).0, 500, "nothing doubled");
}

/// The `adesync` binary with `config`.
fn adesync_with(config: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
    cmd.arg("--config").arg(config);
    cmd
}

/// The env's config for replica `name`: its connections carry that application_name.
fn replica_config(env: &OrgEnv, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let schema = env.database.rsplit("search_path%3D").next().unwrap();
    let url = env
        .database
        .replace(&format!("application_name={schema}&"), "");
    let text = text.replace(
        &format!("database = \"{}\"", env.database),
        &format!("database = \"{url}&application_name={name}\""),
    );
    let path = env.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// While another connection holds an organisation account, `run` leaves it alone and
/// says who has it; `status` (table and JSON) and the daemon's `/metrics` name the holder;
/// once it lets go, the next run walks the account.
#[test]
fn postgres_an_account_being_walked_is_left_to_its_replica() {
    if super::common::postgres_url("postgres_an_account_being_walked_is_left_to_its_replica")
        .is_none()
    {
        return;
    }
    let rt = runtime();
    let port = super::common::free_port();
    let env = rt.block_on(OrgEnv::on(
        Backend::Postgres,
        5,
        vec![account(120, 31)],
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    ));
    // The holder has a name of its own, so what is named is the holder, not the runner.
    let replica = "the-holder";
    let holder_url = env.database.replace(
        &format!(
            "application_name={}",
            super::common::application_name(&env.database)
        ),
        &format!("application_name={replica}"),
    );
    let mut holder =
        Store::open(adesync::config::Database::postgres(&holder_url, None).unwrap()).unwrap();
    assert_eq!(holder.own_account("org0").unwrap(), None, "free at first");
    let report = rt.block_on(env.run());
    assert!(report.org_failed.is_empty(), "{report:?}");
    let held = report.org_ok[0].held_by.clone().unwrap_or_default();
    assert!(held.starts_with(replica), "{report:?}");
    assert_eq!(report.org_ok[0].pages, 0);
    assert_eq!(
        env.store().org_counts("org0").unwrap().devices,
        0,
        "left alone"
    );
    // The ADE token is not the account: it synced.
    assert_eq!(env.store().device_counts("acme").unwrap().0, 5);

    let out = rt.block_on(output({
        let mut c = adesync_with(&env.config_path);
        c.arg("status");
        c
    }));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("org account org0: being walked now by {replica}")),
        "{text}"
    );
    let out = rt.block_on(output({
        let mut c = adesync_with(&env.config_path);
        c.args(["status", "--format", "json"]);
        c
    }));
    let org_line: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["account"] == "org0")
        .unwrap();
    assert!(
        org_line["walked_by"]
            .as_str()
            .is_some_and(|b| b.starts_with(replica)),
        "{org_line}"
    );

    let mut daemon = KillOnDrop(
        adesync_with(&env.config_path)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let want = format!("adesync_org_account_walked_by{{account=\"org0\",replica=\"{replica}\"}} 1");
    let metrics = super::common::metrics_once_they_show(&rt, port, &want);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    daemon.wait().unwrap();
    assert!(metrics.contains(&want), "{metrics}");
    assert_eq!(env.store().org_counts("org0").unwrap().devices, 0);

    drop(holder);
    let report = rt.block_on(env.run());
    assert!(report.org_failed.is_empty(), "{report:?}");
    assert_eq!(report.org_ok[0].held_by, None);
    let store = env.store();
    assert_org_mirrors(&store, &env.mock, 0);
    // The organisation holds the token's 5 devices too.
    assert_eq!(counts(&org_events(&store)), (125, 0, 0));
}

/// Two replicas walk three organisation accounts of one PostgreSQL mirror: while one walks
/// them, the other leaves them alone; the first is killed with SIGKILL mid-walk, and the
/// second takes every account over at its next run and finishes the walks where the
/// committed pages left them. Every device is stored once, with exactly one event.
#[test]
fn postgres_a_replica_killed_mid_walk_leaves_its_accounts_to_another() {
    if super::common::postgres_url(
        "postgres_a_replica_killed_mid_walk_leaves_its_accounts_to_another",
    )
    .is_none()
    {
        return;
    }
    const DEVICES: usize = 15_000;
    let rt = runtime();
    let env = rt.block_on(OrgEnv::on(
        Backend::Postgres,
        0,
        (0..3).map(|i| account(DEVICES, 40 + i)).collect(),
        "",
    ));
    let accounts: Vec<String> = (0..3).map(|i| format!("org{i}")).collect();
    let (a, b) = (
        replica_config(&env, "replica-a"),
        replica_config(&env, "replica-b"),
    );
    let mut first = KillOnDrop(
        adesync_with(&a)
            .args(["run", "--once"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let store = env.store();
    let started = std::time::Instant::now();
    // Wait until replica-a holds every account and has committed pages of each.
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "replica-a never walked all accounts"
        );
        let held = store.account_holders(&accounts).unwrap();
        let walking = held
            .iter()
            .filter(|(_, h)| h.starts_with("replica-a"))
            .count();
        let written = accounts
            .iter()
            .all(|n| store.org_counts(n).unwrap().devices > 0);
        if walking == 3 && written {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // replica-b, meanwhile, leaves all three alone.
    let out = rt.block_on(output({
        let mut c = adesync_with(&b);
        c.args(["run", "--once"]).env("RUST_LOG", "info");
        c
    }));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        log.matches("another replica is walking this account")
            .count(),
        3,
        "{log}"
    );
    first.kill().unwrap();
    let killed_at = std::time::Instant::now();
    first.wait().unwrap();
    let partial: Vec<u64> = accounts
        .iter()
        .map(|n| store.org_counts(n).unwrap().devices)
        .collect();
    assert!(
        partial.iter().any(|n| (*n as usize) < DEVICES),
        "the walks finished before the kill: {partial:?}"
    );
    let out = rt.block_on(output({
        let mut c = adesync_with(&b);
        c.args(["run", "--once"]).env("RUST_LOG", "warn");
        c
    }));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "replica-a killed with {partial:?} of {DEVICES} devices stored per account; replica-b finished every walk {:?} after the kill",
        killed_at.elapsed()
    );
    for i in 0..3 {
        assert_org_mirrors(&store, &env.mock, i);
    }
    let evs = org_events(&store);
    assert_eq!(counts(&evs), (3 * DEVICES, 0, 0));
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for e in &evs {
        *per.entry((e.token_name.clone(), e.serial_number.clone()))
            .or_default() += 1;
    }
    assert!(per.values().all(|n| *n == 1), "one event per device");
}

/// What the CLI shows of the organisation: its devices (removed ones too) and every event.
fn org_cli_view(rt: &tokio::runtime::Runtime, config: &std::path::Path) -> (String, String) {
    let run = |args: &[&str]| {
        let mut c = adesync_with(config);
        c.args(args);
        let out = rt.block_on(output(c));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    (
        run(&["org-devices", "--removed", "--format", "json"]),
        run(&["events", "--format", "json", "--limit", "100000"]),
    )
}

/// `store copy` moves the organisation's inventory along, even in the middle of a walk:
/// devices (with their ids, which the walk's seen-set names), servers, AppleCare coverage,
/// where each walk stands and the organisation events. The CLI shows the same on both
/// sides, and the walk finishes on PostgreSQL with exactly the removals it owed, once.
#[test]
fn postgres_store_copy_moves_the_organisations_inventory_mid_walk() {
    if super::common::postgres_url("postgres_store_copy_moves_the_organisations_inventory_mid_walk")
        .is_none()
    {
        return;
    }
    let rt = runtime();
    let env = rt.block_on(OrgEnv::new(10, vec![account(490, 50)], ""));
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("page_size = 100\n", "page_size = 100\napplecare = true\n");
    std::fs::write(&env.config_path, text).unwrap();
    rt.block_on(env.run());
    let gone = env.mock.pick_org_devices(0, 4);
    env.mock.release_org_devices(0, &gone);
    // The next walk stops after two pages, past every retry.
    fail_the_walk_at_page_3(&env);
    let report = rt.block_on(env.run());
    assert_eq!(report.org_failed.len(), 1, "{report:?}");
    let lite = env.store();
    assert!(lite.org_walk("org0").unwrap().cursor.is_some(), "mid-walk");
    let serial = env.mock.org_devices(0)[0].serial.clone();
    let coverage = lite.applecare_of("org0", &serial).unwrap();
    assert!(!coverage.is_empty());
    let walk = lite.org_walk("org0").unwrap();
    drop(lite);
    let before = org_cli_view(&rt, &env.config_path);

    let url = fresh_postgres_database();
    let out = rt.block_on(output({
        let mut c = adesync_with(&env.config_path);
        c.args(["store", "copy", "--to", &url]);
        c
    }));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("and 1 organisation accounts' walks, 500 organisation devices"),
        "{said}"
    );
    let pg_config = env.dir.path().join("pg.toml");
    std::fs::write(
        &pg_config,
        std::fs::read_to_string(&env.config_path).unwrap().replace(
            "database = \"adesync.db\"",
            &format!("database = \"{url}\""),
        ),
    )
    .unwrap();
    let after = org_cli_view(&rt, &pg_config);
    assert_eq!(
        after.0, before.0,
        "organisation devices differ after the copy"
    );
    assert_eq!(after.1, before.1, "events differ after the copy");
    let pg = Store::open(adesync::config::Database::postgres(&url, None).unwrap()).unwrap();
    assert_eq!(
        pg.org_walk("org0").unwrap(),
        walk,
        "the walk stands where it stood"
    );
    assert_eq!(pg.applecare_of("org0", &serial).unwrap(), coverage);
    let copied_events = pg.max_event_id().unwrap();

    // The walk finishes on PostgreSQL: the four releases, once each, nothing re-added; new
    // devices get ids after the copied ones.
    let bought = env.mock.add_org_devices(0, 3, None);
    let out = rt.block_on(output({
        let mut c = adesync_with(&pg_config);
        c.args(["run", "--once"]);
        c
    }));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new: Vec<StoredEvent> = org_events(&pg)
        .into_iter()
        .filter(|e| e.id > copied_events)
        .collect();
    let of = |kind: EventKind| {
        let mut v: Vec<&str> = new
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.serial_number.as_str())
            .collect();
        v.sort();
        v
    };
    let mut want: Vec<&str> = gone.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(of(EventKind::Deleted), want);
    let mut want: Vec<&str> = bought.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(of(EventKind::Added), want);
    assert_eq!(new.len(), 7);
    assert_org_mirrors(&pg, &env.mock, 0);
}

fn resources(json: Value) -> Vec<adesync::orgapi::RawResource> {
    serde_json::from_str(&json.to_string()).unwrap()
}

on_both_backends!(
    odd_org_values_read_back_exactly_and_are_no_change_when_sent_again,
    a_repeated_serial_or_an_unusable_id_never_stops_a_walk,
);

/// Attributes a column cannot hold as they are — a NUL character, a number where text is
/// documented, a list where a string is, a boolean that is not one — come back exactly on
/// PostgreSQL (the row) and on both (the event); sent again they are no change, and a real
/// change next to them is the only one reported.
fn odd_org_values_read_back_exactly_and_are_no_change_when_sent_again(b: Backend) {
    let (_dir, mut store) = empty_store(b);
    let odd = serde_json::json!([{"type": "orgDevices", "id": "ODD1", "attributes": {
        "serialNumber": "ODD1", "deviceModel": "iPad\u{0}Pro", "productFamily": 42,
        "color": ["SPACE", "GRAY"], "isMdmMigrationCapable": "yes",
        "imei": ["35\u{0}1"], "status": "ASSIGNED", "newThing": {"a": "b\u{0}c"}}}]);
    let page = resources(odd.clone());
    let decoded = page[0].decode().unwrap();
    let now = "2026-01-01T00:00:00Z";
    let stats = store
        .apply_org_page("org", 1, page, Some("c1"), now)
        .unwrap();
    assert_eq!(stats.added, 1);
    let stored = store.org_devices(&OrgDeviceFilter::default()).unwrap();
    assert_eq!(stored.len(), 1);
    if b == Backend::Postgres {
        assert_eq!(stored[0].device, decoded, "the row");
    }
    let event = &org_events(&store)[0];
    assert_eq!(event.org_device.as_ref(), Some(&decoded), "the event");
    // Sent again: unchanged (the digest), no event.
    let stats = store
        .apply_org_page("org", 1, resources(odd.clone()), Some("c2"), now)
        .unwrap();
    assert_eq!(stats.unchanged, 1);
    // One real change beside them: only it is reported.
    let mut changed = odd;
    changed[0]["attributes"]["status"] = "UNASSIGNED".into();
    let stats = store
        .apply_org_page("org", 1, resources(changed), Some("c3"), now)
        .unwrap();
    assert_eq!(stats.modified, 1);
    let evs = org_events(&store);
    assert_eq!(evs.len(), 2);
    let changes: Vec<&String> = evs[1].changes.as_object().unwrap().keys().collect();
    if b == Backend::Postgres {
        assert_eq!(changes, ["status"]);
    } else {
        // SQLite's text columns hold a number as text: the known limit of its read-back.
        assert!(changes.contains(&&"status".to_owned()), "{changes:?}");
    }
}

/// A server's device list that repeats a serial, and devices whose ids are not serial
/// numbers (a NUL, too long), are stored or refused one by one: the walk goes on.
fn a_repeated_serial_or_an_unusable_id_never_stops_a_walk(b: Backend) {
    let (_dir, mut store) = empty_store(b);
    let now = "2026-01-01T00:00:00Z";
    store.record_org_run_start("org", now).unwrap();
    let listed = vec!["S1".to_owned(), "S1".to_owned(), "S2".to_owned()];
    store
        .stage_server_devices("org", "srv", &listed, None, true)
        .unwrap();
    let page = resources(serde_json::json!([
        {"type": "orgDevices", "id": "S1", "attributes": {"serialNumber": "S1"}},
        {"type": "orgDevices", "id": "AB\u{0}C", "attributes": {"status": "ASSIGNED"}},
        {"type": "orgDevices", "id": "X\u{0}Y", "attributes": {"serialNumber": "S3"}},
        {"type": "orgDevices", "id": "L".repeat(65), "attributes": {}},
    ]));
    let stats = store.apply_org_page("org", 1, page, None, now).unwrap();
    assert_eq!((stats.added, stats.refused), (2, 2), "{stats:?}");
    let serials: Vec<String> = store
        .org_devices(&OrgDeviceFilter::default())
        .unwrap()
        .into_iter()
        .map(|d| d.device.serial_number)
        .collect();
    assert_eq!(serials, ["S1", "S3"]);
    let walk = store.org_walk("org").unwrap();
    assert_eq!((walk.walk_run, walk.last_walk_devices), (2, Some(2)));
}

/// A walk whose connection the server ended (a restart, a cut network) can write nothing
/// more once another replica has taken the account: the lock went with the session.
#[test]
fn postgres_a_walk_that_lost_its_connection_writes_nothing_more() {
    if super::common::postgres_url("postgres_a_walk_that_lost_its_connection_writes_nothing_more")
        .is_none()
    {
        return;
    }
    let url = fresh_postgres_database();
    let schema = url.rsplit("search_path%3D").next().unwrap().to_owned();
    let db = adesync::config::Database::postgres(&url, None).unwrap();
    let mut owner = Store::open(&db).unwrap();
    assert_eq!(owner.own_account("org").unwrap(), None);
    let page = |id: &str| {
        resources(serde_json::json!([{"type": "orgDevices", "id": id, "attributes": {}}]))
    };
    owner
        .apply_org_page("org", 1, page("S1"), Some("c1"), "2026-01-01T00:00:00Z")
        .unwrap();
    assert!(super::common::terminate_sessions(&schema) >= 1);
    std::thread::sleep(Duration::from_millis(200));
    let mut next = Store::open(&db).unwrap();
    assert_eq!(next.own_account("org").unwrap(), None, "taken over");
    assert!(owner
        .apply_org_page("org", 1, page("S2"), Some("c2"), "2026-01-01T00:00:01Z")
        .is_err());
    let serials: Vec<String> = next
        .org_devices(&OrgDeviceFilter::default())
        .unwrap()
        .into_iter()
        .map(|d| d.device.serial_number)
        .collect();
    assert_eq!(serials, ["S1"]);
    assert_eq!(org_events(&next).len(), 1);
}

/// On PostgreSQL an ADE deletion and the organisation's removal of the same device may be
/// written at the same moment by two replicas. Each decides its event by reading the
/// other's side, so neither may miss the other: both are held at the point where they read
/// (here by a third session holding the event-id counter, which is where they wait for
/// each other), then let go together. Whichever commits first, the device's story ends
/// with exactly one `released` event.
#[test]
fn postgres_an_ade_deletion_and_an_organisation_removal_at_once_end_in_one_release() {
    use adesync::model::{Device, DeviceRecord, OpType, Phase, Reason};
    use adesync::store::{CursorState, PageWrite};
    if super::common::postgres_url(
        "postgres_an_ade_deletion_and_an_organisation_removal_at_once_end_in_one_release",
    )
    .is_none()
    {
        return;
    }
    let url = fresh_postgres_database();
    let schema = super::common::application_name(&url);
    let db = adesync::config::Database::postgres(&url, None).unwrap();
    let device = Device {
        serial_number: "S1".into(),
        model: Some("iPad".into()),
        ..Device::default()
    };
    let page = |records: &[DeviceRecord], kind: Phase, cursor: &str, completes: bool| {
        let mut store = Store::open(&db).unwrap();
        store
            .apply_page(&PageWrite {
                token: "acme",
                kind,
                records,
                next: CursorState {
                    phase: if completes { Phase::Sync } else { kind },
                    cursor: Some(cursor.into()),
                    fetch_run: 1,
                },
                fetched_until: None,
                completes_fetch: completes,
                now: "2026-01-01T00:00:00Z",
                unreadable: &[],
                expect_new: false,
                prepared: None,
            })
            .unwrap();
    };
    let fetched = [DeviceRecord {
        device: device.clone(),
        op_type: None,
        op_date: None,
    }];
    page(&fetched, Phase::Fetch, "c1", true);
    let org_page = |run: i64, listed: Value| {
        let mut store = Store::open(&db).unwrap();
        store
            .apply_org_page("org", run, resources(listed), None, "2026-01-01T00:00:01Z")
            .unwrap();
    };
    org_page(
        1,
        serde_json::json!([{"type": "orgDevices", "id": "S1", "attributes": {}}]),
    );

    // A third session holds the counter; both writers start and must stop at it.
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut hold = admin.transaction().unwrap();
    hold.execute("SELECT 1 FROM event_ids FOR UPDATE", &[])
        .unwrap();
    let deleted = [DeviceRecord {
        device,
        op_type: Some(OpType::Deleted),
        op_date: Some("2026-01-01T00:00:02Z".into()),
    }];
    std::thread::scope(|threads| {
        threads.spawn(|| page(&deleted, Phase::Sync, "c2", false));
        threads.spawn(|| org_page(2, serde_json::json!([])));
        let mut watch = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let started = std::time::Instant::now();
        loop {
            let waiting: i64 = watch
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE NOT l.granted AND a.application_name = $1",
                    &[&schema],
                )
                .unwrap()
                .get(0);
            if waiting >= 2 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "both writers should wait for the counter ({waiting} waiting)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        hold.commit().unwrap();
    });

    let store = Store::open(&db).unwrap();
    let story: Vec<Option<Reason>> = store
        .events_of(0, Some("acme"), Some("S1"), 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventKind::Deleted)
        .map(|e| e.reason)
        .collect();
    assert_eq!(story.last(), Some(&Some(Reason::Released)), "{story:?}");
    assert_eq!(
        story
            .iter()
            .filter(|r| **r == Some(Reason::Released))
            .count(),
        1,
        "{story:?}"
    );
}
