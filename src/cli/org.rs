//! `adesync org-devices`, `org-accounts` and the organisation side of `device SERIAL` and
//! `status`: what the organisation's inventory holds, as a table, JSON lines or CSV.

use std::io::Write;
use std::process::ExitCode;

use serde_json::Value;

use super::render::{csv_cell, write_table, Format};
use adesync::config::Config;
use adesync::model::printable;
use adesync::orgapi::device::ORG_COLUMNS;
use adesync::status::OrgAccountStatus;
use adesync::store::{Store, StoredOrgDevice};

/// A column's value as one cell: strings as they are, lists and the rest as JSON.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The device as one JSON object: the columns plus account and bookkeeping.
pub(super) fn org_device_json(d: &StoredOrgDevice) -> Value {
    let mut v = d.device.to_json();
    if let Value::Object(m) = &mut v {
        m.insert("account".into(), d.account.clone().into());
        m.insert("first_seen_at".into(), d.first_seen_at.clone().into());
        m.insert("updated_at".into(), d.updated_at.clone().into());
        m.insert("removed_at".into(), d.removed_at.clone().into());
    }
    v
}

pub(super) fn print_org_devices(rows: &[StoredOrgDevice], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for r in rows {
                writeln!(out, "{}", org_device_json(r))?;
            }
        }
        Format::Csv => {
            let mut header = vec!["account", "serial_number"];
            header.extend(ORG_COLUMNS.iter().map(|c| c.0));
            header.extend([
                "assigned_server_id",
                "assigned_server_name",
                "first_seen_at",
                "updated_at",
                "removed_at",
            ]);
            writeln!(out, "{}", header.join(","))?;
            for r in rows {
                let d = &r.device;
                let mut cells = vec![csv_cell(&r.account), csv_cell(&d.serial_number)];
                cells.extend(d.values.iter().map(|v| csv_cell(&cell(v))));
                for s in [&d.server_id, &d.server_name] {
                    cells.push(csv_cell(s.as_deref().unwrap_or("")));
                }
                cells.push(csv_cell(&r.first_seen_at));
                cells.push(csv_cell(&r.updated_at));
                cells.push(csv_cell(r.removed_at.as_deref().unwrap_or("")));
                writeln!(out, "{}", cells.join(","))?;
            }
        }
        Format::Table => {
            let get = |d: &StoredOrgDevice, c: &str| d.device.get(c).map(cell).unwrap_or_default();
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.account.clone(),
                        r.device.serial_number.clone(),
                        get(r, "product_family"),
                        get(r, "device_model"),
                        get(r, "status"),
                        r.device.server_name.clone().unwrap_or_else(|| "-".into()),
                        get(r, "purchase_source_type"),
                        get(r, "order_number"),
                        r.removed_at.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            write_table(
                &mut out,
                &[
                    "account",
                    "serial_number",
                    "family",
                    "model",
                    "status",
                    "mdm_server",
                    "purchase_source",
                    "order_number",
                    "removed_at",
                ],
                &body,
            )?;
        }
    }
    Ok(())
}

/// The organisation side of `adesync device SERIAL`, as text.
pub(super) fn print_org_detail(
    out: &mut impl Write,
    store: &Store,
    rows: &[StoredOrgDevice],
    events: &[adesync::store::StoredEvent],
) -> anyhow::Result<()> {
    for r in rows {
        writeln!(
            out,
            "{} in the organisation (account {})",
            printable(&r.device.serial_number),
            r.account
        )?;
        let server = match (&r.device.server_name, &r.device.server_id) {
            (Some(n), Some(id)) => format!("{n} ({id})"),
            (None, Some(id)) => id.clone(),
            _ => "(none: unassigned)".into(),
        };
        writeln!(out, "  {:<34} {}", "mdm_server", printable(&server))?;
        for ((col, _, _), v) in ORG_COLUMNS.iter().zip(&r.device.values) {
            if !v.is_null() {
                writeln!(out, "  {col:<34} {}", printable(&cell(v)))?;
            }
        }
        for (k, v) in &r.device.extra {
            writeln!(out, "  {:<34} {}", printable(k), printable(&cell(v)))?;
        }
        writeln!(out, "  {:<34} {}", "first_seen_at", r.first_seen_at)?;
        writeln!(
            out,
            "  {:<34} {}",
            "removed_at",
            r.removed_at.as_deref().unwrap_or("(listed by Apple)")
        )?;
        let coverage = store.applecare_of(&r.account, &r.device.serial_number)?;
        if !coverage.is_empty() {
            writeln!(out, "\nAppleCare coverage:")?;
            let body: Vec<Vec<String>> = coverage
                .iter()
                .map(|c| {
                    [
                        "description",
                        "status",
                        "payment_type",
                        "start_date_time",
                        "end_date_time",
                    ]
                    .iter()
                    .map(|k| cell(&c[*k]))
                    .collect()
                })
                .collect();
            write_table(
                out,
                &["description", "status", "payment", "start", "end"],
                &body,
            )?;
        }
        writeln!(out, "\nHistory in the organisation:")?;
        let body: Vec<Vec<String>> = events
            .iter()
            .filter(|e| {
                e.scope == adesync::events::EventScope::OrgDevice && e.token_name == r.account
            })
            .map(|e| {
                vec![
                    e.id.to_string(),
                    e.occurred_at.clone(),
                    e.scope.event_type(e.kind).to_owned(),
                    super::query::summarize_changes(e.kind, &e.changes),
                ]
            })
            .collect();
        write_table(out, &["id", "occurred_at", "type", "changes"], &body)?;
        writeln!(out)?;
    }
    Ok(())
}

