//! Event delivery: every configured sink receives every stored event, at least once and
//! in id order, each at its own pace.
//!
//! Key invariant: a sink's cursor (`sink_cursors.last_event_id`) moves only after the
//! receiver acknowledged every event up to it (a 2xx answer, exit status 0, a flushed
//! write), and only from the value this pass read (a compare-and-set). So a crash between
//! sending and recording repeats at most the batch in flight, with the same ids and the
//! same bytes, and never skips one; receivers de-duplicate by `id`. A batch the receiver
//! refuses for good *parks* the sink instead of being skipped, so order is kept.
//!
//! Sinks are independent: a pass runs them concurrently, each on its own task and
//! database connection, with bounded retries and its own result. No write lock is held
//! while a receiver is talked to, so a slow or dead receiver never delays a sync, nor
//! another sink.
//!
//! - `jsonl`, `webhook`, `command`: how one batch reaches each kind of receiver; each
//!   event is in the sink's `format` (adesync's object, or a CloudEvent around it).
//! - [`deliver_all`]: one pass over every sink, then retention of delivered events.
//! - [`sink_status`]: each sink's cursor, backlog and health, for people and metrics.
//! - [`replay`], [`resume`], [`send_test`]: the operator's tools.

pub(crate) mod command;
pub(crate) mod jsonl;
pub(crate) mod webhook;

/// How a receiver checks the `X-Adesync-Signature` of a webhook request (the
/// `adesync-v1` scheme; for the default, Standard Webhooks, use any of its libraries).
pub use webhook::{verify, VerifyError, DEFAULT_TOLERANCE};

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, EventFormat, RetryPolicy, SinkConfig, SinkKind};
use crate::events::{cloudevent, event_json};
use crate::model::{format_time, parse_time, SinkState};
use crate::store::{Database, Store, StoreError};

/// Events read per batch for a `jsonl` sink (webhook and command sinks use `max_batch`).
const JSONL_BATCH: usize = 1000;
/// Longest pause a receiver's `Retry-After` can impose on its sink.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Why a sink did not take its events. Every message names the sink and what happens
/// next or what to do; none contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Reading events or recording progress failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The receiver failed or could not be reached, on every attempt of this pass.
    #[error("sink \"{sink}\": {message}; the events stay queued and are retried on the next pass")]
    Unavailable {
        /// Sink name.
        sink: String,
        /// What went wrong on the last attempt.
        message: String,
    },
    /// The receiver refused a batch for good; delivery to this sink waits for a person.
    #[error("sink \"{sink}\" is parked: {}", parked(sink, message))]
    Parked {
        /// Sink name.
        sink: String,
        /// What the receiver answered.
        message: String,
    },
    /// The receiver asked for a pause (`Retry-After`) longer than a pass waits.
    #[error("sink \"{sink}\": the receiver asked for no requests before {until} (Retry-After); the events stay queued until then")]
    Deferred {
        /// Sink name.
        sink: String,
        /// When delivery resumes (RFC 3339).
        until: String,
    },
    /// The delivery task itself failed (a bug); nothing was lost.
    #[error("sink \"{sink}\": delivery stopped unexpectedly ({message}); the events stay queued and are retried on the next pass")]
    Internal {
        /// Sink name.
        sink: String,
        /// What stopped it.
        message: String,
    },
    /// An operator command named a sink that is not configured.
    #[error("no sink named \"{name}\" in the configuration (configured: {known})")]
    UnknownSink {
        /// The name given.
        name: String,
        /// The configured names.
        known: String,
    },
    /// A replay that cannot be done as asked.
    #[error("cannot replay to sink \"{sink}\": {reason}")]
    Replay {
        /// Sink name.
        sink: String,
        /// Why, and what to ask instead.
        reason: String,
    },
    /// `adesync sinks test` did not get its event accepted.
    #[error("sink \"{sink}\": the test event was not delivered: {message}")]
    TestFailed {
        /// Sink name.
        sink: String,
        /// What the receiver answered.
        message: String,
    },
}

/// A parked sink's message with what to do, unless the message says it already.
fn parked(sink: &str, message: &str) -> String {
    let resume = format!("`adesync sinks resume {sink}`");
    if message.contains(&resume) {
        message.to_owned()
    } else {
        format!("{message}; fix the receiver (or what it refuses), then run {resume}")
    }
}

