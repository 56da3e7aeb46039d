//! Enrollment profile assignment against the simulator (and wiremock for the batching):
//! new and returned devices get their profile, Apple's answers are kept and honoured, a
//! changed profile file is defined again, the dry run touches nothing.

use std::collections::HashMap;
use std::time::Duration;

use adesync::events::EventScope;
use adesync::syncer::run_all_once;
use adesync_mock::{AssignStatus, Endpoint, MockConfig};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::common::{adesync, kill_after, output, run_once, runtime, Backend, Env};
use crate::on_both_backends;

const RULES: &str = r#"
[[profiles]]
name = "corp-mac"
file = "corp-mac.json"

[[profiles]]
name = "shared-ipad"
file = "shared-ipad.json"

[[assign]]
profile = "corp-mac"
match = { device_family = "Mac" }

[[assign]]
profile = "shared-ipad"
match = { device_family = "iPad" }
"#;

async fn env(devices: usize, extra: &str) -> Env {
    env_on(Backend::Sqlite, devices, extra).await
}

async fn env_on(b: Backend, devices: usize, extra: &str) -> Env {
    let env = Env::on(
        b,
        MockConfig {
            devices,
            ..Default::default()
        },
        1000,
        &format!("{RULES}{extra}"),
    )
    .await;
    write_profile(&env, "corp-mac", "Corp Mac");
    write_profile(&env, "shared-ipad", "Shared iPad");
    env
}

fn write_profile(env: &Env, name: &str, title: &str) {
    std::fs::write(
        env.path(&format!("{name}.json")),
        json!({"profile_name": title, "url": "https://mdm.example.com/enroll",
               "is_supervised": true, "skip_setup_items": ["Location", "Siri"]})
        .to_string(),
    )
    .unwrap();
}

/// family → serials, from the simulator.
fn by_family(env: &Env) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for d in env.mock.devices() {
        m.entry(d["device_family"].as_str().unwrap().to_owned())
            .or_default()
            .push(d["serial_number"].as_str().unwrap().to_owned());
    }
    m
}

fn uuid_of(env: &Env, name: &str) -> String {
    env.mock
        .profiles()
        .into_iter()
        .rev()
        .find(|(_, p)| p["profile_name"] == name)
        .map(|(u, _)| u)
        .unwrap()
}

fn assigned_serials(env: &Env) -> Vec<Vec<String>> {
    env.mock
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::AssignProfile)
        .map(|r| r.serials())
        .collect()
}

async fn run(env: &Env) {
    let report = run_all_once(&env.config(), None).await;
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(
        report.ok.iter().all(|s| s.assign_error.is_none()),
        "{report:?}"
    );
}

on_both_backends!(new_devices_get_their_profile_and_apple_shows_it_on_the_next_sync);

