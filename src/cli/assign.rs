//! `adesync assign`: enrollment profile assignment now, its dry run, and its status.

use std::io::Write;
use std::process::ExitCode;

use super::render::{write_table, Format};
use adesync::config::Config;
use adesync::store::Store;

/// `adesync assign --dry-run`: per token and rule, the devices that would get a profile
/// now and why. Reads only; exits 0 even before the first sync.
pub(super) fn dry_run(config: &Config, token: Option<&str>) -> anyhow::Result<ExitCode> {
    if config.assign_rules.is_empty() {
        outln!("no [[assign]] rules are configured; nothing would be assigned");
        return Ok(ExitCode::SUCCESS);
    }
    let store = Store::open_read_only_if_exists(&config.database)?;
    let plans = adesync::syncer::dry_run(config, store.as_ref(), token)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Dry run: nothing is sent to Apple and nothing is written."
    )?;
    for (t, planned, note) in plans {
        writeln!(out, "\ntoken {t}:")?;
        if let Some(n) = note {
            writeln!(out, "  {n}")?;
        }
        for rule in adesync::syncer::rules_for(config, &t) {
            let mine: Vec<_> = planned.iter().filter(|p| p.rule == rule.number).collect();
            let target = rule.profile.as_deref().unwrap_or("none");
            writeln!(
                out,
                "  rule {} ({} → {}): {} device(s)",
                rule.number,
                rule.matches.describe(),
                target,
                mine.len()
            )?;
            let body: Vec<Vec<String>> = mine
                .iter()
                .map(|p| vec![format!("    {}", p.serial_number), p.why.to_owned()])
                .collect();
            write_table(&mut out, &[], &body)?;
        }
    }
    for w in adesync::config::overlaps(&config.assign_rules) {
        writeln!(out, "\nnote: {w}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `adesync assign status`: per token and profile, how many devices Apple accepted, how
/// many wait (failed with the next retry, throttled) and how many left the server; plus
/// how many are pending (the dry run's count).
pub(super) fn status(config: &Config, format: Format) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only_if_exists(&config.database)?;
    let counts = match &store {
        Some(s) => s.assignment_counts()?,
        None => Vec::new(),
    };
    let plans = adesync::syncer::dry_run(config, store.as_ref(), None)?;
    // (token, profile) → [pending, done, failed, throttled, not accessible]
    let mut table: std::collections::BTreeMap<(String, String), [u64; 5]> = Default::default();
    for (t, planned, _) in &plans {
        for p in planned {
            table.entry((t.clone(), p.profile.clone())).or_default()[0] += 1;
        }
    }
    for (t, p, status, n) in &counts {
        let col = match status.as_str() {
            "SUCCESS" => 1,
            "FAILED" => 2,
            "THROTTLED" => 3,
            _ => 4,
        };
        table.entry((t.clone(), p.clone())).or_default()[col] += n;
    }
    let rows: Vec<(String, String, u64, u64, u64, u64, u64)> = table
        .into_iter()
        .map(|((t, p), c)| (t, p, c[0], c[1], c[2], c[3], c[4]))
        .collect();
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for r in &rows {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"token": r.0, "profile": r.1, "pending": r.2, "done": r.3,
                        "failed": r.4, "throttled": r.5, "not_accessible": r.6})
                )?;
            }
        }
        Format::Csv | Format::Table => {
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.0.clone(),
                        r.1.clone(),
                        r.2.to_string(),
                        r.3.to_string(),
                        r.4.to_string(),
                        r.5.to_string(),
                        r.6.to_string(),
                    ]
                })
                .collect();
            if format == Format::Csv {
                writeln!(
                    out,
                    "token,profile,pending,done,failed,throttled,not_accessible"
                )?;
                for b in body {
                    writeln!(out, "{}", b.join(","))?;
                }
            } else {
                write_table(
                    &mut out,
                    &[
                        "token",
                        "profile",
                        "pending",
                        "done",
                        "failed",
                        "throttled",
                        "not_accessible",
                    ],
                    &body,
                )?;
                if let Some(s) = &store {
                    for (t, p, st, n) in &counts {
                        if st == "FAILED" || st == "THROTTLED" {
                            let next = s.next_retry(t, p, st)?;
                            writeln!(
                                out,
                                "{t} / {p}: {n} {} device(s), next retry {}",
                                st.to_ascii_lowercase(),
                                next.as_deref().unwrap_or("-")
                            )?;
                        }
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `adesync assign [--token T]`: a pass now, for each token with rules.
pub(super) async fn run_now(config: &Config, token: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for t in config
        .tokens
        .iter()
        .filter(|t| token.is_none_or(|o| o == t.name))
    {
        if adesync::syncer::rules_for(config, &t.name).is_empty() {
            continue;
        }
        // On PostgreSQL a replica may be syncing (and assigning for) this token now.
        let (db, name) = (config.database.clone(), t.name.clone());
        let (owner, held_by) = tokio::task::spawn_blocking(move || {
            let mut s = adesync::store::Store::open(&db)?;
            let held = s.own_token(&name)?;
            Ok::<_, adesync::store::StoreError>((s, held))
        })
        .await??;
        if let Some(holder) = held_by {
            outln!("{}: skipped: being synced now by {holder}", t.name);
            continue;
        }
        let server_token = t.load_token()?;
        let client = adesync::apple::AppleClient::new(
            server_token,
            adesync::syncer::client_settings(config, t),
        )?;
        // Written through the connection that holds the token.
        let pass = adesync::syncer::PassStore::owned(config.database.clone(), owner);
        match adesync::syncer::assign_token_on(config, t, &client, pass.clone()).await {
            Ok(s) => outln!(
                "{}: {} assigned, {} failed, {} throttled, {} not accessible ({} calls, {} profiles defined)",
                t.name, s.success, s.failed, s.throttled, s.not_accessible, s.calls, s.defined
            ),
            Err(e) => {
                eprintln!("error: token \"{}\": {e}", t.name);
                failed = true;
            }
        }
        tokio::task::spawn_blocking(move || drop(pass)).await?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
