//! The HTTP face of the Apple School and Business Manager API simulation:
//! `POST /auth/oauth2/token` and the `GET /v1/...` JSON:API routes. Each request is decided
//! in two short locked steps (who is asking, and the scripted faults / rate limiter; then
//! the answer's data), with any scripted delay slept in between and the JSON rendered after
//! the lock is released; then it is journalled with the status it got.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State as AxumState};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

use super::cursor::{Listing, OrgCursor};
use super::inventory::{self, key_str, Key, OrgDevice, ServerInfo, Slice};
use super::{assertion, Gate, OrgEndpoint, OrgReply, OrgRequest};
use crate::config::OrgQuirks;
use crate::server::{append_headers, header_pairs, Shared};
use crate::store::PageFault;

/// Larger request bodies are refused; a token request is well under 2 kB.
const MAX_BODY: usize = 64 * 1024;

/// Page size when a request names no `limit`.
const DEFAULT_LIMIT: usize = 100;

/// Largest `limit`.
const MAX_LIMIT: usize = 1000;

fn to_response(reply: OrgReply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        reply.body,
    )
        .into_response();
    append_headers(&mut response, &reply.headers);
    response
}

/// What the journal needs from a request.
struct Arrival {
    received: Instant,
    method: String,
    path_and_query: String,
    headers: Vec<(String, String)>,
}

impl Arrival {
    fn new(parts: &Parts) -> Self {
        Self {
            received: Instant::now(),
            method: parts.method.to_string(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
            headers: header_pairs(&parts.headers),
        }
    }
}

/// Journals and sends.
fn finish(
    shared: &Shared,
    arrival: Arrival,
    endpoint: OrgEndpoint,
    account: Option<usize>,
    jti: Option<String>,
    reply: OrgReply,
) -> Response {
    let status = reply.status;
    tracing::debug!(
        method = arrival.method,
        path = arrival.path_and_query,
        status,
        "org request"
    );
    let mut s = shared.lock();
    // Arrival on the simulated clock.
    let at = s.now() - chrono::Duration::from_std(arrival.received.elapsed()).unwrap_or_default();
    s.org.record(OrgRequest {
        account,
        endpoint,
        method: arrival.method,
        path_and_query: arrival.path_and_query,
        headers: arrival.headers,
        at,
        received: arrival.received,
        status,
        jti,
    });
    drop(s);
    to_response(reply)
}

// ---------------------------------------------------------------------------------------
// POST /auth/oauth2/token

/// `POST /auth/oauth2/token`, form-encoded client-credentials grant.
pub(crate) async fn token(AxumState(shared): AxumState<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let arrival = Arrival::new(&parts);
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let jti = get("client_assertion").and_then(assertion::peek_jti);
    let account = get("client_id").and_then(|id| shared.lock().org.by_client(id));
    let reply = token_reply(&shared, &parts.method, &form, account, arrival.received).await;
    finish(&shared, arrival, OrgEndpoint::Token, account, jti, reply)
}

async fn token_reply(
    shared: &Shared,
    method: &Method,
    form: &[(String, String)],
    account: Option<usize>,
    received: Instant,
) -> OrgReply {
    if *method != Method::POST {
        return OrgReply::oauth_error("invalid_request", "use POST").with_status(405);
    }
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(account) = account else {
        return match get("client_id") {
            None => OrgReply::oauth_error("invalid_request", "client_id is required"),
            Some(id) => {
                tracing::info!(client_id = id, "token request for an unknown client");
                OrgReply::oauth_error("invalid_client", "unknown client_id")
            }
        };
    };
    let gate = shared
        .lock()
        .org
        .gate(account, OrgEndpoint::Token, received);
    match gate {
        Gate::Reply(reply) => return reply,
        Gate::Pass(Some(delay), _) => tokio::time::sleep(delay).await,
        Gate::Pass(None, _) => {}
    }
    match get("grant_type") {
        Some("client_credentials") => {}
        None => return OrgReply::oauth_error("invalid_request", "grant_type is required"),
        Some(other) => {
            return OrgReply::oauth_error(
                "unsupported_grant_type",
                &format!("grant_type {other:?} is not supported; use client_credentials"),
            )
        }
    }
    let mut s = shared.lock();
    let now = s.now();
    s.org.grant(account, form, now)
}

impl OrgReply {
    fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

// ---------------------------------------------------------------------------------------
// GET /v1/...

/// A `/v1` route, with its path parameter (percent-decoded).
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Devices,
    Device(String),
    Servers,
    ServerDevices(String),
    AssignedLinkage(String),
    AssignedRelated(String),
    Coverage(String),
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<String> = path
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        Some(match s[..] {
            ["v1", "orgDevices"] => Route::Devices,
            ["v1", "orgDevices", serial] => Route::Device(serial.to_owned()),
            ["v1", "orgDevices", serial, "relationships", "assignedServer"] => {
                Route::AssignedLinkage(serial.to_owned())
            }
            ["v1", "orgDevices", serial, "assignedServer"] => {
                Route::AssignedRelated(serial.to_owned())
            }
            ["v1", "orgDevices", serial, "appleCareCoverage"] => Route::Coverage(serial.to_owned()),
            ["v1", "mdmServers"] => Route::Servers,
            ["v1", "mdmServers", id, "relationships", "devices"] => {
                Route::ServerDevices(id.to_owned())
            }
            _ => return None,
        })
    }