/// On both backends (the store is used from this thread, the simulator from the runtime).
fn new_devices_get_their_profile_and_apple_shows_it_on_the_next_sync(b: Backend) {
    let rt = runtime();
    let env = rt.block_on(env_on(b, 300, ""));
    rt.block_on(run(&env));
    let fam = by_family(&env);
    let mac = uuid_of(&env, "Corp Mac");
    let ipad = uuid_of(&env, "Shared iPad");
    for d in env.mock.devices() {
        let want = match d["device_family"].as_str().unwrap() {
            "Mac" => Some(&mac),
            "iPad" => Some(&ipad),
            _ => None,
        };
        match want {
            Some(u) => assert_eq!(d["profile_uuid"].as_str(), Some(u.as_str()), "{d}"),
            None => assert_ne!(d["profile_uuid"].as_str(), Some(mac.as_str())),
        }
    }
    let store = env.store();
    let evs: Vec<_> = store
        .events_after(0, None, 1 << 40)
        .unwrap()
        .into_iter()
        .filter(|e| e.scope == EventScope::Profile)
        .collect();
    assert_eq!(evs.len(), fam["Mac"].len() + fam["iPad"].len());
    let j = adesync::events::event_json(&evs[0]);
    assert_eq!(j["type"], "profile.assigned");
    assert_eq!(j["device"]["status"], "SUCCESS");
    // Every profile event validates against the published schema.
    let v = crate::common::schema();
    for e in &evs {
        crate::common::assert_valid(&v, &adesync::events::event_json(e));
    }
    // The next sync shows Apple's change as profile_assigned; nothing is assigned again.
    let calls = assigned_serials(&env).len();
    rt.block_on(run(&env));
    assert_eq!(assigned_serials(&env).len(), calls, "no second call");
    let stored = store
        .devices(&adesync::store::DeviceFilter {
            family: Some("Mac".into()),
            ..Default::default()
        })
        .unwrap();
    assert!(stored
        .iter()
        .all(|d| d.device.profile_uuid.as_deref() == Some(mac.as_str())));
    // A device added later is assigned after the sync that brings it.
    let before = assigned_serials(&env).len();
    let new = env.mock.add_devices(12);
    rt.block_on(run(&env));
    let calls = assigned_serials(&env);
    let newly: Vec<&String> = calls[before..].iter().flatten().collect();
    let fam = by_family(&env);
    for s in &new {
        let family_has_rule = fam["Mac"].contains(s) || fam["iPad"].contains(s);
        assert_eq!(newly.contains(&s), family_has_rule, "{s}");
    }
    // status counts them.
    let out = rt.block_on(output({
        let mut c = adesync(&env);
        c.args(["assign", "status", "--format", "json"]);
        c
    }));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(r#""profile":"corp-mac""#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moved_away_and_back_is_assigned_again() {
    let env = env(80, "").await;
    run(&env).await;
    let mac = by_family(&env)["Mac"][0].clone();
    // Moved to another MDM server: Apple says profile_status removed; then back.
    env.mock.modify_device(&mac, |m| {
        m.insert("profile_status".into(), json!("removed"));
        m.remove("profile_uuid");
    });
    run(&env).await;
    env.mock.modify_device(&mac, |m| {
        m.insert("profile_status".into(), json!("empty"));
    });
    let before = assigned_serials(&env).len();
    run(&env).await;
    let after = assigned_serials(&env);
    assert!(
        after[before..].iter().flatten().any(|s| s == &mac),
        "re-assigned when it returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_waits_for_its_cooldown_and_throttled_for_apples_wait() {
    let env = env(0, "\n[assignment]\nfailed_cooldown = \"1h\"\n").await;
    run(&env).await;
    env.mock.script_assignments(AssignStatus::Failed, 1, None);
    env.mock
        .script_assignments(AssignStatus::Throttled, 1, Some(600));
    let added = env.mock.add_devices(40);
    run(&env).await;
    let db = rusqlite::Connection::open(env.path("adesync.db")).unwrap();
    let rows: Vec<(String, String, Option<String>)> = db
        .prepare("SELECT serial_number, status, retry_after FROM profile_assignments WHERE status <> 'SUCCESS'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let failed = rows.iter().find(|r| r.1 == "FAILED").unwrap().clone();
    let throttled = rows.iter().find(|r| r.1 == "THROTTLED").unwrap().clone();
    let wait = |at: &Option<String>| {
        (adesync::model::parse_time(at.as_deref().unwrap()).unwrap() - chrono::Utc::now())
            .num_seconds()
    };
    assert!((3500..=3600).contains(&wait(&failed.2)), "failed_cooldown");
    assert!(
        (500..=600).contains(&wait(&throttled.2)),
        "Apple's retry_after_seconds"
    );
    assert!(added.contains(&failed.0) && added.contains(&throttled.0));
    // Before their time, neither is tried again.
    let before = assigned_serials(&env).len();
    run(&env).await;
    assert_eq!(assigned_serials(&env).len(), before);
    // Once the cooldown is over (moved into the past here), both are tried again.
    db.execute("UPDATE profile_assignments SET retry_after = '2000-01-01T00:00:00.000Z' WHERE status <> 'SUCCESS'", [])
        .unwrap();
    run(&env).await;
    let retried: Vec<String> = assigned_serials(&env)[before..]
        .iter()
        .flatten()
        .cloned()
        .collect();
    let mut want = vec![failed.0.clone(), throttled.0.clone()];
    want.sort();
    let mut got = retried.clone();
    got.sort();
    assert_eq!(got, want);
    let attempts: i64 = db
        .query_row(
            "SELECT attempts FROM profile_assignments WHERE serial_number = ?1",
            [&failed.0],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(attempts, 2);
    // NOT_ACCESSIBLE is not retried.
    env.mock
        .script_assignments(AssignStatus::NotAccessible, 1, None);
    let more = env.mock.add_devices(10);
    run(&env).await;
    let na: String = db
        .query_row(
            "SELECT serial_number FROM profile_assignments WHERE status = 'NOT_ACCESSIBLE'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(more.contains(&na));
    db.execute(
        "UPDATE profile_assignments SET retry_after = '2000-01-01T00:00:00.000Z'",
        [],
    )
    .unwrap();
    let before = assigned_serials(&env).len();
    run(&env).await;
    assert!(!assigned_serials(&env)[before..]
        .iter()
        .flatten()
        .any(|s| *s == na));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_profile_file_is_defined_again_and_its_devices_assigned_again() {
    let env = env(120, "").await;
    run(&env).await;
    let macs = by_family(&env)["Mac"].clone();
    let first = uuid_of(&env, "Corp Mac");
    run(&env).await; // Apple's change reaches the mirror.
    write_profile(&env, "corp-mac", "Corp Mac");
    std::fs::write(
        env.path("corp-mac.json"),
        json!({"profile_name": "Corp Mac", "url": "https://mdm.example.com/enroll2"}).to_string(),
    )
    .unwrap();
    let defined = env.mock.count_requests(Endpoint::DefineProfile);
    run(&env).await;
    assert_eq!(
        env.mock.count_requests(Endpoint::DefineProfile),
        defined + 1
    );
    let second = uuid_of(&env, "Corp Mac");
    assert_ne!(first, second);
    for d in env.mock.devices() {
        if macs.contains(&d["serial_number"].as_str().unwrap().to_owned()) {
            assert_eq!(d["profile_uuid"].as_str(), Some(second.as_str()), "{d}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_changes_nothing_and_says_nothing_is_known_before_a_sync() {
    let env = env(60, "").await;
    // Before the first sync: no database, exit 0.
    let out = output({
        let mut c = adesync(&env);
        c.args(["assign", "--dry-run"]);
        c
    })
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing is known"));
    assert!(!env.path("adesync.db").exists());
    // A mirror synced without the rules, which the rules would now change.
    let cfg = std::fs::read_to_string(&env.config_path).unwrap();
    let bare = env.path("bare.toml");
    std::fs::write(&bare, cfg.replace(RULES, "")).unwrap();
    let out = output({
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
        c.arg("--config").arg(&bare).args(["run", "--once"]);
        c
    })
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = env.mock.requests().len();
    let before = std::fs::read(env.path("adesync.db")).unwrap();
    let out = output({
        let mut c = adesync(&env);
        c.args(["assign", "--dry-run"]);
        c
    })
    .await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let macs = by_family(&env)["Mac"].len();
    assert!(
        text.contains(&format!(
            "rule 1 (device_family = \"Mac\" → corp-mac): {macs} device(s)"
        )),
        "{text}"
    );
    assert!(text.contains("new to the server"), "{text}");
    assert_eq!(env.mock.requests().len(), calls, "nothing sent to Apple");
    assert_eq!(
        std::fs::read(env.path("adesync.db")).unwrap(),
        before,
        "nothing written"
    );
}

/// Answers every serial of an assignment call SUCCESS.
struct AllSuccess;

impl Respond for AllSuccess {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        let devices: serde_json::Map<String, serde_json::Value> = body["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s.as_str().unwrap().to_owned(), json!("SUCCESS")))
            .collect();
        ResponseTemplate::new(200)
            .set_body_json(json!({"profile_uuid": body["profile_uuid"], "devices": devices}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_five_hundred_devices_take_three_calls() {
    let env = Env::with(
        MockConfig {
            devices: 2500,
            ..Default::default()
        },
        1000,
        "[[profiles]]\nname = \"all\"\nfile = \"all.json\"\n[[assign]]\nprofile = \"all\"\non = [\"full_fetch\"]\n",
    )
    .await;
    write_profile(&env, "all", "Everything");
    // Sync from the simulator with the rule's trigger not yet met (no full fetch seen by a
    // pass) would assign at once; so sync first with the rules off, then assign against
    // wiremock.
    let no_rules = adesync::config::Config {
        assign_rules: Vec::new(),
        ..env.config()
    };
    run_all_once(&no_rules, None).await;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/session"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"auth_session_token":"s"}"#))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/profile"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"profile_uuid": "AB12", "devices": {}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/profile/devices"))
        .respond_with(AllSuccess)
        .expect(3)
        .mount(&server)
        .await;
    let mut config = env.config();
    config.tokens[0].api_url = reqwest::Url::parse(&server.uri()).unwrap();
    let token = config.tokens[0].clone();
    let client = adesync::apple::AppleClient::new(
        token.load_token().unwrap(),
        adesync::syncer::client_settings(&config, &token),
    )
    .unwrap();
    let s = adesync::syncer::assign_token(&config, &token, &client)
        .await
        .unwrap();
    assert_eq!((s.calls, s.success, s.defined), (3, 2500, 1));
    let reqs = server.received_requests().await.unwrap();
    let sizes: Vec<usize> = reqs
        .iter()
        .filter(|r| r.url.path() == "/profile/devices")
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["devices"]
                .as_array()
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(sizes, vec![1000, 1000, 500]);
    for r in reqs.iter().filter(|r| r.url.path() == "/profile/devices") {
        let b: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(b["profile_uuid"], "AB12");
    }
}

/// A process killed while it assigns: each device ends assigned, with at most one repeated
/// call for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_assignment_loses_nothing_and_repeats_at_most_one_call() {
    let env = env(0, "").await;
    run(&env).await;
    env.mock.add_devices(3000);
    // Slow assignment answers, so the kills land around them.
    for _ in 0..6 {
        env.mock.push_fault(
            Endpoint::AssignProfile,
            adesync_mock::Fault {
                times: 1,
                kind: adesync_mock::FaultKind::Delay(Duration::from_millis(250)),
            },
        );
    }
    let mut kills = 0;
    for delay in [300u64, 550, 800] {
        let mut cmd = adesync(&env);
        cmd.args(["run", "--once"]);
        kills += kill_after(cmd, Duration::from_millis(delay)).await as usize;
    }
    assert!(kills >= 1, "the runs finished before a kill");
    let out = run_once(&env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fam = by_family(&env);
    let ruled: Vec<&String> = fam["Mac"].iter().chain(&fam["iPad"]).collect();
    let mut times: HashMap<String, usize> = HashMap::new();
    for s in assigned_serials(&env).into_iter().flatten() {
        *times.entry(s).or_default() += 1;
    }
    let db = rusqlite::Connection::open(env.path("adesync.db")).unwrap();
    for s in ruled {
        let status: String = db
            .query_row(
                "SELECT status FROM profile_assignments WHERE serial_number = ?1",
                [s],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(status, "SUCCESS", "{s}");
        assert!(times[s] <= 2, "{s} assigned {} times", times[s]);
    }
}
