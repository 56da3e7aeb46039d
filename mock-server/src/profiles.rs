//! ADE enrollment profiles (docs/apple-dep-api.md §4.9): the profiles the organisation
//! defined, the scripted per-device assignment answers, and the four profile endpoints'
//! logic over the device store. The HTTP layer (`server`) has already checked method,
//! User-Agent, faults and session; it hands over the raw body (or query) and renders what
//! comes back.
//!
//! - `POST`/`PUT /profile`, body a Profile object → `{"profile_uuid": U, "devices":
//!   {SERIAL: STATUS}}`. `400` tokens: `MALFORMED_REQUEST_BODY` (not a JSON object, `devices`
//!   not an array of strings or longer than 1000), `CONFIG_NAME_REQUIRED` (`profile_name`
//!   missing, null or blank), `CONFIG_NAME_INVALID` (not a string, or over 125 characters),
//!   `CONFIG_URL_REQUIRED` (`url` missing, null or blank), `CONFIG_URL_INVALID` (not a
//!   string, or over 2000 characters); checked in that order. Every define makes a new
//!   UUID (32 upper-case hex digits); the serials of the profile's own `devices` are
//!   assigned at once, `SUCCESS` or `NOT_ACCESSIBLE` (scripted answers are for assign calls
//!   only).
//! - `GET /profile?profile_uuid=U` → the profile as defined plus `profile_uuid`;
//!   `400 PROFILE_UUID_REQUIRED`, `404 PROFILE_NOT_FOUND`.
//! - `POST`/`PUT /profile/devices` `{"profile_uuid": U, "devices": [..]}` → `{"profile_uuid":
//!   U, "devices": {SERIAL: STATUS}}` (+ `retry_after_seconds` at protocol 10 when a device
//!   is `THROTTLED`). `400` tokens in order: `MALFORMED_REQUEST_BODY` (not a JSON object),
//!   `PROFILE_UUID_REQUIRED` (missing, null or blank; `MALFORMED_REQUEST_BODY` if not a
//!   string), `DEVICE_ID_REQUIRED` (missing, null or `[]`; `MALFORMED_REQUEST_BODY` if not an
//!   array of strings), `MALFORMED_REQUEST_BODY` for more than 1000 serials (Apple documents
//!   the limit, not its error: [`TOO_MANY_DEVICES`]); then `404 PROFILE_NOT_FOUND`.
//! - `DELETE /profile/devices` `{"devices": [..]}` (`profile_uuid` ignored) → `{"devices":
//!   {SERIAL: "SUCCESS"|"NOT_ACCESSIBLE"}}`; `400 MALFORMED_REQUEST_BODY`,
//!   `400 DEVICE_ID_REQUIRED`. No 1000 limit (Apple documents none for removal).
//!
//! Per device: a serial not assigned to the server now is `NOT_ACCESSIBLE`. An assignment
//! that succeeds makes the device `profile_status: assigned` with the profile's UUID,
//! `profile_assign_time` = now (simulated clock) and no `profile_push_time`, logged as one
//! `modified` sync record; assigning the UUID the device already has succeeds without a
//! change or record. A removal makes it `profile_status: removed` without the three
//! profile fields (one `modified` record; none if it already looked so).
//!
//! Scripted answers ([`AssignStatus`]) replace `SUCCESS` for the next devices of assign calls
//! that would have succeeded, in request order, and change nothing. `THROTTLED` exists from
//! protocol 9 (before, a scripted `THROTTLED` answers `FAILED`); at protocol 10 and later a
//! response with a `THROTTLED` device carries `retry_after_seconds`, the largest of its
//! throttled devices' scripted values.
//!
//! UUIDs are compared without dashes and case (zentral sends them upper-cased and without
//! dashes; `C1F12309-8EB5-...` finds `C1F123098EB5...`); responses carry the stored form.
//! The profile UUIDs the generated devices refer to predate the simulation and are not
//! known profiles (`GET` answers `404`, an assignment of them `PROFILE_NOT_FOUND`).

use std::collections::{HashMap, VecDeque};

use axum::http::StatusCode;
use rand::Rng;
use serde_json::{json, Map, Value};

use crate::rfc3339;
use crate::store::Store;

/// Most serials one assign call may name (docs/apple-dep-api.md §4.9).
pub const MAX_ASSIGN_DEVICES: usize = 1000;

/// The `400` token for an assign (or define) naming more than [`MAX_ASSIGN_DEVICES`]
/// serials. Apple documents the limit but no token for it; the request's body is what is
/// wrong, so the generic body token is the most plausible.
pub const TOO_MANY_DEVICES: &str = "MALFORMED_REQUEST_BODY";

