//! The command line: argument types, one function per subcommand, and output for people
//! (tables) and scripts (JSON, CSV). Exit codes: 0 ok, 1 failure, 2 usage, 78 bad config.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use adesync::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use adesync::model::{EventKind, SinkState};
use adesync::status::TokenExpiry;
use adesync::store::{DeviceFilter, Store};

/// `println!` that returns the error instead of panicking: a reader that stops reading
/// (`adesync check-config | head -1`) ends the command quietly (see `is_broken_pipe`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

mod account;
mod assign;
mod demo;
mod org;
mod query;
mod render;
mod run;
mod sinks;
mod status;
mod store;
mod token;

use query::{filtered_events, open_existing, print_device_detail, print_devices, print_events};
use run::{lock_database, run_once};
use status::{print_sink_attention, print_status};

use render::Format;

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
        /// With --once: a full re-fetch now (every device read again and compared; what
        /// the sync cursor missed is corrected and counted), whatever `full_fetch` says.
        #[arg(long, requires = "once")]
        full: bool,
        /// With --once: only this token.
        #[arg(long, requires = "once")]
        token: Option<String>,
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
        /// Only the device with this IMEI (protocol 10).
        #[arg(long)]
        imei: Option<String>,
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
        /// Only this kind: added, modified or deleted (`removed`, the organisation's word, is `deleted`).
        #[arg(long, value_parser = ["added", "modified", "deleted", "removed"])]
        kind: Option<String>,
        /// Only this reason: assigned, returned, unassigned, released, replaced,
        /// profile_assigned, profile_pushed, profile_removed, updated.
        #[arg(long, value_parser = ["assigned", "returned", "unassigned", "released", "replaced", "profile_assigned", "profile_pushed", "profile_removed", "updated"])]
        reason: Option<String>,
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
    /// List the organisation's devices (Apple School/Business Manager API accounts): every
    /// device the organisation owns, which MDM server holds it, purchase and order data.
    OrgDevices {
        /// Only this account.
        #[arg(long)]
        account: Option<String>,
        /// Only this status: ASSIGNED or UNASSIGNED.
        #[arg(long)]
        status: Option<String>,
        /// Only this product family: iPhone, iPad, Mac, AppleTV, Watch, Vision.
        #[arg(long)]
        family: Option<String>,
        /// Only devices no MDM server holds.
        #[arg(long)]
        unassigned: bool,
        /// Include devices removed from the organisation.
        #[arg(long)]
        removed: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Organisation API accounts: list them with their key and last walk, or `test NAME`
    /// to ask Apple for one access token and show what Apple answered.
    OrgAccounts {
        /// What to do (without it: list the accounts).
        #[command(subcommand)]
        action: Option<OrgAccountsAction>,
        /// Output format of the list.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Enrollment profile assignment: `--dry-run` shows what the [[assign]] rules would do
    /// now (nothing is sent or written); `assign status` counts pending, done, failed and
    /// throttled devices; without either, a pass runs now for each token with rules.
    #[command(args_conflicts_with_subcommands = true)]
    Assign {
        /// `status`: the counts per token and profile.
        #[command(subcommand)]
        action: Option<AssignAction>,
        /// Show what would be assigned and why; change nothing at Apple or in the database.
        #[arg(long)]
        dry_run: bool,
        /// Only this token.
        #[arg(long)]
        token: Option<String>,
    },
    /// The mirror itself: `store copy --to postgres://…` moves an SQLite mirror into an
    /// empty PostgreSQL database (events keep their ids; no re-fetch).
    Store {
        /// What to do with the mirror.
        #[command(subcommand)]
        cmd: store::StoreCommand,
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

/// `adesync assign` actions.
#[derive(Debug, Subcommand)]
pub enum AssignAction {
    /// Pending, done, failed (with the next retry), throttled and not-accessible counts.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// `adesync org-accounts` actions.
#[derive(Debug, Subcommand)]
pub enum OrgAccountsAction {
    /// Ask Apple for one access token with the account's key and say what Apple answered.
    Test {
        /// The account's `name`.
        name: String,
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
    let json = cli.log_format == LogFormat::Json;
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        // The reader went away (`adesync events | head`): not an error, nothing to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let message = describe(&e);
            if json {
                // Log shippers get the final error in the same format as every other line.
                tracing::error!(error = %message, "adesync failed");
            } else {
                eprintln!("error: {message}");
            }
            // `database` pointing at another application's file is a configuration error
            // too: restarting will not help (the unit does not restart on 78).
            let foreign = e
                .downcast_ref::<adesync::store::StoreError>()
                .is_some_and(|s| matches!(s, adesync::store::StoreError::Foreign { .. }));
            if e.downcast_ref::<ConfigError>().is_some() || foreign {
                return ExitCode::from(EXIT_CONFIG);
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: a message that already quotes its cause
/// (`cannot read X: No such file (os error 2)`) is not followed by it again.
fn describe(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !message.contains(&c) {
            message.push_str(": ");
            message.push_str(&c);
        }
    }
    adesync::model::printable(&message).into_owned()
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Logs go to standard error. Under journald (JOURNAL_STREAM set) the timestamp is left
/// out because the journal adds its own. Colour only on a terminal: a log file written by
/// cron, a pipe or `2>file` gets plain text. `RUST_LOG` filters (default `info`).
fn init_logging(format: LogFormat, quiet: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if quiet { "warn" } else { "info" }));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let _ = match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { once, full, token } => {
            let config = Config::load(&cli.config)?;
            if let Some(t) = &token {
                if !config.tokens.iter().any(|c| &c.name == t)
                    && !config.org_accounts.iter().any(|a| &a.name == t)
                {
                    let names: Vec<&str> = config
                        .tokens
                        .iter()
                        .map(|c| c.name.as_str())
                        .chain(config.org_accounts.iter().map(|a| a.name.as_str()))
                        .collect();
                    anyhow::bail!(
                        "--token {t:?}: no such token in {}; configured: {}",
                        config.source.display(),
                        names.join(", ")
                    );
                }
            }
            let db = config.database.clone();
            let _lock = tokio::task::spawn_blocking(move || lock_database(&db)).await??;
            if once {
                run_once(&config, token, full).await
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
        Command::Assign {
            action: None,
            dry_run: false,
            token,
        } => {
            let config = Config::load(&cli.config)?;
            let db = config.database.clone();
            let _lock = tokio::task::spawn_blocking(move || lock_database(&db)).await??;
            assign::run_now(&config, token.as_deref()).await
        }
        Command::OrgAccounts {
            action: Some(OrgAccountsAction::Test { name }),
            ..
        } => {
            let config = Config::load(&cli.config)?;
            org::test_account(&config, &name).await
        }
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
        | Command::OrgAccounts {
            action: Some(_), ..
        }
        | Command::Assign {
            action: None,
            dry_run: false,
            ..
        }
        | Command::Events {
            action: Some(_), ..
        } => {
            anyhow::bail!("internal error: an async command reached the blocking dispatcher")
        }
        Command::CheckConfig => {
            let config = Config::load(config_path)?;
            write!(std::io::stdout(), "{}", config.to_redacted_toml())?;
            let now = chrono::Utc::now();
            for (i, t) in config.tokens.iter().enumerate() {
                // The file was found at load; check-config also proves it decrypts.
                let token = t.load_token().map_err(|e| ConfigError::Invalid {
                    path: config.source.clone(),
                    key: format!("tokens[{i}].token_file"),
                    reason: e.to_string(),
                })?;
                outln!(
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
            for (i, a) in config.org_accounts.iter().enumerate() {
                // check-config also proves the key is a usable P-256 key.
                adesync::orgapi::SigningKey::load(&a.private_key_file).map_err(|e| {
                    ConfigError::Invalid {
                        path: config.source.clone(),
                        key: format!("org_accounts[{i}].private_key_file"),
                        reason: e.to_string(),
                    }
                })?;
                outln!(
                    "# org account {:?}: {} ({}), key {} readable",
                    a.name,
                    a.client_id,
                    a.scope.product(),
                    a.key_id
                );
            }
            for w in adesync::config::overlaps(&config.assign_rules) {
                eprintln!("note: {w}");
            }
            eprintln!(
                "configuration OK: {} token(s), {} organisation account(s)",
                config.tokens.len(),
                config.org_accounts.len()
            );
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
            imei,
            limit,
            format,
        } => {
            let store = open_existing(config_path)?;
            let filter = DeviceFilter {
                imei,
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
            if format == Format::Table {
                // Aligned columns need every row first.
                print_devices(&store.devices(&filter)?, format)?;
            } else {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                query::write_device_header(&mut out, format)?;
                store.for_each_device(&filter, |d| query::write_device(&mut out, &d, format))?;
                out.flush()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            action: None,
            after,
            token,
            kind,
            reason,
            limit,
            follow,
            format,
        } => {
            let store = open_existing(config_path)?;
            let reason = reason.as_deref().and_then(adesync::model::Reason::parse);
            let mut last = after;
            let mut header = format != Format::Json;
            // Printed a chunk at a time: the newest million events never sit in memory.
            // (A table for people is aligned over all its rows: one chunk.)
            let chunk = if format == Format::Table {
                u64::MAX
            } else {
                5000
            };
            loop {
                let mut printed = 0u64;
                let caught_up = loop {
                    let want = (limit - printed).min(chunk);
                    let (events, scanned_to) = filtered_events(
                        &store,
                        last,
                        token.as_deref(),
                        kind.as_deref()
                            .map(|k| if k == "removed" { "deleted" } else { k })
                            .and_then(EventKind::parse),
                        reason,
                        None,
                        want,
                    )?;
                    let short = (events.len() as u64) < want;
                    if !events.is_empty() || header {
                        print_events(&events, format, header)?;
                        header = false;
                    }
                    printed += events.len() as u64;
                    last = scanned_to;
                    if short || printed >= limit {
                        break short;
                    }
                };
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
                // A backlog is drained at once; only a caught-up reader waits.
                if caught_up || limit == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
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
            let org_devices = store.org_devices(&adesync::store::OrgDeviceFilter {
                serial: Some(serial.clone()),
                accounts: token.clone().into_iter().collect(),
                include_removed: true,
                ..Default::default()
            })?;
            if devices.is_empty() && org_devices.is_empty() {
                eprintln!(
                    "no device with serial number {} is stored",
                    adesync::model::printable(&serial)
                );
                return Ok(ExitCode::FAILURE);
            }
            let (events, _) = filtered_events(
                &store,
                0,
                token.as_deref(),
                None,
                None,
                Some(&serial),
                u64::MAX,
            )?;
            print_device_detail(&devices, &events, format)?;
            if format != Format::Json && !devices.is_empty() {
                let (replaced, by) = store.replacement_links(&serial)?;
                if let Some((original, date)) = replaced {
                    outln!(
                        "Replaces {} (replaced {})",
                        adesync::model::printable(&original),
                        date.as_deref().unwrap_or("on an unknown date")
                    );
                }
                for s in by {
                    outln!("Replaced by {}", adesync::model::printable(&s));
                }
            }
            if format == Format::Json {
                for d in &org_devices {
                    let mut v = org::org_device_json(d);
                    let evs: Vec<serde_json::Value> = events
                        .iter()
                        .filter(|e| {
                            e.scope == adesync::events::EventScope::OrgDevice
                                && e.token_name == d.account
                        })
                        .map(adesync::events::event_json)
                        .collect();
                    v["events"] = evs.into();
                    v["applecare"] = store.applecare_of(&d.account, &serial)?.into();
                    outln!("{v}");
                }
            } else {
                org::print_org_detail(
                    &mut std::io::stdout().lock(),
                    &store,
                    &org_devices,
                    &events,
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { format } => {
            let config = Config::load_for_reports(config_path)?;
            // Read-only when there is a database (a monitoring user may not write it);
            // before the first sync an empty one is made, and every token says so.
            let store = match Store::open_read_only_if_exists(&config.database)? {
                Some(store) => store,
                None => Store::open(&config.database)?,
            };
            let statuses = adesync::status::token_statuses(&config, &store, chrono::Utc::now())?;
            let org = adesync::status::org_statuses(&config, &store, chrono::Utc::now())?;
            let sinks = adesync::sinks::sink_status(&store, &config)?;
            print_status(&statuses, format)?;
            org::print_org_status(&org, format)?;
            print_sink_attention(&sinks, format)?;
            let sink_trouble = sinks.iter().any(|s| s.state != SinkState::Ok);
            Ok(
                if sink_trouble
                    || statuses.iter().any(|s| !s.attention.is_empty())
                    || org.iter().any(|s| !s.attention.is_empty())
                {
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
        Command::OrgDevices {
            account,
            status,
            family,
            unassigned,
            removed,
            format,
        } => {
            let store = open_existing(config_path)?;
            let rows = store.org_devices(&adesync::store::OrgDeviceFilter {
                accounts: account.into_iter().collect(),
                status,
                family,
                unassigned,
                include_removed: removed,
                serial: None,
            })?;
            org::print_org_devices(&rows, format)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Assign {
            action: Some(AssignAction::Status { format }),
            ..
        } => {
            let config = Config::load_for_reports(config_path)?;
            assign::status(&config, format)
        }
        Command::Assign { token, .. } => {
            let config = Config::load_for_reports(config_path)?;
            assign::dry_run(&config, token.as_deref())
        }
        Command::OrgAccounts {
            action: None,
            format,
        } => {
            let config = Config::load_for_reports(config_path)?;
            org::list_accounts(&config, format)
        }
        Command::Account { token, format } => {
            let cfg = adesync::config::LenientConfig::read(config_path, true)?;
            Ok(account::show(&cfg, token.as_deref(), format)?)
        }
        Command::Store { cmd } => store::run(config_path, cmd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_says_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(std::io::Error::new(
            io.kind(),
            format!("cannot read /etc/adesync/acme.json: {io}"),
        ))
        .context("loading the token");
        let inner = anyhow::anyhow!("No such file or directory (os error 2)")
            .context("cannot read /x: No such file or directory (os error 2)");
        assert_eq!(
            describe(&inner),
            "cannot read /x: No such file or directory (os error 2)"
        );
        assert_eq!(
            describe(&e),
            "loading the token: cannot read /etc/adesync/acme.json: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
