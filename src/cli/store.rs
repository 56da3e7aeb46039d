//! `adesync store copy --to postgres://…`: moves the configured SQLite mirror into an empty
//! PostgreSQL database (see `Store::copy_to`).

use std::process::ExitCode;

use clap::Subcommand;

use adesync::config::{Config, Database};
use adesync::store::Store;

/// `adesync store` actions.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy the configured SQLite mirror — devices, events with their ids, sync cursors,
    /// accounts, sink cursors — into an empty PostgreSQL database, in one transaction, so
    /// the move needs no full re-fetch and no receiver sees an event twice. Stop adesync
    /// first; afterwards set `database` to the URL.
    Copy {
        /// The PostgreSQL database, e.g. postgres://adesync@db.example.com/adesync (the
        /// password from PGPASSWORD).
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

pub fn run(config_path: &std::path::Path, cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    let StoreCommand::Copy { to } = cmd;
    let config = Config::load(config_path)?;
    let Database::Sqlite(path) = &config.database else {
        anyhow::bail!(
            "the configured database is already PostgreSQL ({}); `store copy` moves an SQLite mirror: use the config whose `database` is the SQLite file",
            config.database.display()
        );
    };
    if !path.exists() {
        anyhow::bail!(
            "there is no mirror at {} to copy (nothing has synced into it yet)",
            path.display()
        );
    }
    let target = Database::postgres(&to, None)
        .map_err(|reason| anyhow::anyhow!("--to {}: {reason}", printable_url(&to)))?;
    // No sync may write the file while it is copied: what it wrote after the snapshot
    // would be missing on the other side.
    let _lock = super::run::lock_database(&config.database).map_err(|e| {
        anyhow::anyhow!("{e}; stop it first (e.g. `systemctl stop adesync`), then copy")
    })?;
    let source = Store::open(path)?;
    let mut dest = Store::open(&target)?;
    let r = source.copy_to(&mut dest)?;
    outln!(
        "copied {} devices, {} events, {} sync states, {} accounts, {} sink cursors{} from {} to {}",
        r.devices,
        r.events,
        r.sync_states,
        r.accounts,
        r.sink_cursors,
        if r.fetch_seen > 0 {
            " and the full fetch in progress"
        } else {
            ""
        },
        path.display(),
        target.display()
    );
    if r.assignments > 0 || r.profiles > 0 {
        outln!(
            "and {} profile definitions and {} devices' last assignments",
            r.profiles,
            r.assignments
        );
    }
    if r.org_accounts > 0 || r.org_devices > 0 {
        outln!(
            "and {} organisation accounts' walks, {} organisation devices, {} MDM servers and {} AppleCare coverages",
            r.org_accounts, r.org_devices, r.mdm_servers, r.applecare_coverages
        );
    }
    outln!(
        "next: set database = \"{}\" in {} and start adesync again; it continues from the copied cursors",
        target.display(),
        config.source.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The URL as given, without a password, for a message about it.
fn printable_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "(the URL)".into(),
    }
}
