//! `adesync devices`, `device SERIAL` and `events`: what the mirror holds, as a table,
//! JSON lines or CSV.

use std::io::Write;
use std::path::Path;

use super::render::{csv_cell, write_table, Format};
use adesync::config::Config;
use adesync::model::{printable, EventKind, Reason, V10_FIELDS};
use adesync::store::Store;

/// Events after `after` matching the filters, up to `limit`, and the last id scanned.
pub(super) fn filtered_events(
    store: &Store,
    after: i64,
    token: Option<&str>,
    kind: Option<EventKind>,
    reason: Option<Reason>,
    serial: Option<&str>,
    limit: u64,
) -> anyhow::Result<(Vec<adesync::store::StoredEvent>, i64)> {
    const BATCH: u64 = 5000;
    let mut out = Vec::new();
    let mut last = after;
    if limit == 0 {
        return Ok((out, last));
    }
    loop {
        let batch = store.events_of(last, token, serial, BATCH)?;
        let Some(end) = batch.last().map(|e| e.id) else {
            return Ok((out, last));
        };
        for e in batch {
            last = e.id;
            if kind.is_none_or(|k| k == e.kind)
                && serial.is_none_or(|s| s == e.serial_number)
                && reason.is_none_or(|r| event_reason(&e) == Some(r))
            {
                out.push(e);
                if out.len() as u64 >= limit {
                    return Ok((out, last));
                }
            }
        }
        last = end;
    }
}

/// A device event's reason (derived for events stored before reasons); `None` for
/// organisation events.
pub(super) fn event_reason(e: &adesync::store::StoredEvent) -> Option<Reason> {
    (e.scope == adesync::events::EventScope::Device).then(|| {
        e.reason
            .unwrap_or_else(|| adesync::events::derived_reason(e.kind, &e.changes))
    })
}

pub(super) fn open_existing(config_path: &Path) -> anyhow::Result<Store> {
    let config = Config::load_for_reports(config_path)?;
    Store::open_read_only_if_exists(&config.database)?.ok_or_else(|| no_mirror(&config))
}

/// The error for a command that reads the mirror before anything was synced into it.
pub(super) fn no_mirror(config: &Config) -> anyhow::Error {
    anyhow::anyhow!(
        "database {} does not exist yet; run `adesync run --once` first",
        config.database.display()
    )
}

pub(super) const DEVICE_HEADER: [&str; 9] = [
    "token",
    "serial_number",
    "model",
    "os",
    "device_family",
    "color",
    "profile_status",
    "asset_tag",
    "deleted_at",
];

pub(super) fn print_devices(
    rows: &[adesync::store::StoredDevice],
    format: Format,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json | Format::Csv => {
            write_device_header(&mut out, format)?;
            for r in rows {
                write_device(&mut out, r, format)?;
            }
        }
        Format::Table => {
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let d = &r.device;
                    let s = |v: &Option<String>| v.clone().unwrap_or_default();
                    vec![
                        r.token_name.clone(),
                        d.serial_number.clone(),
                        s(&d.model),
                        s(&d.os),
                        s(&d.device_family),
                        s(&d.color),
                        s(&d.profile_status),
                        s(&d.asset_tag),
                        r.deleted_at.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            write_table(&mut out, &DEVICE_HEADER, &body)?;
        }
    }
    Ok(())
}

/// The CSV header row (nothing for JSON lines).
pub(super) fn write_device_header(out: &mut impl Write, format: Format) -> anyhow::Result<()> {
    if format == Format::Csv {
        let mut header: Vec<&str> = vec!["token"];
        header.extend(adesync::store::apple_columns());
        header.extend(["first_seen_at", "updated_at", "deleted_at"]);
        header.extend(V10_FIELDS.iter().map(|f| f.0));
        writeln!(out, "{}", header.join(","))?;
    }
    Ok(())
}

/// One device as a JSON line or a CSV row.
pub(super) fn write_device(
    out: &mut impl Write,
    r: &adesync::store::StoredDevice,
    format: Format,
) -> anyhow::Result<()> {
    if format == Format::Json {
        let mut m = adesync::store::device_map(&r.device);
        m.insert("token".into(), r.token_name.clone().into());
        m.insert("first_seen_at".into(), r.first_seen_at.clone().into());
        m.insert("updated_at".into(), r.updated_at.clone().into());
        m.insert("deleted_at".into(), r.deleted_at.clone().into());
        writeln!(out, "{}", serde_json::Value::Object(m))?;
        return Ok(());
    }
    let mut cells = vec![csv_cell(&r.token_name), csv_cell(&r.device.serial_number)];
    cells.extend(
        r.device
            .fields()
            .iter()
            .map(|f| csv_cell(f.as_deref().unwrap_or(""))),
    );
    cells.push(csv_cell(&r.first_seen_at));
    cells.push(csv_cell(&r.updated_at));
    cells.push(csv_cell(r.deleted_at.as_deref().unwrap_or("")));
    for (name, _) in V10_FIELDS {
        let cell = match r.device.v10(name) {
            None => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        };
        cells.push(csv_cell(&cell));
    }
    writeln!(out, "{}", cells.join(","))?;
    Ok(())
}

