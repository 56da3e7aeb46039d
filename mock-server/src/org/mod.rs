//! A simulator of Apple's newer "Apple School Manager and Apple Business API" (AxM): OAuth 2
//! client credentials with an ES256-signed JWT assertion at `POST /auth/oauth2/token`, then
//! JSON:API REST under `/v1` with bearer tokens. Served on the same listener as the ADE
//! simulation and sharing its simulated clock; the real service lives at
//! `https://account.apple.com/auth/oauth2/token` and `https://api-business.apple.com` /
//! `https://api-school.apple.com`.
//!
//! Each account ([`crate::OrgAccountConfig`]) is an isolated organisation: its own P-256 key
//! (fresh per start), inventory (MDM servers and devices, see `inventory`), access tokens,
//! used `jti`s, fault queues, rate limiter and counters. A bearer token only ever sees its
//! own account's data.
//!
//! # Layout
//! - `catalogue`: products and hardware identifiers.
//! - `inventory`: servers, devices, changes, paging, JSON:API resources.
//! - `cursor`: the opaque listing cursors.
//! - `assertion`: client-assertion (JWT) verification.
//! - `faults`: [`OrgEndpoint`], fault queues, the rate limiter, [`OrgRequest`].
//! - `http`: the token endpoint and `/v1` routes.
//! - `admin`: the `/_mock/org` admin routes.

mod admin;
mod assertion;
pub(crate) mod catalogue;
mod cursor;
mod faults;
mod http;
mod inventory;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use rand::Rng;
use serde_json::{json, Value};

use crate::config::{OrgAccountConfig, OrgQuirks};
use crate::faults::FaultKind;
use crate::store::PageFault;

pub(crate) use admin::routes as admin_routes;
pub use assertion::AUDIENCE;
pub use faults::{OrgEndpoint, OrgRequest};
pub(crate) use http::{api, token};

use faults::{Limiter, OrgFaultQueues};
use inventory::Inventory;

/// Lifetime of an access token, seconds (simulated clock).
pub const TOKEN_TTL_SECS: i64 = 3600;

/// An account's identity and key, as a client needs them. `Debug` leaves out the private
/// key.
#[derive(Clone, PartialEq, Eq)]
pub struct OrgAccountInfo {
    /// OAuth client id (`BUSINESSAPI.…` / `SCHOOLAPI.…`).
    pub client_id: String,
    /// Key id, the assertion's `kid`.
    pub key_id: String,
    /// The private key as Apple's download has it: SEC1 PEM (`-----BEGIN EC PRIVATE KEY-----`).
    pub private_key_pem: String,
    /// The same key as PKCS #8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub private_key_pkcs8_pem: String,
    /// The public key, SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`).
    pub public_key_pem: String,
}

impl fmt::Debug for OrgAccountInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrgAccountInfo")
            .field("client_id", &self.client_id)
            .field("key_id", &self.key_id)
            .field("private_key_pem", &"<redacted>")
            .field("private_key_pkcs8_pem", &"<redacted>")
            .field("public_key_pem", &self.public_key_pem)
            .finish()
    }
}

/// An MDM server of an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrgServer {
    /// `id` (32 upper-case hex characters).
    pub id: String,
    /// `serverName`.
    pub name: String,
    /// `serverType`: `MDM` or `APPLE_CONFIGURATOR`.
    pub server_type: String,
}

/// One listed organisation device as the service holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct OrgDeviceTruth {
    /// Serial number (the resource id).
    pub serial: String,
    /// Id of the assigned MDM server, if any.
    pub server: Option<String>,
    /// The `attributes` object in its documented shape (no quirks).
    pub attributes: Value,
}

/// An account's counters since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrgStats {
    /// Requests to the token endpoint attributed to the account (by `client_id`).
    pub token_requests: u64,
    /// Access tokens issued.
    pub tokens_issued: u64,
    /// Refused token requests by reason (`wrong_kid`, `wrong_aud`, `reused_jti`,
    /// `bad_signature`, `expired`, `wrong_scope`, `too_many_token_requests`, ...).
    pub refused: BTreeMap<String, u64>,
    /// Requests per endpoint name (`token`, `org_devices`, ...; `any`: unknown paths).
    pub requests: BTreeMap<String, u64>,
    /// Responses with status 429, scripted or from the limiter.
    pub served_429: u64,
    /// Requests refused by the `requests_per_second` limiter.
    pub rate_limited: u64,
    /// Devices listed now.
    pub devices: usize,
    /// Devices released so far.
    pub released: usize,
}

