//! The built `adesync` binary: exit codes, output formats, and a process killed mid-sync.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{adesync, assert_mirrors, event_counts, kill_after, output, run_once, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_then_query_devices_and_events() {
    let env = Env::with(
        adesync_mock::MockConfig {
            devices: 120,
            ..Default::default()
        },
        50,
        "[[sinks]]\nname = \"out\"\ntype = \"jsonl\"\npath = \"-\"\n",
    )
    .await;
    let out = run_once(&env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The stdout sink printed one JSON line per event.
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 120);
    assert_eq!(lines[0]["type"], "device.added");
    assert_eq!(lines[0]["token"], "acme");
    assert_eq!(
        lines[0]["device"]["serial_number"],
        lines[0]["serial_number"]
    );
    // A second run prints nothing new: the sink's cursor moved.
    let out = run_once(&env).await;
    assert!(out.status.success());
    assert!(out.stdout.is_empty());

    let out = output({
        let mut c = adesync(&env);
        c.args(["devices", "--format", "csv"]);
        c
    })
    .await;
    assert!(out.status.success());
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(
        csv.starts_with("token,serial_number,model,description,color,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 121);

    let out = output({
        let mut c = adesync(&env);
        c.args(["events", "--after", "100", "--format", "json"]);
        c
    })
    .await;
    let ids: Vec<i64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, (101..=120).collect::<Vec<_>>());

    let out = output({
        let mut c = adesync(&env);
        c.args(["devices", "--format", "table", "--limit", "3"]);
        c
    })
    .await;
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("token  serial_number"), "{table}");
    assert_eq!(table.lines().count(), 4);

    // A reader that goes away (`adesync events | head -1`) is not an error: 120 events are
    // more than a pipe buffers, so the writes hit the closed pipe.
    let mut c = adesync(&env);
    c.args(["events", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = c.spawn().unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}

#[tokio::test]
async fn a_bad_config_exits_78_and_names_the_key() {
    let env = Env::new(1, 100).await;
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("page_size = 100", "page_size = 5000");
    std::fs::write(&env.config_path, text).unwrap();
    let out = run_once(&env).await;
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("tokens[0].page_size") && err.contains("1..=1000"),
        "{err}"
    );

    let out = output({
        let mut c = Command::new(env!("CARGO_BIN_EXE_adesync"));
        c.args(["--config", "/nonexistent/adesync.toml", "check-config"]);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("/nonexistent/adesync.toml"));
}

#[tokio::test]
async fn check_config_prints_the_effective_config_without_secrets() {
    let env = Env::new(1, 100).await;
    let out = output({
        let mut c = adesync(&env);
        c.arg("check-config");
        c
    })
    .await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("name = \"acme\"") && text.contains("page_size = 100"),
        "{text}"
    );
    let creds = adesync_mock::Credentials::depsim();
    for secret in [
        &creds.consumer_secret,
        &creds.access_token,
        &creds.access_secret,
    ] {
        assert!(!text.contains(secret.as_str()));
    }
}

/// A reader that stops reading (`adesync check-config | head -1`) ends a command quietly,
/// as it ends any Unix tool: no panic, no error message. Each command here writes to a
/// pipe whose reading end is already closed.
#[tokio::test]
async fn a_closed_pipe_ends_the_output_quietly() {
    let env = Env::new(20, 100).await;
    let out = crate::common::run_once(&env).await;
    assert!(out.status.success());
    for args in [
        &["check-config"][..],
        &["devices"],
        &["devices", "--format", "json"],
        &["events", "--format", "csv"],
        &["status"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut c = adesync(&env);
        c.args(args).stdout(writer);
        let out = output(c).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("error"),
            "{args:?}: {err}"
        );
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.success() || out.status.signal() == Some(13),
            "{args:?}: {:?}",
            out.status
        );
    }
}

#[tokio::test]
async fn a_failed_token_makes_run_once_exit_1_with_the_reason() {
    let env = Env::new(3, 100).await;
    env.mock.push_fault(
        adesync_mock::Endpoint::Session,
        adesync_mock::Fault {
            times: 5,
            kind: adesync_mock::FaultKind::Status {
                status: 403,
                body: "ACCESS_DENIED".into(),
                headers: vec![],
            },
        },
    );
    let out = run_once(&env).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("ACCESS_DENIED") && err.contains("\"acme\""),
        "{err}"
    );
}

