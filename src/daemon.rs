//! The long-running service: sync every token at start-up and then on the schedule,
//! until SIGTERM or SIGINT.
//!
//! A signal stops the loop between passes; a pass in flight is cancelled at its next
//! await point, and because each page commits in its own transaction nothing already
//! committed is lost and nothing half-written is kept. SIGHUP starts a pass at once.

use std::time::Duration;

use rand::Rng;

use crate::config::Config;

/// Runs until SIGTERM/SIGINT. Config errors never reach here (checked before).
pub async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Open (and migrate) the database up front so a broken database fails fast.
    let db = config.database.clone();
    tokio::task::spawn_blocking(move || crate::store::Store::open(&db)).await??;
    tracing::info!(tokens = config.tokens.len(), schedule = %humantime::format_duration(config.schedule), "adesync started");
    loop {
        let pass = async {
            let report = crate::syncer::run_all_once(&config, None).await;
            if let Err(e) = crate::cli::deliver_sinks(&config).await {
                tracing::error!(error = %e, "event delivery failed");
            }
            report
        };
        tokio::select! {
            _ = pass => {}
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
        }
        let wait = jittered(config.schedule);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = hup.recv() => { tracing::info!("SIGHUP: syncing now"); }
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
        }
    }
}

/// The schedule plus up to 10% random jitter, so many daemons do not call Apple in step.
pub fn jittered(base: Duration) -> Duration {
    let max = base.as_millis() as u64 / 10;
    base + Duration::from_millis(rand::rng().random_range(0..=max))
}
