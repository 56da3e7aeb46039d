//! The checks made at the start of every run, before any device is fetched, using
//! Apple's `GET /account` (docs/apple-dep-api.md §4.1):
//! - logs a warning when the token's expiry crosses 30, 14, 7, 3 or 1 days — once per
//!   threshold, remembered in the database so a cron job every 15 minutes does not repeat
//!   it; a renewed token (another expiry) starts afresh;
//! - asks Apple for the account and stores server name and UUID, organisation and admin;
//! - refuses to go on when the token now reports another `server_uuid` than the one the
//!   stored devices came from, because that would mix two servers' devices under one name;
//! - caps the page size at the `urls[].limit.maximum` Apple reports for fetch/sync.

use chrono::{DateTime, Utc};

use super::SyncError;
use crate::apple::{Account, AppleClient};
use crate::config::TokenConfig;
use crate::model::format_time;
use crate::store::{Database, Store, StoredAccount};
use crate::token::ServerToken;

/// Days before expiry at which a warning is logged: the first is the expiry rule's
/// "expires soon" boundary ([`crate::status::EXPIRY_WARNING_DAYS`]; docs/apple-dep-api.md
/// §2.3: Fleet warns from 30 days).
pub(crate) const EXPIRY_THRESHOLDS: [i64; 5] = [crate::status::EXPIRY_WARNING_DAYS, 14, 7, 3, 1];

/// The endpoints whose `limit` adesync sends.
const PAGED_URIS: [&str; 2] = ["/server/devices", "/devices/sync"];

/// Start-of-run checks for one token: expiry warnings, `GET /account` stored, the
/// same-server guard. Returns the page size to use: the configured one, capped at what
/// Apple allows.
pub async fn check(
    client: &AppleClient,
    database: &Database,
    token: &TokenConfig,
    server_token: &ServerToken,
) -> Result<u32, SyncError> {
    let now = Utc::now();
    let (db, name, expiry) = (
        database.to_owned(),
        token.name.clone(),
        server_token.access_token_expiry,
    );
    blocking(move || warn_expiry_once(&db, &name, expiry, now)).await?;

    let account = client.account().await?;
    let (page_size, maximum) = effective_page_size(token.page_size, &account);
    if page_size < token.page_size {
        tracing::debug!(token = %token.name, configured = token.page_size, page_size,
            "page size capped at the maximum Apple's /account reports");
    }
    let row = StoredAccount {
        token_name: token.name.clone(),
        server_name: account.server_name,
        server_uuid: account.server_uuid,
        org_name: account.org_name,
        org_type: account.org_type,
        org_id: account.org_id,
        admin_id: account.admin_id,
        page_limit_max: maximum,
        consumer_key: Some(server_token.consumer_key.clone()),
        checked_at: Some(format_time(now)),
        ..StoredAccount::default()
    };
    let db = database.to_owned();
    blocking(move || {
        let mut store = Store::open(&db)?;
        if let Some(prev) = store.account(&row.token_name)? {
            if let (Some(old), Some(new)) = (&prev.server_uuid, &row.server_uuid) {
                if !same_server(old, new) {
                    return Err(SyncError::ServerChanged {
                        token: row.token_name.clone(),
                        stored_server: describe_server(prev.server_name.as_deref(), old),
                        new_server: describe_server(row.server_name.as_deref(), new),
                    });
                }
            }
        }
        store.save_account(&row)?;
        Ok(())
    })
    .await?;
    Ok(page_size)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SyncError> + Send + 'static,
) -> Result<T, SyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SyncError::Writer(e.to_string()))?
}

/// Logs the expiry warning due now, if any, and remembers it.
fn warn_expiry_once(
    db: &Database,
    name: &str,
    expiry: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), SyncError> {
    let mut store = Store::open(db)?;
    let prev = store.account(name)?;
    let expiry_text = expiry.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let same_token = prev
        .as_ref()
        .is_some_and(|p| p.token_expiry.as_deref() == Some(expiry_text.as_str()));
    let last = prev
        .as_ref()
        .filter(|_| same_token)
        .and_then(|p| p.expiry_warned_days);
    match expiry_warning(expiry - now, last) {
        Some(threshold) => {
            let days = (expiry - now).num_days();
            let when = match days {
                0 => "in less than a day".to_owned(),
                1 => "in 1 day".to_owned(),
                n => format!("in {n} days"),
            };
            let server = prev
                .as_ref()
                .and_then(|p| p.server_name.as_deref())
                .map(|s| format!("the MDM server \"{s}\""))
                .unwrap_or_else(|| "your MDM server".to_owned());
            tracing::warn!(token = %name, expires = %expiry_text, days_left = days,
                "the server token for \"{name}\" expires {when} ({expiry_text}); renew it: in Apple Business/School Manager open Preferences → {server} → Download Token, then run `adesync token import --name {name} FILE`");
            store.set_expiry_warning(name, &expiry_text, Some(threshold))?;
        }
        // A renewed token: forget the old token's warnings.
        None if !same_token => store.set_expiry_warning(name, &expiry_text, None)?,
        None => {}
    }
    Ok(())
}