/// Nothing lost, nothing doubled while changes rewrite the devices whose `added` event
/// reads its row: a sync of 40,000 modified devices killed with SIGKILL several times, then
/// run to completion. After every kill each `added` event still shows the device as first
/// stored, and each device has at most one `modified` event; at the end exactly one each,
/// showing the device as it is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_sync_of_changes_keeps_every_snapshot() {
    let env = Env::new(50_000, 1000).await;
    let first = run_once(&env).await;
    assert!(first.status.success());
    let as_added: std::collections::HashMap<String, serde_json::Value> =
        crate::common::stored(&env.store(), "acme")
            .into_iter()
            .map(|d| (d["serial_number"].as_str().unwrap().to_owned(), d))
            .collect();
    let changed: Vec<String> = as_added.keys().take(40_000).cloned().collect();
    assert_eq!(env.mock.modify_devices(&changed), 40_000);
    let check = |store: &adesync::store::Store| {
        let events = store.events_after(0, None, 1_000_000).unwrap();
        let mut modified = std::collections::HashSet::new();
        for e in &events {
            let device = e
                .device
                .as_ref()
                .expect("every event carries its device")
                .to_json();
            match e.kind.as_str() {
                "added" => assert_eq!(device, as_added[&e.serial_number], "event {}", e.id),
                _ => assert!(modified.insert(e.serial_number.clone()), "twice: {}", e.id),
            }
        }
        modified.len()
    };
    let mut kills = 0;
    for delay_ms in [300u64, 600, 900, 1200] {
        let mut cmd = adesync(&env);
        cmd.args(["run", "--once"]);
        kills += kill_after(cmd, Duration::from_millis(delay_ms)).await as usize;
        check(&env.store());
    }
    assert!(kills >= 1, "the sync finished before any kill");
    let out = run_once(&env).await;
    assert!(out.status.success());
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    assert_eq!(check(&store), 40_000);
    let now: std::collections::HashMap<String, serde_json::Value> =
        crate::common::stored(&store, "acme")
            .into_iter()
            .map(|d| (d["serial_number"].as_str().unwrap().to_owned(), d))
            .collect();
    for e in store.events_after(0, None, 1_000_000).unwrap() {
        if e.kind.as_str() == "modified" {
            assert_eq!(e.device.unwrap().to_json(), now[&e.serial_number]);
        }
    }
}

