//! The long-running service: every token syncs at start-up and then on its schedule,
//! each in its own loop, until SIGTERM or SIGINT.
//!
//! - One loop per token, so a slow or failing token never delays the others; a semaphore
//!   bounds how many sync at once; a token never runs twice at once (its loop is serial).
//! - After a failed run the next attempt comes sooner than the schedule and backs off while
//!   failures repeat (30 s, 1 m, 2 m, … capped at the schedule). Errors that need a person
//!   (expired or revoked token, terms not accepted, access denied) *park* the token: it is
//!   retried hourly, `adesync status` says what to do, and a change of its token file
//!   un-parks it at once.
//! - SIGHUP syncs every token now (token files are re-read at each run). SIGTERM/SIGINT stop
//!   new work; a pass in flight stops between pages and its writer commits what it holds,
//!   so nothing committed is lost and nothing half-written is kept.
//! - systemd: READY=1 once the database is open, WATCHDOG=1 pings, STATUS= after each run.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, CronSchedule, Schedule, TokenConfig};
use crate::syncer::{RunSummary, SyncError};

mod health;
mod listener;
mod org;

pub(crate) use health::{Health, TokenHealth};

/// How often a parked token is retried.
pub(crate) const PARKED_RETRY: Duration = Duration::from_secs(3600);
/// First retry delay after a failed run; doubles while failures repeat.
pub(crate) const FAILURE_RETRY_BASE: Duration = Duration::from_secs(30);
/// How often a parked token's file is checked for a replacement.
const TOKEN_FILE_POLL: Duration = Duration::from_secs(15);
/// How often pending events are pushed to sinks between syncs.
const SINK_INTERVAL: Duration = Duration::from_secs(30);

/// A sync of one token; the real one is [`crate::syncer::run_token_cancellable`]. Tests
/// substitute their own to drive the scheduler with paused time.
pub(crate) type Runner = Arc<
    dyn Fn(
            TokenConfig,
            CancellationToken,
        ) -> Pin<Box<dyn Future<Output = Result<RunSummary, SyncError>> + Send>>
        + Send
        + Sync,
>;

/// Called after each run with the token's name and outcome (logging, STATUS=, sinks).
pub(crate) type OnRun = Arc<dyn Fn(&str, &Result<RunSummary, SyncError>) + Send + Sync>;

/// The delay before a token's next run, given its last outcome.
pub(crate) fn next_delay(
    schedule: Duration,
    outcome: &Result<RunSummary, SyncError>,
    failures: u32,
) -> Duration {
    match outcome {
        Ok(_) => jittered(schedule),
        Err(e) if e.needs_admin() => PARKED_RETRY.max(schedule),
        Err(_) => {
            let exp = failures.saturating_sub(1).min(16);
            let backoff = FAILURE_RETRY_BASE.saturating_mul(1u32 << exp);
            jittered(backoff.min(schedule))
        }
    }
}

/// The schedule plus up to 10% random jitter, so many daemons do not call Apple in step.
pub(crate) fn jittered(base: Duration) -> Duration {
    let max = base.as_millis() as u64 / 10;
    base + Duration::from_millis(rand::rng().random_range(0..=max))
}

/// The `tokio-cron-scheduler` instance that fires cron-scheduled tokens; `None` when
/// every token runs on an interval.
pub(crate) type Cron = Option<tokio_cron_scheduler::JobScheduler>;

/// Starts `tokio-cron-scheduler` when some token has a cron schedule.
pub(crate) async fn start_cron(tokens: &[TokenConfig]) -> anyhow::Result<Cron> {
    if !tokens
        .iter()
        .any(|t| matches!(t.schedule, Schedule::Cron(_)))
    {
        return Ok(None);
    }
    let scheduler = tokio_cron_scheduler::JobScheduler::new().await?;
    scheduler.start().await?;
    Ok(Some(scheduler))
}

