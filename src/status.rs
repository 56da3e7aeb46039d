//! The rules that decide whether a token needs a person, written once and shared by every
//! surface that reports on tokens: `adesync status`, `adesync token list`,
//! `adesync check-config`, the daemon's `/healthz` and `/metrics`, and the start-of-run
//! expiry warning.
//!
//! - [`TokenExpiry`]: ok, expires soon (within [`EXPIRY_WARNING_DAYS`]), expired —
//!   defined with the token (`token/`), re-exported here.
//! - [`overdue`]: no successful sync within twice the schedule plus five minutes.
//! - [`ErrorKind::needs_admin`](crate::model::ErrorKind::needs_admin): a failure only a
//!   person can fix (the daemon parks such a token).
//! - [`human_duration`]: the one way a duration is shown to people.
//!
//! [`token_statuses`] applies them to every configured token, from the database and the
//! token files, so it works whether or not the daemon is running. Each token file is
//! read here and now: a renewed token shows at once, and an unreadable one is that
//! token's problem, not the whole report's.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, TokenConfig};
use crate::model::{parse_time, ErrorKind, Phase};
use crate::store::{Store, StoreError, SyncState};
use crate::token::ServerToken;
pub use crate::token::{TokenExpiry, EXPIRY_WARNING_DAYS};

/// How long after the last success a token counts as overdue: twice its schedule (one
/// missed run, jitter included) plus five minutes for the sync itself.
pub fn allowed_gap(schedule: Duration) -> Duration {
    schedule * 2 + Duration::from_secs(300)
}

/// The time since the last success when it exceeds [`allowed_gap`], else `None`. A token
/// that never succeeded is not "overdue" (it is "not synced yet").
pub fn overdue(
    schedule: Duration,
    last_success: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let age = (now - last_success?).to_std().unwrap_or_default();
    (age > allowed_gap(schedule)).then_some(age)
}

/// Whether a stored error kind needs a person (see [`ErrorKind::needs_admin`]). An
/// unknown kind (written by another version) does not.
pub fn kind_needs_admin(kind: Option<&str>) -> bool {
    kind.and_then(ErrorKind::parse)
        .is_some_and(ErrorKind::needs_admin)
}

/// A duration for people, rounded to its two largest units: `45s`, `5m 3s`, `1h 24m`,
/// `3d 2h`; below a second, `350ms`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let two = |a: u64, ua: &str, b: u64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua} {b}{ub}")
        }
    };
    match s {
        0 if d.as_millis() > 0 => format!("{}ms", d.as_millis()),
        0..=59 => format!("{s}s"),
        60..=3599 => two(s / 60, "m", s % 60, "s"),
        3600..=86_399 => two(s / 3600, "h", (s % 3600) / 60, "m"),
        _ => two(s / 86_400, "d", (s % 86_400) / 3600, "h"),
    }
}

/// [`human_duration`] of a number of seconds (negative counts as zero).
pub fn human_secs(seconds: i64) -> String {
    human_duration(Duration::from_secs(seconds.max(0) as u64))
}

/// One token's status.
#[derive(Clone, Debug, Serialize)]
pub struct TokenStatus {
    /// Token name.
    pub token: String,
    /// `fetch` or `sync`; `new` before the first run.
    pub phase: String,
    /// Seconds since the cursor was stored (Apple expires cursors after 7 days).
    pub cursor_age_seconds: Option<i64>,
    /// When the last run succeeded.
    pub last_success_at: Option<String>,
    /// The last run's error, if it failed.
    pub last_error: Option<String>,
    /// Stable name of the last error.
    pub last_error_kind: Option<String>,
    /// Devices assigned to the server.
    pub devices: u64,
    /// Devices that left the server.
    pub deleted_devices: u64,
    /// Token expiry (RFC 3339); `None` when the token file cannot be read.
    pub token_expires_at: Option<String>,
    /// Whole days until the token expires; `None` when the token file cannot be read.
    pub token_days_left: Option<i64>,
    /// When the last full fetch completed.
    pub last_full_fetch_at: Option<String>,
    /// Changes the last full *re*-fetch found, i.e. what the sync cursor had missed
    /// (`None` until a re-fetch, the first fetch being the mirror's start).
    pub full_fetch_missed: Option<i64>,
    /// What a person must do, if anything.
    pub attention: Vec<String>,
    /// PostgreSQL: the replica syncing the token right now, as the server names its
    /// connection (application_name, address, backend pid, since when); `None` when none is.
    pub synced_by: Option<String>,
}

/// The changes a completed full re-fetch found that the sync cursor had missed: the
/// count of the last full fetch, recorded only when it was not the mirror's first.
pub fn full_fetch_missed(state: &SyncState) -> Option<i64> {
    state.last_full_fetch_changes
}