    fn endpoint(&self) -> OrgEndpoint {
        match self {
            Route::Devices => OrgEndpoint::OrgDevices,
            Route::Device(_) => OrgEndpoint::OrgDevice,
            Route::Servers => OrgEndpoint::MdmServers,
            Route::ServerDevices(_) => OrgEndpoint::ServerDevices,
            Route::AssignedLinkage(_) | Route::AssignedRelated(_) => OrgEndpoint::AssignedServer,
            Route::Coverage(_) => OrgEndpoint::AppleCare,
        }
    }
}

/// `limit` and `cursor` of a request.
struct Paging {
    limit: Result<usize, String>,
    cursor: Option<String>,
}

impl Paging {
    fn parse(query: Option<&str>) -> Self {
        let mut paging = Self {
            limit: Ok(DEFAULT_LIMIT),
            cursor: None,
        };
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "limit" => {
                    paging.limit = match v.parse::<usize>() {
                        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                        _ => Err(format!(
                            "limit must be an integer from 1 to {MAX_LIMIT}, got {v:?}"
                        )),
                    }
                }
                "cursor" => paging.cursor = Some(v.into_owned()),
                _ => {}
            }
        }
        paging
    }
}

/// Everything the answer needs, copied out under the lock.
enum Data {
    Devices(Slice<OrgDevice>),
    Device(OrgDevice),
    Servers(Slice<ServerInfo>),
    ServerDevices(Slice<Key>),
    Linkage(Option<String>),
    Related(Option<ServerInfo>),
    Coverage(OrgDevice),
}

/// A page's context for rendering.
struct View {
    data: Data,
    limit: usize,
    listing: Listing,
    account: u32,
    instance: u32,
    quirks: OrgQuirks,
    now_ms: i64,
    page_fault: Option<PageFault>,
    sent_cursor: Option<String>,
}

/// Every `/v1` request.
pub(crate) async fn api(AxumState(shared): AxumState<Arc<Shared>>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    let arrival = Arrival::new(&parts);
    let Some(route) = Route::parse(parts.uri.path()) else {
        let reply = OrgReply::for_status(404, "no such path");
        return finish(&shared, arrival, OrgEndpoint::Any, None, None, reply);
    };
    let endpoint = route.endpoint();
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .unwrap_or("")
        .to_owned();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let base = format!("http://{host}");

    // Who is asking; scripted faults and the limiter.
    let first = {
        let mut s = shared.lock();
        let now = s.now();
        match s.org.bearer(&bearer, now) {
            None => Err(()),
            Some((account, _)) => Ok((account, s.org.gate(account, endpoint, arrival.received))),
        }
    };
    let (account, page_fault) = match first {
        Err(()) => {
            let detail = if bearer.is_empty() {
                "no bearer token"
            } else {
                "unknown bearer token"
            };
            let reply = OrgReply::for_status(401, detail);
            return finish(&shared, arrival, endpoint, None, None, reply);
        }
        Ok((account, Gate::Reply(reply))) => {
            return finish(&shared, arrival, endpoint, Some(account), None, reply)
        }
        Ok((account, Gate::Pass(delay, page_fault))) => {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            (account, page_fault)
        }
    };
    if parts.method != Method::GET {
        let reply = OrgReply::for_status(405, "only GET is supported").with_header("Allow", "GET");
        return finish(&shared, arrival, endpoint, Some(account), None, reply);
    }

    let paging = Paging::parse(parts.uri.query());
    let view = {
        let s = shared.lock();
        let now = s.now();
        match s.org.bearer(&bearer, now) {
            Some((_, true)) => collect(&s.org, account, route, paging, now.timestamp_millis()),
            _ => Err(OrgReply::for_status(401, "the access token has expired")),
        }
    };
    let reply = match view {
        Ok(mut view) => {
            view.page_fault = page_fault;
            OrgReply::json(
                200,
                render(&view, &base, &arrival.path_and_query, parts.uri.path()),
            )
        }
        Err(reply) => reply,
    };
    finish(&shared, arrival, endpoint, Some(account), None, reply)
}

