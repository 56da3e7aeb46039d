//! The command line: argument types, one function per subcommand, and output for people
//! (tables) and scripts (JSON, CSV). Exit codes: 0 ok, 1 failure, 2 usage, 78 bad config.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use adesync::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use adesync::model::EventKind;
use adesync::status::TokenExpiry;
use adesync::store::{DeviceFilter, Store};

mod account;
mod demo;
mod render;
mod sinks;
mod token;

use render::{csv_cell, write_table, Format};

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
        /// Only devices with this profile_status (empty, assigned, pushed, removed).
        #[arg(long)]
        profile_status: Option<String>,
        /// Only this model, e.g. "iPad Air" (case-insensitive).
        #[arg(long)]
        model: Option<String>,
        /// Only this device family: iPhone, iPad, Mac, AppleTV, Vision, iPod (case-insensitive).
        #[arg(long)]
        family: Option<String>,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<u64>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show one device, every stored field, and its event history.
    Device {
        /// The device's serial number.
        serial: String,
        /// Only this token (when the serial is known to several).
        #[arg(long)]
        token: Option<String>,
        /// Output format (json: the device and its events as one object).
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show each token's sync status and what needs attention.
    ///
    /// Per token: phase, cursor age, last success and error, device counts and days until
    /// the server token expires. Exits 1 when any token needs attention (a failed or
    /// parked sync, no recent success, a token expiring within 30 days), so it works as a
    /// cron or monitoring check.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print shell completions, e.g. `adesync completions bash > /etc/bash_completion.d/adesync`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `adesync man > /usr/local/share/man/man1/adesync.1`.
    Man,
    /// List change events after an id, oldest first.
    ///
    /// `--format json` prints the same JSON lines the jsonl sink writes; feed the last id
    /// back as --after to read only newer events. `events replay` sends events to a sink again.
    #[command(args_conflicts_with_subcommands = true)]
    Events {
        /// Send events to a sink again (without it: list events).
        #[command(subcommand)]
        action: Option<sinks::EventsAction>,
        /// Only events with a larger id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Only this token.
        #[arg(long)]
        token: Option<String>,
        /// Only this kind: added, modified or deleted.
        #[arg(long, value_parser = ["added", "modified", "deleted"])]
        kind: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
        /// Keep running and print new events as they are committed (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show each event sink's cursor, backlog and last error; `sinks test NAME` sends a
    /// test event, `sinks resume NAME` un-parks a sink whose receiver was fixed.
    #[command(args_conflicts_with_subcommands = true)]
    Sinks {
        /// What to do (without it: list the sinks).
        #[command(subcommand)]
        action: Option<sinks::SinksAction>,
        /// Output format of the list.
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
    /// Server tokens: make the key pair, import Apple's .p7m, list expiry, forget a token.
    ///
    /// From nothing to a syncing token: `token keygen --name acme`, upload the certificate
    /// it writes to Apple Business/School Manager, download the token (.p7m), then
    /// `token import --name acme FILE.p7m`. Renew yearly the same way (download, import).
    Token {
        /// What to do with tokens.
        #[command(subcommand)]
        cmd: token::TokenCommand,
    },
    /// Show the MDM server behind each token, as Apple's GET /account last reported it:
    /// server name and UUID, organisation, ABM or ASM, the admin who downloaded the token,
    /// and the page-size maximum. Refreshed at the start of every sync.
    Account {
        /// Only this token.
        #[arg(long)]
        token: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
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
    // The demo prints its own story; its logs stay quiet unless RUST_LOG asks.
    let quiet = matches!(cli.command, Command::Demo { .. });
    init_logging(cli.log_format, quiet);
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
        // The reader went away (`adesync events | head`): not an error, nothing to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
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

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Logs go to standard error. Under journald (JOURNAL_STREAM set) the timestamp is left
/// out because the journal adds its own. `RUST_LOG` filters (default `info`).
fn init_logging(format: LogFormat, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if quiet { "warn" } else { "info" }));
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
            let _lock = lock_database(&config.database)?;
            if once {
                run_once(&config).await
            } else {
                adesync::daemon::run(config).await?;
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Events {
            action: Some(action),
            ..
        } => sinks::events(&cli.config, action).await,
        Command::Sinks { action, format } => sinks::sinks(&cli.config, action, format).await,
        Command::Demo { devices, dir } => demo::run(devices, &dir).await.map(|_| ExitCode::SUCCESS),
        // Everything else reads SQLite or decrypts token files: off the async runtime.
        command => {
            let config = cli.config;
            tokio::task::spawn_blocking(move || run_blocking(&config, command)).await?
        }
    }
}

/// The commands that only read files and the database, run on a blocking thread.
fn run_blocking(config_path: &Path, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { .. }
        | Command::Sinks { .. }
        | Command::Demo { .. }
        | Command::Events {
            action: Some(_), ..
        } => {
            anyhow::bail!("internal error: an async command reached the blocking dispatcher")
        }
        Command::CheckConfig => {
            let config = Config::load(config_path)?;
            print!("{}", config.to_redacted_toml());
            let now = chrono::Utc::now();
            for (i, t) in config.tokens.iter().enumerate() {
                // The file was found at load; check-config also proves it decrypts.
                let token = t.load_token().map_err(|e| ConfigError::Invalid {
                    path: config.source.clone(),
                    key: format!("tokens[{i}].token_file"),
                    reason: e.to_string(),
                })?;
                println!(
                    "# token {:?}: consumer_key {:?}, secrets redacted, expires {}",
                    t.name,
                    adesync::config::redact_key(&token.consumer_key),
                    token.access_token_expiry.format("%Y-%m-%dT%H:%M:%SZ")
                );
                let days = token.days_left(now);
                match TokenExpiry::of(token.access_token_expiry, now) {
                    TokenExpiry::Ok => {}
                    TokenExpiry::Expired => eprintln!("warning: token \"{}\" has expired; download a new one from Apple Business/School Manager", t.name),
                    TokenExpiry::ExpiresSoon => eprintln!("warning: token \"{}\" expires in {days} days; download a new one from Apple Business/School Manager soon", t.name),
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
            profile_status,
            model,
            family,
            limit,
            format,
        } => {
            let store = open_existing(config_path)?;
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
                profile_status,
                model,
                family,
                limit,
            };
            let rows = store.devices(&filter)?;
            print_devices(&rows, format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            action: None,
            after,
            token,
            kind,
            limit,
            follow,
            format,
        } => {
            let store = open_existing(config_path)?;
            let mut last = after;
            let mut header = format != Format::Json;
            loop {
                let (events, scanned_to) = filtered_events(
                    &store,
                    last,
                    token.as_deref(),
                    kind.as_deref().and_then(EventKind::parse),
                    None,
                    limit,
                )?;
                if !events.is_empty() || header {
                    print_events(&events, format, header)?;
                    header = false;
                }
                last = scanned_to;
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        Command::Device {
            serial,
            token,
            format,
        } => {
            let store = open_existing(config_path)?;
            let devices = store.devices(&DeviceFilter {
                serial: Some(serial.clone()),
                token: token.clone(),
                deleted: Some(false),
                ..DeviceFilter::default()
            })?;
            if devices.is_empty() {
                eprintln!("no device with serial number {serial} is stored");
                return Ok(ExitCode::FAILURE);
            }
            let (events, _) =
                filtered_events(&store, 0, token.as_deref(), None, Some(&serial), u64::MAX)?;
            print_device_detail(&devices, &events, format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { format } => {
            let config = Config::load_for_reports(config_path)?;
            let store = Store::open(&config.database)?;
            let statuses = adesync::status::token_statuses(&config, &store, chrono::Utc::now())?;
            let sinks = adesync::sinks::sink_status(&store, &config)?;
            print_status(&statuses, format)?;
            print_sink_attention(&sinks, format)?;
            let sink_trouble = sinks.iter().any(|s| s.state != "ok");
            Ok(
                if sink_trouble || statuses.iter().any(|s| !s.attention.is_empty()) {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                },
            )
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "adesync",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { cmd } => {
            let cfg = adesync::config::LenientConfig::read(config_path, cmd.needs_config())?;
            Ok(token::run(&cfg, cmd)?)
        }
        Command::Account { token, format } => {
            let cfg = adesync::config::LenientConfig::read(config_path, true)?;
            Ok(account::show(&cfg, token.as_deref(), format)?)
        }
    }
}

/// `run --once`: every token once, then deliver events to the sinks. On a terminal a
/// progress line per token shows pages and devices; elsewhere nothing extra is printed.
pub async fn run_once(config: &Config) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let bars = std::io::stderr().is_terminal().then(progress_bars);
    let report = adesync::syncer::run_all_once(config, bars.as_ref().map(|(_, p)| p.clone())).await;
    if let Some((multi, _)) = bars {
        let _ = multi.clear();
    }
    adesync::sinks::deliver_all_logged(config).await;
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

/// One spinner per token, created on its first page.
fn progress_bars() -> (indicatif::MultiProgress, adesync::syncer::Progress) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    let multi = indicatif::MultiProgress::new();
    let bars: Mutex<HashMap<String, indicatif::ProgressBar>> = Mutex::default();
    let m = multi.clone();
    let progress: adesync::syncer::Progress =
        std::sync::Arc::new(move |token: &str, pages, devices| {
            let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
            let bar = bars.entry(token.to_owned()).or_insert_with(|| {
                let b = m.add(indicatif::ProgressBar::new_spinner());
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} {prefix}: {msg} [{elapsed}]",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                b.set_prefix(token.to_owned());
                b.enable_steady_tick(std::time::Duration::from_millis(120));
                b
            });
            bar.set_message(format!("{pages} pages, {devices} devices"));
        });
    (multi, progress)
}

/// Events after `after` matching the filters, up to `limit`, and the last id scanned.
fn filtered_events(
    store: &Store,
    after: i64,
    token: Option<&str>,
    kind: Option<EventKind>,
    serial: Option<&str>,
    limit: u64,
) -> anyhow::Result<(Vec<adesync::store::StoredEvent>, i64)> {
    const BATCH: u64 = 5000;
    let mut out = Vec::new();
    let mut last = after;
    loop {
        let batch = store.events_after(last, token, BATCH)?;
        let Some(end) = batch.last().map(|e| e.id) else {
            return Ok((out, last));
        };
        for e in batch {
            last = e.id;
            if kind.is_none_or(|k| k == e.kind) && serial.is_none_or(|s| s == e.serial_number) {
                out.push(e);
                if out.len() as u64 >= limit {
                    return Ok((out, last));
                }
            }
        }
        last = end;
    }
}

/// Only one process syncs a database at a time: two would move the same cursors and
/// could write older pages over newer rows. The lock is released when the process exits.
pub fn lock_database(database: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the folder for database {}",
                database.display()
            )
        })?;
    }
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another adesync process is already syncing {} (e.g. the service and a cron job or timer); run only one of them",
            database.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("cannot lock {}", path.display())))
        }
    }
}

