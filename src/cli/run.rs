//! `adesync run --once`: every token once, then delivery; and the lock that keeps a
//! second syncing process off the same database.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use adesync::config::Config;
use adesync::store::Database;

/// `run --once`: every token once, then deliver events to the sinks. On a terminal a
/// progress line per token shows pages and devices; elsewhere nothing extra is printed.
///
/// SIGTERM or SIGINT stops every pass between pages, as in the daemon: what was committed
/// stays, the next run continues from there, and the exit status is 143 (SIGTERM) or 130.
pub async fn run_once(
    config: &Config,
    only: Option<String>,
    full: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    use tokio::signal::unix::{signal, SignalKind};
    let options = adesync::syncer::OnceOptions {
        only,
        full,
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = options.cancel.clone();
    let stopped_by = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    let by = stopped_by.clone();
    let watcher = tokio::spawn(async move {
        let code = tokio::select! {
            _ = term.recv() => 143,
            _ = int.recv() => 130,
        };
        tracing::info!(
            "stopping: the passes in flight stop between pages; committed pages are kept"
        );
        by.store(code, std::sync::atomic::Ordering::SeqCst);
        stop.cancel();
    });
    let bars = std::io::stderr().is_terminal().then(progress_bars);
    let report =
        adesync::syncer::run_all_once_with(config, bars.as_ref().map(|(_, p)| p.clone()), &options)
            .await;
    watcher.abort();
    if let Some((multi, _)) = bars {
        let _ = multi.clear();
    }
    let signal_code = stopped_by.load(std::sync::atomic::Ordering::SeqCst);
    if signal_code != 0 {
        eprintln!(
            "stopped by a signal; committed pages are kept and the next run continues from them"
        );
        return Ok(ExitCode::from(signal_code));
    }
    adesync::sinks::deliver_all_logged(config).await;
    if report.failures() == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    for (name, e) in &report.failed {
        eprintln!("error: token \"{name}\": {e}");
    }
    for (name, e) in &report.org_failed {
        eprintln!("error: organisation account \"{name}\": {e}");
    }
    eprintln!(
        "{} of {} token(s) and account(s) failed; the others synced",
        report.failures(),
        report.ran()
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

/// Only one process syncs a database at a time: two would move the same cursors and
/// could write older pages over newer rows. The lock is released when the process exits.
///
/// On PostgreSQL several processes (replicas) may run at once: each token is synced by one
/// of them at a time, under a lock of its own (see `Store::own_token`).
pub fn lock_database(database: &Database) -> anyhow::Result<Option<std::fs::File>> {
    match database {
        Database::Sqlite(path) => lock_file(path).map(Some),
        Database::Postgres(_) => Ok(None),
    }
}

fn lock_file(database: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the folder for database {}",
                database.display()
            )
        })?;
    }
    // Lock the file the path leads to, so two spellings of one database (a symlink, `..`)
    // share one lock.
    let resolved = match std::fs::canonicalize(database) {
        Ok(p) => p,
        Err(_) => match (database.parent(), database.file_name()) {
            (Some(dir), Some(file)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })
            .map(|d| d.join(file))
            .unwrap_or_else(|_| database.to_owned()),
            _ => database.to_owned(),
        },
    };
    let mut name = resolved.as_os_str().to_owned();
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
