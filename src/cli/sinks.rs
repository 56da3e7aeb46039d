//! `adesync sinks [test NAME | resume NAME]` and `adesync events replay`: the operator's
//! view of event delivery and its tools, in words for people. The work itself is done
//! by [`adesync::sinks`].

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::render::{csv_cell, write_table, Format};
use adesync::config::Config;
use adesync::sinks::{SinkError, SinkStatus};
use adesync::store::Store;

/// What to do with sinks (without one: list them).
#[derive(Debug, Subcommand)]
pub enum SinksAction {
    /// Send one test event (id 0, type "sink.test", never stored) to a sink, once, and say
    /// whether the receiver accepted it. The sink's cursor is not touched.
    Test {
        /// The sink's name.
        name: String,
    },
    /// Un-park a sink once its receiver is fixed (and drop any Retry-After pause): the
    /// next delivery pass — the daemon's within 30 s, or the next `run --once` — sends
    /// again, starting with the batch that was refused.
    Resume {
        /// The sink's name.
        name: String,
    },
}

/// What to do with events (without one: list them).
#[derive(Debug, Subcommand)]
pub enum EventsAction {
    /// Send events to one sink again, from an id on, in order: the sink's cursor goes
    /// back and a delivery pass runs now. Receivers see the same ids and bytes again.
    Replay {
        /// The sink's name.
        #[arg(long)]
        sink: String,
        /// The first event id to send again.
        #[arg(long)]
        from: i64,
    },
}

/// `adesync sinks …`.
pub async fn sinks(
    config_path: &Path,
    action: Option<SinksAction>,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    match action {
        None => {
            // SQLite off the async runtime.
            let statuses = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let store = open_store(&config)?;
                Ok(adesync::sinks::sink_status(&store, &config)?)
            })
            .await??;
            print_statuses(&statuses, format)?;
        }
        Some(SinksAction::Test { name }) => {
            adesync::sinks::send_test(&config, &name).await?;
            outln!("sink \"{name}\": the test event was accepted");
        }
        Some(SinksAction::Resume { name }) => {
            check_store(&config)?;
            let was_parked = adesync::sinks::resume(&config, &name).await?;
            if was_parked {
                outln!(
                    "sink \"{name}\" resumed: the next delivery pass (the daemon's within 30 s, or the next `adesync run --once`) sends again from where it stopped"
                );
            } else {
                outln!("sink \"{name}\" was not parked; nothing to do");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `adesync events replay …`.
pub async fn events(config_path: &Path, action: EventsAction) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    match action {
        EventsAction::Replay { sink, from } => {
            check_store(&config)?;
            match adesync::sinks::replay(&config, &sink, from).await {
                Ok(n) => {
                    outln!("sink \"{sink}\": sent {n} event(s) again, from id {from}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ (SinkError::Replay { .. } | SinkError::UnknownSink { .. })) => {
                    Err(e.into())
                }
                Err(e) => {
                    eprintln!(
                        "error: {e}\nsink \"{sink}\" will receive the events from id {from} again once it is reachable"
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn check_store(config: &Config) -> anyhow::Result<()> {
    open_store(config).map(drop)
}

fn open_store(config: &Config) -> anyhow::Result<Store> {
    Store::open_read_only_if_exists(&config.database)?
        .ok_or_else(|| super::query::no_mirror(config))
}

fn age(secs: Option<u64>) -> String {
    match secs {
        None => String::new(),
        Some(s) => adesync::status::human_duration(Duration::from_secs(s)),
    }
}

fn print_statuses(statuses: &[SinkStatus], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let header = [
        "name",
        "type",
        "state",
        "cursor",
        "pending",
        "oldest_pending",
        "last_delivered_at",
        "last_error",
    ];
    let row = |s: &SinkStatus| {
        let state = match (&s.retry_at, s.state) {
            (Some(until), adesync::model::SinkState::Waiting) => format!("waiting until {until}"),
            (_, other) => other.to_string(),
        };
        vec![
            s.name.clone(),
            s.kind.to_owned(),
            state,
            s.cursor.to_string(),
            s.pending.to_string(),
            age(s.oldest_pending_age_secs),
            s.last_delivered_at.clone().unwrap_or_default(),
            s.last_error.clone().unwrap_or_default(),
        ]
    };
    match format {
        Format::Json => {
            for s in statuses {
                writeln!(out, "{}", serde_json::to_string(s)?)?;
            }
        }
        Format::Csv => {
            writeln!(out, "{}", header.join(","))?;
            for s in statuses {
                let cells: Vec<String> = row(s).iter().map(|c| csv_cell(c)).collect();
                writeln!(out, "{}", cells.join(","))?;
            }
        }
        Format::Table => {
            if statuses.is_empty() {
                writeln!(
                    out,
                    "no sinks configured; add [[sinks]] tables (see config.example.toml)"
                )?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = statuses.iter().map(row).collect();
            write_table(&mut out, &header, &rows)?;
        }
    }
    Ok(())
}