/// Prints events; `header` is false for the later batches of `--follow`.
pub(super) fn print_events(
    events: &[adesync::store::StoredEvent],
    format: Format,
    header: bool,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for e in events {
                writeln!(out, "{}", adesync::events::event_json(e))?;
            }
        }
        Format::Csv => {
            if header {
                writeln!(
                    out,
                    "id,token,serial_number,kind,changes,occurred_at,type,reason"
                )?;
            }
            for e in events {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{}",
                    e.id,
                    csv_cell(&e.token_name),
                    csv_cell(&e.serial_number),
                    e.kind,
                    csv_cell(&e.changes.to_string()),
                    csv_cell(&e.occurred_at),
                    e.scope.event_type(e.kind),
                    event_reason(e).map_or("", Reason::as_str)
                )?;
            }
        }
        Format::Table => {
            let body: Vec<Vec<String>> = events
                .iter()
                .map(|e| {
                    vec![
                        e.id.to_string(),
                        e.token_name.clone(),
                        e.serial_number.clone(),
                        e.scope.event_type(e.kind).to_owned(),
                        event_reason(e).map_or("-", Reason::as_str).to_owned(),
                        summarize_changes(e.kind, &e.changes),
                        e.occurred_at.clone(),
                    ]
                })
                .collect();
            let head = [
                "id",
                "token",
                "serial_number",
                "type",
                "reason",
                "changes",
                "occurred_at",
            ];
            write_table(&mut out, if header { &head[..] } else { &[] }, &body)?;
        }
    }
    out.flush()?;
    Ok(())
}

pub(super) fn print_device_detail(
    devices: &[adesync::store::StoredDevice],
    events: &[adesync::store::StoredEvent],
    format: Format,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if format == Format::Json {
        for d in devices {
            let mut m = adesync::store::device_map(&d.device);
            m.insert("token".into(), d.token_name.clone().into());
            m.insert("first_seen_at".into(), d.first_seen_at.clone().into());
            m.insert("updated_at".into(), d.updated_at.clone().into());
            m.insert("deleted_at".into(), d.deleted_at.clone().into());
            let evs: Vec<serde_json::Value> = events
                .iter()
                .filter(|e| e.token_name == d.token_name)
                .map(adesync::events::event_json)
                .collect();
            m.insert("events".into(), evs.into());
            writeln!(out, "{}", serde_json::Value::Object(m))?;
        }
        return Ok(());
    }
    for d in devices {
        writeln!(
            out,
            "{} (token {})",
            printable(&d.device.serial_number),
            d.token_name
        )?;
        for (k, v) in adesync::store::device_map(&d.device) {
            if k != "serial_number" {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                writeln!(out, "  {:<22} {}", printable(&k), printable(&v))?;
            }
        }
        writeln!(out, "  {:<22} {}", "first_seen_at", d.first_seen_at)?;
        writeln!(out, "  {:<22} {}", "updated_at", d.updated_at)?;
        writeln!(
            out,
            "  {:<22} {}",
            "deleted_at",
            d.deleted_at.as_deref().unwrap_or("(assigned)")
        )?;
        writeln!(out, "\nStory:")?;
        let body: Vec<Vec<String>> = events
            .iter()
            .filter(|e| {
                e.token_name == d.token_name && e.scope == adesync::events::EventScope::Device
            })
            .map(|e| {
                vec![
                    e.occurred_at.clone(),
                    event_reason(e).map_or("-", Reason::as_str).to_owned(),
                    e.kind.to_string(),
                    summarize_changes(e.kind, &e.changes),
                    format!("#{}", e.id),
                ]
            })
            .collect();
        write_table(
            &mut out,
            &["when", "what", "kind", "changes", "event"],
            &body,
        )?;
        writeln!(out)?;
    }
    Ok(())
}

/// One short line for a table: the changed fields for `modified`, the model otherwise.
pub fn summarize_changes(kind: EventKind, changes: &serde_json::Value) -> String {
    let Some(map) = changes.as_object() else {
        return String::new();
    };
    if kind == EventKind::Modified {
        map.iter()
            .map(|(k, v)| {
                let show = |x: &serde_json::Value| match x {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "∅".into(),
                    other => other.to_string(),
                };
                format!("{k}: {} → {}", show(&v[0]), show(&v[1]))
            })
            .collect::<Vec<_>>()
            .join("; ")
    } else {
        let idx = if kind == EventKind::Added { 1 } else { 0 };
        let get = |f: &str| {
            map.get(f)
                .and_then(|v| v[idx].as_str())
                .unwrap_or("")
                .to_owned()
        };
        // An organisation device's model is `device_model`.
        let model = match get("model") {
            m if m.is_empty() => get("device_model"),
            m => m,
        };
        format!("{model} {}", get("color")).trim().to_owned()
    }
}
