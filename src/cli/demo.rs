//! The one-command demo: the bundled Apple simulator on 127.0.0.1, a full sync into a
//! fresh SQLite file, some changes made in the simulator, an incremental sync, and the
//! change events — the whole product in a minute, with no Apple account. The simulator
//! also serves the organisation API, so the demo mirrors the organisation's inventory
//! (devices unassigned or on other MDM servers) beside the ADE mirror.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use adesync::config::Config;
use adesync::store::Store;

/// Runs the demo in `dir` (its database is recreated) with `devices` simulated devices.
pub async fn run(devices: usize, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for f in [
        "adesync.db",
        "adesync.db-wal",
        "adesync.db-shm",
        "events.jsonl",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let mock = adesync_mock::start(adesync_mock::MockConfig {
        devices,
        seed: 2026,
        org_accounts: vec![adesync_mock::OrgAccountConfig {
            devices: devices / 2,
            ..adesync_mock::OrgAccountConfig::business(2026)
        }],
        ..Default::default()
    })
    .await
    .context("cannot start the Apple simulator on 127.0.0.1")?;

    let credentials = adesync_mock::Credentials::depsim();
    let token_path = dir.join("demo-token.json");
    write_private(
        &token_path,
        &credentials.token_json(chrono::Utc::now() + chrono::Duration::days(365)),
    )?;
    let org = mock.org_account(0);
    write_private(&dir.join("demo-org-account.pem"), &org.private_key_pem)?;
    let config_path = dir.join("config.toml");
    let config_text = format!(
        "# adesync demo configuration (written by `adesync demo`).\n\
         database = \"adesync.db\"\n\n\
         [[tokens]]\nname = \"demo\"\ntoken_file = \"demo-token.json\"\n\
         # The simulator ran on this port during the demo; it is gone now.\n\
         api_url = \"{}\"\npage_size = 1000\n\n\
         [[org_accounts]]\nname = \"demo-org\"\nclient_id = \"{}\"\nkey_id = \"{}\"\n\
         private_key_file = \"demo-org-account.pem\"\napi_url = \"{}\"\ntoken_url = \"{}\"\n\
         requests_per_second = 50\n\n\
         [[sinks]]\nname = \"events-file\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n",
        mock.base_url(),
        org.client_id,
        org.key_id,
        mock.base_url(),
        mock.org_token_url()
    );
    std::fs::write(&config_path, config_text)?;
    let config = Config::load(&config_path)?;

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Apple simulator listening on {} with {devices} devices",
        mock.base_url()
    )?;

    writeln!(
        out,
        "\n1. First sync: full fetch into {}",
        config.database.display()
    )?;
    let first = sync(&config).await?;
    for line in first {
        writeln!(out, "   {line}")?;
    }

    let serials = mock.serials();
    let added = mock.add_devices(25);
    let to_modify: Vec<String> = serials
        .iter()
        .step_by(serials.len().max(1) / 40 + 1)
        .take(40)
        .cloned()
        .collect();
    let modified = mock.modify_devices(&to_modify);
    let to_delete: Vec<String> = serials.iter().rev().take(10).cloned().collect();
    let deleted = mock.delete_devices(&to_delete);
    writeln!(
        out,
        "\n2. In the simulator: {} devices assigned, {modified} changed, {deleted} unassigned",
        added.len()
    )?;
    let bought = mock.add_org_devices(0, 5, None);
    let other = mock
        .org_servers(0)
        .into_iter()
        .find(|s| s.name == "Other MDM")
        .map(|s| s.id);
    let moved = mock.assign_org_devices(0, &mock.pick_org_devices(0, 3), other.as_deref());
    let released = mock.release_org_devices(0, &mock.pick_org_devices(0, 2));
    writeln!(
        out,
        "   and in the organisation: {} devices bought, {moved} moved to another MDM server, {released} released",
        bought.len()
    )?;

    let before = {
        let db = config.database.clone();
        tokio::task::spawn_blocking(move || Store::open(&db)?.max_event_id()).await??
    };
    writeln!(out, "\n3. Second sync: only the changes")?;
    let second = sync(&config).await?;
    for line in second {
        writeln!(out, "   {line}")?;
    }

    let (events, assigned, total_events, org_counts) = {
        let db = config.database.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let s = Store::open(&db)?;
            let events = s.events_after(before, None, 10_000)?;
            let (assigned, _) = s.device_counts("demo")?;
            Ok((
                events,
                assigned,
                s.event_count(None)?,
                s.org_counts("demo-org")?,
            ))
        })
        .await??
    };
    writeln!(
        out,
        "\n4. Events from the second sync ({} in all; a few of each kind):",
        events.len()
    )?;
    for scope in [
        adesync::events::EventScope::Device,
        adesync::events::EventScope::OrgDevice,
    ] {
        for kind in adesync::model::EventKind::ALL {
            for e in events
                .iter()
                .filter(|e| e.kind == kind && e.scope == scope)
                .take(2)
            {
                writeln!(
                    out,
                    "   #{:<6} {:<19} {}  {}",
                    e.id,
                    scope.event_type(kind),
                    e.serial_number,
                    super::query::summarize_changes(e.kind, &e.changes)
                )?;
            }
        }
    }
    mock.shutdown();
    writeln!(
        out,
        "\nThe store now holds {assigned} assigned devices, the organisation's {} devices ({} of them on no MDM server) and {total_events} events; every event is also in {}.",
        org_counts.devices,
        org_counts.unassigned,
        dir.join("events.jsonl").display()
    )?;
    let cfg = config_path.display();
    writeln!(out, "Look around:")?;
    writeln!(out, "   adesync --config {cfg} devices --limit 10")?;
    writeln!(out, "   adesync --config {cfg} devices --deleted")?;
    writeln!(
        out,
        "   adesync --config {cfg} events --after {before} --format json | head -3"
    )?;
    writeln!(
        out,
        "   adesync --config {cfg} org-devices --unassigned | head"
    )?;
    writeln!(
        out,
        "   sqlite3 {} 'SELECT model, COUNT(*) FROM devices GROUP BY model'",
        config.database.display()
    )?;
    writeln!(
        out,
        "   sqlite3 {} 'SELECT org_status, assigned_server_name, mirrored, COUNT(*) FROM inventory GROUP BY 1, 2, 3'",
        config.database.display()
    )?;
    Ok(())
}

async fn sync(config: &Config) -> anyhow::Result<Vec<String>> {
    let report = adesync::syncer::run_all_once(config, None).await;
    if let Some((name, e)) = report.failed.first() {
        anyhow::bail!("sync of \"{name}\" failed: {e}");
    }
    if let Some((name, e)) = report.org_failed.first() {
        anyhow::bail!("walk of \"{name}\" failed: {e}");
    }
    adesync::sinks::deliver_all_logged(config).await;
    let s = report.ok.first().context("no token was synced")?;
    let mut lines = vec![format!(
        "ADE token: {} pages, {} device records in {:.2?}: {} added, {} modified, {} deleted",
        s.pages, s.records, s.duration, s.stats.added, s.stats.modified, s.stats.deleted
    )];
    if let Some(o) = report.org_ok.first() {
        lines.push(format!(
            "organisation: {} pages, {} devices on {} MDM servers in {:.2?}: {} added, {} modified, {} removed",
            o.pages, o.devices, o.servers, o.duration, o.stats.added, o.stats.modified, o.stats.removed
        ));
    }
    Ok(lines)
}

/// Writes a file only its owner can read (it holds secrets).
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}
