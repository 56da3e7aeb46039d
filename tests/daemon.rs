//! The daemon as a process: signals, the metrics listener, `status`, and the unit files.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    adesync, assert_mirrors, event_counts, free_port, output, write_token, Env, KillOnDrop,
};

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Polls `f` every 50 ms until it is true or `limit` passes.
async fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

async fn wait_exit(mut child: KillOnDrop, limit: Duration) -> Option<std::process::ExitStatus> {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        None
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_large_fetch_exits_0_and_loses_nothing() {
    let env = Env::new(100_000, 1000).await;
    let mut cmd = adesync(&env);
    cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::null());
    let child = KillOnDrop(cmd.spawn().unwrap());
    // Wait until the fetch is under way (some pages committed), then stop it.
    let db = env.path("adesync.db");
    let started = wait_for(Duration::from_secs(30), || {
        db.exists()
            && adesync::store::Store::open(&db)
                .and_then(|s| s.device_counts("acme"))
                .is_ok_and(|(n, _)| n > 0)
    })
    .await;
    assert!(started, "the daemon never committed a page");
    signal(&child, "TERM");
    let status = wait_exit(child, Duration::from_secs(10))
        .await
        .expect("exits within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0));
    // A consistent prefix: every stored device has exactly one added event.
    let store = env.store();
    let stored = store.device_counts("acme").unwrap().0 as usize;
    assert!(
        stored < 100_000,
        "the fetch finished before SIGTERM; nothing was interrupted"
    );
    assert_eq!(event_counts(&store), (stored, 0, 0));
    // The next run completes the mirror without doubling anything.
    let out = tokio::task::spawn_blocking({
        let mut c = adesync(&env);
        c.args(["run", "--once"]);
        move || c.output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    assert_mirrors(&env.store(), &env.mock);
    assert_eq!(event_counts(&env.store()), (100_000, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_syncs_now_and_metrics_and_healthz_answer() {
    let port = free_port();
    let env = Env::with(
        adesync_mock::MockConfig {
            devices: 250,
            ..Default::default()
        },
        100,
        &format!(
            "schedule = \"1h\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [[sinks]]\nname = \"archive\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n"
        ),
    )
    .await;
    // `schedule` lands in the token's table (a per-token schedule), [http] is top-level.

    let mut cmd = adesync(&env);
    cmd.arg("run")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.path("daemon.log")).unwrap());
    let child = KillOnDrop(cmd.spawn().unwrap());
    let db = env.path("adesync.db");
    let log = env.path("daemon.log");
    let synced = |n: u64| {
        let db = db.clone();
        move || {
            adesync::store::Store::open(&db)
                .and_then(|s| s.device_counts("acme"))
                .is_ok_and(|(c, _)| c == n)
        }
    };
    assert!(
        wait_for(Duration::from_secs(20), synced(250)).await,
        "first sync: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // /metrics in Prometheus text format.
    let base = format!("http://127.0.0.1:{port}");
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    let mut devices = 0.0;
    let mut seen = std::collections::HashSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name_labels, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample {line}"));
        let name = name_labels.split('{').next().unwrap();
        seen.insert(name.to_owned());
        if name == "adesync_devices" {
            assert!(name_labels.contains("token=\"acme\""));
            devices += value;
        }
    }
    assert_eq!(devices, 250.0, "{text}");
    for m in [
        "adesync_last_success_timestamp_seconds",
        "adesync_sync_duration_seconds",
        "adesync_token_expiry_timestamp_seconds",
        "adesync_events_total",
        "adesync_token_parked",
        "adesync_sink_pending_events",
        "adesync_sink_oldest_pending_age_seconds",
    ] {
        assert!(seen.contains(m), "{m} missing from\n{text}");
    }
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);

    // A second process on the same database is refused while the daemon runs.
    let mut once = adesync(&env);
    once.args(["run", "--once"]);
    let out = tokio::task::spawn_blocking(move || once.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another adesync process"));

    // SIGHUP: sync now, long before the 1h schedule.
    env.mock.add_devices(7);
    signal(&child, "HUP");
    assert!(
        wait_for(Duration::from_secs(20), synced(257)).await,
        "SIGHUP did not sync"
    );

    signal(&child, "TERM");
    let status = wait_exit(child, Duration::from_secs(10))
        .await
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_code_says_whether_attention_is_needed() {
    let env = Env::new(40, 100).await;
    let status = |env: &Env| {
        let mut c = adesync(env);
        c.arg("status");
        c
    };
    let run = |mut c: Command| tokio::task::spawn_blocking(move || c.output().unwrap());
    // Never synced: attention.
    let out = run(status(&env)).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("never synced"));
    // Synced: all well.
    let mut once = adesync(&env);
    once.args(["run", "--once"]);
    assert!(run(once).await.unwrap().status.success());
    let out = run(status(&env)).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("acme") && text.contains(" 40 ") && text.contains("ok"),
        "{text}"
    );
    // JSON for scripts.
    let mut json = status(&env);
    json.args(["--format", "json"]);
    let out = run(json).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["devices"], 40);
    assert_eq!(v["phase"], "sync");
    // A token expiring in 10 days needs attention.
    write_token(
        &env.path("acme.json"),
        &adesync_mock::Credentials::depsim(),
        10,
    );
    let out = run(status(&env)).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("expires in"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A failed sync needs attention and says why.
    write_token(
        &env.path("acme.json"),
        &adesync_mock::Credentials::depsim(),
        365,
    );
    env.mock.expire_sessions();
    env.mock.push_fault(
        adesync_mock::Endpoint::Session,
        adesync_mock::Fault {
            times: 1,
            kind: adesync_mock::FaultKind::Status {
                status: 403,
                body: "T_C_NOT_SIGNED".into(),
                headers: vec![],
            },
        },
    );
    let mut once = adesync(&env);
    once.args(["run", "--once"]);
    assert_eq!(run(once).await.unwrap().status.code(), Some(1));
    let out = run(status(&env)).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("parked") && text.contains("accept"), "{text}");
}

#[tokio::test]
async fn device_and_filtered_listings() {
    let env = Env::new(60, 100).await;
    let once = || {
        let mut c = adesync(&env);
        c.args(["run", "--once"]);
        output(c)
    };
    assert!(once().await.status.success());
    let serial = env.mock.serials()[3].clone();
    env.mock.modify_devices(std::slice::from_ref(&serial));
    assert!(once().await.status.success());

    let run = |args: Vec<String>| {
        let mut c = adesync(&env);
        c.args(args);
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    let out = run(vec![
        "device".into(),
        serial.clone(),
        "--format".into(),
        "json".into(),
    ])
    .await
    .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["serial_number"], serial.as_str());
    let kinds: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["device.added", "device.modified"]);
    let out = run(vec!["device".into(), "NOSUCHSERIAL".into()])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // --family filters to exactly the simulator's devices of that family.
    let truth = env.mock.devices();
    let ipads = truth
        .iter()
        .filter(|d| d["device_family"] == "iPad")
        .count();
    let out = run(vec![
        "devices".into(),
        "--family".into(),
        "ipad".into(),
        "--format".into(),
        "json".into(),
    ])
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), ipads);
    let out = run(vec![
        "events".into(),
        "--kind".into(),
        "modified".into(),
        "--format".into(),
        "json".into(),
    ])
    .await
    .unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains(&serial));
}