fn open_existing(config_path: &Path) -> anyhow::Result<Store> {
    let config = Config::load_for_reports(config_path)?;
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

fn print_devices(rows: &[adesync::store::StoredDevice], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for r in rows {
                let mut m = adesync::store::device_map(&r.device);
                m.insert("token".into(), r.token_name.clone().into());
                m.insert("first_seen_at".into(), r.first_seen_at.clone().into());
                m.insert("updated_at".into(), r.updated_at.clone().into());
                m.insert("deleted_at".into(), r.deleted_at.clone().into());
                writeln!(out, "{}", serde_json::Value::Object(m))?;
            }
        }
        Format::Csv => {
            let mut header: Vec<&str> = vec!["token"];
            header.extend(adesync::store::apple_columns());
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

/// Prints events; `header` is false for the later batches of `--follow`.
fn print_events(
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
                writeln!(out, "id,token,serial_number,kind,changes,occurred_at")?;
            }
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
                        e.kind.to_string(),
                        summarize_changes(e.kind, &e.changes),
                        e.occurred_at.clone(),
                    ]
                })
                .collect();
            let head = [
                "id",
                "token",
                "serial_number",
                "kind",
                "changes",
                "occurred_at",
            ];
            write_table(&mut out, if header { &head[..] } else { &[] }, &body)?;
        }
    }
    out.flush()?;
    Ok(())
}