/// The threshold to warn about now, given the time left and the last threshold warned
/// about for this token: the smallest threshold reached, if not warned yet. Once expired,
/// nothing: the run is refused with its own message.
pub fn expiry_warning(remaining: chrono::Duration, last_warned: Option<i64>) -> Option<i64> {
    if remaining <= chrono::Duration::zero() {
        return None;
    }
    let reached = EXPIRY_THRESHOLDS
        .iter()
        .copied()
        .filter(|&t| remaining <= chrono::Duration::days(t))
        .min()?;
    match last_warned {
        Some(last) if last <= reached => None,
        _ => Some(reached),
    }
}

/// The page size to send: `configured`, capped at the smallest `limit.maximum` Apple
/// lists for fetch and sync (docs/apple-dep-api.md §4.1: the documented maximum and the one `/account`
/// reports disagree, so the account wins). Also returns that maximum.
pub fn effective_page_size(configured: u32, account: &Account) -> (u32, Option<u32>) {
    let maximum = account
        .urls
        .iter()
        .filter(|u| PAGED_URIS.contains(&u.uri.as_str()))
        .filter_map(|u| u.limit.and_then(|l| l.maximum))
        .filter(|&m| m > 0)
        .min();
    (maximum.map_or(configured, |m| configured.min(m)), maximum)
}

/// Apple shows a server's UUID both as 32 hex digits and dashed (docs/apple-dep-api.md §4.1); compare the
/// digits only.
fn same_server(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    norm(a) == norm(b)
}

fn describe_server(name: Option<&str>, uuid: &str) -> String {
    match name {
        Some(n) => format!(
            "server \"{}\" ({})",
            crate::model::printable(n),
            crate::model::printable(uuid)
        ),
        None => format!("server {}", crate::model::printable(uuid)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn expiry_warnings_come_once_per_threshold() {
        let d = Duration::days;
        assert_eq!(expiry_warning(d(200), None), None);
        assert_eq!(expiry_warning(d(31), None), None);
        assert_eq!(expiry_warning(d(30), None), Some(30));
        assert_eq!(expiry_warning(d(29), Some(30)), None, "not again");
        assert_eq!(expiry_warning(d(14), Some(30)), Some(14));
        assert_eq!(expiry_warning(d(10), None), Some(14), "first run mid-way");
        assert_eq!(expiry_warning(d(5), Some(14)), Some(7));
        assert_eq!(expiry_warning(d(3), Some(7)), Some(3));
        assert_eq!(expiry_warning(Duration::hours(20), Some(3)), Some(1));
        assert_eq!(expiry_warning(Duration::hours(1), Some(1)), None);
        // Expired: the run is refused instead, with the renewal steps.
        assert_eq!(expiry_warning(Duration::zero(), None), None);
        assert_eq!(expiry_warning(-d(1), None), None);
    }

    fn account(json: &str) -> Account {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn page_size_is_capped_at_the_accounts_maximum() {
        let micromdm = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/apple/micromdm-account_response.json"
        ))
        .unwrap();
        // MicroMDM's real (sanitised) response allows 5000: the configured 1000 stands.
        assert_eq!(
            effective_page_size(1000, &account(&micromdm)),
            (1000, Some(5000))
        );
        let small = r#"{"urls":[{"uri":"/server/devices","http_method":["POST"],"limit":{"default":100,"maximum":200}},
                                {"uri":"/devices/sync","http_method":["POST"],"limit":{"default":100,"maximum":300}},
                                {"uri":"/devices","http_method":["POST"],"limit":{"maximum":1}}]}"#;
        assert_eq!(effective_page_size(1000, &account(small)), (200, Some(200)));
        assert_eq!(effective_page_size(50, &account(small)), (50, Some(200)));
        // Before protocol 3 there are no urls: the configured size stands.
        assert_eq!(
            effective_page_size(1000, &account(r#"{"server_name":"x"}"#)),
            (1000, None)
        );
    }

    #[test]
    fn server_uuids_compare_without_dashes_or_case() {
        assert!(same_server(
            "677cab70-fe18-11e2-b778-0800200c9a66",
            "677CAB70FE1811E2B7780800200C9A66"
        ));
        assert!(!same_server(
            "6666ED66666666666666666666666666",
            "5D1A0E3C9B7F4A2E8C6D0B1F3A5E7C92"
        ));
    }
}
