//! The HTTP client for Apple's device-assignment service: session handling and one
//! method per endpoint.
//!
//! Session rules (docs/apple-dep-api.md §3.2, NanoDEP's transport as the model): authenticate on first use
//! and cache the session token; on `401`, or `403` whose body is `FORBIDDEN`, authenticate
//! once and replay the request once; adopt any `X-ADM-Auth-Session` a response carries.
//! Transient failures (connect errors, timeouts, 5xx, 429/503 with `Retry-After`) are
//! retried with capped exponential backoff and jitter; everything else is returned at once.

use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT,
};
use serde::{Deserialize, Serialize};

use super::error::{classify, parse_retry_after, ApiError, Endpoint};
use super::oauth1;
use crate::config::RetryPolicy;
use crate::http_client::{describe_reqwest, Exchange, ExchangeError};
use crate::model::printable;
use crate::model::DeviceRecord;
use crate::token::ServerToken;

/// Apple's media type, spelled as Apple and every client spell it (docs/apple-dep-api.md §1).
const JSON_UTF8: &str = "application/json;charset=UTF8";
/// Header carrying the session token, both ways.
const SESSION_HEADER: &str = "x-adm-auth-session";
/// Caps a `Retry-After` so one answer cannot stall a run for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Everything the client needs besides the token.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Base URL, e.g. `https://mdmenrollment.apple.com`.
    pub base_url: reqwest::Url,
    /// `User-Agent` (required by Apple).
    pub user_agent: String,
    /// `X-Server-Protocol-Version`.
    pub protocol_version: u32,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Backoff for transient failures.
    pub retry: RetryPolicy,
    /// The largest response body accepted; a larger one is cut off and refused.
    pub max_response_bytes: usize,
}

pub use crate::config::DEFAULT_MAX_RESPONSE_BYTES;

/// A page of `POST /server/devices` or `POST /devices/sync` (`FetchDeviceResponse`).
///
/// Records are read one by one: a record that cannot be a device (no usable serial
/// number, a field of the wrong type) is set aside in [`DevicePage::refused`] instead of
/// failing the page, so one malformed record never blocks every later device.
#[derive(Debug)]
pub struct DevicePage {
    /// The page's records, in Apple's order.
    pub devices: Vec<DeviceRecord>,
    /// Position after this page.
    pub cursor: String,
    /// Progress marker.
    pub fetched_until: Option<String>,
    /// True: ask again at once with `cursor`.
    pub more_to_follow: bool,
    /// Records that were not stored, with why (escaped, no values beyond the serial).
    pub refused: Vec<String>,
    /// Serial numbers of refused records that had one: those devices are on the server
    /// even though their record could not be read, so a full fetch must not delete them.
    pub unreadable_serials: Vec<String>,
}

/// Just the serial number of a record that is not otherwise a device.
#[derive(Deserialize)]
struct SerialOnly {
    serial_number: String,
}

/// The page as Apple documents it: every record a device. The fast path.
#[derive(Deserialize)]
struct StrictPage {
    #[serde(default)]
    devices: Vec<DeviceRecord>,
    cursor: String,
    #[serde(default)]
    fetched_until: Option<String>,
    #[serde(default)]
    more_to_follow: bool,
}

/// The page read record by record, when some record is not a device.
#[derive(Deserialize)]
struct RawPage<'a> {
    #[serde(default, borrow)]
    devices: Vec<&'a serde_json::value::RawValue>,
    cursor: String,
    #[serde(default)]
    fetched_until: Option<String>,
    #[serde(default)]
    more_to_follow: bool,
}

