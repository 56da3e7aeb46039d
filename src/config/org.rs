//! `[[org_accounts]]`: Apple School Manager / Apple Business Manager API accounts
//! (docs/apple-business-api.md), resolved into [`OrgAccountConfig`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{check_name, check_secret_file, duration_in, parse_api_url, resolve, Schedule};

/// Apple's token endpoint (docs/apple-business-api.md §2).
pub const DEFAULT_TOKEN_URL: &str = "https://account.apple.com/auth/oauth2/token";
/// The client assertion's `aud`: Apple's constant, whatever `token_url` says
/// (docs/apple-business-api.md §2).
pub const ASSERTION_AUDIENCE: &str = "https://account.apple.com/auth/oauth2/v2/token";
/// Base of the Apple Business Manager API.
pub const BUSINESS_API_URL: &str = "https://api-business.apple.com";
/// Base of the Apple School Manager API.
pub const SCHOOL_API_URL: &str = "https://api-school.apple.com";
/// How often an account is walked unless configured.
pub const DEFAULT_ORG_SCHEDULE: Duration = Duration::from_secs(3600);
/// Requests per second per account unless configured.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 5.0;
/// How often a device's AppleCare coverage is asked for again.
pub const DEFAULT_APPLECARE_REFRESH: Duration = Duration::from_secs(7 * 86_400);
/// Apple's largest `limit` for the organisation API's lists (docs/apple-business-api.md §3).
pub const MAX_ORG_PAGE_SIZE: u32 = 1000;

/// Which of Apple's two APIs an account belongs to, from its client ID's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrgScope {
    /// `BUSINESSAPI.…`: Apple Business Manager, scope `business.api`.
    Business,
    /// `SCHOOLAPI.…`: Apple School Manager, scope `school.api`.
    School,
}

impl OrgScope {
    /// The OAuth scope requested.
    pub fn scope(self) -> &'static str {
        match self {
            OrgScope::Business => "business.api",
            OrgScope::School => "school.api",
        }
    }

    /// The product, for messages.
    pub fn product(self) -> &'static str {
        match self {
            OrgScope::Business => "Apple Business Manager",
            OrgScope::School => "Apple School Manager",
        }
    }

    fn default_api_url(self) -> &'static str {
        match self {
            OrgScope::Business => BUSINESS_API_URL,
            OrgScope::School => SCHOOL_API_URL,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrgAccount {
    name: String,
    client_id: String,
    key_id: String,
    private_key_file: PathBuf,
    api_url: Option<String>,
    token_url: Option<String>,
    schedule: Option<String>,
    requests_per_second: Option<toml::Value>,
    applecare: Option<bool>,
    applecare_refresh: Option<String>,
    page_size: Option<i64>,
}

impl RawOrgAccount {
    pub(super) fn name(&self) -> &str {
        &self.name
    }
}

/// One organisation API account.
#[derive(Clone)]
pub struct OrgAccountConfig {
    /// Unique name across tokens and accounts; keys every stored row of this account.
    pub name: String,
    /// `BUSINESSAPI.<uuid>` or `SCHOOLAPI.<uuid>`.
    pub client_id: String,
    /// The key's ID as ABM/ASM shows it.
    pub key_id: String,
    /// The P-256 private key (PEM, SEC1 or PKCS#8).
    pub private_key_file: PathBuf,
    /// Business or School.
    pub scope: OrgScope,
    /// The API's base, without `/v1`.
    pub api_url: reqwest::Url,
    /// Where access tokens are asked for.
    pub token_url: reqwest::Url,
    /// When the daemon walks this account.
    pub schedule: Schedule,
    /// Request budget of this account.
    pub requests_per_second: f64,
    /// Whether AppleCare coverage is fetched.
    pub applecare: bool,
    /// How old a device's coverage may grow before it is asked for again.
    pub applecare_refresh: Duration,
    /// `limit` of each list request.
    pub page_size: u32,
}

impl fmt::Debug for OrgAccountConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgAccountConfig")
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .field("key_id", &self.key_id)
            .field("private_key_file", &self.private_key_file)
            .field("api_url", &self.api_url.as_str())
            .field("token_url", &self.token_url.as_str())
            .field("schedule", &self.schedule.to_config_text())
            .field("requests_per_second", &self.requests_per_second)
            .field("applecare", &self.applecare)
            .finish()
    }
}

