//! Each device event's `reason`, produced by a simulator scenario; protocol-10 fields in
//! their columns; replacement details.

use std::collections::HashMap;

use adesync::events::{event_json, EventScope};
use adesync::model::{EventKind, Reason};
use adesync::store::{DeviceFilter, StoredEvent};
use adesync::syncer::run_all_once;
use serde_json::{json, Value};

use crate::common::{adesync, output, Env};
use crate::on_both_backends;

on_both_backends!(a_release_the_organisation_saw_makes_a_released_event);

/// The device events after `after`, with their derived reasons.
fn events_after(env: &Env, after: i64) -> Vec<StoredEvent> {
    env.store()
        .events_after(after, None, 1 << 40)
        .unwrap()
        .into_iter()
        .filter(|e| e.scope == EventScope::Device)
        .collect()
}

fn reason_of(e: &StoredEvent) -> String {
    event_json(e)["reason"].as_str().unwrap().to_owned()
}

/// Syncs and returns the new device events by serial (one each).
async fn sync_events(env: &Env) -> HashMap<String, StoredEvent> {
    let before = env.store().max_event_id().unwrap();
    let report = run_all_once(&env.config(), None).await;
    assert!(report.failed.is_empty(), "{report:?}");
    let evs = events_after(env, before);
    let map: HashMap<String, StoredEvent> = evs
        .iter()
        .map(|e| (e.serial_number.clone(), e.clone()))
        .collect();
    assert_eq!(map.len(), evs.len(), "one event per device");
    map
}

