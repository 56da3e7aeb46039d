//! The HTTP face of the simulator: Apple's endpoints (`GET /session`, `GET /account`,
//! `POST /server/devices`, `POST /devices/sync`, from protocol 10
//! `GET /device/replacementDetails`, and the profile endpoints `POST`/`PUT`/`GET /profile`,
//! `POST`/`PUT`/`DELETE /profile/devices` whose logic is in `profiles`) with Apple's checks
//! in Apple's order, and the admin API under `/_mock` that the binary and demos drive. All state sits behind one std mutex held
//! only for short, non-async sections; responses are rendered after it is released.
//!
//! `GET /device/replacementDetails?device=SERIAL` (docs/apple-dep-api.md §4.8) answers `200
//! {"serial_number","original_device_serial_number","replacement_date":"YYYY-MM-DD"}` for a
//! replacement device, `404 DEVICE_NOT_FOUND` for any other serial and `400
//! DEVICE_ID_REQUIRED` without a `device` (the token the other single-device endpoints use
//! for a missing device; Apple documents none for this one). Below protocol 10 it does not
//! exist: `404` with an empty body, before any other check, exactly as for a path the service
//! does not serve (what Apple answers is undocumented).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::config::MockConfig;
use crate::devices::{LATEST_PROTOCOL, PROTOCOL_V10};
use crate::faults::{Endpoint, Fault, FaultKind, FaultQueues, RecordedRequest};
use crate::oauth::{self, OAuthError, SignedRequest, Verifier};
use crate::org::{self, OrgWorld};
use crate::profiles::{ApiError, AssignStatus, ProfileBook};
use crate::rfc3339;
use crate::store::{CursorContext, CursorError, PageFault, Store};

/// Content type of Apple's 2xx bodies, spelled as Apple spells it (docs/apple-dep-api.md §1).
const JSON_UTF8: &str = "application/json;charset=UTF8";

/// Larger request bodies are refused; Apple's largest (a profile, or 1000 serials) is tens
/// of kilobytes.
const MAX_BODY: usize = 1 << 20;

const SESSION_HEADER: &str = "x-adm-auth-session";

/// Server state shared by every connection and every [`crate::MockHandle`].
pub(crate) struct Shared {
    pub config: MockConfig,
    /// Random per start; cursors carry it (see `cursor`).
    pub instance: u32,
    state: Mutex<State>,
    /// `true` asks the server to stop.
    pub shutdown: watch::Sender<bool>,
    /// Becomes `true` once the server has stopped.
    pub stopped: watch::Sender<bool>,
}

/// Everything mutable.
pub(crate) struct State {
    pub store: Store,
    /// Simulated clock = real UTC now + this.
    pub clock_offset: chrono::Duration,
    /// Session token → simulated issue time.
    pub sessions: HashMap<String, DateTime<Utc>>,
    pub verifier: Verifier,
    /// Authenticated calls so far, for session rotation.
    pub authenticated_calls: u64,
    pub faults: FaultQueues<Endpoint>,
    pub requests: Vec<RecordedRequest>,
    /// Defined enrollment profiles and scripted assignment answers.
    pub profiles: ProfileBook,
    /// The Apple School and Business Manager API simulation.
    pub org: OrgWorld,
}

impl State {
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }
}

impl Shared {
    pub fn new(config: MockConfig, store: Store, org: OrgWorld) -> Self {
        let verifier = Verifier::new(config.oauth_timestamp_window);
        Self {
            config,
            instance: org.instance,
            state: Mutex::new(State {
                store,
                clock_offset: chrono::Duration::zero(),
                sessions: HashMap::new(),
                verifier,
                authenticated_calls: 0,
                faults: FaultQueues::default(),
                requests: Vec::new(),
                profiles: ProfileBook::default(),
                org,
            }),
            shutdown: watch::Sender::new(false),
            stopped: watch::Sender::new(false),
        }
    }

    /// The state; a panic elsewhere while it was held leaves it usable, since every
    /// mutation is a complete step.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds devices now; returns their serials.
    pub fn add_devices(&self, n: usize) -> Vec<String> {
        let mut s = self.lock();
        let now = s.now().timestamp();
        s.store.add(n, now)
    }