/// Parses a device page: in one pass when every record is a device (the usual case),
/// else record by record, setting aside what cannot be stored. Either way a record with
/// an empty serial number is set aside.
fn parse_page(endpoint: Endpoint, bytes: &[u8]) -> Result<DevicePage, ApiError> {
    // (position in the page, record) and (position, why it was set aside).
    let mut refused: Vec<(usize, String)> = Vec::new();
    let mut unreadable_serials = Vec::new();
    let (records, cursor, fetched_until, more_to_follow) =
        match serde_json::from_slice::<StrictPage>(bytes) {
            Ok(p) => (
                p.devices.into_iter().enumerate().collect::<Vec<_>>(),
                p.cursor,
                p.fetched_until,
                p.more_to_follow,
            ),
            Err(_) => {
                let raw: RawPage<'_> =
                    serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedBody {
                        endpoint,
                        detail: format!("{e} in a {}-byte body", bytes.len()),
                    })?;
                let mut records = Vec::with_capacity(raw.devices.len());
                for (i, r) in raw.devices.into_iter().enumerate() {
                    match serde_json::from_str::<DeviceRecord>(r.get()) {
                        Ok(rec) => records.push((i, rec)),
                        Err(e) => {
                            if let Ok(only) = serde_json::from_str::<SerialOnly>(r.get()) {
                                if !only.serial_number.trim().is_empty() {
                                    unreadable_serials.push(only.serial_number);
                                }
                            }
                            refused.push((
                                i,
                                format!(
                                    "record {} is not a device ({})",
                                    i + 1,
                                    printable(&e.to_string())
                                ),
                            ))
                        }
                    }
                }
                (records, raw.cursor, raw.fetched_until, raw.more_to_follow)
            }
        };
    let mut devices = Vec::with_capacity(records.len());
    for (i, mut rec) in records {
        rec.device.normalise_v10();
        if rec.device.serial_number.trim().is_empty() {
            refused.push((i, format!("record {} has an empty serial number", i + 1)));
        } else if rec.device.serial_number.chars().any(char::is_control) {
            // No serial Apple gives has one, and a NUL cannot be a key in PostgreSQL.
            refused.push((
                i,
                format!(
                    "record {} has a control character in its serial number ({})",
                    i + 1,
                    crate::model::printable(&rec.device.serial_number)
                ),
            ));
        } else {
            devices.push(rec);
        }
    }
    refused.sort_by_key(|(i, _)| *i);
    Ok(DevicePage {
        devices,
        cursor,
        fetched_until,
        more_to_follow,
        refused: refused.into_iter().map(|(_, why)| why).collect(),
        unreadable_serials,
    })
}

/// `POST /profile/devices`'s answer (docs/apple-dep-api.md §4.9).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AssignResult {
    /// Per serial: `SUCCESS`, `NOT_ACCESSIBLE`, `FAILED` or `THROTTLED`.
    #[serde(default)]
    pub devices: std::collections::HashMap<String, String>,
    /// Protocol 10: how long to wait before a `THROTTLED` device is tried again.
    #[serde(default)]
    pub retry_after_seconds: Option<u64>,
}

/// `GET /device/replacementDetails` (docs/apple-dep-api.md §4.8).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ReplacementDetails {
    /// The replacement device.
    #[serde(default)]
    pub serial_number: Option<String>,
    /// The device it replaced.
    #[serde(default)]
    pub original_device_serial_number: Option<String>,
    /// When, `YYYY-MM-DD`.
    #[serde(default)]
    pub replacement_date: Option<String>,
}

/// `GET /account` (docs/apple-dep-api.md §4.1), the fields adesync uses; everything else is ignored.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Account {
    /// MDM server name in ABM/ASM.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The server's ID.
    #[serde(default)]
    pub server_uuid: Option<String>,
    /// Organisation name.
    #[serde(default)]
    pub org_name: Option<String>,
    /// `edu` (ASM) or `org` (ABM).
    #[serde(default)]
    pub org_type: Option<String>,
    /// Apple Account that downloaded the token.
    #[serde(default)]
    pub admin_id: Option<String>,
    /// Apple's customer ID of the organisation (protocol 3+).
    #[serde(default)]
    pub org_id: Option<String>,
    /// The endpoints this organisation may call, with page-size limits (protocol 3+).
    #[serde(default)]
    pub urls: Vec<AccountUrl>,
}

