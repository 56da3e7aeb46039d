//! The `/_mock/org` admin routes (not Apple's): change and inspect the organisation accounts
//! of the Apple School and Business Manager API simulation. No auth, plain JSON in and out,
//! curl-friendly; every body may name `"account"` (an index, default 0).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State as AxumState};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::OrgEndpoint;
use crate::config::OrgQuirks;
use crate::rfc3339;
use crate::server::{self, admin_error, parse_fault_body, selection, Shared};

/// The admin routes, to merge into the service's router.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_mock/org/accounts", get(accounts))
        .route("/_mock/org/devices", get(devices).post(add))
        .route("/_mock/org/devices/modify", post(modify))
        .route("/_mock/org/devices/release", post(release))
        .route("/_mock/org/devices/assign", post(assign))
        .route("/_mock/org/tokens/expire", post(expire))
        .route("/_mock/org/faults", post(faults))
        .route("/_mock/org/quirks", post(quirks))
        .route("/_mock/org/rate", post(rate))
        .route("/_mock/org/stats", get(stats))
}

/// [`server::with_body`] with the body's `"account"` (default 0).
fn with_body(body: &Bytes, f: impl FnOnce(&Value, usize) -> Result<Value, String>) -> Response {
    server::with_body(body, |v| {
        let account = match v.get("account") {
            None | Some(Value::Null) => 0,
            Some(a) => a.as_u64().ok_or("\"account\" must be an account index")? as usize,
        };
        f(v, account)
    })
}

/// `"server"`: absent or `null` → `None`, a string → that id.
fn server_of(v: &Value) -> Result<Option<&str>, String> {
    match v.get("server") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Some(id)),
        Some(_) => Err("\"server\" must be an MDM server id or null".into()),
    }
}

/// [`selection`] among the account's listed devices.
fn org_selection(shared: &Shared, v: &Value, account: usize) -> Result<Vec<String>, String> {
    selection(v, |n| {
        Ok(shared.lock().org.account_mut(account)?.inventory.pick(n))
    })
}

#[derive(serde::Deserialize)]
struct AccountQuery {
    account: Option<usize>,
}

async fn accounts(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let s = shared.lock();
    let list: Vec<Value> = s
        .org
        .accounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let servers: Vec<Value> = a
                .servers()
                .into_iter()
                .map(|s| json!({ "id": s.id, "name": s.name, "type": s.server_type }))
                .collect();
            json!({
                "account": i,
                "client_id": a.config.client_id,
                "key_id": a.config.key_id,
                "scope": a.config.scope(),
                "public_key_pem": a.info().public_key_pem,
                "servers": servers,
            })
        })
        .collect();
    Json(Value::Array(list)).into_response()
}

async fn devices(
    AxumState(shared): AxumState<Arc<Shared>>,
    Query(q): Query<AccountQuery>,
) -> Response {
    let truth = match shared.lock().org.account(q.account.unwrap_or(0)) {
        Ok(a) => a.truth(),
        Err(message) => return admin_error(message),
    };
    let list: Vec<Value> = truth
        .into_iter()
        .map(|t| json!({ "serial": t.serial, "server": t.server, "attributes": t.attributes }))
        .collect();
    Json(Value::Array(list)).into_response()
}

async fn add(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v, account| {
        let n = v
            .get("count")
            .and_then(Value::as_u64)
            .ok_or("expected {\"count\": n, \"server\": id or null}")?;
        let mut s = shared.lock();
        let now = s.now();
        let serials = s.org.add_devices(account, n as usize, server_of(v)?, now)?;
        Ok(json!({ "added": serials.len(), "serials": serials }))
    })
}

async fn modify(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v, account| {
        let serials = org_selection(&shared, v, account)?;
        let mut s = shared.lock();
        let now = s.now().timestamp_millis();
        let n = s.org.account_mut(account)?.inventory.modify(&serials, now);
        Ok(json!({ "modified": n, "serials": serials }))
    })
}