/// Waits for the next occurrence of `cron` after now. The occurrence is computed in the
/// schedule's own time zone (so it follows daylight-saving changes) and fired by a
/// one-shot `tokio-cron-scheduler` job; a fresh signal per wait means a tick that fell
/// during a run never causes an extra run. A fallback timer a minute after the
/// occurrence keeps the token syncing even if the scheduler failed.
async fn next_occurrence(scheduler: &tokio_cron_scheduler::JobScheduler, cron: &CronSchedule) {
    let now = chrono::Utc::now();
    let Some(next) = cron.next_after(now) else {
        // No occurrence within reach (checked at load, so not expected): a day's wait.
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        return;
    };
    let wait = (next - now).to_std().unwrap_or_default();
    let fired = Arc::new(Notify::new());
    let ring = fired.clone();
    let job = tokio_cron_scheduler::Job::new_one_shot_at_instant_async(
        std::time::Instant::now() + wait,
        move |_, _| {
            let ring = ring.clone();
            Box::pin(async move { ring.notify_one() })
        },
    );
    let id = match job {
        Ok(job) => scheduler.add(job).await.ok(),
        Err(_) => None,
    };
    tokio::select! {
        _ = fired.notified() => {}
        _ = tokio::time::sleep(wait + Duration::from_secs(60)) => {
            tracing::warn!(schedule = %cron.expr, "the cron scheduler did not fire; running on the fallback timer");
        }
    }
    if let Some(id) = id {
        let _ = scheduler.remove(&id).await;
    }
    // The scheduler counts whole seconds and may fire a moment early; never run before
    // the occurrence, so the next wait is for the one after it.
    if let Ok(early) = (next - chrono::Utc::now()).to_std() {
        tokio::time::sleep(early).await;
    }
}

/// The scheduler: one loop per token until `shutdown` is cancelled. `sync_now` wakes every
/// loop at once (SIGHUP); a cron-scheduled token also wakes at its tick. Returns when every
/// loop has stopped.
pub(crate) async fn schedule(
    tokens: Vec<TokenConfig>,
    runner: Runner,
    health: Health,
    sync_now: watch::Receiver<u64>,
    shutdown: CancellationToken,
    on_run: OnRun,
    cron: Cron,
) {
    let permits = Arc::new(Semaphore::new(crate::syncer::MAX_CONCURRENT_TOKENS));
    let mut loops = tokio::task::JoinSet::new();
    for token in tokens {
        health.lock().unwrap_or_else(|e| e.into_inner()).insert(
            token.name.clone(),
            TokenHealth {
                name: token.name.clone(),
                ..TokenHealth::default()
            },
        );
        let cron = cron.clone();
        loops.spawn(token_loop(
            (token, cron),
            runner.clone(),
            health.clone(),
            sync_now.clone(),
            shutdown.clone(),
            permits.clone(),
            on_run.clone(),
        ));
    }
    while loops.join_next().await.is_some() {}
}

