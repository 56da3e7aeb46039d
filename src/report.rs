//! `adesync status`: what each token's sync looks like, and whether a person must act.
//!
//! Built from the database (phase, cursor, last success and error, device counts) and the
//! config (token expiry, schedule), so it works whether or not the daemon is running.
//! [`TokenStatus::attention`] lists what needs a person; the command exits non-zero when
//! any token has something there, which makes it usable from cron or a monitoring check.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::model::parse_time;
use crate::store::{Store, StoreError};

/// Days before expiry from which a token needs attention.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Error kinds that need a person rather than time (see `SyncError::needs_admin`).
const ADMIN_KINDS: [&str; 6] = [
    "token_expired",
    "token_file",
    "token_rejected",
    "terms_not_signed",
    "access_denied",
    "user_agent",
];

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
    /// Token expiry (RFC 3339).
    pub token_expires_at: String,
    /// Whole days until the token expires.
    pub token_days_left: i64,
    /// What a person must do, if anything.
    pub attention: Vec<String>,
}

/// Computes every configured token's status.
pub fn token_statuses(
    config: &Config,
    store: &Store,
    now: DateTime<Utc>,
) -> Result<Vec<TokenStatus>, StoreError> {
    let mut out = Vec::new();
    for t in &config.tokens {
        let state = store.sync_state(&t.name)?;
        let (devices, deleted_devices) = store.device_counts(&t.name)?;
        let never_ran = state.last_run_at.is_none() && state.cursor.cursor.is_none();
        let days_left = t.token.days_left(now);
        let mut attention = Vec::new();
        if now >= t.token.access_token_expiry {
            attention.push(format!(
                "the server token expired on {}: download a new one in Apple Business/School Manager (Preferences → your MDM server → Download Token) and replace {}",
                t.token.access_token_expiry.format("%Y-%m-%d"),
                t.token_file.display()
            ));
        } else if days_left < EXPIRY_WARNING_DAYS {
            attention.push(format!(
                "the server token expires in {days_left} day(s) ({}): download a new one in Apple Business/School Manager before then",
                t.token.access_token_expiry.format("%Y-%m-%d")
            ));
        }
        if let (Some(err), kind) = (&state.last_error, state.last_error_kind.as_deref()) {
            let needs_admin = kind.is_some_and(|k| ADMIN_KINDS.contains(&k));
            attention.push(if needs_admin {
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
            Some(t_ok) => {
                let allowed = chrono::Duration::from_std(t.schedule * 2 + Duration::from_secs(300))
                    .unwrap_or(chrono::Duration::hours(1));
                if now - t_ok > allowed && state.last_error.is_none() {
                    attention.push(format!(
                        "no successful sync for {}: is the daemon running? (`systemctl status adesync`)",
                        humantime::format_duration((now - t_ok).to_std().unwrap_or_default())
                    ));
                }
            }
            None => {}
        }
        if never_ran {
            attention.push("never synced: run `adesync run --once` or start the service".into());
        }
        let cursor_age = state
            .cursor_at
            .as_deref()
            .and_then(parse_time)
            .map(|t| (now - t).num_seconds());
        if let Some(age) = cursor_age {
            if age > 5 * 86_400 {
                attention.push(format!(
                    "the stored cursor is {} days old; Apple expires it after 7 days and a full re-fetch follows",
                    age / 86_400
                ));
            }
        }
        out.push(TokenStatus {
            token: t.name.clone(),
            phase: if never_ran {
                "new".into()
            } else {
                match state.cursor.phase {
                    crate::store::Phase::Fetch => "fetch".into(),
                    crate::store::Phase::Sync => "sync".into(),
                }
            },
            cursor_age_seconds: cursor_age,
            last_success_at: state.last_success_at,
            last_error: state.last_error,
            last_error_kind: state.last_error_kind,
            devices,
            deleted_devices,
            token_expires_at: t
                .token
                .access_token_expiry
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
            token_days_left: days_left,
            attention,
        });
    }
    Ok(out)
}

/// A duration in a short human form ("3h 12m").
pub fn short_age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}