/// Resolves one `[[org_accounts]]` entry; errors are `(key, reason)`.
pub(super) fn resolve_account(
    i: usize,
    raw: RawOrgAccount,
    base: &Path,
    timezone: chrono_tz::Tz,
    check_files: bool,
) -> Result<OrgAccountConfig, (String, String)> {
    let key = |k: &str| format!("org_accounts[{i}].{k}");
    check_name(&raw.name).map_err(|r| (key("name"), r))?;
    let scope = client_scope(&raw.client_id).map_err(|r| (key("client_id"), r))?;
    let key_id = raw.key_id.trim();
    if key_id.is_empty() || key_id.len() > 128 || !key_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err((
            key("key_id"),
            "must be the key's ID as Apple Business/School Manager shows it under Preferences → API (printable, no spaces)".into(),
        ));
    }
    let private_key_file = resolve(base, raw.private_key_file);
    if check_files {
        check_secret_file(&private_key_file, true).map_err(|r| (key("private_key_file"), r))?;
    }
    let api_url = match raw.api_url.as_deref() {
        None => parse_api_url(scope.default_api_url()).expect("a valid constant"),
        Some(text) => {
            let url = parse_api_url(text).map_err(|r| (key("api_url"), r))?;
            if url.path().trim_end_matches('/').ends_with("/v1") {
                return Err((
                    key("api_url"),
                    format!(
                        "{text:?} ends in /v1; give the base without it, e.g. \"{}\"",
                        scope.default_api_url()
                    ),
                ));
            }
            url
        }
    };
    let token_url = parse_api_url(raw.token_url.as_deref().unwrap_or(DEFAULT_TOKEN_URL))
        .map_err(|r| (key("token_url"), r))?;
    let schedule = match raw.schedule.as_deref() {
        None => Schedule::Interval(DEFAULT_ORG_SCHEDULE),
        Some(text) => super::parse_schedule(text, timezone, Duration::from_secs(60), None)
            .map_err(|r| (key("schedule"), r))?,
    };
    let requests_per_second = match &raw.requests_per_second {
        None => DEFAULT_REQUESTS_PER_SECOND,
        Some(v) => {
            let n = match v {
                toml::Value::Integer(n) => *n as f64,
                toml::Value::Float(f) => *f,
                _ => f64::NAN,
            };
            if !(0.1..=100.0).contains(&n) {
                return Err((
                    key("requests_per_second"),
                    format!("{v} is outside 0.1..=100; Apple throttles an account that asks too fast (default {DEFAULT_REQUESTS_PER_SECOND})"),
                ));
            }
            n
        }
    };
    let applecare_refresh = duration_in(
        raw.applecare_refresh.as_deref(),
        DEFAULT_APPLECARE_REFRESH,
        Duration::from_secs(3600),
        Duration::from_secs(366 * 86_400),
    )
    .map_err(|r| (key("applecare_refresh"), r))?;
    let page_size = match raw.page_size {
        None => MAX_ORG_PAGE_SIZE,
        Some(n) if (1..=MAX_ORG_PAGE_SIZE as i64).contains(&n) => n as u32,
        Some(n) => {
            return Err((
                key("page_size"),
                format!("{n} is out of range; Apple accepts 1..=1000"),
            ))
        }
    };
    Ok(OrgAccountConfig {
        name: raw.name,
        client_id: raw.client_id.trim().to_owned(),
        key_id: key_id.to_owned(),
        private_key_file,
        scope,
        api_url,
        token_url,
        schedule,
        requests_per_second,
        applecare: raw.applecare.unwrap_or(false),
        applecare_refresh,
        page_size,
    })
}

/// The scope a client ID belongs to: `BUSINESSAPI.<id>` or `SCHOOLAPI.<id>`.
fn client_scope(client_id: &str) -> Result<OrgScope, String> {
    let id = client_id.trim();
    let (scope, rest) = if let Some(rest) = id.strip_prefix("BUSINESSAPI.") {
        (OrgScope::Business, rest)
    } else if let Some(rest) = id.strip_prefix("SCHOOLAPI.") {
        (OrgScope::School, rest)
    } else {
        return Err(format!(
            "{:?} is not an API account's client ID; copy it from Apple Business/School Manager → Preferences → API (it starts with BUSINESSAPI. or SCHOOLAPI.)",
            crate::model::printable(id)
        ));
    };
    if rest.is_empty()
        || rest.len() > 128
        || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(format!(
            "{:?} is not an API account's client ID: after the prefix comes the account's ID (letters, digits and -)",
            crate::model::printable(id)
        ));
    }
    Ok(scope)
}

/// Appends the account to `check-config`'s effective TOML.
pub(super) fn account_to_toml(s: &mut String, a: &OrgAccountConfig) {
    use std::fmt::Write;
    let _ = writeln!(s, "\n[[org_accounts]]");
    let _ = writeln!(s, "name = {:?}", a.name);
    let _ = writeln!(s, "client_id = {:?}", a.client_id);
    let _ = writeln!(s, "key_id = {:?}", a.key_id);
    let _ = writeln!(
        s,
        "private_key_file = {:?}",
        a.private_key_file.display().to_string()
    );
    let _ = writeln!(
        s,
        "api_url = {:?}",
        a.api_url.as_str().trim_end_matches('/')
    );
    let _ = writeln!(s, "token_url = {:?}", a.token_url.as_str());
    let _ = writeln!(s, "schedule = {:?}", a.schedule.to_config_text());
    let _ = writeln!(s, "requests_per_second = {}", a.requests_per_second);
    let _ = writeln!(s, "page_size = {}", a.page_size);
    let _ = writeln!(s, "applecare = {}", a.applecare);
    let _ = writeln!(
        s,
        "applecare_refresh = {:?}",
        humantime::format_duration(a.applecare_refresh).to_string()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_name_their_scope() {
        assert_eq!(
            client_scope("BUSINESSAPI.9703f56c-10ce-4876-8f59-e78e5e23a152").unwrap(),
            OrgScope::Business
        );
        assert_eq!(
            client_scope("SCHOOLAPI.9703f56c-10ce-4876-8f59-e78e5e23a152").unwrap(),
            OrgScope::School
        );
        for bad in [
            "",
            "BUSINESSAPI.",
            "9703f56c",
            "businessapi.x",
            "SCHOOLAPI.a b",
        ] {
            let e = client_scope(bad).unwrap_err();
            assert!(e.contains("client ID"), "{bad}: {e}");
        }
    }
}