    /// A realistic change to each listed device; how many existed.
    pub fn modify_devices(&self, serials: &[String]) -> usize {
        let mut s = self.lock();
        let now = s.now().timestamp();
        s.store.modify(serials, now)
    }

    /// Unassigns, logged; how many existed.
    pub fn delete_devices(&self, serials: &[String]) -> usize {
        let mut s = self.lock();
        let now = s.now().timestamp();
        s.store.delete(serials, now)
    }

    /// Unassigns, not logged; how many existed.
    pub fn remove_silently(&self, serials: &[String]) -> usize {
        self.lock().store.remove_silently(serials)
    }

    /// Apple replaces the listed devices now; `(original, replacement)` pairs.
    pub fn replace_devices(&self, serials: &[String]) -> Vec<(String, String)> {
        let mut s = self.lock();
        let now = s.now().timestamp();
        s.store.replace(serials, now)
    }

    /// Departed devices are assigned again now; how many had departed.
    pub fn reassign_devices(&self, serials: &[String]) -> usize {
        let mut s = self.lock();
        let now = s.now().timestamp();
        s.store.reassign(serials, now)
    }

    /// The `GET /device/replacementDetails` body for `serial`, if it is a replacement.
    pub fn replacement_details(&self, serial: &str) -> Option<Value> {
        let (original, date) = self.lock().store.replacement(serial)?;
        let date = DateTime::from_timestamp(date, 0).unwrap_or_default();
        Some(json!({
            "serial_number": serial,
            "original_device_serial_number": original,
            "replacement_date": date.format("%Y-%m-%d").to_string(),
        }))
    }

    /// Every device as one JSON array, sorted by serial, as a client speaking protocol
    /// `proto` sees them.
    pub fn devices_array(&self, proto: u32) -> String {
        // Copy out handles under the lock; write JSON after releasing it.
        let (all, profiles) = self.lock().store.snapshot_by_serial();
        let mut out = String::with_capacity(all.len() * 420 + 2);
        out.push('[');
        for (i, (_, device)) in all.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            device.render(&mut out, proto, &profiles);
        }
        out.push(']');
        out
    }
}

/// The whole service.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_mock/devices", get(admin_devices).post(admin_add))
        .route("/_mock/devices/modify", post(admin_modify))
        .route("/_mock/devices/delete", post(admin_delete))
        .route("/_mock/devices/release", post(admin_release))
        .route("/_mock/devices/replace", post(admin_replace))
        .route("/_mock/devices/reassign", post(admin_reassign))
        .route("/_mock/clock/advance", post(admin_clock))
        .route("/_mock/faults", post(admin_faults))
        .route("/_mock/sessions/expire", post(admin_expire))
        .route("/_mock/stats", get(admin_stats))
        .route("/_mock/profiles", get(admin_profiles))
        .route("/_mock/profiles/script", post(admin_profile_script))
        .route("/auth/oauth2/token", any(org::token))
        .route("/v1", any(org::api))
        .route("/v1/{*rest}", any(org::api))
        .merge(org::admin_routes())
        .fallback(apple)
        .with_state(shared)
}

// ---------------------------------------------------------------------------------------
// Apple's endpoints

/// Every non-admin request: answer it, then journal it with the status it got.
async fn apple(AxumState(shared): AxumState<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let endpoint = Endpoint::from_request(&parts.method, parts.uri.path());
    let body = axum::body::to_bytes(body, MAX_BODY).await;
    // Before protocol 10 replacementDetails is a path like any unknown one (see the module
    // docs); it is still journalled as that endpoint.
    let served = endpoint
        .filter(|e| *e != Endpoint::ReplacementDetails || protocol(&parts.headers) >= PROTOCOL_V10);
    let response = match (&body, served) {
        (_, None) => StatusCode::NOT_FOUND.into_response(),
        (Err(_), Some(_)) => apple_error(
            &shared.config,
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST_BODY",
        ),
        (Ok(bytes), Some(endpoint)) => {
            respond(
                &shared,
                endpoint,
                &parts.method,
                &parts.uri,
                &parts.headers,
                bytes,
            )
            .await
        }
    };
    let status = response.status().as_u16();
    tracing::debug!(method = %parts.method, path = parts.uri.path(), status, "request");
    let record = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: header_pairs(&parts.headers),
        body: body
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
        status,
        endpoint: endpoint.unwrap_or(Endpoint::Any),
    };
    shared.lock().requests.push(record);
    response
}