/// A response decided under the lock, turned into HTTP after it is released.
pub(crate) struct OrgReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl OrgReply {
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body,
        }
    }

    /// A JSON:API error document with one error.
    pub fn api_error(status: u16, code: &str, title: &str, detail: &str) -> Self {
        let id = crate::config::uuid_v4(&mut rand::rng());
        let body = json!({ "errors": [{
            "id": id,
            "status": status.to_string(),
            "code": code,
            "title": title,
            "detail": detail,
        }]});
        Self::json(status, body.to_string())
    }

    /// The JSON:API error a status means when nothing more specific is known.
    pub fn for_status(status: u16, detail: &str) -> Self {
        let (code, title) = match status {
            400 => (
                "PARAMETER_ERROR.INVALID",
                "A parameter has an invalid value.",
            ),
            401 => (
                "NOT_AUTHORIZED",
                "Authentication credentials are missing or invalid.",
            ),
            403 => (
                "FORBIDDEN_ERROR",
                "This request is forbidden for security reasons.",
            ),
            404 => ("NOT_FOUND", "The specified resource does not exist."),
            405 => ("METHOD_NOT_ALLOWED", "The request method is not supported."),
            429 => (
                "RATE_LIMIT_EXCEEDED",
                "The request rate limit has been reached.",
            ),
            500..=599 => ("UNEXPECTED_ERROR", "An unexpected error occurred."),
            _ => ("ERROR", "The request failed."),
        };
        Self::api_error(status, code, title, detail)
    }

    /// `400` with an OAuth error body.
    pub fn oauth_error(error: &str, description: &str) -> Self {
        let body = json!({ "error": error, "error_description": description });
        Self::json(400, body.to_string())
    }

    fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// What to do with a request once faults and the limiter have had their say.
pub(crate) enum Gate {
    /// Answer this instead.
    Reply(OrgReply),
    /// Go on, after sleeping this long if given, shaping the page if given.
    Pass(Option<Duration>, Option<PageFault>),
}

#[derive(Default)]
struct Counters {
    token_requests: u64,
    tokens_issued: u64,
    refused: BTreeMap<&'static str, u64>,
    requests: [u64; 8],
    served_429: u64,
    rate_limited: u64,
}

/// One organisation.
pub(crate) struct Account {
    pub config: OrgAccountConfig,
    key: EcKey<Private>,
    pub inventory: Inventory,
    pub quirks: OrgQuirks,
    pub faults: OrgFaultQueues,
    limiter: Option<Limiter>,
    /// Every `jti` of an assertion that got a token.
    jtis: HashSet<String>,
    /// When the last token was issued (simulated clock).
    last_token: Option<DateTime<Utc>>,
    counters: Counters,
}

impl Account {
    fn new(
        config: &OrgAccountConfig,
        ade: &[(crate::devices::Serial, Option<crate::devices::Summary>)],
        ade_server: (&str, &str),
    ) -> Result<Self, openssl::error::ErrorStack> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
        Ok(Self {
            config: config.clone(),
            key: EcKey::generate(&group)?,
            inventory: Inventory::new(config, ade, ade_server),
            quirks: config.quirks,
            faults: OrgFaultQueues::default(),
            limiter: config.requests_per_second.map(Limiter::new),
            jtis: HashSet::new(),
            last_token: None,
            counters: Counters::default(),
        })
    }

    /// Client id, key id and the key in PEM forms.
    pub fn info(&self) -> OrgAccountInfo {
        let pem = |r: Result<Vec<u8>, _>| {
            String::from_utf8(r.expect("an in-memory P-256 key serialises")).expect("PEM is ASCII")
        };
        let pkey = PKey::from_ec_key(self.key.clone()).expect("an EC key makes a PKey");
        OrgAccountInfo {
            client_id: self.config.client_id.clone(),
            key_id: self.config.key_id.clone(),
            private_key_pem: pem(self.key.private_key_to_pem()),
            private_key_pkcs8_pem: pem(pkey.private_key_to_pem_pkcs8()),
            public_key_pem: pem(self.key.public_key_to_pem()),
        }
    }

    /// Replaces the limiter (`None`: unlimited).
    pub fn set_rate(&mut self, rate: Option<f64>) {
        self.config.requests_per_second = rate;
        self.limiter = rate.map(Limiter::new);
    }

    /// The counters, with the inventory's sizes.
    pub fn stats(&self) -> OrgStats {
        let c = &self.counters;
        OrgStats {
            token_requests: c.token_requests,
            tokens_issued: c.tokens_issued,
            refused: c
                .refused
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            requests: OrgEndpoint::ALL
                .iter()
                .map(|e| (e.name().to_owned(), c.requests[*e as usize]))
                .collect(),
            served_429: c.served_429,
            rate_limited: c.rate_limited,
            devices: self.inventory.listed(),
            released: self.inventory.released(),
        }
    }

    /// Every MDM server.
    pub fn servers(&self) -> Vec<OrgServer> {
        self.inventory
            .servers()
            .into_iter()
            .map(|s| OrgServer {
                id: s.id,
                name: s.name,
                server_type: s.kind.to_owned(),
            })
            .collect()
    }

    /// Every listed device, sorted by serial.
    pub fn truth(&self) -> Vec<OrgDeviceTruth> {
        self.inventory
            .listed_devices()
            .iter()
            .map(|d| {
                let mut attributes = String::with_capacity(700);
                inventory::render_attributes(&mut attributes, d, OrgQuirks::default());
                OrgDeviceTruth {
                    serial: inventory::key_str(&d.serial).to_owned(),
                    server: d.server().map(|s| self.inventory.server_info(s).id.clone()),
                    attributes: serde_json::from_str(&attributes)
                        .expect("attributes render as JSON"),
                }
            })
            .collect()
    }
}