fn print_device_detail(
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
        writeln!(out, "{} (token {})", d.device.serial_number, d.token_name)?;
        for (k, v) in adesync::store::device_map(&d.device) {
            if k != "serial_number" {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                writeln!(out, "  {k:<22} {v}")?;
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
        writeln!(out, "\nHistory:")?;
        let body: Vec<Vec<String>> = events
            .iter()
            .filter(|e| e.token_name == d.token_name)
            .map(|e| {
                vec![
                    e.id.to_string(),
                    e.occurred_at.clone(),
                    e.kind.to_string(),
                    summarize_changes(e.kind, &e.changes),
                ]
            })
            .collect();
        write_table(&mut out, &["id", "occurred_at", "kind", "changes"], &body)?;
        writeln!(out)?;
    }
    Ok(())
}

/// After the token status: the sinks, when any is configured.
fn print_sink_attention(
    sinks: &[adesync::sinks::SinkStatus],
    format: Format,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for s in sinks {
                let mut v = serde_json::to_value(s)?;
                v["sink"] = serde_json::Value::String(s.name.clone());
                writeln!(out, "{v}")?;
            }
        }
        Format::Csv => {}
        Format::Table if !sinks.is_empty() => {
            writeln!(out)?;
            let body: Vec<Vec<String>> = sinks
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.kind.to_owned(),
                        s.state.to_owned(),
                        s.pending.to_string(),
                        s.oldest_pending_age_secs
                            .map(|a| adesync::status::human_secs(a as i64))
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            write_table(
                &mut out,
                &["sink", "type", "state", "pending", "oldest_pending"],
                &body,
            )?;
            for s in sinks.iter().filter(|s| s.state != "ok") {
                let why = s.last_error.as_deref().unwrap_or("see `adesync sinks`");
                let todo = if s.state == "parked" {
                    " — fix the receiver, then `adesync sinks resume NAME`"
                } else {
                    ""
                };
                writeln!(out, "sink {}: {}: {why}{todo}", s.name, s.state)?;
            }
        }
        Format::Table => {}
    }
    Ok(())
}