/// Request headers as (name, value) pairs in arrival order, names in lower case, values as
/// lossy UTF-8: what the request journals keep.
pub(crate) fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Appends scripted `(name, value)` headers to `response`, skipping any that are not valid
/// HTTP.
pub(crate) fn append_headers(response: &mut Response, headers: &[(String, String)]) {
    for (name, value) in headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(n, v);
        }
    }
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Apple's error body: a bare token, or a JSON string when configured like depsim (docs/apple-dep-api.md §6.1).
fn apple_error(config: &MockConfig, status: StatusCode, token: &str) -> Response {
    if config.quoted_errors {
        (
            status,
            [(header::CONTENT_TYPE, JSON_UTF8)],
            Value::String(token.to_owned()).to_string(),
        )
            .into_response()
    } else {
        (
            status,
            [(header::CONTENT_TYPE, "text/plain;charset=UTF-8")],
            token.to_owned(),
        )
            .into_response()
    }
}

fn json_ok(body: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, JSON_UTF8)], body).into_response()
}

/// The checks every Apple endpoint shares, in order: method, User-Agent, scripted faults,
/// then the endpoint itself.
async fn respond(
    shared: &Shared,
    endpoint: Endpoint,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let config = &shared.config;
    if !endpoint.accepts(method) {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, endpoint.allow())],
        )
            .into_response();
    }
    let user_agent = header_str(headers, header::USER_AGENT).unwrap_or("").trim();
    if user_agent.is_empty() {
        return apple_error(config, StatusCode::BAD_REQUEST, "USER_AGENT_MISSING");
    }
    let lower = user_agent.to_ascii_lowercase();
    if config
        .user_agent_denylist
        .iter()
        .any(|bad| !bad.is_empty() && lower.contains(&bad.to_ascii_lowercase()))
    {
        return apple_error(config, StatusCode::BAD_REQUEST, "USER_AGENT_INVALID");
    }

    let fault = shared.lock().faults.take(endpoint);
    let page_fault = match fault {
        Some(FaultKind::Status {
            status,
            body,
            headers,
        }) => return status_fault(status, body, &headers),
        Some(FaultKind::MalformedJson) => {
            return json_ok(r#"{"devices":[{"serial_number":"C02TRUNC"#.to_owned())
        }
        Some(FaultKind::Delay(d)) => {
            tokio::time::sleep(d).await;
            None
        }
        Some(kind) => kind.page_fault(),
        None => None,
    };

    let proto = protocol(headers);
    match endpoint {
        Endpoint::Session => session(shared, method, uri, headers),
        _ => authenticated(shared, endpoint, uri, headers, body, proto, page_fault),
    }
}

/// The client's `X-Server-Protocol-Version`. docs/apple-dep-api.md §1.1: absent → 2 (what
/// Apple assumes is unconfirmed); garbage is treated alike.
fn protocol(headers: &HeaderMap) -> u32 {
    header_str(headers, "x-server-protocol-version")
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(2)
}

fn status_fault(status: u16, body: String, headers: &[(String, String)]) -> Response {
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
        .into_response();
    append_headers(&mut response, headers);
    response
}