#[tokio::test]
async fn demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = output({
        let mut c = Command::new(env!("CARGO_BIN_EXE_adesync"));
        c.args(["demo", "--devices", "2000", "--dir"])
            .arg(dir.path().join("demo"))
            .env("RUST_LOG", "warn");
        c
    })
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("2000 added"), "{text}");
    assert!(text.contains("25 added, 40 modified, 10 deleted"), "{text}");
    // The organisation: the 2000 ADE devices and 1000 more, then 5 bought, 3 moved, 2 released.
    assert!(text.contains("3000 devices on 3 MDM servers"), "{text}");
    assert!(text.contains("5 added, 3 modified, 2 removed"), "{text}");
    let jsonl = std::fs::read_to_string(dir.path().join("demo/events.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 2075 + 3010);
    use std::os::unix::fs::PermissionsExt;
    let org_key = std::fs::metadata(dir.path().join("demo/demo-org-account.pem")).unwrap();
    assert_eq!(org_key.permissions().mode() & 0o777, 0o600);
    let mode = std::fs::metadata(dir.path().join("demo/demo-token.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let env = Env::new(20, 100).await;
    let out = output({
        let mut c = adesync(&env);
        c.args(["run", "--once"]).env("RUST_LOG", "debug");
        c
    })
    .await;
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("INFO"), "logs were written: {stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no escape sequences in a log written to a pipe: {stderr:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_run_once_between_pages_and_the_next_run_completes() {
    let env = Env::new(100_000, 1000).await;
    let mut stopped = false;
    for delay_ms in [300u64, 600, 900] {
        let mut cmd = adesync(&env);
        cmd.args(["run", "--once"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        if out.status.code() == Some(143) {
            stopped = true;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("stopped by a signal"), "{err}");
        } else {
            assert!(
                out.status.success(),
                "finished before the signal, or failed: {out:?}"
            );
        }
        let store = env.store();
        let (added, modified, deleted) = event_counts(&store);
        assert_eq!(added, store.device_counts("acme").unwrap().0 as usize);
        assert_eq!((modified, deleted), (0, 0));
    }
    assert!(stopped, "SIGTERM never arrived mid-sync");
    let out = run_once(&env).await;
    assert!(out.status.success());
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    assert_eq!(event_counts(&store), (100_000, 0, 0));
}

#[tokio::test]
async fn run_once_full_refetches_and_counts_what_the_cursor_missed() {
    let env = Env::new(60, 100).await;
    let once = |extra: &'static [&'static str]| {
        let mut c = adesync(&env);
        c.args(["run", "--once"]).args(extra);
        c
    };
    assert!(output(once(&[])).await.status.success());
    // Apple drops three devices without a sync record: the cursor never tells.
    let gone: Vec<String> = env.mock.serials().into_iter().take(3).collect();
    assert_eq!(env.mock.remove_silently(&gone), 3);
    assert!(output(once(&[])).await.status.success());
    assert_eq!(env.store().device_counts("acme").unwrap().0, 60, "missed");
    // `--token` must name a configured token.
    let out = output(once(&["--full", "--token", "nope"])).await;
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("configured: acme"));
    // A forced full re-fetch reconciles them, with one event each.
    let out = output(once(&["--full", "--token", "acme"])).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    assert_eq!(event_counts(&store), (60, 0, 3));
    // `status` says what the cursor had missed, without calling it a problem.
    let out = output({
        let mut c = adesync(&env);
        c.arg("status");
        c
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("found 3 change(s) the sync cursor had missed"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_limit_0_prints_none_and_follow_drains_a_backlog_first() {
    let env = Env::new(300, 100).await;
    let mut once = adesync(&env);
    once.args(["run", "--once"]);
    assert!(output(once).await.status.success());
    let out = output({
        let mut c = adesync(&env);
        c.args(["events", "--limit", "0", "--format", "json"]);
        c
    })
    .await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 0);

    // --follow with a small --limit: the 300-event backlog is printed at once, not 10
    // every half second.
    let mut c = adesync(&env);
    c.args(["events", "--follow", "--limit", "10", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().take(300).count()
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    child.kill().unwrap();
    let _ = child.wait();
    let lines = reader.join().unwrap();
    assert_eq!(
        lines, 300,
        "the whole backlog within 3 s (paced, it would take 15 s)"
    );
}

#[tokio::test]
async fn the_run_lock_follows_symlinks_to_the_real_database() {
    let env = Env::new(5, 100).await;
    let real = env.path("adesync.db");
    std::fs::write(&real, b"").unwrap();
    let link = env.path("via-link.db");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("database = \"adesync.db\"", "database = \"via-link.db\"");
    std::fs::write(&env.config_path, text).unwrap();
    // Another process syncs the real file.
    let lock = std::fs::File::create(env.path("adesync.db.lock")).unwrap();
    lock.try_lock().unwrap();
    let out = run_once(&env).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another adesync process"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn with_json_logs_the_final_error_is_json_too() {
    let out = output({
        let mut c = Command::new(env!("CARGO_BIN_EXE_adesync"));
        c.args([
            "--log-format",
            "json",
            "--config",
            "/nonexistent/a.toml",
            "check-config",
        ]);
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(v["level"], "ERROR");
    let error = v["fields"]["error"].as_str().unwrap();
    assert!(error.contains("/nonexistent/a.toml"), "{v}");
    assert_eq!(
        error.matches("os error 2").count(),
        1,
        "the cause once: {error}"
    );
}

#[tokio::test]
async fn hostile_config_values_exit_78_naming_the_key_before_anything_is_written() {
    let env = Env::new(3, 100).await;
    let base = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::create_dir(env.path("a-folder")).unwrap();
    let cases: [(String, &str); 6] = [
        (
            base.replace("database = \"adesync.db\"", "database = \"\""),
            "database",
        ),
        (
            base.replace("database = \"adesync.db\"", "database = \"a-folder\""),
            "database",
        ),
        (
            format!("request_timeout = \"1ns\"\n{base}"),
            "request_timeout",
        ),
        (
            format!("request_timeout = \"1000000000000d\"\n{base}"),
            "request_timeout",
        ),
        (
            base.replace("http://127.0.0.1", "http://admin:hunter2@127.0.0.1"),
            "tokens[0].api_url",
        ),
        (
            format!("{base}[http]\nlisten = \"0.0.0.0:9464\"\n").replacen(
                "[[tokens]]",
                "[[tokens]]",
                1,
            ),
            "http.listen",
        ),
    ];
    for (text, key) in cases {
        std::fs::write(&env.config_path, &text).unwrap();
        let out = run_once(&env).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(
            !env.path("adesync.db").exists(),
            "{key}: nothing was synced anywhere"
        );
    }
}

#[tokio::test]
async fn another_applications_database_is_refused_untouched_by_run_once() {
    let env = Env::new(3, 100).await;
    let db = env.path("adesync.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE tickets (id INTEGER PRIMARY KEY, title TEXT);
             INSERT INTO tickets (title) VALUES ('printer on fire');",
        )
        .unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    let out = run_once(&env).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not an adesync database") && err.contains("untouched"),
        "{err}"
    );
    assert!(
        err.lines().filter(|l| l.contains("CREATE")).count() == 0,
        "no schema dump: {err}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), before, "not a byte changed");
    assert!(!env.path("adesync.db-wal").exists());
    // The daemon stops with 78, so systemd does not restart it in a loop.
    let mut daemon = adesync(&env);
    daemon
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = daemon.spawn().unwrap();
    let mut code = None;
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            code = status.code();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if code.is_none() {
        let _ = child.kill();
    }
    assert_eq!(code, Some(78));
    assert_eq!(std::fs::read(&db).unwrap(), before);
}