/// `retry_after_seconds` of a scripted `THROTTLED` batch that names none.
pub const DEFAULT_RETRY_AFTER_SECONDS: u64 = 60;

/// Protocol version from which assign answers `THROTTLED` (docs/apple-dep-api.md §1.1).
const PROTOCOL_THROTTLED: u32 = 9;

/// Protocol version from which assign answers carry `retry_after_seconds`.
const PROTOCOL_RETRY_AFTER: u32 = 10;

/// Longest `profile_name` and `url` Apple takes, in characters (docs/apple-dep-api.md §4.9).
const MAX_NAME_CHARS: usize = 125;
const MAX_URL_CHARS: usize = 2000;

/// A scripted answer for a device of an assign call, in place of `SUCCESS`
/// ([`crate::MockHandle::script_assignments`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AssignStatus {
    /// `FAILED`.
    Failed,
    /// `THROTTLED` (protocol 9 and later; `FAILED` before), with `retry_after_seconds` at
    /// protocol 10 and later.
    Throttled,
    /// `NOT_ACCESSIBLE`, although the device is assigned to the server.
    NotAccessible,
}

impl AssignStatus {
    /// The status as Apple writes it (`FAILED`, `THROTTLED`, `NOT_ACCESSIBLE`).
    pub fn token(self) -> &'static str {
        match self {
            AssignStatus::Failed => "FAILED",
            AssignStatus::Throttled => "THROTTLED",
            AssignStatus::NotAccessible => "NOT_ACCESSIBLE",
        }
    }

    /// Inverse of [`Self::token`].
    pub fn from_token(token: &str) -> Option<Self> {
        [
            AssignStatus::Failed,
            AssignStatus::Throttled,
            AssignStatus::NotAccessible,
        ]
        .into_iter()
        .find(|s| s.token() == token)
    }
}

/// An Apple error answer: status and body token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub token: &'static str,
}

const fn bad_request(token: &'static str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        token,
    }
}

const MALFORMED: ApiError = bad_request("MALFORMED_REQUEST_BODY");
const DEVICE_ID_REQUIRED: ApiError = bad_request("DEVICE_ID_REQUIRED");
const PROFILE_UUID_REQUIRED: ApiError = bad_request("PROFILE_UUID_REQUIRED");
const PROFILE_NOT_FOUND: ApiError = ApiError {
    status: StatusCode::NOT_FOUND,
    token: "PROFILE_NOT_FOUND",
};

/// One scripted batch: the next `remaining` devices get `status`.
struct Script {
    status: AssignStatus,
    remaining: usize,
    retry_after: u64,
}

/// The profiles defined so far, in definition order, and the scripted assignment answers.
#[derive(Default)]
pub(crate) struct ProfileBook {
    /// `(uuid, profile as defined)`.
    profiles: Vec<(String, Map<String, Value>)>,
    /// uuid → index into `profiles`.
    index: HashMap<String, usize>,
    script: VecDeque<Script>,
}

/// `uuid` as stored: no dashes or surrounding blanks, upper case.
fn canonical_uuid(uuid: &str) -> String {
    uuid.trim()
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .to_ascii_uppercase()
}

/// The body as a JSON object, else `MALFORMED_REQUEST_BODY`.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(MALFORMED),
    }
}

/// A required string field: `Ok(None)` when missing, null or blank, `Err(invalid)` when not
/// a string or longer than `max` characters.
fn text<'a>(
    map: &'a Map<String, Value>,
    key: &str,
    max: usize,
    invalid: ApiError,
) -> Result<Option<&'a str>, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max => Ok(Some(s)),
        Some(_) => Err(invalid),
    }
}

/// The `devices` array: `Ok(empty)` when missing or null, `MALFORMED_REQUEST_BODY` when not
/// an array of strings.
fn serials(map: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match map.get("devices") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list
            .iter()
            .map(|s| s.as_str().map(str::to_owned).ok_or(MALFORMED))
            .collect(),
        Some(_) => Err(MALFORMED),
    }
}

/// `serials` without repeats, first occurrences in order: the answer is keyed by serial.
fn distinct(serials: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    serials
        .into_iter()
        .filter(|s| seen.insert(s.clone()))
        .collect()
}

/// Assigns profile `uuid` to the assigned device `serial` at `now`; `false` if it is not
/// assigned to the server. A device already holding `uuid` is left alone (no record).
fn assign_one(store: &mut Store, serial: &str, uuid: &str, now: i64) -> bool {
    store
        .modify_if(serial, now, |d| {
            if d.get("profile_uuid").and_then(Value::as_str) == Some(uuid) {
                return false;
            }
            d.insert("profile_status".into(), "assigned".into());
            d.insert("profile_uuid".into(), uuid.into());
            d.insert(
                "profile_assign_time".into(),
                Value::String(rfc3339::format(now)),
            );
            d.remove("profile_push_time");
            true
        })
        .is_some()
}