fn not_found(what: &str) -> OrgReply {
    OrgReply::for_status(404, what)
}

/// The data of a `/v1` answer, or the error it is.
fn collect(
    org: &super::OrgWorld,
    account: usize,
    route: Route,
    paging: Paging,
    now_ms: i64,
) -> Result<View, OrgReply> {
    let a = &org.accounts[account];
    let inv = &a.inventory;
    let limit = paging
        .limit
        .map_err(|message| OrgReply::for_status(400, &message))?;
    let listing = match &route {
        Route::Devices => Listing::Devices,
        Route::Servers => Listing::Servers,
        Route::ServerDevices(id) => Listing::ServerDevices(
            inv.server_index(id)
                .ok_or_else(|| not_found(&format!("no MDM server {id:?}")))?,
        ),
        _ => Listing::Devices,
    };
    let lists = matches!(
        route,
        Route::Devices | Route::Servers | Route::ServerDevices(_)
    );
    let start = match paging.cursor.as_deref().filter(|_| lists) {
        None => 0,
        Some(c) => {
            let bound = match listing {
                Listing::Servers => inv.server_count() as u32,
                _ => inv.end(),
            };
            OrgCursor::decode(c)
                .filter(|c| {
                    c.listing == listing
                        && c.account as usize == account
                        && c.instance == org.instance
                        && c.start <= bound
                })
                .ok_or_else(|| {
                    OrgReply::for_status(400, "cursor is not one this listing handed out")
                })?
                .start
        }
    };
    let device = |serial: &str| {
        inv.get(serial)
            .copied()
            .ok_or_else(|| not_found(&format!("no device with serial number {serial:?}")))
    };
    let data = match route {
        Route::Devices => Data::Devices(inv.device_page(start, limit)),
        Route::Device(serial) => Data::Device(device(&serial)?),
        Route::Servers => Data::Servers(inv.server_page(start, limit)),
        Route::ServerDevices(_) => {
            let Listing::ServerDevices(server) = listing else {
                unreachable!("set above")
            };
            Data::ServerDevices(inv.server_devices_page(server, start, limit))
        }
        Route::AssignedLinkage(serial) => Data::Linkage(
            device(&serial)?
                .server()
                .map(|s| inv.server_info(s).id.clone()),
        ),
        Route::AssignedRelated(serial) => Data::Related(
            device(&serial)?
                .server()
                .map(|s| inv.server_info(s).clone()),
        ),
        Route::Coverage(serial) => Data::Coverage(device(&serial)?),
    };
    Ok(View {
        data,
        limit,
        listing,
        account: account as u32,
        instance: org.instance,
        quirks: a.quirks,
        now_ms,
        page_fault: None,
        sent_cursor: paging.cursor,
    })
}