async fn release(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v, account| {
        let serials = org_selection(&shared, v, account)?;
        let mut s = shared.lock();
        let now = s.now().timestamp_millis();
        let n = s.org.account_mut(account)?.inventory.release(&serials, now);
        Ok(json!({ "released": n, "serials": serials }))
    })
}

async fn assign(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v, account| {
        let server = server_of(v)?;
        let serials = org_selection(&shared, v, account)?;
        let mut s = shared.lock();
        let now = s.now();
        let n = s.org.assign(account, &serials, server, now)?;
        Ok(json!({ "assigned": n, "server": server, "serials": serials }))
    })
}

async fn expire(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let mut s = shared.lock();
    let now = s.now();
    let n = s.org.expire_tokens(now);
    Json(json!({ "expired": n })).into_response()
}

/// `{"account": 0, "endpoint": "org_devices", "times": 2, "status": 429, "headers":
/// [["Retry-After", "2"]], "body": "..."}` (an empty body becomes a JSON:API error) or
/// `"kind"` as for `/_mock/faults`.
async fn faults(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v, account| {
        let name = v.get("endpoint").and_then(Value::as_str).unwrap_or("any");
        let endpoint = OrgEndpoint::from_name(name).ok_or_else(|| {
            let names: Vec<&str> = OrgEndpoint::ALL.iter().map(|e| e.name()).collect();
            format!("unknown endpoint {name:?} ({})", names.join(", "))
        })?;
        let fault = parse_fault_body(v)?;
        shared
            .lock()
            .org
            .account_mut(account)?
            .faults
            .push(endpoint, fault);
        Ok(json!({ "queued": endpoint.name(), "account": account }))
    })
}

/// `{"account": 0, "list_values_as_strings": true, "purchase_source_uid": false,
/// "future_field": true}`; absent flags are false.
async fn quirks(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v, account| {
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let q = OrgQuirks {
            list_values_as_strings: flag("list_values_as_strings"),
            purchase_source_uid: flag("purchase_source_uid"),
            future_field: flag("future_field"),
        };
        shared.lock().org.account_mut(account)?.quirks = q;
        Ok(json!({ "account": account, "quirks": {
            "list_values_as_strings": q.list_values_as_strings,
            "purchase_source_uid": q.purchase_source_uid,
            "future_field": q.future_field,
        }}))
    })
}

/// `{"account": 0, "requests_per_second": 2.5}` (`null`: unlimited).
async fn rate(AxumState(shared): AxumState<Arc<Shared>>, body: Bytes) -> Response {
    with_body(&body, |v, account| {
        let rate = match v.get("requests_per_second") {
            None | Some(Value::Null) => None,
            Some(r) => Some(
                r.as_f64()
                    .filter(|r| *r > 0.0)
                    .ok_or("\"requests_per_second\" must be a positive number or null")?,
            ),
        };
        shared.lock().org.account_mut(account)?.set_rate(rate);
        Ok(json!({ "account": account, "requests_per_second": rate }))
    })
}

async fn stats(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let s = shared.lock();
    let accounts: Vec<Value> = s
        .org
        .accounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let st = a.stats();
            let counts = |m: std::collections::BTreeMap<String, u64>| {
                Value::Object(
                    m.into_iter()
                        .map(|(k, v)| (k, v.into()))
                        .collect::<Map<_, _>>(),
                )
            };
            json!({
                "account": i,
                "client_id": a.config.client_id,
                "devices": st.devices,
                "released": st.released,
                "token_requests": st.token_requests,
                "tokens_issued": st.tokens_issued,
                "refused_assertions": counts(st.refused),
                "requests": counts(st.requests),
                "served_429": st.served_429,
                "rate_limited": st.rate_limited,
            })
        })
        .collect();
    Json(json!({
        "now": rfc3339::format(s.now().timestamp()),
        "unattributed_requests": s.org.journal.iter().filter(|r| r.account.is_none()).count(),
        "accounts": accounts,
    }))
    .into_response()
}