async fn token_loop(
    (token, cron): (TokenConfig, Cron),
    runner: Runner,
    health: Health,
    mut sync_now: watch::Receiver<u64>,
    shutdown: CancellationToken,
    permits: Arc<Semaphore>,
    on_run: OnRun,
) {
    let mut failures: u32 = 0;
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p,
            _ = shutdown.cancelled() => return,
        };
        let Ok(_permit) = permit else { return };
        update(&health, &token.name, |h| h.running = true);
        let outcome = runner(token.clone(), shutdown.clone()).await;
        drop(_permit);
        if matches!(outcome, Err(SyncError::Cancelled)) || shutdown.is_cancelled() {
            update(&health, &token.name, |h| h.running = false);
            return;
        }
        failures = if outcome.is_ok() { 0 } else { failures + 1 };
        let parked = matches!(&outcome, Err(e) if e.needs_admin());
        update(&health, &token.name, |h| {
            h.running = false;
            h.runs += 1;
            h.consecutive_failures = failures;
            match &outcome {
                // Another replica synced it: nothing of this replica's to report.
                Ok(s) if s.held_by.is_some() => {}
                Ok(s) => {
                    h.last_success = Some(SystemTime::now());
                    h.events_written += s.stats.events();
                    h.records_refused += s.refused;
                    h.last_summary = Some(s.clone());
                    h.last_error = None;
                    h.parked = None;
                }
                Err(e) => {
                    *h.errors_by_kind
                        .entry(e.kind().as_str().to_owned())
                        .or_default() += 1;
                    h.last_error = Some(e.to_string());
                    h.parked = parked.then(|| e.to_string());
                }
            }
        });
        on_run(&token.name, &outcome);
        let delay = next_delay(token.schedule.longest_gap(), &outcome, failures);
        // A cron token that succeeded waits for its next occurrence; after a failure (or
        // while parked) the backoff timer decides, as for an interval.
        let cron_wait = match (&token.schedule, &cron) {
            (Schedule::Cron(c), Some(scheduler)) if outcome.is_ok() => {
                Some((scheduler.clone(), c.clone()))
            }
            _ => None,
        };
        let on_cron = async {
            match &cron_wait {
                Some((scheduler, c)) => next_occurrence(scheduler, c).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(on_cron);
        if parked {
            tracing::error!(token = %token.name, retry_in = %crate::status::human_duration(delay),
                "token parked until an administrator acts (see `adesync status`); a new token file is picked up at once");
        } else if let Err(e) = &outcome {
            tracing::warn!(token = %token.name, error = %e, retry_in = %crate::status::human_duration(delay), "sync failed; will retry");
        }
        let stamp = parked.then(|| file_stamp(&token.token_file));
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep, if cron_wait.is_none() => break,
                _ = &mut on_cron => {
                    tracing::debug!(token = %token.name, "scheduled run");
                    break;
                }
                changed = sync_now.changed() => {
                    if changed.is_err() { return; }
                    tracing::info!(token = %token.name, "sync requested");
                    break;
                }
                _ = tokio::time::sleep(TOKEN_FILE_POLL), if stamp.is_some() => {
                    if stamp != Some(file_stamp(&token.token_file)) {
                        tracing::info!(token = %token.name, "token file changed; un-parking");
                        break;
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn update(health: &Health, name: &str, f: impl FnOnce(&mut TokenHealth)) {
    if let Some(h) = health
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(name)
    {
        f(h);
    }
}

/// Runs the service until SIGTERM/SIGINT. The config was validated by the caller.
pub async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Open (and migrate) the database up front so a broken database fails fast.
    let db = config.database.clone();
    tokio::task::spawn_blocking(move || crate::store::Store::open(&db)).await??;

    let config = Arc::new(config);
    let health: Health = Arc::default();
    let shutdown = CancellationToken::new();
    let (sync_now_tx, sync_now_rx) = watch::channel(0u64);

    if let Some(addr) = config.http_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (config `http.listen`): {e}"))?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "serving /metrics and /healthz to other machines (http.allow_public = true); they need no credentials");
        }
        tracing::info!(%addr, "serving /metrics and /healthz");
        let app = listener::router(config.clone(), health.clone());
        tokio::spawn(listener::serve(listener, app, shutdown.clone()));
    }

    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("started; first sync running"),
    ]);
    spawn_watchdog(shutdown.clone());
    tracing::info!(
        tokens = config.tokens.len(),
        org_accounts = config.org_accounts.len(),
        "adesync started"
    );

    let runner_config = config.clone();
    let runner: Runner = Arc::new(move |token, cancel| {
        let config = runner_config.clone();
        Box::pin(async move {
            crate::syncer::run_token_cancellable(&config, &token, None, &cancel).await
        })
    });
    let status_health = health.clone();
    let sink_config = config.clone();
    let (deliver_tx, mut deliver_rx) = watch::channel(0u64);
    let accounts = org::spawn(&config, &sync_now_rx, &deliver_tx, &shutdown);
    let on_run: OnRun = Arc::new(move |name, outcome| {
        if let Ok(s) = outcome {
            crate::syncer::log_summary(s);
        } else if let Err(e) = outcome {
            tracing::error!(token = %name, error = %e, "sync failed");
        }
        let line = status_line(&status_health);
        notify(&[sd_notify::NotifyState::Status(&line)]);
        deliver_tx.send_modify(|n| *n += 1);
    });

    // Event delivery runs beside the syncs, so a slow sink never delays a sync.
    let sink_stop = shutdown.clone();
    let sinks = tokio::spawn(async move {
        loop {
            crate::sinks::deliver_all_logged(&sink_config).await;
            tokio::select! {
                _ = deliver_rx.changed() => {}
                _ = tokio::time::sleep(SINK_INTERVAL) => {}
                _ = sink_stop.cancelled() => return,
            }
        }
    });

    let cron = start_cron(&config.tokens).await?;
    let sched = tokio::spawn(schedule(
        config.tokens.clone(),
        runner,
        health.clone(),
        sync_now_rx,
        shutdown.clone(),
        on_run,
        cron.clone(),
    ));

    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: syncing every token now");
                sync_now_tx.send_modify(|n| *n += 1);
            }
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    // Passes in flight stop between pages; their writers commit what they hold.
    if let Some(mut cron) = cron {
        let _ = cron.shutdown().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), sched).await;
    for a in accounts {
        let _ = tokio::time::timeout(Duration::from_secs(20), a).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), sinks).await;
    tracing::info!("stopped");
    Ok(())
}