/// Appends `items` as a JSON array, rendering each with `f`; a duplicate-serial fault
/// repeats the first at the end.
fn push_array<T>(out: &mut String, items: &[T], dup: bool, mut f: impl FnMut(&mut String, &T)) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        f(out, item);
    }
    if let (true, Some(first)) = (dup, items.first()) {
        out.push(',');
        f(out, first);
    }
    out.push(']');
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// The response document.
fn render(view: &View, base: &str, self_path: &str, path: &str) -> String {
    let mut out = String::with_capacity(1024);
    let dup = view.page_fault == Some(PageFault::DuplicateSerial);
    let next = |n: Option<u32>| {
        if view.page_fault == Some(PageFault::SameCursor) {
            // Apple-style bug: the cursor sent comes back (from the start if none was).
            return Some(view.sent_cursor.clone().unwrap_or_else(|| cursor(view, 0)));
        }
        n.map(|n| cursor(view, n))
    };
    let self_link = format!("{base}{self_path}");
    out.push_str(r#"{"data":"#);
    // A listing's next start; `None` for a single resource or linkage.
    let listed = match &view.data {
        Data::Devices(slice) => {
            push_array(&mut out, &slice.items, dup, |out, d| {
                inventory::render_device(out, d, view.quirks, base)
            });
            Some(slice.next)
        }
        Data::Servers(slice) => {
            push_array(&mut out, &slice.items, dup, |out, s| {
                inventory::render_server(out, s, base)
            });
            Some(slice.next)
        }
        Data::ServerDevices(slice) => {
            push_array(&mut out, &slice.items, dup, |out, k| {
                out.push_str(r#"{"type":"orgDevices","id":""#);
                out.push_str(key_str(k));
                out.push_str("\"}");
            });
            Some(slice.next)
        }
        Data::Device(d) => {
            inventory::render_device(&mut out, d, view.quirks, base);
            links_tail(&mut out, &self_link, None);
            None
        }
        Data::Linkage(server) => {
            match server {
                Some(id) => {
                    out.push_str(r#"{"type":"mdmServers","id":"#);
                    inventory::push_json_str(&mut out, id);
                    out.push('}');
                }
                None => out.push_str("null"),
            }
            let related = self_link.replace("/relationships/assignedServer", "/assignedServer");
            links_tail(&mut out, &self_link, Some(&related));
            None
        }
        Data::Related(server) => {
            match server {
                Some(s) => inventory::render_server(&mut out, s, base),
                None => out.push_str("null"),
            }
            links_tail(&mut out, &self_link, None);
            None
        }
        Data::Coverage(d) => {
            out.push('[');
            inventory::render_coverage(&mut out, d, view.now_ms);
            out.push_str(r#"],"links":{"self":"#);
            inventory::push_json_str(&mut out, &self_link);
            out.push_str(r#"},"meta":{"paging":{"limit":"#);
            out.push_str(&view.limit.to_string());
            out.push_str(r#","total":"#);
            out.push_str(&inventory::coverage_count(d).to_string());
            out.push_str("}}}");
            None
        }
    };
    if let Some(next_start) = listed {
        list_tail(
            &mut out,
            &self_link,
            base,
            path,
            view.limit,
            next(next_start),
        );
    }
    out
}

fn cursor(view: &View, start: u32) -> String {
    OrgCursor {
        listing: view.listing,
        start,
        account: view.account,
        instance: view.instance,
    }
    .encode()
}

/// `,"links":{...},"meta":{"paging":{...}}}` of a listing.
fn list_tail(
    out: &mut String,
    self_link: &str,
    base: &str,
    path: &str,
    limit: usize,
    next: Option<String>,
) {
    out.push_str(r#","links":{"self":"#);
    inventory::push_json_str(out, self_link);
    if let Some(c) = &next {
        let url = format!("{base}{path}?cursor={}&limit={limit}", enc(c));
        out.push_str(r#","next":"#);
        inventory::push_json_str(out, &url);
    }
    out.push_str(r#"},"meta":{"paging":{"limit":"#);
    out.push_str(&limit.to_string());
    if let Some(c) = &next {
        out.push_str(r#","nextCursor":"#);
        inventory::push_json_str(out, c);
    }
    out.push_str("}}}");
}

/// `,"links":{"self":..,"related":..}}` of a single resource or linkage.
fn links_tail(out: &mut String, self_link: &str, related: Option<&str>) {
    out.push_str(r#","links":{"self":"#);
    inventory::push_json_str(out, self_link);
    if let Some(r) = related {
        out.push_str(r#","related":"#);
        inventory::push_json_str(out, r);
    }
    out.push_str("}}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse() {
        assert_eq!(Route::parse("/v1/orgDevices"), Some(Route::Devices));
        assert_eq!(Route::parse("/v1/orgDevices/"), Some(Route::Devices));
        assert_eq!(
            Route::parse("/v1/orgDevices/ABC%31/appleCareCoverage"),
            Some(Route::Coverage("ABC1".into()))
        );
        assert_eq!(
            Route::parse("/v1/mdmServers/X/relationships/devices"),
            Some(Route::ServerDevices("X".into()))
        );
        assert_eq!(Route::parse("/v1/orgDevices/A/B"), None);
        assert_eq!(Route::parse("/v1"), None);
        assert!(Paging::parse(Some("limit=1001")).limit.is_err());
        assert!(Paging::parse(Some("limit=0")).limit.is_err());
        let p = Paging::parse(Some("limit=5&cursor=%2B%2F%3D"));
        assert_eq!((p.limit, p.cursor.as_deref()), (Ok(5), Some("+/=")));
    }
}
