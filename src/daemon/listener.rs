//! The optional HTTP listener (off by default, loopback by default when on):
//! `/metrics` in Prometheus text format and `/healthz` for load balancers and monitors.
//!
//! Metrics combine the database (device counts, last success, events) with what the
//! running daemon knows (durations, errors by kind, parked tokens). Reads go through
//! `spawn_blocking`; nothing here writes.
//!
//! Bounded against any local client: at most [`MAX_CONNECTIONS`] connections are served
//! at once (more are closed on arrival), a client has [`HEADER_TIMEOUT`] to send its
//! request and [`CONNECTION_DEADLINE`] in all, one request per connection (no idle
//! keep-alive), and the database view behind both routes is read at most once per
//! [`VIEW_TTL`] however many clients ask — so a flood of scrapes costs neither memory nor
//! file descriptors the sync needs.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::health::Health;

/// Connections served at once; more are closed as they arrive.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request line and headers.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may live in all.
pub(crate) const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);
/// How long one read of the database serves every scrape.
pub(crate) const VIEW_TTL: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown`, within the bounds above.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors or memory: wait instead of spinning; the
                // sync's own work goes on.
                tracing::warn!(error = %e, "the /metrics listener cannot accept a connection; retrying shortly");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream); // over the limit: closed at once, nothing kept
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
        });
    }
}
use crate::config::{Config, TokenConfig};
use crate::store::{Store, SyncState};

#[derive(Clone)]
struct AppState {
    config: Arc<Config>,
    health: Health,
    expiries: Arc<ExpiryCache>,
    /// The last database view and when it was read; the async mutex makes concurrent
    /// scrapes wait for one read instead of each starting its own.
    view: Arc<tokio::sync::Mutex<Option<CachedView>>>,
}

/// A database view and when it was read.
type CachedView = (std::time::Instant, Arc<DbView>);

/// Each token's expiry as its file says now: re-read when the file changes (a renewal
/// needs no restart), otherwise served from memory so a scrape never decrypts.
#[derive(Default)]
struct ExpiryCache(Mutex<HashMap<PathBuf, CachedExpiry>>);

/// The file stamp (mtime, size) an expiry was read at, and the expiry.
type CachedExpiry = (Option<(SystemTime, u64)>, Option<i64>);

impl ExpiryCache {
    /// The expiry (Unix seconds) of `token`'s file, `None` when it cannot be read.
    fn get(&self, token: &TokenConfig) -> Option<i64> {
        let stamp = super::file_stamp(&token.token_file);
        let key = token.token_file.clone();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, expiry)) = map.get(&key) {
            if *seen == stamp && stamp.is_some() {
                return *expiry;
            }
        }
        let expiry = token
            .load_token()
            .ok()
            .map(|t| t.access_token_expiry.timestamp());
        map.insert(key, (stamp, expiry));
        expiry
    }
}

/// The listener's routes.
pub fn router(config: Arc<Config>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(AppState {
            config,
            health,
            expiries: Arc::default(),
            view: Arc::default(),
        })
}

struct DbView {
    states: Vec<SyncState>,
    by_status: Vec<(String, String, u64)>,
    events: Vec<(String, u64)>,
    sinks: Vec<crate::sinks::SinkStatus>,
    org: Vec<crate::status::OrgAccountStatus>,
    assignments: Vec<(String, String, String, u64)>,
    /// PostgreSQL: (token, the connection syncing it now).
    holders: Vec<(String, String)>,
}

/// The database view, read afresh at most once per [`VIEW_TTL`].
async fn view(app: &AppState) -> Result<Arc<DbView>, String> {
    let mut cached = app.view.lock().await;
    if let Some((at, v)) = cached.as_ref() {
        if at.elapsed() < VIEW_TTL {
            return Ok(v.clone());
        }
    }
    let fresh = Arc::new(read_db(app).await?);
    *cached = Some((std::time::Instant::now(), fresh.clone()));
    Ok(fresh)
}

async fn read_db(app: &AppState) -> Result<DbView, String> {
    let config = app.config.clone();
    tokio::task::spawn_blocking(move || -> Result<DbView, String> {
        let s = Store::open_read_only(&config.database).map_err(|e| e.to_string())?;
        Ok(DbView {
            states: s.sync_states().map_err(|e| e.to_string())?,
            by_status: s.profile_status_counts().map_err(|e| e.to_string())?,
            events: s.event_counts_by_token().map_err(|e| e.to_string())?,
            sinks: crate::sinks::sink_status(&s, &config).map_err(|e| e.to_string())?,
            org: crate::status::org_statuses(&config, &s, chrono::Utc::now())
                .map_err(|e| e.to_string())?,
            assignments: s.assignment_counts().map_err(|e| e.to_string())?,
            holders: s
                .token_holders(
                    &config
                        .tokens
                        .iter()
                        .map(|t| t.name.clone())
                        .collect::<Vec<_>>(),
                )
                .map_err(|e| e.to_string())?,
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    // Token expiries are not part of the cached view: a renewed token shows at once (a
    // stat per token; the file is read again only when it changed).
    let (config, cache) = (app.config.clone(), app.expiries.clone());
    let expiries = tokio::task::spawn_blocking(move || {
        config
            .tokens
            .iter()
            .map(|t| cache.get(t))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    match view(&app).await {
        Ok(view) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render_metrics(&app.config, &app.health, &view, &expiries),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("database unavailable: {e}\n"),
        ),
    }
}

fn rfc3339_unix(s: &str) -> Option<f64> {
    crate::model::parse_time(s).map(|t| t.timestamp_millis() as f64 / 1000.0)
}

/// Prometheus label value escaping.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render_metrics(
    config: &Config,
    health: &Health,
    view: &DbView,
    expiries: &[Option<i64>],
) -> String {
    let mut out = String::new();
    let h = health.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    family(
        "adesync_devices",
        "gauge",
        "Devices assigned to the server, by profile_status.",
        view.by_status
            .iter()
            .map(|(t, s, n)| {
                (
                    format!("token=\"{}\",profile_status=\"{}\"", label(t), label(s)),
                    *n as f64,
                )
            })
            .collect(),
    );
    family(
        "adesync_last_success_timestamp_seconds",
        "gauge",
        "When the token last synced successfully (Unix time).",
        view.states
            .iter()
            .filter_map(|s| {
                let t = rfc3339_unix(s.last_success_at.as_deref()?)?;
                Some((format!("token=\"{}\"", label(&s.token_name)), t))
            })
            .collect(),
    );
    family(
        "adesync_sync_duration_seconds",
        "gauge",
        "Duration of the token's last successful sync.",
        h.values()
            .filter_map(|t| {
                let s = t.last_summary.as_ref()?;
                Some((
                    format!("token=\"{}\"", label(&t.name)),
                    s.duration.as_secs_f64(),
                ))
            })
            .collect(),
    );
    let mut errors = Vec::new();
    for t in h.values() {
        for (kind, n) in &t.errors_by_kind {
            errors.push((
                format!("token=\"{}\",kind=\"{}\"", label(&t.name), label(kind)),
                *n as f64,
            ));
        }
    }
    errors.sort_by(|a, b| a.0.cmp(&b.0));
    family(
        "adesync_sync_errors_total",
        "counter",
        "Failed syncs since start, by error kind.",
        errors,
    );
    if config.database.is_postgres() {
        family(
            "adesync_token_synced_by",
            "gauge",
            "1 for the replica (the server's name for its connection) syncing the token right now (PostgreSQL).",
            view.holders
                .iter()
                .map(|(t, by)| {
                    let replica = by.split(" at ").next().unwrap_or(by);
                    (
                        format!("token=\"{}\",replica=\"{}\"", label(t), label(replica)),
                        1.0,
                    )
                })
                .collect(),
        );
        family(
            "adesync_org_account_walked_by",
            "gauge",
            "1 for the replica (the server's name for its connection) walking the organisation account right now (PostgreSQL).",
            view.org
                .iter()
                .filter_map(|o| {
                    let by = o.walked_by.as_deref()?;
                    let replica = by.split(" at ").next().unwrap_or(by);
                    Some((
                        format!("account=\"{}\",replica=\"{}\"", label(&o.account), label(replica)),
                        1.0,
                    ))
                })
                .collect(),
        );
    }
    family(
        "adesync_token_parked",
        "gauge",
        "1 while the token waits for an administrator (expired or revoked token, terms, access).",
        config
            .tokens
            .iter()
            .map(|t| {
                let parked = h.get(&t.name).is_some_and(|x| x.parked.is_some());
                (
                    format!("token=\"{}\"", label(&t.name)),
                    if parked { 1.0 } else { 0.0 },
                )
            })
            .collect(),
    );
    family(
        "adesync_token_expiry_timestamp_seconds",
        "gauge",
        "When the server token expires (Unix time).",
        config
            .tokens
            .iter()
            .zip(expiries)
            .filter_map(|(t, e)| Some((format!("token=\"{}\"", label(&t.name)), (*e)? as f64)))
            .collect(),
    );
    let sink = |f: &dyn Fn(&crate::sinks::SinkStatus) -> f64| -> Vec<(String, f64)> {
        view.sinks
            .iter()
            .map(|s| {
                (
                    format!("sink=\"{}\",type=\"{}\"", label(&s.name), s.kind),
                    f(s),
                )
            })
            .collect()
    };
    family(
        "adesync_sink_pending_events",
        "gauge",
        "Stored events the sink has not acknowledged yet.",
        sink(&|s| s.pending as f64),
    );
    family(
        "adesync_sink_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest event the sink has not acknowledged (0 when none).",
        sink(&|s| s.oldest_pending_age_secs.unwrap_or(0) as f64),
    );
    family(
        "adesync_sink_parked",
        "gauge",
        "1 while the sink is parked (a receiver refused an event; `adesync sinks resume`).",
        sink(&|s| {
            if s.state == crate::model::SinkState::Parked {
                1.0
            } else {
                0.0
            }
        }),
    );
    family(
        "adesync_events_total",
        "counter",
        "Change events stored for the token.",
        view.events
            .iter()
            .map(|(t, n)| (format!("token=\"{}\"", label(t)), *n as f64))
            .collect(),
    );
    family(
        "adesync_full_fetch_missed_changes",
        "gauge",
        "Changes the last full re-fetch found that the sync cursor had missed.",
        view.states
            .iter()
            .filter_map(|st| {
                let n = crate::status::full_fetch_missed(st)?;
                Some((format!("token=\"{}\"", label(&st.token_name)), n as f64))
            })
            .collect(),
    );
    family(
        "adesync_records_refused_total",
        "counter",
        "Device records from Apple skipped because they cannot be stored (no usable serial number), since start.",
        h.values()
            .map(|t| (format!("token=\"{}\"", label(&t.name)), t.records_refused as f64))
            .collect(),
    );
    family(
        "adesync_profile_assignments",
        "gauge",
        "Devices by the last answer Apple gave to assigning them their enrollment profile (SUCCESS, FAILED, THROTTLED, NOT_ACCESSIBLE).",
        view.assignments
            .iter()
            .map(|(t, p, st, n)| {
                (
                    format!("token=\"{}\",profile=\"{}\",status=\"{}\"", label(t), label(p), label(st)),
                    *n as f64,
                )
            })
            .collect(),
    );
    family(
        "adesync_org_devices",
        "gauge",
        "Organisation devices per API account: listed by Apple, of those unassigned, and removed.",
        view.org
            .iter()
            .flat_map(|o| {
                let a = label(&o.account);
                [
                    (
                        format!("account=\"{a}\",state=\"listed\""),
                        o.devices as f64,
                    ),
                    (
                        format!("account=\"{a}\",state=\"unassigned\""),
                        o.unassigned as f64,
                    ),
                    (
                        format!("account=\"{a}\",state=\"removed\""),
                        o.removed_devices as f64,
                    ),
                ]
            })
            .collect(),
    );
    family(
        "adesync_org_last_complete_walk_timestamp_seconds",
        "gauge",
        "When the account's last complete walk of the organisation's devices ended.",
        view.org
            .iter()
            .filter_map(|o| {
                let t = rfc3339_unix(o.last_complete_at.as_deref()?)?;
                Some((format!("account=\"{}\"", label(&o.account)), t))
            })
            .collect(),
    );
    family(
        "adesync_org_rate_limited_total",
        "counter",
        "429/503 answers the organisation API gave the account.",
        view.org
            .iter()
            .map(|o| {
                (
                    format!("account=\"{}\"", label(&o.account)),
                    o.rate_limited as f64,
                )
            })
            .collect(),
    );
    family(
        "adesync_org_account_error",
        "gauge",
        "1 when the account's last walk failed, by error kind (api_key and account_rejected need an administrator).",
        view.org
            .iter()
            .filter_map(|o| {
                let kind = o.last_error_kind.as_deref()?;
                Some((
                    format!("account=\"{}\",kind=\"{}\"", label(&o.account), label(kind)),
                    1.0,
                ))
            })
            .collect(),
    );
    out
}

/// Why a token is unhealthy, or `None` when it synced within its expected interval
/// (the one overdue rule, [`crate::status::overdue`]).
pub(crate) fn token_problem(
    name: &str,
    schedule: &crate::config::Schedule,
    state: Option<&SyncState>,
    parked: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    if let Some(p) = parked {
        return Some(format!("{name}: parked: {p}"));
    }
    let last = state
        .and_then(|s| s.last_success_at.as_deref())
        .and_then(crate::model::parse_time);
    if last.is_none() {
        return Some(format!("{name}: has not synced successfully yet"));
    }
    let age = crate::status::overdue(schedule.longest_gap(), last, now)?;
    let err = state
        .and_then(|s| s.last_error.as_deref())
        .unwrap_or("no error recorded");
    Some(format!(
        "{name}: last successful sync {} ago (expected within {}); last error: {err}",
        crate::status::human_duration(age),
        crate::status::human_duration(crate::status::allowed_gap(schedule.longest_gap()))
    ))
}

async fn healthz(State(app): State<AppState>) -> impl IntoResponse {
    let view = match view(&app).await {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("database unavailable: {e}\n"),
            )
        }
    };
    let h = app.health.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let now = chrono::Utc::now();
    let problems: Vec<String> = app
        .config
        .tokens
        .iter()
        .filter_map(|t| {
            let state = view.states.iter().find(|s| s.token_name == t.name);
            let parked = h.get(&t.name).and_then(|x| x.parked.as_deref());
            token_problem(&t.name, &t.schedule, state, parked, now)
        })
        .chain(view.org.iter().filter_map(|o| {
            if o.last_success_at.is_none() {
                return Some(format!("{}: has not walked successfully yet", o.account));
            }
            o.attention
                .first()
                .map(|a| format!("{}: {}", o.account, crate::model::printable(a)))
        }))
        .collect();
    if problems.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}