/// Takes the profile off the assigned device `serial` at `now`; `false` if it is not
/// assigned to the server.
fn remove_one(store: &mut Store, serial: &str, now: i64) -> bool {
    const FIELDS: [&str; 3] = ["profile_uuid", "profile_assign_time", "profile_push_time"];
    store
        .modify_if(serial, now, |d| {
            let removed = d.get("profile_status").and_then(Value::as_str) == Some("removed");
            if removed && FIELDS.iter().all(|k| !d.contains_key(*k)) {
                return false;
            }
            d.insert("profile_status".into(), "removed".into());
            for key in FIELDS {
                d.remove(key);
            }
            true
        })
        .is_some()
}

fn status(ok: bool) -> Value {
    Value::from(if ok { "SUCCESS" } else { "NOT_ACCESSIBLE" })
}

impl ProfileBook {
    /// Every defined profile as defined, with its UUID, in definition order.
    pub fn list(&self) -> Vec<(String, Value)> {
        self.profiles
            .iter()
            .map(|(uuid, p)| (uuid.clone(), Value::Object(p.clone())))
            .collect()
    }

    /// How many profiles are defined.
    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    /// Queues `count` scripted answers after any already queued.
    pub fn script(&mut self, status: AssignStatus, count: usize, retry_after: Option<u64>) {
        if count > 0 {
            self.script.push_back(Script {
                status,
                remaining: count,
                retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER_SECONDS),
            });
        }
    }

    /// Scripted answers not used yet.
    pub fn scripted(&self) -> usize {
        self.script.iter().map(|s| s.remaining).sum()
    }

    /// Uses up the next scripted answer, if any: its status and retry-after.
    fn next_scripted(&mut self) -> Option<(AssignStatus, u64)> {
        let front = self.script.front_mut()?;
        let answer = (front.status, front.retry_after);
        front.remaining -= 1;
        if front.remaining == 0 {
            self.script.pop_front();
        }
        Some(answer)
    }

    /// `POST /profile`: defines the profile in `body`, assigning its `devices` at `now`.
    pub fn define(&mut self, store: &mut Store, body: &[u8], now: i64) -> Result<Value, ApiError> {
        let profile = object(body)?;
        let devices = serials(&profile)?;
        if devices.len() > MAX_ASSIGN_DEVICES {
            return Err(bad_request(TOO_MANY_DEVICES));
        }
        let name = text(
            &profile,
            "profile_name",
            MAX_NAME_CHARS,
            bad_request("CONFIG_NAME_INVALID"),
        )?;
        if name.is_none() {
            return Err(bad_request("CONFIG_NAME_REQUIRED"));
        }
        let url = text(
            &profile,
            "url",
            MAX_URL_CHARS,
            bad_request("CONFIG_URL_INVALID"),
        )?;
        if url.is_none() {
            return Err(bad_request("CONFIG_URL_REQUIRED"));
        }
        let uuid = loop {
            let bytes: [u8; 16] = rand::rng().random();
            let uuid: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
            if !self.index.contains_key(&uuid) {
                break uuid;
            }
        };
        let mut answers = Map::new();
        for serial in distinct(devices) {
            let ok = assign_one(store, &serial, &uuid, now);
            answers.insert(serial, status(ok));
        }
        self.index.insert(uuid.clone(), self.profiles.len());
        self.profiles.push((uuid.clone(), profile));
        Ok(json!({ "profile_uuid": uuid, "devices": answers }))
    }

    /// `GET /profile?profile_uuid=U`.
    pub fn get(&self, query: Option<&str>) -> Result<Value, ApiError> {
        let uuid = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "profile_uuid")
            .map(|(_, v)| canonical_uuid(&v))
            .filter(|v| !v.is_empty())
            .ok_or(PROFILE_UUID_REQUIRED)?;
        let &at = self.index.get(&uuid).ok_or(PROFILE_NOT_FOUND)?;
        let (uuid, profile) = &self.profiles[at];
        let mut out = profile.clone();
        out.insert("profile_uuid".into(), uuid.clone().into());
        Ok(Value::Object(out))
    }

    /// `POST /profile/devices` at protocol `proto`.
    pub fn assign(
        &mut self,
        store: &mut Store,
        body: &[u8],
        now: i64,
        proto: u32,
    ) -> Result<Value, ApiError> {
        let request = object(body)?;
        let uuid = match request.get("profile_uuid") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(canonical_uuid(s)).filter(|s| !s.is_empty()),
            Some(_) => return Err(MALFORMED),
        }
        .ok_or(PROFILE_UUID_REQUIRED)?;
        let devices = serials(&request)?;
        if devices.is_empty() {
            return Err(DEVICE_ID_REQUIRED);
        }
        if devices.len() > MAX_ASSIGN_DEVICES {
            return Err(bad_request(TOO_MANY_DEVICES));
        }
        if !self.index.contains_key(&uuid) {
            return Err(PROFILE_NOT_FOUND);
        }
        let mut answers = Map::new();
        let mut retry_after: Option<u64> = None;
        for serial in distinct(devices) {
            let answer = if !store.contains(&serial) {
                "NOT_ACCESSIBLE"
            } else {
                match self.next_scripted() {
                    Some((AssignStatus::Throttled, _)) if proto < PROTOCOL_THROTTLED => "FAILED",
                    Some((AssignStatus::Throttled, after)) => {
                        retry_after = Some(retry_after.map_or(after, |r| r.max(after)));
                        "THROTTLED"
                    }
                    Some((scripted, _)) => scripted.token(),
                    None => {
                        assign_one(store, &serial, &uuid, now);
                        "SUCCESS"
                    }
                }
            };
            answers.insert(serial, answer.into());
        }
        let mut out = json!({ "profile_uuid": uuid, "devices": answers });
        if let Some(after) = retry_after.filter(|_| proto >= PROTOCOL_RETRY_AFTER) {
            out["retry_after_seconds"] = after.into();
        }
        Ok(out)
    }

    /// `DELETE /profile/devices`.
    pub fn remove(store: &mut Store, body: &[u8], now: i64) -> Result<Value, ApiError> {
        let request = object(body)?;
        let devices = serials(&request)?;
        if devices.is_empty() {
            return Err(DEVICE_ID_REQUIRED);
        }
        let mut answers = Map::new();
        for serial in distinct(devices) {
            let ok = remove_one(store, &serial, now);
            answers.insert(serial, status(ok));
        }
        Ok(json!({ "devices": answers }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_compared_without_dashes_or_case() {
        assert_eq!(
            canonical_uuid(" c1f12309-8eb5-0745-8004-1e69883004c3 "),
            "C1F123098EB5074580041E69883004C3"
        );
    }

    #[test]
    fn scripts_are_used_in_order_and_statuses_round_trip() {
        let mut book = ProfileBook::default();
        book.script(AssignStatus::Failed, 1, None);
        book.script(AssignStatus::Throttled, 2, Some(5));
        book.script(AssignStatus::NotAccessible, 0, None);
        assert_eq!(book.scripted(), 3);
        assert_eq!(book.next_scripted(), Some((AssignStatus::Failed, 60)));
        assert_eq!(book.next_scripted(), Some((AssignStatus::Throttled, 5)));
        assert_eq!(book.next_scripted(), Some((AssignStatus::Throttled, 5)));
        assert_eq!(book.next_scripted(), None);
        for s in [
            AssignStatus::Failed,
            AssignStatus::Throttled,
            AssignStatus::NotAccessible,
        ] {
            assert_eq!(AssignStatus::from_token(s.token()), Some(s));
        }
        assert_eq!(AssignStatus::from_token("SUCCESS"), None);
    }

    #[test]
    fn define_checks_name_then_url() {
        let mut book = ProfileBook::default();
        let mut store = Store::new(0, 1);
        let mut define = |body: &str| book.define(&mut store, body.as_bytes(), 0).map(|_| ());
        let token = |r: Result<(), ApiError>| r.unwrap_err().token;
        assert_eq!(token(define("[]")), "MALFORMED_REQUEST_BODY");
        assert_eq!(token(define("")), "MALFORMED_REQUEST_BODY");
        assert_eq!(token(define("{}")), "CONFIG_NAME_REQUIRED");
        assert_eq!(
            token(define(r#"{"profile_name":" "}"#)),
            "CONFIG_NAME_REQUIRED"
        );
        assert_eq!(
            token(define(r#"{"profile_name":7}"#)),
            "CONFIG_NAME_INVALID"
        );
        let long = format!(r#"{{"profile_name":"{}","url":"u"}}"#, "x".repeat(126));
        assert_eq!(token(define(&long)), "CONFIG_NAME_INVALID");
        assert_eq!(
            token(define(r#"{"profile_name":"p"}"#)),
            "CONFIG_URL_REQUIRED"
        );
        assert_eq!(
            token(define(r#"{"profile_name":"p","url":[]}"#)),
            "CONFIG_URL_INVALID"
        );
        assert_eq!(
            token(define(r#"{"profile_name":"p","url":"u","devices":"X"}"#)),
            "MALFORMED_REQUEST_BODY"
        );
        assert!(define(r#"{"profile_name":"p","url":"u"}"#).is_ok());
        assert_eq!(book.len(), 1);
    }
}