/// What needs a person about a token's expiry, if anything.
pub fn expiry_attention(
    token: &ServerToken,
    token_file: &std::path::Path,
    now: DateTime<Utc>,
) -> Option<String> {
    let expiry = token.access_token_expiry;
    match TokenExpiry::of(expiry, now) {
        TokenExpiry::Ok => None,
        TokenExpiry::Expired => Some(format!(
            "the server token expired on {}: download a new one in Apple Business/School Manager (Preferences → your MDM server → Download Token) and replace {}",
            expiry.format("%Y-%m-%d"),
            token_file.display()
        )),
        TokenExpiry::ExpiresSoon => Some(format!(
            "the server token expires in {} day(s) ({}): download a new one in Apple Business/School Manager before then",
            token.days_left(now),
            expiry.format("%Y-%m-%d")
        )),
    }
}

/// One token's status from its stored state and its token file as it is now.
pub fn token_status(
    t: &TokenConfig,
    state: SyncState,
    counts: (u64, u64),
    now: DateTime<Utc>,
) -> TokenStatus {
    let never_ran = state.last_run_at.is_none() && state.cursor.cursor.is_none();
    let mut attention = Vec::new();
    let (expires_at, days_left) = match t.load_token() {
        Ok(token) => {
            attention.extend(expiry_attention(&token, &t.token_file, now));
            (
                Some(
                    token
                        .access_token_expiry
                        .format("%Y-%m-%dT%H:%M:%SZ")
                        .to_string(),
                ),
                Some(token.days_left(now)),
            )
        }
        Err(e) => {
            attention.push(format!("the token file cannot be used: {e}"));
            (None, None)
        }
    };
    if let Some(err) = &state.last_error {
        attention.push(if kind_needs_admin(state.last_error_kind.as_deref()) {
            format!("parked until an administrator acts: {err}")
        } else {
            format!("the last sync failed and is retried automatically: {err}")
        });
    }
    let last_success = state.last_success_at.as_deref().and_then(parse_time);
    match last_success {
        None if !never_ran && state.last_error.is_none() => {
            attention.push("no successful sync yet".into());
        }
        Some(_) if state.last_error.is_none() => {
            if let Some(age) = overdue(t.schedule.longest_gap(), last_success, now) {
                attention.push(format!(
                    "no successful sync for {}: is the daemon running? (`systemctl status adesync`)",
                    human_duration(age)
                ));
            }
        }
        _ => {}
    }
    if never_ran {
        attention.push("never synced: run `adesync run --once` or start the service".into());
    }
    let cursor_age = state
        .cursor_at
        .as_deref()
        .and_then(parse_time)
        .map(|c| (now - c).num_seconds());
    if let Some(age) = cursor_age {
        if age > 5 * 86_400 {
            attention.push(format!(
                "the stored cursor is {} days old; Apple expires it after 7 days and a full re-fetch follows",
                age / 86_400
            ));
        }
    }
    let missed = full_fetch_missed(&state);
    TokenStatus {
        token: t.name.clone(),
        phase: if never_ran {
            "new".into()
        } else {
            match state.cursor.phase {
                Phase::Fetch => "fetch".into(),
                Phase::Sync => "sync".into(),
            }
        },
        cursor_age_seconds: cursor_age,
        last_success_at: state.last_success_at,
        last_error: state.last_error,
        last_error_kind: state.last_error_kind,
        devices: counts.0,
        deleted_devices: counts.1,
        token_expires_at: expires_at,
        token_days_left: days_left,
        full_fetch_missed: missed,
        last_full_fetch_at: state.last_full_fetch_at,
        attention,
        synced_by: None,
    }
}

/// Every configured token's status.
pub fn token_statuses(
    config: &Config,
    store: &Store,
    now: DateTime<Utc>,
) -> Result<Vec<TokenStatus>, StoreError> {
    let mut out = Vec::new();
    for t in &config.tokens {
        let state = store.sync_state(&t.name)?;
        let counts = store.device_counts(&t.name)?;
        out.push(token_status(t, state, counts, now));
    }
    let names: Vec<String> = config.tokens.iter().map(|t| t.name.clone()).collect();
    for (token, holder) in store.token_holders(&names)? {
        if let Some(s) = out.iter_mut().find(|s| s.token == token) {
            s.synced_by = Some(holder);
        }
    }
    Ok(out)
}