/// After the tokens in `status`: the organisation accounts, when any is configured.
pub(super) fn print_org_status(
    statuses: &[OrgAccountStatus],
    format: Format,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for s in statuses {
                writeln!(out, "{}", serde_json::to_string(s)?)?;
            }
        }
        Format::Csv => {}
        Format::Table if !statuses.is_empty() => {
            writeln!(out)?;
            let body: Vec<Vec<String>> = statuses
                .iter()
                .map(|s| {
                    vec![
                        s.account.clone(),
                        s.phase.clone(),
                        s.last_complete_at.clone().unwrap_or_else(|| "never".into()),
                        s.last_error_kind.clone().unwrap_or_else(|| "-".into()),
                        s.devices.to_string(),
                        s.unassigned.to_string(),
                        s.mdm_servers.to_string(),
                        s.rate_limited.to_string(),
                        if s.attention.is_empty() {
                            "ok".into()
                        } else {
                            "ATTENTION".into()
                        },
                    ]
                })
                .collect();
            write_table(
                &mut out,
                &[
                    "org_account",
                    "phase",
                    "last_complete_walk",
                    "last_error",
                    "devices",
                    "unassigned",
                    "mdm_servers",
                    "rate_limited",
                    "state",
                ],
                &body,
            )?;
            for s in statuses {
                if let Some(by) = &s.walked_by {
                    writeln!(
                        out,
                        "org account {}: being walked now by {}",
                        s.account,
                        printable(by)
                    )?;
                }
                for a in &s.attention {
                    writeln!(out, "org account {}: {}", s.account, printable(a))?;
                }
            }
        }
        Format::Table => {}
    }
    Ok(())
}

/// `adesync org-accounts test NAME`: one access token, and what Apple said.
pub(super) async fn test_account(config: &Config, name: &str) -> anyhow::Result<ExitCode> {
    let Some(account) = config.org_accounts.iter().find(|a| a.name == name) else {
        let known: Vec<&str> = config
            .org_accounts
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        anyhow::bail!(
            "no [[org_accounts]] entry is named {:?}; configured: {}",
            printable(name),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let client =
        adesync::orgapi::OrgClient::new(account, adesync::syncer::org_client_settings(config))?;
    match client.fetch_token().await {
        Ok(grant) => {
            outln!(
                "{}: Apple issued an access token ({} {}, valid {} s) for {} at {}",
                account.name,
                grant.token_type,
                grant.scope,
                grant.expires_in,
                account.client_id,
                account.token_url
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}: {e}", account.name);
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `adesync org-accounts`: each account, its key file and its walk.
pub(super) fn list_accounts(config: &Config, format: Format) -> anyhow::Result<ExitCode> {
    let store = Store::open_read_only_if_exists(&config.database)?;
    let mut out = std::io::stdout().lock();
    let mut rows = Vec::new();
    for a in &config.org_accounts {
        let walk = store.as_ref().map(|s| s.org_walk(&a.name)).transpose()?;
        let key = match adesync::orgapi::SigningKey::load(&a.private_key_file) {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.to_string(),
        };
        let v = serde_json::json!({
            "account": a.name,
            "client_id": a.client_id,
            "key_id": a.key_id,
            "private_key_file": a.private_key_file.display().to_string(),
            "key": key,
            "api": a.scope.product(),
            "api_url": a.api_url.as_str().trim_end_matches('/'),
            "last_complete_at": walk.as_ref().and_then(|w| w.last_complete_at.clone()),
            "last_error": walk.as_ref().and_then(|w| w.last_error.clone()),
        });
        rows.push(v);
    }
    match format {
        Format::Json => {
            for r in &rows {
                writeln!(out, "{r}")?;
            }
        }
        Format::Csv | Format::Table => {
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    [
                        "account",
                        "client_id",
                        "key_id",
                        "api",
                        "key",
                        "last_complete_at",
                    ]
                    .iter()
                    .map(|k| cell(&r[*k]))
                    .collect()
                })
                .collect();
            write_table(
                &mut out,
                &[
                    "account",
                    "client_id",
                    "key_id",
                    "api",
                    "key",
                    "last_complete_walk",
                ],
                &body,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
