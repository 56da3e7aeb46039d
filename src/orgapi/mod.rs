//! Everything that speaks the Apple School Manager and Apple Business API
//! (docs/apple-business-api.md): the ES256 client assertion, the access-token cache, the
//! per-account request budget, one method per endpoint, errors parsed once.
//!
//! One [`OrgClient`] per account. Every request of an account waits for the account's
//! budget ([`limiter::Limiter`]): a token bucket of `requests_per_second`, and after a 429
//! a pause until its `Retry-After` has passed, for every request of the account.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use serde::Deserialize;
use tokio::time::Instant;

pub mod assertion;
pub mod device;
pub mod error;
mod limiter;

pub use assertion::{KeyError, SigningKey};
pub use device::{Coverage, MdmServer, OrgDevice, RawResource, Refused, Resource};
pub use error::{OrgApiError, OrgEndpoint};

use crate::config::{OrgAccountConfig, RetryPolicy, ASSERTION_AUDIENCE};
use crate::http_client::{describe_reqwest, exchange, retry_after, Exchange, ExchangeError};
use crate::model::printable;

/// The longest `Retry-After` honoured within a run; a longer one ends the run (the next
/// one starts after it).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// A cached access token is replaced this long before Apple says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(120);

/// What the client needs besides the account.
#[derive(Clone, Debug)]
pub struct OrgClientSettings {
    /// `User-Agent`.
    pub user_agent: String,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Backoff for transient failures.
    pub retry: RetryPolicy,
    /// The largest body accepted.
    pub max_response_bytes: usize,
}

/// One list page: the resources and the cursor of the next page, if any.
#[derive(Debug)]
pub struct ListPage<T = Resource> {
    /// `data`.
    pub data: Vec<T>,
    /// `meta.paging.nextCursor`, or the `cursor` of `links.next`.
    pub next_cursor: Option<String>,
}

/// What the token endpoint answered (for `adesync org-accounts test`).
#[derive(Clone, Debug)]
pub struct TokenGrant {
    /// `token_type`.
    pub token_type: String,
    /// `scope`.
    pub scope: String,
    /// `expires_in`.
    pub expires_in: u64,
}

/// Counters of one client, for logs and `/metrics`.
#[derive(Debug, Default)]
pub struct OrgCounters {
    /// Requests sent (the token endpoint included).
    pub requests: AtomicU64,
    /// Access tokens minted.
    pub tokens: AtomicU64,
    /// 429/503 answers received.
    pub rate_limited: AtomicU64,
}

struct CachedToken {
    value: String,
    renew_at: Instant,
}

/// One API account's connection to Apple.
pub struct OrgClient {
    http: reqwest::Client,
    account: OrgAccountConfig,
    settings: OrgClientSettings,
    key: SigningKey,
    token: Mutex<Option<CachedToken>>,
    limiter: limiter::Limiter,
    /// Counters since the client was made.
    pub counters: OrgCounters,
}

impl std::fmt::Debug for OrgClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrgClient")
            .field("account", &self.account.name)
            .field("api_url", &self.account.api_url.as_str())
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize)]
struct ListBody<T> {
    #[serde(default = "none")]
    data: Option<Vec<T>>,
    #[serde(default)]
    links: Option<Links>,
    #[serde(default)]
    meta: Option<Meta>,
}

fn none<T>() -> Option<T> {
    None
}

#[derive(Deserialize)]
struct Links {
    next: Option<String>,
}

#[derive(Deserialize)]
struct Meta {
    paging: Option<Paging>,
}

#[derive(Deserialize)]
struct Paging {
    #[serde(rename = "nextCursor")]
    next_cursor: Option<String>,
}