struct Token {
    account: usize,
    expires: DateTime<Utc>,
}

/// Every account, the access tokens and the journal.
pub(crate) struct OrgWorld {
    pub accounts: Vec<Account>,
    tokens: HashMap<String, Token>,
    pub journal: Vec<OrgRequest>,
    /// Random per start; cursors carry it.
    pub instance: u32,
}

impl OrgWorld {
    /// The accounts of `configs`, with fresh keys; `ade` is the ADE store's devices and
    /// `ade_server` the ADE server's (id, name).
    pub fn new(
        configs: &[OrgAccountConfig],
        ade: &[(crate::devices::Serial, Option<crate::devices::Summary>)],
        ade_server: (&str, &str),
        instance: u32,
    ) -> Result<Self, String> {
        let accounts = configs
            .iter()
            .map(|c| Account::new(c, ade, ade_server))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot generate an account key: {e}"))?;
        Ok(Self {
            accounts,
            tokens: HashMap::new(),
            journal: Vec::new(),
            instance,
        })
    }

    /// Account `i`, or a clear message.
    pub fn account(&self, i: usize) -> Result<&Account, String> {
        self.accounts.get(i).ok_or_else(|| self.no_account(i))
    }

    /// Account `i` to change, or a clear message.
    pub fn account_mut(&mut self, i: usize) -> Result<&mut Account, String> {
        let message = self.no_account(i);
        self.accounts.get_mut(i).ok_or(message)
    }

    fn no_account(&self, i: usize) -> String {
        format!(
            "no organisation account {i} (there are {}; see MockConfig::org_accounts)",
            self.accounts.len()
        )
    }

    /// The account with `client_id`.
    pub fn by_client(&self, client_id: &str) -> Option<usize> {
        self.accounts
            .iter()
            .position(|a| a.config.client_id == client_id)
    }

    /// The account a bearer token belongs to, and whether it is still valid at `now`.
    pub fn bearer(&self, token: &str, now: DateTime<Utc>) -> Option<(usize, bool)> {
        let t = self.tokens.get(token)?;
        Some((t.account, now < t.expires))
    }

    /// Makes every access token invalid; returns how many were still valid.
    pub fn expire_tokens(&mut self, now: DateTime<Utc>) -> usize {
        let mut n = 0;
        for t in self.tokens.values_mut() {
            if now < t.expires {
                n += 1;
            }
            t.expires = DateTime::<Utc>::MIN_UTC;
        }
        n
    }

    /// Scripted faults first, then the rate limiter.
    pub fn gate(&mut self, account: usize, endpoint: OrgEndpoint, at: Instant) -> Gate {
        let a = &mut self.accounts[account];
        let (delay, page) = match a.faults.take(endpoint) {
            Some(FaultKind::Status {
                status,
                body,
                headers,
            }) => {
                let mut reply = if body.is_empty() {
                    OrgReply::for_status(status, "scripted fault")
                } else {
                    OrgReply::json(status, body)
                };
                reply.headers = headers;
                return Gate::Reply(reply);
            }
            Some(FaultKind::MalformedJson) => {
                return Gate::Reply(OrgReply::json(
                    200,
                    r#"{"data":[{"type":"orgDevices","id":"TRUNC"#.to_owned(),
                ))
            }
            Some(FaultKind::Delay(d)) => (Some(d), None),
            Some(kind) => (None, kind.page_fault()),
            None => (None, None),
        };
        if let Some(limiter) = &mut a.limiter {
            if !limiter.allow(at) {
                a.counters.rate_limited += 1;
                let reply = OrgReply::for_status(429, "more requests per second than allowed")
                    .with_header("Retry-After", "1");
                return Gate::Reply(reply);
            }
        }
        Gate::Pass(delay, page)
    }

