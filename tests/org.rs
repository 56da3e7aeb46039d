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

use super::common::{output, write_token};

pub struct OrgEnv {
    pub dir: tempfile::TempDir,
    pub mock: MockHandle,
    pub config_path: PathBuf,
}

impl OrgEnv {
    /// A simulator with `ade` ADE devices and one organisation account per entry of
    /// `accounts`; a config with the token "acme" and accounts "org0", "org1", ….
    pub async fn new(ade: usize, accounts: Vec<OrgAccountConfig>, extra: &str) -> OrgEnv {
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
        let mut text = format!(
            "database = \"adesync.db\"\n{extra}\n\
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
        }
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).unwrap()
    }

    pub fn store(&self) -> Store {
        Store::open(self.dir.path().join("adesync.db")).unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_mirrors_the_organisation_with_one_event_per_device_and_a_rewalk_writes_nothing() {
    let env = OrgEnv::new(50, vec![account(250, 1)], "").await;
    let report = env.run().await;
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
    let mirrored: i64 = rusqlite::Connection::open(env.dir.path().join("adesync.db"))
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM inventory WHERE mirrored AND token_name = 'acme'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(mirrored, 50);

    // Identical data: no event, no row written.
    let before = max_updated(&store);
    let report = env.run().await;
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
    env.run().await;
    assert_eq!(
        org_events(&env.store()).len(),
        300,
        "no event for a change of shape"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_give_exactly_one_event_each_with_what_changed() {
    let env = OrgEnv::new(20, vec![account(180, 2)], "").await;
    env.run().await;
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
    let report = env.run().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_walk_removes_nothing_and_the_next_complete_one_removes_once() {
    let env = OrgEnv::new(0, vec![account(500, 3)], "").await;
    env.run().await;
    let gone = env.mock.pick_org_devices(0, 5);
    env.mock.release_org_devices(0, &gone);
    // Page 3 of the walk fails past every retry.
    env.mock.push_org_fault(
        0,
        OrgEndpoint::OrgDevices,
        Fault {
            times: 1,
            kind: FaultKind::Delay(Duration::ZERO),
        },
    );
    env.mock.push_org_fault(
        0,
        OrgEndpoint::OrgDevices,
        Fault {
            times: 1,
            kind: FaultKind::Delay(Duration::ZERO),
        },
    );
    env.mock.push_org_fault(
        0,
        OrgEndpoint::OrgDevices,
        Fault {
            times: 3,
            kind: FaultKind::Status {
                status: 500,
                body: String::new(),
                headers: vec![],
            },
        },
    );
    let report = env.run().await;
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

    let report = env.run().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_stay_apart() {
    let env = OrgEnv::new(10, vec![account(120, 4), account(80, 5)], "").await;
    let report = env.run().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applecare_coverage_is_fetched_once_per_refresh_and_a_429_is_waited_out() {
    let env = OrgEnv::new(0, vec![account(40, 6)], "").await;
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
    let report = env.run().await;
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
    let report = env.run().await;
    assert_eq!(report.org_ok[0].applecare, 0);
}

/// Nothing lost, nothing doubled: the `adesync` process killed with SIGKILL during a walk
/// of 30,000 devices, several times, then run to completion: exactly one `added` event per
/// device, and the mirror equals the simulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_walk_loses_and_doubles_nothing() {
    let env = OrgEnv::new(0, vec![account(30_000, 7)], "").await;
    // Only the account: the token would finish at once anyway.
    let mut kills = 0;
    for delay_ms in [300u64, 600, 900, 1200] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        cmd.arg("--config")
            .arg(&env.config_path)
            .args(["run", "--once", "--token", "org0"])
            .env("RUST_LOG", "warn");
        kills += crate::common::kill_after(cmd, Duration::from_millis(delay_ms)).await as usize;
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
    let out = output(cmd).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_devices_and_device_show_the_inventory() {
    let env = OrgEnv::new(10, vec![account(30, 10)], "").await;
    env.run().await;
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        cmd.arg("--config").arg(&env.config_path).args(args);
        cmd
    };
    let out = output(run(&["org-devices", "--unassigned", "--format", "json"])).await;
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
    let out = output(run(&["org-devices", "--format", "csv"])).await;
    let csv = String::from_utf8_lossy(&out.stdout);
    assert_eq!(csv.lines().count(), 41);
    assert!(csv.lines().next().unwrap().contains("ethernet_mac_address"));
    // A serial both mirrored by the token and known to the organisation: both sides.
    let serial = env.mock.serials()[0].clone();
    let out = output(run(&["device", &serial])).await;
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
    let out = output(run(&["status"])).await;
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
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"))
        .arg("--config")
        .arg(&env.config_path)
        .arg("run")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_stuck_on_a_cursor_starts_the_list_again_and_a_vanished_server_is_skipped() {
    let env = OrgEnv::new(0, vec![account(500, 13)], "").await;
    // Page 2 answers with the cursor it was sent: this run fails...
    env.mock.push_org_fault(
        0,
        OrgEndpoint::OrgDevices,
        Fault {
            times: 1,
            kind: FaultKind::Delay(Duration::ZERO),
        },
    );
    env.mock.push_org_fault(
        0,
        OrgEndpoint::OrgDevices,
        Fault {
            times: 1,
            kind: FaultKind::SameCursor,
        },
    );
    let report = env.run().await;
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
    let report = env.run().await;
    assert!(report.org_failed.is_empty(), "{report:?}");
    assert!(report.org_ok[0].complete);
    assert_eq!(counts(&org_events(&env.store())).0, 500, "nothing doubled");
}