/// One line for systemd's STATUS=: per token, its last outcome.
pub(crate) fn status_line(health: &Health) -> String {
    let h = health.lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = h.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = &h[n];
            if let Some(p) = &t.parked {
                let short: String = p.chars().take(60).collect();
                format!("{n}: PARKED ({short})")
            } else if t.last_error.is_some() {
                format!("{n}: failing ({} in a row)", t.consecutive_failures)
            } else if let Some(s) = &t.last_summary {
                format!(
                    "{n}: ok, +{} ~{} -{}",
                    s.stats.added, s.stats.modified, s.stats.deleted
                )
            } else {
                format!("{n}: starting")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    let _ = sd_notify::notify(false, states);
}

fn spawn_watchdog(shutdown: CancellationToken) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        loop {
            notify(&[sd_notify::NotifyState::Watchdog]);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apple::{ApiError, Endpoint};
    use std::sync::Mutex;
    use tokio::time::Instant;

    fn token(name: &str, schedule_secs: u64) -> TokenConfig {
        let dir = std::env::temp_dir();
        TokenConfig {
            name: name.into(),
            token_file: dir.join(format!("adesync-daemon-test-{name}.json")),
            private_key_file: None,
            api_url: reqwest::Url::parse("http://127.0.0.1:9").unwrap(),
            page_size: 100,
            user_agent: "t".into(),
            protocol_version: 7,
            schedule: Schedule::Interval(Duration::from_secs(schedule_secs)),
            full_fetch: None,
        }
    }

    type Log = Arc<Mutex<Vec<(String, Duration)>>>;

    /// A fake runner: "fail" always fails transiently, "revoked" needs an admin,
    /// "slow" takes 40 minutes, others succeed at once. Records (token, start time).
    fn runner(log: Log, start: Instant) -> Runner {
        Arc::new(move |t: TokenConfig, cancel: CancellationToken| {
            let log = log.clone();
            Box::pin(async move {
                log.lock().unwrap().push((t.name.clone(), start.elapsed()));
                match t.name.as_str() {
                    "fail" => Err(SyncError::Api(ApiError::Server {
                        endpoint: Endpoint::SyncDevices,
                        status: 500,
                        body: String::new(),
                    })),
                    "revoked" => Err(SyncError::Api(ApiError::AccessDenied(Endpoint::Session))),
                    "slow" => {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(40 * 60)) => {}
                            _ = cancel.cancelled() => return Err(SyncError::Cancelled),
                        }
                        Ok(RunSummary {
                            token: t.name.clone(),
                            ..Default::default()
                        })
                    }
                    _ => Ok(RunSummary {
                        token: t.name.clone(),
                        ..Default::default()
                    }),
                }
            })
        })
    }

    fn starts(log: &Log, name: &str) -> Vec<u64> {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| t.as_secs())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_keep_their_schedule_while_one_fails_and_one_is_slow() {
        let log: Log = Arc::default();
        let health: Health = Arc::default();
        let shutdown = CancellationToken::new();
        let (_tx, rx) = watch::channel(0);
        let start = Instant::now();
        let tokens = vec![
            token("a", 900),
            token("b", 600),
            token("fail", 900),
            token("slow", 900),
            token("revoked", 900),
        ];
        let sched = tokio::spawn(schedule(
            tokens,
            runner(log.clone(), start),
            health.clone(),
            rx,
            shutdown.clone(),
            Arc::new(|_, _| {}),
            None,
        ));
        tokio::time::sleep(Duration::from_secs(3 * 3600 + 60)).await;
        shutdown.cancel();
        sched.await.unwrap();

        // "a" runs at start and then every 15 minutes (+ up to 10% jitter): 0, ~900, ~1800 ...
        let a = starts(&log, "a");
        assert!(a.len() >= 11 && a.len() <= 13, "{a:?}");
        assert_eq!(a[0], 0);
        for w in a.windows(2) {
            let gap = w[1] - w[0];
            assert!((900..=990).contains(&gap), "a's gap {gap} in {a:?}");
        }
        let b = starts(&log, "b");
        for w in b.windows(2) {
            assert!((600..=660).contains(&(w[1] - w[0])), "b: {b:?}");
        }
        // The failing token retries sooner, backing off: ~30 s, ~60 s, ~120 s, ... capped at 900 s.
        let f = starts(&log, "fail");
        let gaps: Vec<u64> = f.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            (30..=33).contains(&gaps[0])
                && (60..=66).contains(&gaps[1])
                && (120..=132).contains(&gaps[2]),
            "{gaps:?}"
        );
        assert!(gaps.iter().all(|g| *g <= 990), "{gaps:?}");
        // The slow token (40 minutes a run) never delayed the others, and never overlapped itself.
        let s = starts(&log, "slow");
        for w in s.windows(2) {
            assert!(w[1] - w[0] >= 2400, "slow overlapped: {s:?}");
        }
        // The parked token is retried hourly, not every 15 minutes.
        let r = starts(&log, "revoked");
        assert_eq!(r.len(), 4, "{r:?}");
        let h = health.lock().unwrap();
        assert!(h["revoked"]
            .parked
            .as_deref()
            .unwrap()
            .contains("ACCESS_DENIED"));
        assert!(h["fail"].consecutive_failures >= 5);
        assert_eq!(h["a"].consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn sync_now_wakes_every_token_at_once() {
        let log: Log = Arc::default();
        let shutdown = CancellationToken::new();
        let (tx, rx) = watch::channel(0);
        let start = Instant::now();
        let sched = tokio::spawn(schedule(
            vec![token("a", 3600), token("b", 3600)],
            runner(log.clone(), start),
            Arc::default(),
            rx,
            shutdown.clone(),
            Arc::new(|_, _| {}),
            None,
        ));
        tokio::time::sleep(Duration::from_secs(600)).await;
        tx.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.cancel();
        sched.await.unwrap();
        assert_eq!(starts(&log, "a"), vec![0, 600]);
        assert_eq!(starts(&log, "b"), vec![0, 600]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_a_slow_run_promptly() {
        let log: Log = Arc::default();
        let shutdown = CancellationToken::new();
        let (_tx, rx) = watch::channel(0);
        let start = Instant::now();
        let sched = tokio::spawn(schedule(
            vec![token("slow", 900)],
            runner(log.clone(), start),
            Arc::default(),
            rx,
            shutdown.clone(),
            Arc::new(|_, _| {}),
            None,
        ));
        tokio::time::sleep(Duration::from_secs(60)).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), sched)
            .await
            .expect("stops at once")
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokio_cron_scheduler_fires_each_occurrence_once() {
        let every_second = match crate::config::parse_schedule(
            "* * * * * *",
            chrono_tz::Europe::Berlin,
            Duration::from_secs(1),
            None,
        )
        .unwrap()
        {
            Schedule::Cron(c) => c,
            other => panic!("{other:?}"),
        };
        let mut cron_token = token("cron", 60);
        cron_token.schedule = Schedule::Cron(every_second.clone());
        let scheduler = start_cron(&[cron_token]).await.unwrap().expect("started");
        assert!(start_cron(&[token("interval", 60)])
            .await
            .unwrap()
            .is_none());
        let began = chrono::Utc::now();
        for _ in 0..2 {
            tokio::time::timeout(
                Duration::from_secs(5),
                next_occurrence(&scheduler, &every_second),
            )
            .await
            .expect("fired at the next occurrence, not the fallback a minute later");
        }
        assert!(chrono::Utc::now() - began >= chrono::Duration::milliseconds(1000));
        let mut scheduler = scheduler;
        scheduler.shutdown().await.unwrap();
    }

    #[test]
    fn failure_backoff_grows_and_is_capped_by_the_schedule() {
        let err = || -> Result<RunSummary, SyncError> {
            Err(SyncError::Api(ApiError::Server {
                endpoint: Endpoint::SyncDevices,
                status: 502,
                body: String::new(),
            }))
        };
        let d1 = next_delay(Duration::from_secs(900), &err(), 1);
        let d3 = next_delay(Duration::from_secs(900), &err(), 3);
        let d9 = next_delay(Duration::from_secs(900), &err(), 9);
        assert!(d1 >= Duration::from_secs(30) && d1 <= Duration::from_secs(33));
        assert!(d3 >= Duration::from_secs(120) && d3 <= Duration::from_secs(132));
        assert!(d9 >= Duration::from_secs(900) && d9 <= Duration::from_secs(990));
    }
}