    /// The client-credentials grant for `account` (identified by `client_id`), after the
    /// request-level checks; `form` is the request body.
    pub fn grant(
        &mut self,
        account: usize,
        form: &[(String, String)],
        now: DateTime<Utc>,
    ) -> OrgReply {
        match self.try_grant(account, form, now) {
            Ok(reply) => reply,
            Err(refusal) => {
                let a = &mut self.accounts[account];
                *a.counters.refused.entry(refusal.reason).or_default() += 1;
                tracing::info!(
                    client_id = a.config.client_id,
                    reason = refusal.reason,
                    "token request refused: {}",
                    refusal.description
                );
                OrgReply::oauth_error(refusal.error, &refusal.description)
            }
        }
    }

    fn try_grant(
        &mut self,
        account: usize,
        form: &[(String, String)],
        now: DateTime<Utc>,
    ) -> Result<OrgReply, assertion::Refusal> {
        use assertion::Refusal;
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let a = &self.accounts[account];
        if let (Some(min), Some(last)) = (a.config.min_token_interval, a.last_token) {
            if chrono::Duration::from_std(min).is_ok_and(|min| now - last < min) {
                return Err(Refusal::new(
                    "invalid_request",
                    "too_many_token_requests",
                    "too many token requests",
                ));
            }
        }
        match get("client_assertion_type") {
            Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer") => {}
            other => {
                return Err(Refusal::new(
                    "invalid_request",
                    "wrong_assertion_type",
                    format!(
                        "client_assertion_type must be \
                         urn:ietf:params:oauth:client-assertion-type:jwt-bearer, got {other:?}"
                    ),
                ))
            }
        }
        let Some(jwt) = get("client_assertion") else {
            return Err(Refusal::new(
                "invalid_request",
                "missing_assertion",
                "client_assertion is required",
            ));
        };
        let claims = assertion::verify(
            jwt,
            &a.config.client_id,
            &a.config.key_id,
            &a.key,
            now.timestamp(),
        )?;
        let scope = a.config.scope();
        match get("scope") {
            Some(s) if s == scope => {}
            None => {
                return Err(Refusal::new(
                    "invalid_request",
                    "missing_scope",
                    format!("scope is required ({scope})"),
                ))
            }
            Some(other) => {
                return Err(Refusal::new(
                    "invalid_scope",
                    "wrong_scope",
                    format!("scope {other:?} is not allowed for this client; use {scope:?}"),
                ))
            }
        }
        if a.jtis.contains(&claims.jti) {
            return Err(Refusal::new(
                "invalid_grant",
                "reused_jti",
                format!("jti {:?} was already used", claims.jti),
            ));
        }
        let a = &mut self.accounts[account];
        a.jtis.insert(claims.jti);
        a.last_token = Some(now);
        a.counters.tokens_issued += 1;
        let bytes: [u8; 32] = rand::rng().random();
        let token = URL_SAFE_NO_PAD.encode(bytes);
        self.tokens.insert(
            token.clone(),
            Token {
                account,
                expires: now + chrono::Duration::seconds(TOKEN_TTL_SECS),
            },
        );
        let body = json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": TOKEN_TTL_SECS,
            "scope": scope,
        });
        Ok(OrgReply::json(200, body.to_string()).with_header("Cache-Control", "no-store"))
    }

    /// The index of server `id` of `account`; `None` passes through.
    fn server(&self, account: usize, id: Option<&str>) -> Result<Option<u8>, String> {
        let inv = &self.account(account)?.inventory;
        id.map(|id| {
            inv.server_index(id)
                .ok_or_else(|| format!("account {account} has no MDM server {id:?}"))
        })
        .transpose()
    }

    /// Adds `n` devices to `account`, assigned to server `server` if given; their serials.
    pub fn add_devices(
        &mut self,
        account: usize,
        n: usize,
        server: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, String> {
        let server = self.server(account, server)?;
        let inv = &mut self.account_mut(account)?.inventory;
        Ok(inv.add(n, server, now.timestamp_millis()))
    }

    /// Assigns listed devices to `server` (`None`: unassigns); how many changed.
    pub fn assign(
        &mut self,
        account: usize,
        serials: &[String],
        server: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<usize, String> {
        let server = self.server(account, server)?;
        let inv = &mut self.account_mut(account)?.inventory;
        Ok(inv.assign(serials, server, now.timestamp_millis()))
    }

    /// Journals a request and counts it for its account.
    pub fn record(&mut self, request: OrgRequest) {
        if let Some(a) = request.account.and_then(|i| self.accounts.get_mut(i)) {
            a.counters.requests[request.endpoint as usize] += 1;
            if request.endpoint == OrgEndpoint::Token {
                a.counters.token_requests += 1;
            }
            if request.status == 429 {
                a.counters.served_429 += 1;
            }
        }
        self.journal.push(request);
    }
}

#[cfg(test)]
mod tests;