#[test]
fn completions_and_man_page_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_adesync"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("check-config"),
            "{shell}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_adesync"))
        .arg("man")
        .output()
        .unwrap();
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.starts_with(".ie") || man.contains(".TH adesync"),
        "{man}"
    );
}

#[test]
fn the_unit_file_has_the_required_directives_and_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/adesync.service"
    ))
    .unwrap();
    for directive in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "LimitNOFILE=",
        "User=adesync",
        "StateDirectory=adesync",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(directive), "{directive} missing");
    }
    let timer = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/adesync-once.timer"
    ))
    .unwrap();
    assert!(timer.contains("OnUnitActiveSec="));
    // Where systemd is installed, let it check the units too.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "adesync.service",
            "adesync-once.service",
            "adesync-once.timer",
        ] {
            let text =
                std::fs::read_to_string(format!("{}/systemd/{name}", env!("CARGO_MANIFEST_DIR")))
                    .unwrap()
                    .replace("/usr/local/bin/adesync", env!("CARGO_BIN_EXE_adesync"));
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg("--man=no")
            .arg(dir.path().join("adesync.service"))
            .arg(dir.path().join("adesync-once.service"))
            .arg(dir.path().join("adesync-once.timer"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Only complaints about the unit files matter (not about the host's own units).
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("adesync")).collect();
        assert!(ours.is_empty(), "{err}");
    }
}

/// A simulator with `devices` devices and the daemon syncing it hourly, with its
/// listener on a free loopback port.
async fn daemon_with_listener(devices: usize) -> (Env, u16, KillOnDrop) {
    let port = free_port();
    let env = Env::with(
        adesync_mock::MockConfig {
            devices,
            ..Default::default()
        },
        100,
        &format!("schedule = \"1h\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await;
    let mut cmd = adesync(&env);
    cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::null());
    let child = KillOnDrop(cmd.spawn().unwrap());
    (env, port, child)
}

/// The `adesync_token_expiry_timestamp_seconds` sample of token `acme`, if any.
async fn expiry_metric(base: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("adesync_token_expiry_timestamp_seconds{token=\"acme\"}"))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_a_renewed_tokens_expiry_without_a_restart() {
    let (env, port, child) = daemon_with_listener(20).await;
    let base = format!("http://127.0.0.1:{port}");
    let mut first = None;
    for _ in 0..200 {
        first = expiry_metric(&base).await;
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = first.expect("the listener reports the token's expiry");
    let in_days = |v: f64| ((v - chrono::Utc::now().timestamp() as f64) / 86_400.0).round();
    assert_eq!(in_days(first), 365.0);

    // Renewed in place, as `adesync token import` does: no restart, no sync needed.
    write_token(
        &env.path("acme.json"),
        &adesync_mock::Credentials::depsim(),
        700,
    );
    let renewed = expiry_metric(&base).await.expect("still reported");
    assert_eq!(in_days(renewed), 700.0, "the renewed expiry, read afresh");

    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(10)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_an_unusable_token_file_as_that_tokens_problem_and_shows_the_others() {
    let env = Env::new(30, 100).await;
    // A second token of the same simulator.
    write_token(
        &env.path("beta.json"),
        &adesync_mock::Credentials::depsim(),
        365,
    );
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let beta = format!(
        "\n[[tokens]]\nname = \"beta\"\ntoken_file = \"beta.json\"\napi_url = \"{}\"\n",
        env.mock.base_url()
    );
    std::fs::write(&env.config_path, text + &beta).unwrap();
    let run = |mut c: Command| tokio::task::spawn_blocking(move || c.output().unwrap());
    let mut once = adesync(&env);
    once.args(["run", "--once"]);
    assert!(run(once).await.unwrap().status.success());

    for (case, damage) in [("garbage", Some("{ not a token")), ("missing", None)] {
        match damage {
            Some(bytes) => std::fs::write(env.path("beta.json"), bytes).unwrap(),
            None => {
                let _ = std::fs::remove_file(env.path("beta.json"));
            }
        }
        let mut status = adesync(&env);
        status.arg("status");
        let out = run(status).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{case}: {stdout}{stderr}");
        assert!(
            stdout.contains("acme") && stdout.contains(" 30 "),
            "{case}: the other token is still shown: {stdout}"
        );
        assert!(
            stdout.contains("beta: the token file cannot be used"),
            "{case}: {stdout}"
        );
        let mut json = adesync(&env);
        json.args(["status", "--format", "json"]);
        let out = run(json).await.unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let beta = lines.iter().find(|v| v["token"] == "beta").unwrap();
        assert!(beta["token_expires_at"].is_null(), "{case}: {beta}");
        let acme = lines.iter().find(|v| v["token"] == "acme").unwrap();
        assert!(acme["attention"].as_array().unwrap().is_empty(), "{acme}");
    }
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_and_busy_metrics_clients_is_bounded_and_the_sync_goes_on() {
    let (env, port, child) = daemon_with_listener(500).await;
    let pid = child.id();
    let db = env.path("adesync.db");
    let synced = |n: u64| {
        let db = db.clone();
        move || {
            adesync::store::Store::open(&db)
                .and_then(|s| s.device_counts("acme"))
                .is_ok_and(|(c, _)| c == n)
        }
    };
    assert!(wait_for(Duration::from_secs(20), synced(500)).await);
    let baseline = open_fds(pid);

    // 400 idle connections that never send a byte, and 200 scrapes at once.
    let addr = format!("127.0.0.1:{port}");
    let mut idle = Vec::new();
    for _ in 0..400 {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            idle.push(s);
        }
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let scrapes: Vec<_> = (0..200)
        .map(|_| {
            let c = client.clone();
            let url = format!("http://{addr}/metrics");
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    // While the flood lasts, the daemon holds a bounded number of connections…
    let during = open_fds(pid);
    assert!(
        during < baseline + 64 + 16,
        "{during} fds open during the flood (baseline {baseline})"
    );
    // …and a sync still runs to completion.
    env.mock.add_devices(25);
    signal(&child, "HUP");
    assert!(
        wait_for(Duration::from_secs(30), synced(525)).await,
        "the sync completes during the flood"
    );
    for s in scrapes {
        let _ = s.await.unwrap(); // served, or closed at the limit: never hung forever
    }
    drop(idle);
    // Afterwards everything is served again.
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(r) = client.get(format!("http://{addr}/metrics")).send().await {
            if r.status() == 200 {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "/metrics answers once the flood is over");
    assert!(
        open_fds(pid) < baseline + 16,
        "connections are released ({} fds, baseline {baseline})",
        open_fds(pid)
    );
    signal(&child, "TERM");
    assert!(wait_exit(child, Duration::from_secs(10)).await.is_some());
}