fn set_profile(env: &Env, serial: &str, status: &str) {
    assert!(env.mock.modify_device(serial, |m| {
        m.insert("profile_status".into(), json!(status));
        match status {
            "assigned" | "pushed" => {
                m.insert(
                    "profile_uuid".into(),
                    json!("C1F123098EB5074580041E69883004C3"),
                );
            }
            _ => {
                m.remove("profile_uuid");
                m.remove("profile_assign_time");
                m.remove("profile_push_time");
            }
        }
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_but_released_comes_from_a_simulator_scenario() {
    let env = Env::new(60, 100).await;
    let first = sync_events(&env).await;
    assert!(first.values().all(|e| reason_of(e) == "assigned"));
    let serials = env.mock.serials();

    // A new device; profiles assigned, pushed and cleared; a field; a move away.
    let new = env.mock.add_devices(1);
    set_profile(&env, &serials[0], "empty");
    set_profile(&env, &serials[1], "empty");
    set_profile(&env, &serials[2], "pushed");
    env.mock.modify_device(&serials[3], |m| {
        m.insert("asset_tag".into(), json!("TAG-NEW"));
    });
    set_profile(&env, &serials[4], "removed");
    env.mock.delete_devices(&serials[5..6]);
    let replaced = env.mock.replace_devices(&serials[6..7]);
    sync_events(&env).await; // settle: some starting profiles were already "empty"
    set_profile(&env, &serials[0], "assigned");
    set_profile(&env, &serials[1], "pushed");
    set_profile(&env, &serials[2], "empty");
    let evs = sync_events(&env).await;
    let want = [
        (&serials[0], "profile_assigned"),
        (&serials[1], "profile_pushed"),
        (&serials[2], "profile_removed"),
    ];
    for (serial, reason) in want {
        assert_eq!(reason_of(&evs[serial]), reason, "{serial}");
    }
    let story = env.store();
    let all = events_after(&env, 0);
    let last = |serial: &str| {
        all.iter()
            .rev()
            .find(|e| e.serial_number == serial)
            .cloned()
            .unwrap()
    };
    assert_eq!(reason_of(&last(&new[0])), "assigned");
    assert_eq!(reason_of(&last(&serials[3])), "updated");
    assert_eq!(reason_of(&last(&serials[4])), "unassigned");
    let deleted = last(&serials[5]);
    assert_eq!(
        (deleted.kind, reason_of(&deleted)),
        (EventKind::Deleted, "unassigned".into())
    );
    let original = last(&serials[6]);
    assert_eq!(original.kind, EventKind::Deleted);
    assert_eq!(reason_of(&original), "replaced");
    assert_eq!(
        event_json(&original)["device"]["released_by_replacement"],
        json!(true)
    );
    let replacement = last(&replaced[0]);
    assert_eq!(reason_of(&replacement), "assigned");
    assert_eq!(
        event_json(&replacement)["device"]["is_replacement_device"],
        json!(true)
    );
    // Its details were asked for once, and link the two devices.
    assert_eq!(
        env.mock
            .count_requests(adesync_mock::Endpoint::ReplacementDetails),
        1
    );
    let (links, by) = story.replacement_links(&replaced[0]).unwrap();
    assert_eq!(links.unwrap().0, serials[6]);
    assert!(by.is_empty());
    assert_eq!(
        story.replacement_links(&serials[6]).unwrap().1,
        vec![replaced[0].clone()]
    );

    // Back: the moved-away device returns to the server, the deleted one is reassigned.
    set_profile(&env, &serials[4], "empty");
    assert_eq!(env.mock.reassign_devices(&serials[5..6]), 1);
    let evs = sync_events(&env).await;
    assert_eq!(reason_of(&evs[&serials[4]]), "returned");
    assert_eq!(evs[&serials[5]].kind, EventKind::Added);
    assert_eq!(reason_of(&evs[&serials[5]]), "returned");

    // Every reason the scenario produced is listed by --reason, and only those.
    for (reason, serial) in [("returned", &serials[5]), ("replaced", &serials[6])] {
        let out = output({
            let mut c = adesync(&env);
            c.args(["events", "--reason", reason, "--format", "json"]);
            c
        })
        .await;
        assert!(out.status.success());
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.iter().all(|l| l["reason"] == reason), "{lines:?}");
        assert!(lines.iter().any(|l| l["serial_number"] == serial.as_str()));
    }
    // The story of one device, as a timeline.
    let out = output({
        let mut c = adesync(&env);
        c.args(["device", &replaced[0]]);
        c
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Story:"), "{text}");
    assert!(text.contains(&format!("Replaces {}", serials[6])), "{text}");
    let out = output({
        let mut c = adesync(&env);
        c.args(["device", &serials[4]]);
        c
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    for r in ["assigned", "unassigned", "returned"] {
        assert!(text.contains(r), "{r}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_10_fields_are_columns_and_version_7_gets_none() {
    let env = Env::new(80, 100).await;
    run_all_once(&env.config(), None).await;
    let db = rusqlite::Connection::open(env.path("adesync.db")).unwrap();
    let (with_wifi, with_imei): (i64, i64) = db
        .query_row(
            "SELECT COUNT(wifi_mac_address), COUNT(imei) FROM devices",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        with_wifi, 80,
        "every device has a Wi-Fi address at protocol 10"
    );
    assert!(with_imei > 0);
    let leftover: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM devices WHERE extra_json LIKE '%imei%' OR extra_json LIKE '%mac_address%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(leftover, 0, "protocol-10 fields are not also in extra_json");
    let imei: String = db
        .query_row(
            "SELECT json_extract(imei, '$[0]') FROM devices WHERE imei IS NOT NULL LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let out = output({
        let mut c = adesync(&env);
        c.args(["devices", "--imei", &imei, "--format", "csv"]);
        c
    })
    .await;
    let csv = String::from_utf8_lossy(&out.stdout);
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().next().unwrap().contains(",imei,"));
    assert!(csv.contains(&imei));
    // The same devices re-fetched: no event for the fields (a string became a list).
    let before = env.store().max_event_id().unwrap();
    let out = output({
        let mut c = adesync(&env);
        c.args(["run", "--once", "--full"]);
        c
    })
    .await;
    assert!(out.status.success());
    assert_eq!(
        env.store().max_event_id().unwrap(),
        before,
        "nothing changed"
    );

    // A token speaking protocol 7 sees none of them.
    let env7 = Env::with(
        adesync_mock::MockConfig {
            devices: 20,
            ..Default::default()
        },
        100,
        "protocol_version = 7\n",
    )
    .await;
    run_all_once(&env7.config(), None).await;
    let stored = env7.store().devices(&DeviceFilter::default()).unwrap();
    assert!(stored
        .iter()
        .all(|d| d.device.v10("wifi_mac_address").is_none() && d.device.v10("imei").is_none()));
}

/// On both backends: the organisation's release reaches the ADE side's story.
fn a_release_the_organisation_saw_makes_a_released_event(b: crate::common::Backend) {
    let rt = crate::common::runtime();
    let env = rt.block_on(crate::org::OrgEnv::on(
        b,
        30,
        vec![crate::org::account(10, 21)],
        "",
    ));
    rt.block_on(env.run());
    let serials = env.mock.serials();
    let store = || env.store();
    let device_event = |serial: &str| {
        store()
            .events_after(0, None, 1 << 40)
            .unwrap()
            .into_iter()
            .rev()
            .find(|e| e.scope == EventScope::Device && e.serial_number == serial)
            .unwrap()
    };
    // Unassigned first, released from the organisation later: its own released event.
    env.mock.delete_devices(&serials[0..1]);
    rt.block_on(env.run());
    assert_eq!(reason_of(&device_event(&serials[0])), "unassigned");
    env.mock.release_org_devices(0, &serials[0..1]);
    rt.block_on(env.run());
    let e = device_event(&serials[0]);
    assert_eq!(
        (e.kind, reason_of(&e)),
        (EventKind::Deleted, "released".into())
    );
    assert_eq!(e.token_name, "acme");

    // Released from the organisation first, the ADE deletion follows: released at once.
    env.mock.release_org_devices(0, &serials[1..2]);
    rt.block_on(env.run());
    env.mock.delete_devices(&serials[1..2]);
    rt.block_on(env.run());
    let e = device_event(&serials[1]);
    assert_eq!(
        (e.kind, e.reason),
        (EventKind::Deleted, Some(Reason::Released))
    );
    // Exactly one deleted event for it.
    let n = store()
        .events_after(0, None, 1 << 40)
        .unwrap()
        .iter()
        .filter(|e| {
            e.scope == EventScope::Device
                && e.serial_number == serials[1]
                && e.kind == EventKind::Deleted
        })
        .count();
    assert_eq!(n, 1);
}