fn print_status(statuses: &[adesync::status::TokenStatus], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for s in statuses {
                writeln!(out, "{}", serde_json::to_string(s)?)?;
            }
        }
        Format::Csv => {
            writeln!(out, "token,phase,cursor_age_seconds,last_success_at,last_error_kind,devices,deleted_devices,token_days_left,attention")?;
            for s in statuses {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{}",
                    csv_cell(&s.token),
                    s.phase,
                    s.cursor_age_seconds
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    s.last_success_at.as_deref().unwrap_or(""),
                    s.last_error_kind.as_deref().unwrap_or(""),
                    s.devices,
                    s.deleted_devices,
                    s.token_days_left.map(|d| d.to_string()).unwrap_or_default(),
                    csv_cell(&s.attention.join("; "))
                )?;
            }
        }
        Format::Table => {
            let body: Vec<Vec<String>> = statuses
                .iter()
                .map(|s| {
                    vec![
                        s.token.clone(),
                        s.phase.clone(),
                        s.cursor_age_seconds
                            .map(adesync::status::human_secs)
                            .unwrap_or_else(|| "-".into()),
                        s.last_success_at.clone().unwrap_or_else(|| "never".into()),
                        s.last_error_kind.clone().unwrap_or_else(|| "-".into()),
                        s.devices.to_string(),
                        s.deleted_devices.to_string(),
                        s.token_days_left
                            .map(|d| d.to_string())
                            .unwrap_or_else(|| "-".into()),
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
                    "token",
                    "phase",
                    "cursor_age",
                    "last_success",
                    "last_error",
                    "devices",
                    "deleted",
                    "token_days_left",
                    "state",
                ],
                &body,
            )?;
            for s in statuses {
                for a in &s.attention {
                    writeln!(out, "{}: {a}", s.token)?;
                }
            }
        }
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
        format!("{} {}", get("model"), get("color"))
            .trim()
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