/// Why one attempt to hand a batch to a receiver failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth retrying: a network error, a timeout, 408/429/5xx, a non-zero exit, an I/O
    /// error. `retry_after` is the receiver's own request for a pause.
    Retry {
        /// What happened, for logs and `last_error`.
        message: String,
        /// The receiver's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// The receiver refused the batch and will refuse it again (a 4xx).
    Refused {
        /// What it answered.
        message: String,
    },
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Retry { message, .. } | Failure::Refused { message } => message,
        }
    }
}

/// One sink's receiver, ready to take batches.
enum Transport {
    Jsonl(jsonl::JsonlWriter),
    Webhook(webhook::WebhookClient),
    Command(command::CommandRunner),
}

impl Transport {
    fn new(sink: &SinkConfig) -> Result<Self, Failure> {
        Ok(match &sink.kind {
            SinkKind::Jsonl(t) => Transport::Jsonl(jsonl::JsonlWriter::new(t.clone())),
            SinkKind::Webhook(w) => {
                Transport::Webhook(webhook::WebhookClient::new(&sink.name, w, sink.format)?)
            }
            SinkKind::Command(c) => {
                Transport::Command(command::CommandRunner::new(&sink.name, c.clone()))
            }
        })
    }

    fn max_batch(&self) -> usize {
        match self {
            Transport::Jsonl(_) => JSONL_BATCH,
            Transport::Webhook(w) => w.max_batch(),
            Transport::Command(c) => c.max_batch(),
        }
    }

    /// Hands over one batch of serialized events (each one JSON object, no newline).
    /// `batch_id` is the same for every attempt of the same events (a webhook's
    /// `webhook-id`).
    async fn send(&self, batch_id: &str, events: &[Vec<u8>]) -> Result<(), Failure> {
        match self {
            Transport::Jsonl(j) => j.send(events).await,
            Transport::Webhook(w) => w.send(batch_id, events).await,
            Transport::Command(c) => c.send(events).await,
        }
    }
}

/// One event as the sink's `format` wants it, serialized.
fn render(format: EventFormat, event: serde_json::Value, instance: &str) -> Vec<u8> {
    match format {
        EventFormat::Adesync => event,
        EventFormat::CloudEvents => cloudevent(event, instance),
    }
    .to_string()
    .into_bytes()
}

/// The id of the batch of events `first..=last`, derived from the events it carries: every
/// attempt at the same batch (a retry, or a re-send after a restart) has the same id.
fn batch_id(first: i64, last: i64) -> String {
    format!("evt_{first}_{last}")
}

/// A store shared by one sink's pass, reached off the executor.
#[derive(Clone)]
struct Db {
    store: Arc<Mutex<Store>>,
    sink: String,
}

