//! The daemon's organisation accounts: one loop per account, beside the tokens'
//! scheduler. Each keeps its client (and so its access token) between runs, walks on the
//! account's schedule, retries a transient failure sooner (1 min, doubling, never later
//! than the schedule), and re-reads the key after a failure that needs an administrator.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OrgAccountConfig, Schedule};
use crate::orgapi::OrgClient;
use crate::syncer::{org_client_settings, run_account, run_account_with, OrgSyncError};

/// Starts one loop per configured account.
pub(super) fn spawn(
    config: &Arc<Config>,
    sync_now: &watch::Receiver<u64>,
    delivered: &watch::Sender<u64>,
    shutdown: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    config
        .org_accounts
        .iter()
        .map(|a| {
            tokio::spawn(account_loop(
                config.clone(),
                a.clone(),
                sync_now.clone(),
                delivered.clone(),
                shutdown.clone(),
            ))
        })
        .collect()
}

/// Time from now to the schedule's next run.
fn until_next(schedule: &Schedule) -> Duration {
    match schedule {
        Schedule::Interval(d) => *d,
        Schedule::Cron(c) => {
            let now = chrono::Utc::now();
            c.next_after(now)
                .and_then(|n| (n - now).to_std().ok())
                .unwrap_or(Duration::from_secs(3600))
        }
    }
}

/// The wait after `failures` failures in a row that time may heal.
fn retry_delay(schedule: &Schedule, failures: u32) -> Duration {
    let backoff = Duration::from_secs(60).saturating_mul(1 << failures.saturating_sub(1).min(10));
    backoff.min(until_next(schedule))
}

async fn account_loop(
    config: Arc<Config>,
    account: OrgAccountConfig,
    mut sync_now: watch::Receiver<u64>,
    delivered: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut client: Option<OrgClient> = None;
    let mut failures = 0u32;
    loop {
        if client.is_none() {
            client = OrgClient::new(&account, org_client_settings(&config)).ok();
        }
        let result = match &client {
            Some(c) => run_account_with(&config, c, &shutdown).await,
            // The key cannot be read: run_account says why and records it.
            None => run_account(&config, &account, &shutdown).await,
        };
        let wait = match &result {
            Ok(s) if s.held_by.is_some() => {
                // Another replica walks it (logged by the run); try again on the schedule.
                failures = 0;
                until_next(&account.schedule)
            }
            Ok(s) => {
                failures = 0;
                tracing::info!(
                    account = %account.name,
                    pages = s.pages,
                    devices = s.devices,
                    added = s.stats.added,
                    modified = s.stats.modified,
                    removed = s.stats.removed,
                    rate_limited = s.rate_limited,
                    duration_ms = s.duration.as_millis() as u64,
                    "organisation walk done"
                );
                until_next(&account.schedule)
            }
            Err(OrgSyncError::Cancelled) => return,
            Err(e) => {
                failures += 1;
                tracing::error!(account = %account.name, error = %e, "organisation walk failed");
                if e.kind().needs_admin() {
                    // Read the key and ask for a token afresh next time.
                    client = None;
                    until_next(&account.schedule)
                } else {
                    retry_delay(&account.schedule, failures)
                }
            }
        };
        delivered.send_modify(|n| *n += 1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = sync_now.changed() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_back_off_up_to_the_schedule() {
        let hourly = Schedule::Interval(Duration::from_secs(3600));
        assert_eq!(retry_delay(&hourly, 1), Duration::from_secs(60));
        assert_eq!(retry_delay(&hourly, 3), Duration::from_secs(240));
        assert_eq!(retry_delay(&hourly, 30), Duration::from_secs(3600));
    }
}