/// `GET /session` (docs/apple-dep-api.md §3.1).
fn session(
    shared: &Shared,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Response {
    let config = &shared.config;
    // The client signs the URL it used; the Host header (with port) is that URL's authority.
    let Some(host) = header_str(headers, header::HOST).or(uri.authority().map(|a| a.as_str()))
    else {
        return apple_error(config, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    };
    let base_uri = oauth::base_uri(host, uri.path());
    let request = SignedRequest {
        method: method.as_str(),
        base_uri: &base_uri,
        query: uri.query(),
        authorization: header_str(headers, header::AUTHORIZATION),
    };
    // The client signs with its real clock, so the window is checked against ours.
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut state = shared.lock();
    match state
        .verifier
        .verify(&request, &config.credentials, now_unix)
    {
        Err(OAuthError::BadRequest(why)) => {
            tracing::info!(reason = why, "GET /session refused (400)");
            apple_error(config, StatusCode::BAD_REQUEST, "BAD_REQUEST")
        }
        Err(OAuthError::Unauthorized(why)) => {
            tracing::info!(reason = why, "GET /session refused (401)");
            apple_error(config, StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
        }
        Ok(()) => {
            let token = new_session_token();
            let now = state.now();
            state.sessions.insert(token.clone(), now);
            json_ok(json!({ "auth_session_token": token }).to_string())
        }
    }
}

/// 48 random hex characters, like Apple's sample token.
fn new_session_token() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Body of fetch and sync requests.
#[derive(Deserialize)]
struct PageRequest {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<i64>,
}

/// Endpoints behind `X-ADM-Auth-Session` (docs/apple-dep-api.md §3.2).
#[allow(clippy::too_many_arguments)]
fn authenticated(
    shared: &Shared,
    endpoint: Endpoint,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
    proto: u32,
    page_fault: Option<PageFault>,
) -> Response {
    let config = &shared.config;
    let mut state = shared.lock();
    let now = state.now();
    let token = header_str(headers, SESSION_HEADER).unwrap_or("");
    let valid = match state.sessions.get(token) {
        None => false,
        Some(issued) => match config.session_ttl {
            None => true,
            Some(ttl) => chrono::Duration::from_std(ttl).is_ok_and(|ttl| now - *issued < ttl),
        },
    };
    if !valid {
        state.sessions.remove(token);
        drop(state);
        return apple_error(config, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    }
    // Apple "periodically issues a new X-ADM-Auth-Session in its response" (docs/apple-dep-api.md §3.2).
    state.authenticated_calls += 1;
    let rotated = match config.rotate_session_every {
        Some(n) if n > 0 && state.authenticated_calls.is_multiple_of(u64::from(n)) => {
            let fresh = new_session_token();
            state.sessions.insert(fresh.clone(), now);
            Some(fresh)
        }
        _ => None,
    };

    let response = match endpoint {
        Endpoint::Account => {
            drop(state);
            json_ok(account(config, proto).to_string())
        }
        Endpoint::ReplacementDetails => {
            drop(state);
            replacement_details(shared, uri.query())
        }
        Endpoint::DefineProfile | Endpoint::AssignProfile | Endpoint::RemoveProfile => {
            let now = now.timestamp();
            let State {
                store, profiles, ..
            } = &mut *state;
            let answer = match endpoint {
                Endpoint::DefineProfile => profiles.define(store, body, now),
                Endpoint::AssignProfile => profiles.assign(store, body, now, proto),
                _ => ProfileBook::remove(store, body, now),
            };
            drop(state);
            profile_answer(config, answer)
        }
        Endpoint::GetProfile => {
            let answer = state.profiles.get(uri.query());
            drop(state);
            profile_answer(config, answer)
        }
        _ => {
            let request: PageRequest = if body.iter().all(u8::is_ascii_whitespace) {
                PageRequest {
                    cursor: None,
                    limit: None,
                }
            } else {
                match serde_json::from_slice(body) {
                    Ok(r) => r,
                    Err(_) => {
                        drop(state);
                        return with_session(
                            apple_error(config, StatusCode::BAD_REQUEST, "MALFORMED_REQUEST_BODY"),
                            rotated,
                        );
                    }
                }
            };
            let max = config.max_limit.max(1);
            let limit = match request.limit {
                Some(l) if l > 0 => u32::try_from(l).unwrap_or(u32::MAX).min(max),
                _ => config.default_limit.clamp(1, max),
            } as usize;
            let cursor = request.cursor.as_deref().filter(|c| !c.is_empty());
            let ctx = CursorContext {
                now_ms: now.timestamp_millis(),
                instance: shared.instance,
                ttl_ms: config.cursor_ttl.num_milliseconds(),
            };
            let page = if endpoint == Endpoint::FetchDevices {
                state.store.fetch(cursor, limit, ctx, page_fault)
            } else {
                state.store.sync(cursor, limit, ctx, page_fault)
            };
            drop(state);
            match page {
                Ok(page) => json_ok(page.render(now.timestamp(), proto)),
                Err(e) => cursor_error(config, e),
            }
        }
    };
    with_session(response, rotated)
}

/// `GET /device/replacementDetails?device=SERIAL` (docs/apple-dep-api.md §4.8), past the
/// protocol gate and the session check.
fn replacement_details(shared: &Shared, query: Option<&str>) -> Response {
    let config = &shared.config;
    let device = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "device")
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty());
    let Some(device) = device else {
        return apple_error(config, StatusCode::BAD_REQUEST, "DEVICE_ID_REQUIRED");
    };
    match shared.replacement_details(&device) {
        Some(details) => json_ok(details.to_string()),
        None => apple_error(config, StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND"),
    }
}

/// A profile endpoint's answer: `200` JSON or Apple's error.
fn profile_answer(config: &MockConfig, answer: Result<Value, ApiError>) -> Response {
    match answer {
        Ok(v) => json_ok(v.to_string()),
        Err(e) => apple_error(config, e.status, e.token),
    }
}

fn cursor_error(config: &MockConfig, e: CursorError) -> Response {
    apple_error(config, StatusCode::BAD_REQUEST, e.token())
}

fn with_session(mut response: Response, token: Option<String>) -> Response {
    if let Some(v) = token.and_then(|t| HeaderValue::from_str(&t).ok()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(SESSION_HEADER), v);
    }
    response
}

/// `GET /account` (docs/apple-dep-api.md §4.1); the v3 fields only from protocol version 3 on.
fn account(config: &MockConfig, proto: u32) -> Value {
    let mut v = Map::new();
    let mut put = |k: &str, val: Value| {
        v.insert(k.to_owned(), val);
    };
    put("server_name", config.server_name.clone().into());
    put("server_uuid", config.server_uuid.clone().into());
    put("admin_id", "it-admin@example.com".into());
    put("facilitator_id", "it-admin@example.com".into());
    put("org_name", config.org_name.clone().into());
    put("org_email", "it-admin@example.com".into());
    put("org_phone", "+1 555 0100".into());
    put("org_address", "1 Infinite Loop, Cupertino, CA 95014".into());
    if proto >= 3 {
        let limit = json!({ "default": config.default_limit, "maximum": config.max_limit });
        put("org_id", "1234567".into());
        put(
            "org_id_hash",
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8".into(),
        );
        put("org_type", config.org_type.clone().into());
        put("org_version", "v2".into());
        put(
            "urls",
            json!([
                { "uri": "/session", "http_method": ["GET"] },
                { "uri": "/account", "http_method": ["GET"] },
                { "uri": "/server/devices", "http_method": ["POST"], "limit": limit },
                { "uri": "/devices/sync", "http_method": ["POST"], "limit": limit },
                { "uri": "/devices", "http_method": ["POST"] },
                { "uri": "/devices/disown", "http_method": ["POST"] },
                { "uri": "/device/activationlock", "http_method": ["POST"] },
                { "uri": "/profile", "http_method": ["POST", "GET"] },
                { "uri": "/profile/devices", "http_method": ["DELETE", "POST", "PUT"] },
            ]),
        );
        if proto >= PROTOCOL_V10 {
            if let Some(Value::Array(urls)) = v.get_mut("urls") {
                urls.push(json!({ "uri": "/device/replacementDetails", "http_method": ["GET"] }));
            }
        }
    }
    Value::Object(v)
}

// ---------------------------------------------------------------------------------------
// Admin API (not Apple's): no auth, plain JSON in and out, curl-friendly (any content type).

pub(crate) fn admin_error(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": message.into() })),
    )
        .into_response()
}

pub(crate) fn parse_body(body: &Bytes) -> Result<Value, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))
}