impl Db {
    async fn open(path: Database, sink: &str) -> Result<Db, SinkError> {
        let store = blocking(sink, move || Store::open(&path)).await?;
        Ok(Db {
            store: Arc::new(Mutex::new(store)),
            sink: sink.to_owned(),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, SinkError> {
        let store = self.store.clone();
        blocking(&self.sink, move || {
            f(&mut store.lock().unwrap_or_else(|e| e.into_inner()))
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    sink: &str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, SinkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SinkError::Internal {
            sink: sink.to_owned(),
            message: e.to_string(),
        })?
        .map_err(SinkError::from)
}

/// Sinks being delivered by this process, by (database, sink name): two passes that
/// overlap (the daemon's timer and its after-sync trigger) never send the same batch twice.
static IN_FLIGHT: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());

struct Claim((String, String));

impl Claim {
    fn take(db: &Database, sink: &str) -> Option<Claim> {
        let key = (db.display().to_string(), sink.to_owned());
        let mut set = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(key.clone()).then_some(Claim(key))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// One delivery pass over every configured sink ([`deliver_all`]), each outcome logged.
///
/// A sink that cannot take its events is logged as a warning that names it and the
/// remedy; it never fails the caller: syncing succeeded, and the events stay queued.
pub async fn deliver_all_logged(config: &Config) {
    for (name, result) in deliver_all(config).await {
        match result {
            Ok(0) => {}
            Ok(n) => tracing::debug!(sink = %name, events = n, "events delivered"),
            Err(e) => tracing::warn!(sink = %name, "{e}"),
        }
    }
}

/// One delivery pass over every configured sink, concurrently; then events that every
/// sink has and that are older than `event_retention` are deleted.
///
/// Each sink delivers its backlog in id order, in batches, retrying a failing batch
/// within the pass as `[retry]` allows. Returns, per sink in config order, how many
/// events it took or why it stopped. Never panics and never fails as a whole: one
/// sink's trouble is only that sink's result.
pub async fn deliver_all(config: &Config) -> Vec<(String, Result<u64, SinkError>)> {
    if config.sinks.is_empty() {
        return Vec::new();
    }
    // Make every committed event durable before any leaves the machine: with
    // synchronous=NORMAL a power loss could otherwise roll back events a receiver already
    // has, and their ids would be given to different events (receivers de-duplicate by id).
    let db = config.database.clone();
    let synced = tokio::task::spawn_blocking(move || {
        crate::store::Store::open(&db).and_then(|s| s.make_durable())
    })
    .await;
    if let Ok(Err(e)) = synced {
        tracing::warn!(error = %e, "could not flush the database before delivering events");
    }
    let tasks: Vec<_> = config
        .sinks
        .iter()
        .map(|s| {
            let pass = deliver_sink(
                config.database.clone(),
                s.clone(),
                config.retry.clone(),
                config.instance.clone(),
            );
            (s.name.clone(), tokio::spawn(pass))
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for (name, task) in tasks {
        let result = task.await.unwrap_or_else(|e| {
            Err(SinkError::Internal {
                sink: name.clone(),
                message: e.to_string(),
            })
        });
        results.push((name, result));
    }
    match prune(config).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(events = n, "pruned delivered events past event_retention"),
        Err(e) => tracing::warn!(error = %e, "pruning old events failed; retried on the next pass"),
    }
    results
}

/// Delivers one sink's backlog (used by [`deliver_all`] and [`replay`]).
async fn deliver_sink(
    db: Database,
    sink: SinkConfig,
    retry: RetryPolicy,
    instance: String,
) -> Result<u64, SinkError> {
    let Some(_claim) = Claim::take(&db, &sink.name) else {
        // Another pass of this process is on it and will deliver the backlog.
        tracing::debug!(sink = %sink.name, "already being delivered");
        return Ok(0);
    };
    let name = sink.name.clone();
    let db = Db::open(db, &name).await?;
    // On PostgreSQL, one replica at a time delivers each sink: this pass's connection takes
    // it (and moves its cursor), or another replica has it and delivers the backlog.
    let held_by = {
        let name = name.clone();
        db.run(move |s| s.own_sink(&name)).await?
    };
    if let Some(holder) = held_by {
        tracing::debug!(sink = %name, held_by = %holder, "another replica is delivering this sink");
        return Ok(0);
    }
    let state = {
        let name = name.clone();
        db.run(move |s| s.sink_state(&name)).await?
    };
    if state.parked_at.is_some() {
        return Err(SinkError::Parked {
            sink: name,
            message: state.last_error.unwrap_or_default(),
        });
    }
    if let Some(until) = &state.retry_at {
        if parse_time(until).is_some_and(|t| t > Utc::now()) {
            return Err(SinkError::Deferred {
                sink: name,
                until: until.clone(),
            });
        }
    }
    let record_error = |message: String, retry_at: Option<String>| {
        let name = name.clone();
        let db = db.clone();
        async move {
            let now = format_time(Utc::now());
            db.run(move |s| s.record_sink_error(&name, &message, &now, retry_at.as_deref()))
                .await
        }
    };
    let transport = match Transport::new(&sink) {
        Ok(t) => t,
        Err(f) => {
            let message = f.message().to_owned();
            record_error(message.clone(), None).await?;
            return Err(SinkError::Unavailable {
                sink: name,
                message,
            });
        }
    };
    let batch = transport.max_batch() as u64;
    let mut cursor = state.cursor;
    let mut delivered = 0;
    loop {
        let events = db.run(move |s| s.events_after(cursor, None, batch)).await?;
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            break;
        };
        let (first, last) = (first.id, last.id);
        let payload: Vec<Vec<u8>> = events
            .iter()
            .map(|e| render(sink.format, event_json(e), &instance))
            .collect();
        let id = batch_id(first, last);
        match send_with_retries(&transport, &name, &id, &payload, &retry).await {
            Ok(()) => {}
            Err(Failure::Refused { message }) => {
                let message = format!("events {first}..={last} were refused: {message}");
                let (n, m, now) = (name.clone(), message.clone(), format_time(Utc::now()));
                db.run(move |s| s.park_sink(&n, &m, &now)).await?;
                return Err(SinkError::Parked {
                    sink: name,
                    message,
                });
            }
            Err(Failure::Retry {
                message,
                retry_after,
            }) => {
                // A pause longer than a pass waits is remembered, so later passes (the
                // daemon's, every 30 s) respect it too.
                let until = retry_after
                    .filter(|d| *d > retry.max_delay)
                    .map(|d| format_time(Utc::now() + d.min(MAX_RETRY_AFTER)));
                record_error(message.clone(), until.clone()).await?;
                return Err(match until {
                    Some(until) => SinkError::Deferred { sink: name, until },
                    None => SinkError::Unavailable {
                        sink: name,
                        message,
                    },
                });
            }
        }
        delivered += events.len() as u64;
        let moved = {
            let (n, now) = (name.clone(), format_time(Utc::now()));
            db.run(move |s| s.advance_sink_cursor(&n, cursor, last, &now))
                .await?
        };
        if !moved {
            // A replay rewound the cursor, a resume/park raced us, or another process
            // delivers this sink: stop here; the next pass starts from what is stored.
            tracing::info!(sink = %name, "the sink's cursor changed during delivery; continuing on the next pass");
            break;
        }
        tracing::debug!(sink = %name, first, last, "events delivered");
        cursor = last;
    }
    Ok(delivered)
}

/// Sends one batch, retrying transient failures with capped exponential backoff and
/// jitter (`[retry]`), or the receiver's `Retry-After` when it gives one and it fits
/// within `max_delay`. A longer `Retry-After` ends the pass at once.
async fn send_with_retries(
    transport: &Transport,
    sink: &str,
    batch_id: &str,
    payload: &[Vec<u8>],
    retry: &RetryPolicy,
) -> Result<(), Failure> {
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(retry.initial_delay)
        .with_max_delay(retry.max_delay)
        .with_max_times(retry.max_attempts.saturating_sub(1) as usize)
        .with_jitter()
        .build();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (message, retry_after) = match transport.send(batch_id, payload).await {
            Ok(()) => return Ok(()),
            Err(refused @ Failure::Refused { .. }) => return Err(refused),
            Err(Failure::Retry {
                message,
                retry_after,
            }) => (message, retry_after),
        };
        let wait = match (retry_after, delays.next()) {
            (Some(ra), Some(_)) if ra <= retry.max_delay => ra,
            (None, Some(planned)) => planned,
            (ra, _) => {
                let message = if attempts > 1 {
                    format!("{message} (after {attempts} attempts)")
                } else {
                    message
                };
                return Err(Failure::Retry {
                    message,
                    retry_after: ra,
                });
            }
        };
        tracing::warn!(sink, error = %message, retry_in = ?wait, "event delivery failed; retrying");
        tokio::time::sleep(wait).await;
    }
}

/// Deletes events older than `event_retention` that every configured sink has received.
async fn prune(config: &Config) -> Result<u64, SinkError> {
    let Some(keep) = config.event_retention else {
        return Ok(0);
    };
    let cutoff = chrono::Duration::from_std(keep)
        .ok()
        .and_then(|k| Utc::now().checked_sub_signed(k))
        .map(format_time);
    let Some(cutoff) = cutoff else {
        return Ok(0);
    };
    let path = config.database.clone();
    let names: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
    blocking("retention", move || {
        let mut store = Store::open(&path)?;
        // Never past the slowest sink: an undelivered event is kept whatever its age.
        let mut through = store.max_event_id()?;
        for n in &names {
            through = through.min(store.sink_state(n)?.cursor);
        }
        store.prune_events(through, &cutoff)
    })
    .await
}

/// One sink's delivery position and health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SinkStatus {
    /// The sink's name.
    pub name: String,
    /// Its type: `jsonl`, `webhook` or `command`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `ok`, `failing` (the last pass failed; retried on the next), `waiting` (the
    /// receiver's Retry-After) or `parked` (needs `adesync sinks resume`).
    pub state: SinkState,
    /// The last event id the sink acknowledged.
    pub cursor: i64,
    /// Stored events it has not acknowledged yet.
    pub pending: u64,
    /// When the oldest of them was recorded.
    pub oldest_pending_at: Option<String>,
    /// How old that is, in seconds.
    pub oldest_pending_age_secs: Option<u64>,
    /// When a batch was last acknowledged.
    pub last_delivered_at: Option<String>,
    /// Why the last pass failed (cleared by the next success).
    pub last_error: Option<String>,
    /// When it failed.
    pub last_error_at: Option<String>,
    /// The sink is parked: a receiver refused a batch for good.
    pub parked: bool,
    /// No delivery before this time (Retry-After).
    pub retry_at: Option<String>,
}

/// Every configured sink's cursor, backlog and health, in config order.
pub fn sink_status(store: &Store, config: &Config) -> Result<Vec<SinkStatus>, StoreError> {
    sink_status_at(store, config, Utc::now())
}

/// [`sink_status`] as of `now`.
pub fn sink_status_at(
    store: &Store,
    config: &Config,
    now: DateTime<Utc>,
) -> Result<Vec<SinkStatus>, StoreError> {
    config
        .sinks
        .iter()
        .map(|sink| {
            let st = store.sink_state(&sink.name)?;
            let (pending, oldest) = store.pending_events(st.cursor)?;
            let age = oldest
                .as_deref()
                .and_then(parse_time)
                .map(|t| (now - t).num_seconds().max(0) as u64);
            let waiting = st
                .retry_at
                .as_deref()
                .and_then(parse_time)
                .is_some_and(|t| t > now);
            let state = if st.parked_at.is_some() {
                SinkState::Parked
            } else if waiting {
                SinkState::Waiting
            } else if st.last_error.is_some() {
                SinkState::Failing
            } else {
                SinkState::Ok
            };
            Ok(SinkStatus {
                name: sink.name.clone(),
                kind: sink.kind.type_name(),
                state,
                cursor: st.cursor,
                pending,
                oldest_pending_at: oldest,
                oldest_pending_age_secs: age,
                last_delivered_at: st.last_delivered_at,
                last_error: st.last_error,
                last_error_at: st.last_error_at,
                parked: st.parked_at.is_some(),
                retry_at: st.retry_at,
            })
        })
        .collect()
}

fn find<'a>(config: &'a Config, name: &str) -> Result<&'a SinkConfig, SinkError> {
    config
        .sinks
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| SinkError::UnknownSink {
            name: name.to_owned(),
            known: if config.sinks.is_empty() {
                "none".into()
            } else {
                config
                    .sinks
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
}

/// Sends events `from..` to a sink again: its cursor goes back to `from - 1` and a pass
/// delivers from there, in order, as usual. Returns how many events that pass delivered.
///
/// Only events the sink already received can be replayed (undelivered ones are on their
/// way anyway), and only those still stored (see `event_retention`).
pub async fn replay(config: &Config, name: &str, from: i64) -> Result<u64, SinkError> {
    let sink = find(config, name)?.clone();
    let path = config.database.clone();
    let n = sink.name.clone();
    let refused = blocking(&sink.name, move || {
        let mut store = Store::open(&path)?;
        let cursor = store.sink_state(&n)?.cursor;
        if from < 1 {
            return Ok(Some("event ids start at 1".to_owned()));
        }
        if from > cursor {
            return Ok(Some(format!(
                "event {from} has not been delivered yet (the sink has received up to {cursor}); it will be sent anyway"
            )));
        }
        if let Some(min) = store.min_event_id()? {
            if min > from {
                return Ok(Some(format!(
                    "events before {min} were deleted (event_retention); replay from {min} or later"
                )));
            }
        }
        store.rewind_sink(&n, from - 1)?;
        Ok(None)
    })
    .await?;
    if let Some(reason) = refused {
        return Err(SinkError::Replay {
            sink: sink.name,
            reason,
        });
    }
    deliver_sink(
        config.database.clone(),
        sink,
        config.retry.clone(),
        config.instance.clone(),
    )
    .await
}

/// Un-parks a sink (and drops a Retry-After pause): the next pass delivers again,
/// starting with the batch that was refused. Returns whether it was parked.
pub async fn resume(config: &Config, name: &str) -> Result<bool, SinkError> {
    let sink = find(config, name)?.name.clone();
    let path = config.database.clone();
    blocking(&sink.clone(), move || {
        Store::open(&path)?.resume_sink(&sink)
    })
    .await
}

/// Sends one test event (id 0, type `sink.test`, never stored) to a sink in its format,
/// once, and says whether the receiver accepted it. The sink's cursor and state are not
/// touched. Its batch id (a webhook's `webhook-id`) is new each time, `test_<unix ms>`.
pub async fn send_test(config: &Config, name: &str) -> Result<(), SinkError> {
    let sink = find(config, name)?;
    let failed = |f: Failure| SinkError::TestFailed {
        sink: sink.name.clone(),
        message: f.message().to_owned(),
    };
    let transport = Transport::new(sink).map_err(failed)?;
    let token = config.tokens.first().map_or("", |t| t.name.as_str());
    let now = Utc::now();
    let event = crate::events::test_event(token, &format_time(now));
    let event = render(sink.format, event, &config.instance);
    transport
        .send(&format!("test_{}", now.timestamp_millis()), &[event])
        .await
        .map_err(failed)
}
