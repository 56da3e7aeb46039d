//! The command line: argument types, one function per subcommand, and output for people
//! (tables) and scripts (JSON, CSV). Exit codes: 0 ok, 1 failure, 2 usage, 78 bad config.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use crate::store::{DeviceFilter, Store};

/// Exit code for a configuration error (sysexits EX_CONFIG); systemd does not restart on it.
pub const EXIT_CONFIG: u8 = 78;

/// adesync mirrors the devices Apple Business Manager / Apple School Manager assigns to your
/// device-management server into SQLite, and records every change as an event.
#[derive(Debug, Parser)]
#[command(name = "adesync", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', global = true, env = "ADESYNC_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format on standard error: `text` for people, `json` for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Output format of listing commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON: one object per line.
    Json,
    /// CSV with a header row.
    Csv,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sync every configured token: once with --once, otherwise as a daemon on the schedule.
    ///
    /// With --once the exit code is 0 when every token synced and 1 when any failed
    /// (the others still sync). Events are written to the configured sinks after the sync.
    Run {
        /// Sync each token once, then exit.
        #[arg(long)]
        once: bool,
    },
    /// Validate the configuration and print it with secrets left out. Exit 78 if invalid.
    CheckConfig,
    /// List stored devices (assigned ones unless --deleted or --all).
    Devices {
        /// Only this token.
        #[arg(long)]
        token: Option<String>,
        /// Only this serial number.
        #[arg(long)]
        serial: Option<String>,
        /// Only devices no longer assigned to the server.
        #[arg(long, conflicts_with = "all")]
        deleted: bool,
        /// Assigned and deleted devices.
        #[arg(long)]
        all: bool,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// List change events after an id, oldest first.
    ///
    /// `--format json` prints the same JSON lines the jsonl sink writes; feed the last id
    /// back as --after to read only newer events.
    Events {
        /// Only events with a larger id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Only this token.
        #[arg(long)]
        token: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run a demo without an Apple account: start the bundled Apple simulator on
    /// 127.0.0.1, sync its devices into SQLite, change some, sync again, show the events.
    Demo {
        /// Devices the simulator starts with.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Folder for the demo's config, token file and database (recreated).
        #[arg(long, default_value = "adesync-demo")]
        dir: PathBuf,
    },
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<ConfigError>().is_some() {
                eprintln!("error: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to standard error. Under journald (JOURNAL_STREAM set) the timestamp is left
/// out because the journal adds its own. `RUST_LOG` filters (default `info`).
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { once } => {
            let config = Config::load(&cli.config)?;
            if once {
                run_once(&config).await
            } else {
                crate::daemon::run(config).await?;
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::CheckConfig => {
            let config = Config::load(&cli.config)?;
            print!("{}", config.to_redacted_toml());
            let now = chrono::Utc::now();
            for t in &config.tokens {
                let days = t.token.days_left(now);
                if days < 0 {
                    eprintln!("warning: token \"{}\" has expired; download a new one from Apple Business/School Manager", t.name);
                } else if days < 30 {
                    eprintln!("warning: token \"{}\" expires in {days} days; download a new one from Apple Business/School Manager soon", t.name);
                }
            }
            eprintln!("configuration OK: {} token(s)", config.tokens.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices {
            token,
            serial,
            deleted,
            all,
            limit,
            format,
        } => {
            let store = open_existing(&cli.config)?;
            let filter = DeviceFilter {
                token,
                serial,
                deleted: if all {
                    Some(false)
                } else if deleted {
                    Some(true)
                } else {
                    None
                },
                limit,
            };
            let rows = store.devices(&filter)?;
            print_devices(&rows, format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            after,
            token,
            limit,
            format,
        } => {
            let store = open_existing(&cli.config)?;
            let events = store.events_after(after, token.as_deref(), limit)?;
            print_events(&events, format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { devices, dir } => crate::demo::run(devices, &dir)
            .await
            .map(|_| ExitCode::SUCCESS),
    }
}

/// `run --once`: every token once, then deliver events to the sinks.
pub async fn run_once(config: &Config) -> anyhow::Result<ExitCode> {
    let report = crate::syncer::run_all_once(config, None).await;
    deliver_sinks(config).await?;
    if report.failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for (name, e) in &report.failed {
        eprintln!("error: token \"{name}\": {e}");
    }
    eprintln!(
        "{} of {} token(s) failed; the others synced",
        report.failed.len(),
        config.tokens.len()
    );
    Ok(ExitCode::FAILURE)
}

/// Writes pending events to every configured sink.
pub async fn deliver_sinks(config: &Config) -> anyhow::Result<()> {
    if config.sinks.is_empty() {
        return Ok(());
    }
    let config = config.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut store = Store::open(&config.database)?;
        for sink in &config.sinks {
            let n = crate::events::deliver_jsonl(&mut store, sink)?;
            tracing::debug!(sink = %sink.name, events = n, "events delivered");
        }
        Ok(())
    })
    .await
    .context("event delivery stopped")?
}

fn open_existing(config_path: &Path) -> anyhow::Result<Store> {
    let config = Config::load(config_path)?;
    if !config.database.exists() {
        anyhow::bail!(
            "database {} does not exist yet; run `adesync run --once` first",
            config.database.display()
        );
    }
    Ok(Store::open(&config.database)?)
}

const DEVICE_HEADER: [&str; 9] = [
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

fn print_devices(rows: &[crate::store::StoredDevice], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for r in rows {
                let mut m = crate::store::device_map(&r.device);
                m.insert("token".into(), r.token_name.clone().into());
                m.insert("first_seen_at".into(), r.first_seen_at.clone().into());
                m.insert("updated_at".into(), r.updated_at.clone().into());
                m.insert("deleted_at".into(), r.deleted_at.clone().into());
                writeln!(out, "{}", serde_json::Value::Object(m))?;
            }
        }
        Format::Csv => {
            let mut header: Vec<&str> = vec!["token"];
            header.extend(crate::store::apple_columns());
            header.extend(["first_seen_at", "updated_at", "deleted_at"]);
            writeln!(out, "{}", header.join(","))?;
            for r in rows {
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
                writeln!(out, "{}", cells.join(","))?;
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

fn print_events(events: &[crate::store::StoredEvent], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for e in events {
                writeln!(out, "{}", crate::events::event_json(e))?;
            }
        }
        Format::Csv => {
            writeln!(out, "id,token,serial_number,kind,changes,occurred_at")?;
            for e in events {
                writeln!(
                    out,
                    "{},{},{},{},{},{}",
                    e.id,
                    csv_cell(&e.token_name),
                    csv_cell(&e.serial_number),
                    e.kind,
                    csv_cell(&e.changes.to_string()),
                    csv_cell(&e.occurred_at)
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
                        e.kind.clone(),
                        summarize_changes(&e.kind, &e.changes),
                        e.occurred_at.clone(),
                    ]
                })
                .collect();
            write_table(
                &mut out,
                &[
                    "id",
                    "token",
                    "serial_number",
                    "kind",
                    "changes",
                    "occurred_at",
                ],
                &body,
            )?;
        }
    }
    Ok(())
}

/// One short line for a table: the changed fields for `modified`, the model otherwise.
pub fn summarize_changes(kind: &str, changes: &serde_json::Value) -> String {
    let Some(map) = changes.as_object() else {
        return String::new();
    };
    if kind == "modified" {
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
        let idx = if kind == "added" { 1 } else { 0 };
        let get = |f: &str| {
            map.get(f)
                .and_then(|v| v[idx].as_str())
                .unwrap_or("")
                .to_owned()
        };
        format!("{} {}", get("model"), get("color"))
            .trim()
            .to_owned()
    }
}

fn write_table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_when_needed() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