/// Runs `f` on the parsed body: its value is the `200` JSON answer, its error (or the body's)
/// a `400 {"error": ...}`.
pub(crate) fn with_body(body: &Bytes, f: impl FnOnce(&Value) -> Result<Value, String>) -> Response {
    match parse_body(body).and_then(|v| f(&v)) {
        Ok(v) => axum::Json(v).into_response(),
        Err(message) => admin_error(message),
    }
}

/// `{"serials": [..]}` as given, or `{"count": n}` chosen by `pick(n)` (at random among the
/// devices the body is about).
pub(crate) fn selection(
    v: &Value,
    pick: impl FnOnce(usize) -> Result<Vec<String>, String>,
) -> Result<Vec<String>, String> {
    if let Some(list) = v.get("serials") {
        return serde_json::from_value(list.clone())
            .map_err(|_| "\"serials\" must be an array of strings".to_owned());
    }
    match v.get("count").and_then(Value::as_u64) {
        Some(n) => pick(n as usize),
        None => Err("expected {\"count\": n} or {\"serials\": [..]}".to_owned()),
    }
}

/// [`selection`] among the ADE devices.
fn ade_selection(shared: &Shared, v: &Value) -> Result<Vec<String>, String> {
    selection(v, |n| Ok(shared.lock().store.pick(n)))
}