/// One organisation account's status, for `status`, `/healthz` and `/metrics`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OrgAccountStatus {
    /// Account name.
    pub account: String,
    /// `new` before the first walk, else where the walk stands: `servers` or `devices`.
    pub phase: String,
    /// When a run last ended well.
    pub last_success_at: Option<String>,
    /// When the last complete walk ended.
    pub last_complete_at: Option<String>,
    /// The last run's error, if it failed.
    pub last_error: Option<String>,
    /// Stable name of the last error.
    pub last_error_kind: Option<String>,
    /// Devices Apple lists for the organisation.
    pub devices: u64,
    /// Of those, held by no MDM server.
    pub unassigned: u64,
    /// Devices removed from the organisation.
    pub removed_devices: u64,
    /// MDM servers.
    pub mdm_servers: u64,
    /// 429/503 answers received, in all.
    pub rate_limited: u64,
    /// What a person must do, if anything.
    pub attention: Vec<String>,
    /// PostgreSQL: the replica walking the account right now (see
    /// [`TokenStatus::synced_by`]); `None` when none is.
    pub walked_by: Option<String>,
}

/// Every configured organisation account's status.
pub fn org_statuses(
    config: &Config,
    store: &Store,
    now: DateTime<Utc>,
) -> Result<Vec<OrgAccountStatus>, StoreError> {
    let mut out = Vec::with_capacity(config.org_accounts.len());
    for a in &config.org_accounts {
        let walk = store.org_walk(&a.name)?;
        let counts = store.org_counts(&a.name)?;
        let never_ran = walk.last_run_at.is_none();
        let mut attention = Vec::new();
        if let Some(err) = &walk.last_error {
            attention.push(if kind_needs_admin(walk.last_error_kind.as_deref()) {
                format!("parked until an administrator acts: {err}")
            } else {
                format!("the last walk failed and is retried automatically: {err}")
            });
        }
        let last_success = walk.last_success_at.as_deref().and_then(parse_time);
        if walk.last_error.is_none() {
            if let Some(age) = overdue(a.schedule.longest_gap(), last_success, now) {
                attention.push(format!(
                    "no successful walk for {}: is the daemon running? (`systemctl status adesync`)",
                    human_duration(age)
                ));
            }
        }
        if never_ran {
            attention.push("never walked: run `adesync run --once` or start the service".into());
        }
        out.push(OrgAccountStatus {
            account: a.name.clone(),
            phase: if never_ran {
                "new".into()
            } else {
                walk.phase.as_str().into()
            },
            last_success_at: walk.last_success_at,
            last_complete_at: walk.last_complete_at,
            last_error: walk.last_error,
            last_error_kind: walk.last_error_kind,
            devices: counts.devices,
            unassigned: counts.unassigned,
            removed_devices: counts.removed,
            mdm_servers: counts.servers,
            rate_limited: walk.rate_limited.max(0) as u64,
            attention,
            walked_by: None,
        });
    }
    let names: Vec<String> = config.org_accounts.iter().map(|a| a.name.clone()).collect();
    for (account, holder) in store.account_holders(&names)? {
        if let Some(s) = out.iter_mut().find(|s| s.account == account) {
            s.walked_by = Some(holder);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overdue_means_more_than_two_schedules_and_five_minutes() {
        let now = Utc::now();
        let schedule = Duration::from_secs(900);
        let ago = |s: i64| Some(now - chrono::Duration::seconds(s));
        assert_eq!(overdue(schedule, None, now), None);
        assert_eq!(overdue(schedule, ago(2100), now), None);
        assert_eq!(
            overdue(schedule, ago(2101), now),
            Some(Duration::from_secs(2101))
        );
    }

    #[test]
    fn every_kind_that_parks_a_token_needs_a_person_in_status() {
        for k in ErrorKind::ALL {
            assert_eq!(kind_needs_admin(Some(k.as_str())), k.needs_admin(), "{k:?}");
        }
        assert!(kind_needs_admin(Some("server_changed")));
        assert!(!kind_needs_admin(Some("timeout")));
        assert!(!kind_needs_admin(Some("no-such-kind")));
        assert!(!kind_needs_admin(None));
    }

    #[test]
    fn durations_for_people_keep_two_units() {
        let s = Duration::from_secs;
        assert_eq!(human_duration(Duration::from_millis(350)), "350ms");
        assert_eq!(human_duration(s(0)), "0s");
        assert_eq!(human_duration(s(45)), "45s");
        assert_eq!(human_duration(s(300)), "5m");
        assert_eq!(human_duration(s(303)), "5m 3s");
        assert_eq!(
            human_duration(Duration::new(5074, 114_386_851)),
            "1h 24m",
            "no seconds, milliseconds or nanoseconds beside hours"
        );
        assert_eq!(human_duration(s(3 * 86_400 + 7200 + 59)), "3d 2h");
        assert_eq!(human_secs(-5), "0s");
    }
}