/// One entry of `/account`'s `urls` (docs/apple-dep-api.md §4.1).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct AccountUrl {
    /// Path, e.g. `/server/devices`.
    #[serde(default)]
    pub uri: String,
    /// Allowed methods.
    #[serde(default)]
    pub http_method: Vec<String>,
    /// Page-size limits for paged endpoints.
    #[serde(default)]
    pub limit: Option<AccountLimit>,
}

/// `urls[].limit`: Apple's default and maximum `limit` for a paged endpoint.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct AccountLimit {
    /// Used when a request names no `limit`.
    #[serde(default)]
    pub default: Option<u32>,
    /// The largest `limit` accepted.
    #[serde(default)]
    pub maximum: Option<u32>,
}

#[derive(Serialize)]
struct PageRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<&'a str>,
    limit: u32,
}

/// One token's connection to Apple.
pub struct AppleClient {
    http: reqwest::Client,
    settings: ClientSettings,
    token: ServerToken,
    session: Mutex<Option<String>>,
}

impl std::fmt::Debug for AppleClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppleClient")
            .field("base_url", &self.settings.base_url.as_str())
            .field("token", &self.token)
            .field("session", &"<redacted>")
            .finish()
    }
}

impl AppleClient {
    /// A client for one token. Builds its own connection pool.
    pub fn new(token: ServerToken, settings: ClientSettings) -> Result<Self, ApiError> {
        let http = crate::http_client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(30)))
            .pool_idle_timeout(Duration::from_secs(60))
            // Apple does not redirect this API. Following one would send the session
            // header to another host and store that host's devices.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ApiError::Transport {
                endpoint: Endpoint::Session,
                url: settings.base_url.to_string(),
                detail: format!("cannot build the HTTP client: {e}"),
                timeout: false,
            })?;
        Ok(Self {
            http,
            settings,
            token,
            session: Mutex::new(None),
        })
    }

    /// `POST /server/devices`: one page of the full device list.
    pub async fn fetch_devices(
        &self,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<DevicePage, ApiError> {
        let body = serde_json::to_vec(&PageRequest { cursor, limit }).unwrap_or_default();
        self.call_with(
            Endpoint::FetchDevices,
            reqwest::Method::POST,
            "server/devices",
            Some(body),
            parse_page,
        )
        .await
    }

    /// `POST /devices/sync`: one page of changes since `cursor`.
    pub async fn sync_devices(&self, cursor: &str, limit: u32) -> Result<DevicePage, ApiError> {
        let body = serde_json::to_vec(&PageRequest {
            cursor: Some(cursor),
            limit,
        })
        .unwrap_or_default();
        self.call_with(
            Endpoint::SyncDevices,
            reqwest::Method::POST,
            "devices/sync",
            Some(body),
            parse_page,
        )
        .await
    }

    /// `GET /device/replacementDetails?device=SERIAL` (protocol 10): what a replacement
    /// device replaced; `None` when Apple says it is not a replacement (404
    /// `DEVICE_NOT_FOUND`, docs/apple-dep-api.md §4.8).
    pub async fn replacement_details(
        &self,
        serial: &str,
    ) -> Result<Option<ReplacementDetails>, ApiError> {
        let encoded: String = url::form_urlencoded::byte_serialize(serial.as_bytes()).collect();
        let path = format!("device/replacementDetails?device={encoded}");
        match self
            .call(
                Endpoint::ReplacementDetails,
                reqwest::Method::GET,
                &path,
                None,
            )
            .await
        {
            Ok(d) => Ok(Some(d)),
            Err(ApiError::Http { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /profile`: defines a profile (Apple's profile JSON) and returns its UUID
    /// (docs/apple-dep-api.md §4.9).
    pub async fn define_profile(
        &self,
        profile: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ApiError> {
        #[derive(Deserialize)]
        struct Defined {
            profile_uuid: String,
        }
        let body = serde_json::to_vec(profile).unwrap_or_default();
        let d: Defined = self
            .call(
                Endpoint::DefineProfile,
                reqwest::Method::POST,
                "profile",
                Some(body),
            )
            .await?;
        if d.profile_uuid.is_empty() || d.profile_uuid.len() > 64 {
            return Err(ApiError::MalformedBody {
                endpoint: Endpoint::DefineProfile,
                detail: "the profile_uuid is empty or too long".into(),
            });
        }
        Ok(d.profile_uuid)
    }

    /// `POST /profile/devices`: assigns a profile to at most 1,000 devices; Apple's
    /// answer per device (docs/apple-dep-api.md §4.9).
    pub async fn assign_profile(
        &self,
        profile_uuid: &str,
        serials: &[String],
    ) -> Result<AssignResult, ApiError> {
        let body = serde_json::to_vec(&serde_json::json!({
            "profile_uuid": profile_uuid,
            "devices": serials,
        }))
        .unwrap_or_default();
        self.call(
            Endpoint::AssignProfile,
            reqwest::Method::POST,
            "profile/devices",
            Some(body),
        )
        .await
    }

    /// `GET /account`.
    pub async fn account(&self) -> Result<Account, ApiError> {
        self.call(Endpoint::Account, reqwest::Method::GET, "account", None)
            .await
    }

    /// Forgets the cached session (the next call authenticates).
    pub fn clear_session(&self) {
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Calls an endpoint and parses its JSON, with retries for transient failures
    /// (a malformed body counts as one: it is usually a truncated transfer).
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ApiError> {
        self.call_with(endpoint, method, path, body, parse_json)
            .await
    }

    /// [`Self::call`] with the body parsed by `parse`.
    async fn call_with<T>(
        &self,
        endpoint: Endpoint,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        parse: fn(Endpoint, &[u8]) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let policy = &self.settings.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.initial_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.max_attempts.saturating_sub(1) as usize)
            .with_jitter();
        (|| async {
            let bytes = self
                .call_authenticated(endpoint, method.clone(), path, body.as_deref())
                .await?;
            parse(endpoint, &bytes)
        })
        .retry(backoff)
        .when(ApiError::is_retryable)
        .adjust(|err, planned| {
            // Out of attempts stays out; otherwise Apple's Retry-After wins.
            planned.map(|d| {
                err.retry_after()
                    .map(|ra| ra.min(MAX_RETRY_AFTER))
                    .unwrap_or(d)
            })
        })
        .notify(|err, wait| {
            tracing::warn!(error = %err, retry_in = ?wait, "transient failure; retrying");
        })
        .await
    }

    /// One attempt: ensure a session, send, re-authenticate once on 401/403 FORBIDDEN.
    async fn call_authenticated(
        &self,
        endpoint: Endpoint,
        method: reqwest::Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<bytes::Bytes, ApiError> {
        let mut session = match self.cached_session() {
            Some(s) => s,
            None => self.authenticate().await?,
        };
        let mut reauthenticated = false;
        loop {
            let resp = self
                .send(endpoint, method.clone(), path, body, Some(&session))
                .await?;
            self.adopt_session(&resp.headers, &session);
            if resp.status / 100 == 2 {
                return Ok(resp.body);
            }
            let text = String::from_utf8_lossy(&resp.body);
            let expired_session = resp.status == 401
                || (resp.status == 403 && super::error::body_token(&text) == "FORBIDDEN");
            if expired_session && !reauthenticated {
                tracing::debug!(
                    endpoint = endpoint.describe(),
                    status = resp.status,
                    "session not accepted; authenticating again"
                );
                self.clear_session();
                session = self.authenticate().await?;
                reauthenticated = true;
                continue;
            }
            if expired_session && resp.status == 401 {
                return Err(ApiError::SessionRejected(endpoint));
            }
            if expired_session {
                // 403 FORBIDDEN even with a brand-new session: the token was revoked or
                // replaced (docs/apple-dep-api.md §3.1, §6.2).
                return Err(ApiError::TokenRejected {
                    status: 403,
                    body: "FORBIDDEN".into(),
                    hint: "",
                });
            }
            return Err(classify(
                endpoint,
                resp.status,
                &text,
                retry_after(&resp.headers),
            ));
        }
    }

    fn cached_session(&self) -> Option<String> {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes a rotated session token from a response (docs/apple-dep-api.md §3.2).
    fn adopt_session(&self, headers: &HeaderMap, current: &str) {
        if let Some(new) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
            if !new.is_empty() && new != current {
                tracing::debug!("Apple rotated the session token");
                *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(new.to_owned());
            }
        }
    }

    /// `GET /session` with an OAuth 1.0a signature; caches the token.
    async fn authenticate(&self) -> Result<String, ApiError> {
        let url = self.url("session");
        let auth = oauth1::authorization_header(
            "GET",
            &url,
            &self.token,
            Some(oauth1::APPLE_REALM),
            None,
            None,
        );
        let resp = self
            .send_raw(Endpoint::Session, reqwest::Method::GET, url, None, |b| {
                b.header(AUTHORIZATION, auth.clone())
                    // Apple's own simulator requires it on /session (docs/apple-dep-api.md §3.1).
                    .header(CONTENT_TYPE, JSON_UTF8)
            })
            .await?;
        if resp.status / 100 != 2 {
            let text = String::from_utf8_lossy(&resp.body);
            return Err(classify(
                Endpoint::Session,
                resp.status,
                &text,
                retry_after(&resp.headers),
            ));
        }
        #[derive(Deserialize)]
        struct SessionBody {
            auth_session_token: Option<String>,
        }
        let parsed: SessionBody = parse_json(Endpoint::Session, &resp.body)?;
        let token =
            parsed
                .auth_session_token
                .filter(|t| !t.is_empty())
                .ok_or(ApiError::MalformedBody {
                    endpoint: Endpoint::Session,
                    detail: "no auth_session_token in the response".into(),
                })?;
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.clone());
        Ok(token)
    }

    /// The URL of `path`, which may end in an already-encoded `?query`.
    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.settings.base_url.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        url.set_path(&format!("{base_path}/{path}"));
        url.set_query(query);
        url
    }

    async fn send(
        &self,
        endpoint: Endpoint,
        method: reqwest::Method,
        path: &str,
        body: Option<&[u8]>,
        session: Option<&str>,
    ) -> Result<Exchange, ApiError> {
        let url = self.url(path);
        let session = session.map(str::to_owned);
        self.send_raw(endpoint, method, url, body, move |b| match &session {
            Some(s) => b.header(SESSION_HEADER, s.as_str()),
            None => b,
        })
        .await
    }

    async fn send_raw(
        &self,
        endpoint: Endpoint,
        method: reqwest::Method,
        url: reqwest::Url,
        body: Option<&[u8]>,
        extra: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Exchange, ApiError> {
        let mut b = self
            .http
            .request(method, url)
            .header(USER_AGENT, self.settings.user_agent.as_str())
            .header(
                "X-Server-Protocol-Version",
                self.settings.protocol_version.to_string(),
            )
            .header(ACCEPT, HeaderValue::from_static(JSON_UTF8));
        if let Some(body) = body {
            b = b.header(CONTENT_TYPE, JSON_UTF8).body(body.to_vec());
        }
        let limit = self.settings.max_response_bytes;
        crate::http_client::exchange(extra(b), limit)
            .await
            .map_err(|e| match e {
                ExchangeError::Transport(e) => ApiError::Transport {
                    endpoint,
                    url: self.settings.base_url.to_string(),
                    detail: describe_reqwest(&e),
                    timeout: e.is_timeout(),
                },
                ExchangeError::Redirected { status, location } => ApiError::Redirected {
                    endpoint,
                    status,
                    location: printable(&location).into_owned(),
                },
                ExchangeError::TooLarge => ApiError::TooLarge { endpoint, limit },
            })
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, chrono::Utc::now()))
}

fn parse_json<T: serde::de::DeserializeOwned>(
    endpoint: Endpoint,
    bytes: &[u8],
) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedBody {
        endpoint,
        detail: format!("{e} in a {}-byte body", bytes.len()),
    })
}