async fn admin_devices(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    json_ok(shared.devices_array(LATEST_PROTOCOL))
}

async fn admin_add(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let n = v
            .get("count")
            .and_then(Value::as_u64)
            .ok_or("expected {\"count\": n}")?;
        let serials = shared.add_devices(n as usize);
        Ok(json!({ "added": serials.len(), "serials": serials }))
    })
}

async fn admin_modify(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let serials = ade_selection(&shared, v)?;
        let n = shared.modify_devices(&serials);
        Ok(json!({ "modified": n, "serials": serials }))
    })
}

async fn admin_delete(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let serials = ade_selection(&shared, v)?;
        let n = shared.delete_devices(&serials);
        Ok(json!({ "deleted": n, "serials": serials }))
    })
}

async fn admin_release(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let serials = ade_selection(&shared, v)?;
        let n = shared.remove_silently(&serials);
        Ok(json!({ "released": n, "serials": serials }))
    })
}

async fn admin_replace(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let serials = ade_selection(&shared, v)?;
        let (originals, new): (Vec<String>, Vec<String>) =
            shared.replace_devices(&serials).into_iter().unzip();
        Ok(json!({ "replaced": new.len(), "serials": new, "originals": originals }))
    })
}

async fn admin_reassign(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let serials: Vec<String> = v
            .get("serials")
            .and_then(|list| serde_json::from_value(list.clone()).ok())
            .ok_or("expected {\"serials\": [..]} (devices that left)")?;
        let n = shared.reassign_devices(&serials);
        Ok(json!({ "reassigned": n, "serials": serials }))
    })
}

async fn admin_clock(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let seconds = v
            .get("seconds")
            .and_then(Value::as_i64)
            .ok_or("expected {\"seconds\": n}")?;
        let mut s = shared.lock();
        s.clock_offset += chrono::Duration::seconds(seconds);
        let now = s.now().timestamp();
        Ok(json!({ "now": rfc3339::format(now) }))
    })
}

/// `{"endpoint": "...", "times": n, "status": 503, "body": "...", "headers": [[k, v]]}` or
/// `{"endpoint": "...", "kind": "malformed_json" | "same_cursor" | "duplicate_serial" |
/// {"delay_ms": n}}`.
fn parse_fault(v: &Value) -> Result<(Endpoint, Fault), String> {
    let endpoint_name = v.get("endpoint").and_then(Value::as_str).unwrap_or("any");
    let endpoint = Endpoint::from_name(endpoint_name).ok_or_else(|| {
        let names: Vec<&str> = Endpoint::APPLE.iter().map(|e| e.name()).collect();
        format!(
            "unknown endpoint {endpoint_name:?} ({}, any)",
            names.join(", ")
        )
    })?;
    Ok((endpoint, parse_fault_body(v)?))
}

/// The endpoint-independent part of a fault body: `times` and `status`/`body`/`headers` or
/// `kind`.
pub(crate) fn parse_fault_body(v: &Value) -> Result<Fault, String> {
    let times = v.get("times").and_then(Value::as_u64).unwrap_or(1);
    let times = u32::try_from(times).map_err(|_| "\"times\" is too large".to_owned())?;
    let kind = match (v.get("status"), v.get("kind")) {
        (Some(status), _) => {
            let status = status
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .filter(|s| (100..=999).contains(s))
                .ok_or("\"status\" must be an HTTP status code")?;
            let body = v
                .get("body")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let headers = match v.get("headers") {
                None => Vec::new(),
                Some(h) => serde_json::from_value::<Vec<(String, String)>>(h.clone())
                    .map_err(|_| "\"headers\" must be [[name, value], ...]")?,
            };
            FaultKind::Status {
                status,
                body,
                headers,
            }
        }
        (None, Some(Value::String(k))) => match k.as_str() {
            "malformed_json" => FaultKind::MalformedJson,
            "same_cursor" => FaultKind::SameCursor,
            "duplicate_serial" => FaultKind::DuplicateSerial,
            other => return Err(format!("unknown fault kind {other:?}")),
        },
        (None, Some(k)) => match k.get("delay_ms").and_then(Value::as_u64) {
            Some(ms) => FaultKind::Delay(std::time::Duration::from_millis(ms)),
            None => return Err("\"kind\" must be a name or {\"delay_ms\": n}".into()),
        },
        (None, None) => return Err("expected \"status\" or \"kind\"".into()),
    };
    Ok(Fault { times, kind })
}