impl OrgClient {
    /// A client for `account`; reads its private key now.
    pub fn new(
        account: &OrgAccountConfig,
        settings: OrgClientSettings,
    ) -> Result<Self, OrgApiError> {
        let key = SigningKey::load(&account.private_key_file)?;
        let http = crate::http_client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(30)))
            .pool_idle_timeout(Duration::from_secs(60))
            // Never follow a redirect: it would carry the bearer token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OrgApiError::Transport {
                endpoint: OrgEndpoint::Token,
                url: account.token_url.to_string(),
                detail: format!("cannot build the HTTP client: {e}"),
                timeout: false,
            })?;
        Ok(Self {
            http,
            limiter: limiter::Limiter::new(account.requests_per_second),
            account: account.clone(),
            settings,
            key,
            token: Mutex::new(None),
            counters: OrgCounters::default(),
        })
    }

    /// The account this client speaks for.
    pub fn account(&self) -> &OrgAccountConfig {
        &self.account
    }

    /// Mints a new access token now (the cache is replaced): `org-accounts test`.
    pub async fn fetch_token(&self) -> Result<TokenGrant, OrgApiError> {
        self.mint().await
    }

    /// `GET /v1/orgDevices`: resources kept as sent, decoded when needed.
    pub async fn org_devices(
        &self,
        cursor: Option<&str>,
    ) -> Result<ListPage<RawResource>, OrgApiError> {
        self.list(OrgEndpoint::OrgDevices, "v1/orgDevices", cursor)
            .await
    }

    /// `GET /v1/mdmServers`.
    pub async fn mdm_servers(&self, cursor: Option<&str>) -> Result<ListPage, OrgApiError> {
        self.list(OrgEndpoint::MdmServers, "v1/mdmServers", cursor)
            .await
    }

    /// `GET /v1/mdmServers/{id}/relationships/devices`: the serial numbers it holds.
    pub async fn server_devices(
        &self,
        server_id: &str,
        cursor: Option<&str>,
    ) -> Result<ListPage, OrgApiError> {
        let path = format!("v1/mdmServers/{}/relationships/devices", segment(server_id));
        self.list(OrgEndpoint::ServerDevices, &path, cursor).await
    }

    /// `GET /v1/orgDevices/{serial}/appleCareCoverage`: every page of it.
    pub async fn applecare(&self, serial: &str) -> Result<Vec<Coverage>, OrgApiError> {
        let path = format!("v1/orgDevices/{}/appleCareCoverage", segment(serial));
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        // A device has a handful of coverages; a list that never ends is Apple's bug.
        for _ in 0..20 {
            let page = self
                .list(OrgEndpoint::AppleCare, &path, cursor.as_deref())
                .await?;
            let start = out.len();
            out.extend(
                page.data
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| device::coverage(r, start + i)),
            );
            match page.next_cursor {
                Some(c) if Some(&c) != cursor.as_ref() => cursor = Some(c),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: OrgEndpoint,
        path: &str,
        cursor: Option<&str>,
    ) -> Result<ListPage<T>, OrgApiError> {
        let mut url = self.account.api_url.clone();
        let base_path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base_path}/{path}"));
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("limit", &self.account.page_size.to_string());
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
        }
        let body = self.get(endpoint, url, cursor.is_some()).await?;
        parse_list(endpoint, &body)
    }

    /// A GET with retries for transient failures; 429 pauses the whole account.
    async fn get(
        &self,
        endpoint: OrgEndpoint,
        url: reqwest::Url,
        had_cursor: bool,
    ) -> Result<bytes::Bytes, OrgApiError> {
        let policy = &self.settings.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(policy.initial_delay)
            .with_max_delay(policy.max_delay)
            .with_max_times(policy.max_attempts.saturating_sub(1) as usize)
            .with_jitter();
        (|| async { self.get_once(endpoint, url.clone(), had_cursor).await })
            .retry(backoff)
            .when(|e| {
                e.is_retryable()
                    && !matches!(e, OrgApiError::Throttled { retry_after: Some(d), .. } if *d > MAX_RETRY_AFTER)
            })
            // The limiter already waits out a Retry-After; the backoff adds its own
            // delay only for the other failures.
            .adjust(|err, planned| {
                planned.map(|d| {
                    if matches!(err, OrgApiError::Throttled { retry_after: Some(_), .. }) {
                        Duration::ZERO
                    } else {
                        d
                    }
                })
            })
            .notify(|err, wait| {
                tracing::warn!(account = %self.account.name, error = %err, retry_in = ?wait, "transient failure; retrying");
            })
            .await
    }

    /// One attempt, with one re-mint of the access token on 401.
    async fn get_once(
        &self,
        endpoint: OrgEndpoint,
        url: reqwest::Url,
        had_cursor: bool,
    ) -> Result<bytes::Bytes, OrgApiError> {
        let mut reminted = false;
        loop {
            let token = self.access_token().await?;
            let resp = self
                .send(endpoint, &url, |b| {
                    b.header(AUTHORIZATION, format!("Bearer {token}"))
                })
                .await?;
            match resp.status {
                s if s / 100 == 2 => return Ok(resp.body),
                401 if !reminted => {
                    tracing::debug!(account = %self.account.name, "access token not accepted; minting a new one");
                    self.forget_token();
                    reminted = true;
                }
                401 => return Err(OrgApiError::Unauthorized(endpoint)),
                status => {
                    let ra = retry_after(&resp.headers);
                    if status == 429 || status == 503 {
                        self.throttled(ra);
                    }
                    return Err(error::classify(
                        endpoint, status, &resp.body, ra, had_cursor,
                    ));
                }
            }
        }
    }

    fn throttled(&self, ra: Option<Duration>) {
        self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
        // Without a Retry-After the backoff paces the retry; with one, the whole account
        // waits it out.
        if let Some(d) = ra {
            self.limiter.pause_for(d.min(MAX_RETRY_AFTER));
        }
    }

    async fn access_token(&self) -> Result<String, OrgApiError> {
        {
            let cached = self.token.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
                return Ok(t.value.clone());
            }
        }
        self.mint().await?;
        let cached = self.token.lock().unwrap_or_else(|e| e.into_inner());
        Ok(cached.as_ref().map(|t| t.value.clone()).unwrap_or_default())
    }

    fn forget_token(&self) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Asks the token endpoint for an access token with a fresh assertion; caches it.
    async fn mint(&self) -> Result<TokenGrant, OrgApiError> {
        let a = &self.account;
        let assertion = self.key.assertion(
            &a.client_id,
            &a.key_id,
            ASSERTION_AUDIENCE,
            chrono::Utc::now().timestamp(),
        )?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &a.client_id)
            .append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            )
            .append_pair("client_assertion", &assertion)
            .append_pair("scope", a.scope.scope())
            .finish();
        self.counters.tokens.fetch_add(1, Ordering::Relaxed);
        let url = a.token_url.clone();
        let Exchange {
            status,
            headers,
            body,
        } = self
            .send(OrgEndpoint::Token, &url, |b| {
                b.header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form.clone())
            })
            .await?;
        if status / 100 != 2 {
            let ra = retry_after(&headers);
            if status == 429 || status == 503 {
                self.throttled(ra);
            }
            return Err(error::classify_token_error(status, &body, ra));
        }
        let parsed: TokenBody =
            serde_json::from_slice(&body).map_err(|e| OrgApiError::Malformed {
                endpoint: OrgEndpoint::Token,
                detail: format!("{e} in a {}-byte token answer", body.len()),
            })?;
        if parsed.access_token.is_empty()
            || !parsed.access_token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(OrgApiError::Malformed {
                endpoint: OrgEndpoint::Token,
                detail: "the access token is empty or not printable ASCII".into(),
            });
        }
        let expires_in = parsed.expires_in.unwrap_or(3600).clamp(60, 86_400);
        let life = Duration::from_secs(expires_in);
        let renew_after = life.saturating_sub(TOKEN_MARGIN).max(life / 2);
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(CachedToken {
            value: parsed.access_token,
            renew_at: Instant::now() + renew_after,
        });
        Ok(TokenGrant {
            token_type: printable(parsed.token_type.as_deref().unwrap_or("Bearer")).into_owned(),
            scope: printable(parsed.scope.as_deref().unwrap_or(a.scope.scope())).into_owned(),
            expires_in,
        })
    }

    /// Sends one request within the account's budget (POST to the token endpoint, GET
    /// otherwise); never follows a redirect; reads at most `max_response_size`.
    async fn send(
        &self,
        endpoint: OrgEndpoint,
        url: &reqwest::Url,
        extra: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Exchange, OrgApiError> {
        self.limiter.acquire().await;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let method = if endpoint == OrgEndpoint::Token {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let b = self
            .http
            .request(method, url.clone())
            .header(USER_AGENT, self.settings.user_agent.as_str())
            .header(ACCEPT, "application/json");
        let limit = self.settings.max_response_bytes;
        exchange(extra(b), limit).await.map_err(|e| match e {
            ExchangeError::Transport(e) => OrgApiError::Transport {
                endpoint,
                url: origin(url),
                detail: describe_reqwest(&e),
                timeout: e.is_timeout(),
            },
            ExchangeError::Redirected { status, location } => OrgApiError::Redirected {
                endpoint,
                status,
                location: printable(&location).into_owned(),
            },
            ExchangeError::TooLarge => OrgApiError::TooLarge { endpoint, limit },
        })
    }
}

/// Scheme, host and port only: never a path, query or token in a message.
fn origin(url: &reqwest::Url) -> String {
    url.origin().ascii_serialization()
}

/// A path segment, percent-encoded.
fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn parse_list<T: serde::de::DeserializeOwned>(
    endpoint: OrgEndpoint,
    body: &[u8],
) -> Result<ListPage<T>, OrgApiError> {
    let parsed: ListBody<T> = serde_json::from_slice(body).map_err(|e| OrgApiError::Malformed {
        endpoint,
        detail: format!("{e} in a {}-byte body", body.len()),
    })?;
    let data = parsed.data.ok_or_else(|| OrgApiError::Malformed {
        endpoint,
        detail: "no `data` list".into(),
    })?;
    let next_cursor = parsed
        .meta
        .and_then(|m| m.paging)
        .and_then(|p| p.next_cursor)
        .or_else(|| {
            // Only the cursor of `links.next` is used, never its host: a link elsewhere
            // must not receive the access token.
            let next = parsed.links?.next?;
            let url = reqwest::Url::parse(&next).ok()?;
            url.query_pairs()
                .find(|(k, _)| k == "cursor")
                .map(|(_, v)| v.into_owned())
        })
        .filter(|c| !c.is_empty());
    if let Some(c) = &next_cursor {
        if c.len() > 4096 {
            return Err(OrgApiError::Malformed {
                endpoint,
                detail: format!("a {}-byte paging cursor", c.len()),
            });
        }
    }
    Ok(ListPage { data, next_cursor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_cursor_comes_from_meta_or_from_the_next_link() {
        let p: ListPage = parse_list(
            OrgEndpoint::OrgDevices,
            br#"{"data":[],"meta":{"paging":{"limit":1,"nextCursor":"abc"}}}"#,
        )
        .unwrap();
        assert_eq!(p.next_cursor.as_deref(), Some("abc"));
        let p: ListPage = parse_list(
            OrgEndpoint::OrgDevices,
            br#"{"data":[],"links":{"next":"https://elsewhere.example/v1/orgDevices?cursor=a%2Bb&limit=5"}}"#,
        )
        .unwrap();
        assert_eq!(p.next_cursor.as_deref(), Some("a+b"));
        let p: ListPage = parse_list(
            OrgEndpoint::OrgDevices,
            br#"{"data":[{"id":"X"}],"links":{}}"#,
        )
        .unwrap();
        assert!(p.next_cursor.is_none());
        assert_eq!(p.data.len(), 1);
        assert!(parse_list::<Resource>(OrgEndpoint::OrgDevices, br#"{"errors":[]}"#).is_err());
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(segment("C02/..?x y"), "C02%2F..%3Fx%20y");
    }
}