async fn admin_faults(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let (endpoint, fault) = parse_fault(v)?;
        shared.lock().faults.push(endpoint, fault);
        Ok(json!({ "queued": endpoint.name() }))
    })
}

async fn admin_expire(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let mut s = shared.lock();
    let n = s.sessions.len();
    s.sessions.clear();
    axum::Json(json!({ "expired": n })).into_response()
}

async fn admin_stats(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let s = shared.lock();
    let mut counts = Map::new();
    for e in Endpoint::APPLE {
        let n = s.requests.iter().filter(|r| r.endpoint == e).count();
        counts.insert(e.name().to_owned(), n.into());
    }
    counts.insert("total".into(), s.requests.len().into());
    axum::Json(json!({
        "devices": s.store.len(),
        "log_length": s.store.log_len(),
        "sessions": s.sessions.len(),
        "profiles": s.profiles.len(),
        "now": rfc3339::format(s.now().timestamp()),
        "requests": counts,
    }))
    .into_response()
}

/// `GET /_mock/profiles`: every defined profile as `GET /profile` shows it (with
/// `profile_uuid`), in definition order.
async fn admin_profiles(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let list: Vec<Value> = shared
        .lock()
        .profiles
        .list()
        .into_iter()
        .map(|(uuid, mut profile)| {
            profile["profile_uuid"] = uuid.into();
            profile
        })
        .collect();
    axum::Json(Value::Array(list)).into_response()
}

/// `POST /_mock/profiles/script {"status": "FAILED"|"THROTTLED"|"NOT_ACCESSIBLE", "count":
/// n, "retry_after_seconds": s}`: see [`crate::MockHandle::script_assignments`].
async fn admin_profile_script(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v| {
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .and_then(AssignStatus::from_token)
            .ok_or("expected \"status\": \"FAILED\", \"THROTTLED\" or \"NOT_ACCESSIBLE\"")?;
        let count = v
            .get("count")
            .and_then(Value::as_u64)
            .ok_or("expected \"count\": n")?;
        let retry_after = match v.get("retry_after_seconds") {
            None | Some(Value::Null) => None,
            Some(s) => Some(
                s.as_u64()
                    .ok_or("\"retry_after_seconds\" must be a number")?,
            ),
        };
        let mut s = shared.lock();
        s.profiles.script(status, count as usize, retry_after);
        Ok(json!({
            "scripted": count,
            "status": status.token(),
            "pending": s.profiles.scripted(),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_fault_bodies_parse() {
        let (e, f) = parse_fault(&json!({
            "endpoint": "fetch_devices", "times": 2, "status": 503, "body": "",
            "headers": [["Retry-After", "1"]]
        }))
        .unwrap();
        assert_eq!(e, Endpoint::FetchDevices);
        assert_eq!(f.times, 2);
        assert!(
            matches!(f.kind, FaultKind::Status { status: 503, ref headers, .. } if headers[0].1 == "1")
        );
        let (e, f) = parse_fault(&json!({"endpoint": "any", "kind": {"delay_ms": 250}})).unwrap();
        assert_eq!(e, Endpoint::Any);
        assert!(matches!(f.kind, FaultKind::Delay(d) if d.as_millis() == 250));
        for kind in ["malformed_json", "same_cursor", "duplicate_serial"] {
            assert!(parse_fault(&json!({"endpoint": "sync_devices", "kind": kind})).is_ok());
        }
        assert!(parse_fault(&json!({"endpoint": "nope", "status": 500})).is_err());
        assert!(parse_fault(&json!({"endpoint": "any", "kind": "explode"})).is_err());
        assert!(parse_fault(&json!({"endpoint": "any"})).is_err());
    }
}
