//! A stateful simulator of Apple's ADE/DEP "Device Assignment" web service
//! (`mdmenrollment.apple.com`), for tests, benchmarks and demos of a DEP client. The
//! specification it follows is `docs/apple-dep-api.md`; section numbers in comments refer to it.
//!
//! It speaks Apple's protocol on loopback: OAuth 1.0a `GET /session`, `GET /account`, paged
//! `POST /server/devices` (fetch) and `POST /devices/sync` over a device store with a change
//! log, Apple's cursor errors, session rotation and expiry, protocol-version gates, and
//! scripted faults; and the enrollment-profile endpoints (define, get, assign, remove; see
//! below). A [`MockHandle`] changes the world between calls (devices added, modified,
//! deleted or silently released, replaced by Apple or assigned again; the clock advanced) and
//! shows what the client sent.
//!
//! Protocol 10 (`X-Server-Protocol-Version: 10` and up, docs/apple-dep-api.md §1.1, §4.2):
//! every device record, on fetch and sync pages, carries `imei` (one or two, iPhones and
//! cellular iPads), `meid` (iPhones), `eid` (cellular devices), `wifi_mac_address` and
//! `bluetooth_mac_address` (every device), `ethernet_mac_address` (Macs) and
//! `is_replacement_device`, all derived from the serial; `deleted` sync records add
//! `released_by_replacement`; `GET /device/replacementDetails?device=SERIAL` exists (see
//! [`MockHandle::replace_devices`]). Earlier protocols see none of these, edited devices
//! included, and get `404` (empty body) for that path, as for any unknown one.
//!
//! Profiles (docs/apple-dep-api.md §4.9): `POST /profile` (or `PUT`) defines a profile and
//! answers a new 32-hex-digit `profile_uuid`; `GET /profile?profile_uuid=U` reads it back;
//! `POST /profile/devices` (or `PUT`) assigns it to serials and `DELETE /profile/devices`
//! takes it off, each device answered `SUCCESS`, `NOT_ACCESSIBLE` (not assigned to the
//! server), or a scripted `FAILED`/`THROTTLED`/`NOT_ACCESSIBLE`
//! ([`MockHandle::script_assignments`]); `THROTTLED` from protocol 9, `retry_after_seconds`
//! from 10. A successful assignment or removal changes the device's `profile_*` fields and
//! shows up as one `modified` sync record (none when nothing changes: the uuid a device
//! already has, a profile already removed). Errors, bare tokens like the others (`400`
//! unless noted): define `MALFORMED_REQUEST_BODY` (not a JSON object; `devices` not an array
//! of strings or over 1000), `CONFIG_NAME_REQUIRED`, `CONFIG_NAME_INVALID` (not a string, over
//! 125 characters), `CONFIG_URL_REQUIRED`, `CONFIG_URL_INVALID` (not a string, over 2000);
//! get `PROFILE_UUID_REQUIRED`, `404 PROFILE_NOT_FOUND`; assign `MALFORMED_REQUEST_BODY`,
//! `PROFILE_UUID_REQUIRED`, `DEVICE_ID_REQUIRED`, [`TOO_MANY_DEVICES`] (over 1000 serials),
//! `404 PROFILE_NOT_FOUND`; remove `MALFORMED_REQUEST_BODY`, `DEVICE_ID_REQUIRED`; each in
//! that order. UUIDs match without regard to dashes or case.
//!
//! On the same listener it also simulates Apple's newer "Apple School Manager and Apple
//! Business API" (AxM) for the accounts in [`MockConfig::org_accounts`]: OAuth 2 client
//! credentials with an ES256 JWT assertion at `POST /auth/oauth2/token`, then JSON:API
//! `GET /v1/orgDevices`, `/v1/mdmServers`, relationships and AppleCare coverage with bearer
//! tokens; the `org_*` methods of [`MockHandle`] change and observe it.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let mock = adesync_mock::start(adesync_mock::MockConfig { devices: 2500, ..Default::default() }).await?;
//! let url = mock.base_url(); // point the client here, with Credentials::depsim()
//! mock.add_devices(3);       // the next sync reports three `added` records
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `config`: [`Credentials`] and [`MockConfig`], plain data.
//! - `oauth`: RFC 5849 HMAC-SHA1 signature verification and nonce memory.
//! - `devices`: realistic device records (catalogue, serials, profile life cycle).
//! - `store`: membership + change log, and fetch/sync paging by cursor.
//! - `cursor`: the opaque cursor strings.
//! - `faults`: [`Endpoint`], [`Fault`], fault queues and the request journal.
//! - `profiles`: enrollment profiles, scripted assignment answers ([`AssignStatus`]) and the
//!   logic of the profile endpoints.
//! - `server`: the HTTP routes, Apple's and the `/_mock` admin API.
//! - `rfc3339`: fast timestamp formatting.
//! - `org`: the Apple School and Business Manager API: accounts and keys, token endpoint
//!   (`org::assertion`), inventory of MDM servers and devices (`org::inventory`,
//!   `org::catalogue`), cursors, faults/limiter/journal, `/v1` routes (`org::http`) and the
//!   `/_mock/org` admin API (`org::admin`).
//! - `test_http` (tests only): what the loopback scenarios of both APIs share.

mod config;
mod cursor;
mod devices;
mod faults;
mod oauth;
mod org;
mod profiles;
mod rfc3339;
mod server;
mod store;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::net::TcpListener;

pub use config::{Credentials, MockConfig, OrgAccountConfig, OrgQuirks};
pub use faults::{Endpoint, Fault, FaultKind, RecordedRequest};
pub use org::{
    OrgAccountInfo, OrgDeviceTruth, OrgEndpoint, OrgRequest, OrgServer, OrgStats, AUDIENCE,
    TOKEN_TTL_SECS,
};
pub use profiles::{
    AssignStatus, DEFAULT_RETRY_AFTER_SECONDS, MAX_ASSIGN_DEVICES, TOO_MANY_DEVICES,
};

use org::OrgWorld;
use server::Shared;
use store::Store;

/// Starts a simulated service on `127.0.0.1` at a free port, on the current tokio runtime.
pub async fn start(config: MockConfig) -> std::io::Result<MockHandle> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    start_on(listener, config).await
}

/// Starts a simulated service on `listener`, on the current tokio runtime. Returns once the
/// initial devices exist and connections are accepted.
pub async fn start_on(listener: TcpListener, config: MockConfig) -> std::io::Result<MockHandle> {
    let addr = listener.local_addr()?;
    let (count, seed) = (config.devices, config.seed);
    let org_config = config.clone();
    // A million devices take a noticeable fraction of a second: keep the executor free.
    let (store, org) = tokio::task::spawn_blocking(move || {
        let store = Store::new(count, seed);
        let ade = if org_config
            .org_accounts
            .iter()
            .any(|a| a.include_ade_devices)
        {
            store.summaries()
        } else {
            Vec::new()
        };
        let ade_server = (
            org_config.server_uuid.as_str(),
            org_config.server_name.as_str(),
        );
        let org = OrgWorld::new(&org_config.org_accounts, &ade, ade_server, rand::random());
        (store, org)
    })
    .await
    .map_err(std::io::Error::other)?;
    let org = org.map_err(std::io::Error::other)?;
    let shared = Arc::new(Shared::new(config, store, org));
    let app = server::router(shared.clone());
    let mut stop = shared.shutdown.subscribe();
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // An error means every sender is gone: nobody can ask any more, so stop.
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "mock server stopped with an error");
        }
        task_shared.stopped.send_replace(true);
    });
    tracing::debug!(%addr, devices = count, "mock ADE service listening");
    Ok(MockHandle { shared, addr })
}

/// Controls and observes a running simulated service. Cheap to clone; every method is
/// synchronous and holds the state lock only briefly, so it can be called from tests between
/// client calls.
#[derive(Clone)]
pub struct MockHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl MockHandle {
    /// `http://127.0.0.1:PORT`, the API base URL to give the client.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &MockConfig {
        &self.shared.config
    }

    /// Assigns `n` new devices to the MDM server now (sync: `added`); returns their serials.
    pub fn add_devices(&self, n: usize) -> Vec<String> {
        self.shared.add_devices(n)
    }

    /// Applies a realistic change to each listed device (profile assigned → status, uuid and
    /// assign time; assigned → pushed with push time; pushed → removed, or a new asset tag);
    /// sync: `modified`. Returns how many of the serials were assigned.
    pub fn modify_devices(&self, serials: &[String]) -> usize {
        self.shared.modify_devices(serials)
    }

    /// Edits one device arbitrarily (sync: `modified`, one record per call, even when `f`
    /// changes nothing); `false` if it is not assigned. `f` sees every field of the newest
    /// protocol (e.g. set `profile_status` to `assigned`, `pushed`, `removed` or `empty`,
    /// and the profile fields to match). `serial_number` is the device's identity and is
    /// restored if `f` changes it; `op_type`, `op_date` and `released_by_replacement` belong
    /// to sync records and are dropped.
    pub fn modify_device(&self, serial: &str, f: impl FnOnce(&mut Map<String, Value>)) -> bool {
        let mut s = self.shared.lock();
        let now = s.now().timestamp();
        s.store.modify_with(serial, now, |map, _, _| f(map))
    }

    /// Unassigns the listed devices (sync: `deleted`, with their last known fields); returns
    /// how many were assigned.
    pub fn delete_devices(&self, serials: &[String]) -> usize {
        self.shared.delete_devices(serials)
    }

    /// Unassigns without any sync record, as releasing a device from the organisation in ABM
    /// does (docs/apple-dep-api.md §7.3): only a full fetch reveals it. Returns how many were assigned.
    pub fn remove_silently(&self, serials: &[String]) -> usize {
        self.shared.remove_silently(serials)
    }

    /// Apple replaces each listed assigned device now: the original leaves (sync: `deleted`,
    /// with `released_by_replacement: true` at protocol 10) and a new device of the same
    /// family and model is assigned (sync: `added`, `is_replacement_device: true`), whose
    /// `GET /device/replacementDetails` names the original and the simulated clock's date.
    /// Returns the new serials, in the order of the originals; unassigned serials are skipped.
    pub fn replace_devices(&self, serials: &[String]) -> Vec<String> {
        self.shared
            .replace_devices(serials)
            .into_iter()
            .map(|(_, new)| new)
            .collect()
    }

    /// Devices that left the server (deleted, released silently or replaced) are assigned
    /// again now, same serial and hardware (sync: `added`; fetch lists them again, last).
    /// `device_assigned_date` becomes now and, as for any arrival, `profile_status` is
    /// `empty` with no profile fields. Returns how many of the serials had left.
    pub fn reassign_devices(&self, serials: &[String]) -> usize {
        self.shared.reassign_devices(serials)
    }

    /// What `GET /device/replacementDetails?device=SERIAL` answers for a replacement device
    /// (`serial_number`, `original_device_serial_number`, `replacement_date`); `None` (the
    /// endpoint's `404 DEVICE_NOT_FOUND`) for any other serial. Replacements keep their
    /// details after leaving the server.
    pub fn replacement_details(&self, serial: &str) -> Option<Value> {
        self.shared.replacement_details(serial)
    }

    /// The truth: every assigned device in fetch form (no `op_type` / `op_date`), sorted by
    /// serial number, with every field of the newest protocol (the protocol-10 hardware
    /// identifiers and `is_replacement_device` included). To compare with what a client of
    /// an older protocol stored, use [`Self::devices_at`].
    pub fn devices(&self) -> Vec<Value> {
        self.devices_at(u32::MAX)
    }

    /// Every assigned device in fetch form, sorted by serial number, exactly as a fetch with
    /// `X-Server-Protocol-Version: proto` shows it.
    pub fn devices_at(&self, proto: u32) -> Vec<Value> {
        serde_json::from_str(&self.shared.devices_array(proto)).expect("devices render as JSON")
    }

    /// Serial numbers of every assigned device, sorted.
    pub fn serials(&self) -> Vec<String> {
        self.shared.lock().store.serials_sorted()
    }

    /// Moves the simulated clock (real UTC now + offset) by `d`; op dates, session and cursor
    /// lifetimes follow it, OAuth timestamps do not.
    pub fn advance_clock(&self, d: chrono::Duration) {
        self.shared.lock().clock_offset += d;
    }

    /// The simulated clock's now.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.shared.lock().now()
    }

    /// Forgets every session token issued so far: the next authenticated call gets `401`.
    pub fn expire_sessions(&self) {
        self.shared.lock().sessions.clear();
    }

    /// Queues a fault for `endpoint`; faults of one endpoint are used in order, and
    /// [`Endpoint::Any`] faults apply to any Apple endpoint once its own queue is empty.
    pub fn push_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.shared.lock().faults.push(endpoint, fault);
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Scripts the answers for the next `count` devices of profile-assign calls
    /// (`POST`/`PUT /profile/devices`), in request order, after any answers scripted before:
    /// each gets `status` instead of `SUCCESS` and keeps its profile. Only devices that would
    /// have succeeded use up a scripted answer (a serial not assigned to the server is
    /// `NOT_ACCESSIBLE` regardless); defines are never scripted. A `THROTTLED` answers
    /// `FAILED` below protocol 9; at protocol 10 and later a response with a `THROTTLED`
    /// device carries `retry_after_seconds` (this batch's value, default
    /// [`DEFAULT_RETRY_AFTER_SECONDS`]; the largest when batches mix).
    pub fn script_assignments(
        &self,
        status: AssignStatus,
        count: usize,
        retry_after_seconds: Option<u64>,
    ) {
        self.shared
            .lock()
            .profiles
            .script(status, count, retry_after_seconds);
    }

    /// Every profile defined so far (`POST /profile`), in definition order: its UUID and the
    /// profile JSON object exactly as the client sent it (`GET /profile` adds
    /// `profile_uuid`).
    pub fn profiles(&self) -> Vec<(String, Value)> {
        self.shared.lock().profiles.list()
    }

    /// Every request to a non-admin path, in the order they were answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// How many recorded requests hit `endpoint` ([`Endpoint::Any`]: all of them).
    pub fn count_requests(&self, endpoint: Endpoint) -> usize {
        let s = self.shared.lock();
        match endpoint {
            Endpoint::Any => s.requests.len(),
            e => s.requests.iter().filter(|r| r.endpoint == e).count(),
        }
    }

    // -----------------------------------------------------------------------------------
    // The Apple School and Business Manager API (organisation accounts). Methods taking an
    // `account` index panic with a clear message if there is no such account (see
    // `MockConfig::org_accounts`).

    /// Runs `f` on the organisation world at the simulated now; panics with its error.
    fn org<R>(
        &self,
        f: impl FnOnce(&mut OrgWorld, chrono::DateTime<chrono::Utc>) -> Result<R, String>,
    ) -> R {
        let mut s = self.shared.lock();
        let now = s.now();
        f(&mut s.org, now).unwrap_or_else(|message| panic!("{message}"))
    }

    /// `BASE/auth/oauth2/token`, the token URL to give the client (Apple's is
    /// `https://account.apple.com/auth/oauth2/token`; the assertion's `aud` stays [`AUDIENCE`]).
    pub fn org_token_url(&self) -> String {
        format!("{}/auth/oauth2/token", self.base_url())
    }

    /// How many organisation accounts there are.
    pub fn org_account_count(&self) -> usize {
        self.shared.lock().org.accounts.len()
    }

    /// Client id, key id and key of account `account`.
    pub fn org_account(&self, account: usize) -> OrgAccountInfo {
        self.org(|o, _| Ok(o.account(account)?.info()))
    }

    /// The MDM servers of `account`: the ADE server (id [`MockConfig::server_uuid`]), "Other
    /// MDM" and "Apple Configurator", in that order.
    pub fn org_servers(&self, account: usize) -> Vec<OrgServer> {
        self.org(|o, _| Ok(o.account(account)?.servers()))
    }

    /// Adds `n` devices to `account` that joined the organisation now, assigned to the server
    /// with id `server` or unassigned; returns their serials. Panics on an unknown server.
    pub fn add_org_devices(&self, account: usize, n: usize, server: Option<&str>) -> Vec<String> {
        self.org(|o, now| o.add_devices(account, n, server, now))
    }

    /// Changes one attribute (colour, capacity or order number) of each listed device and
    /// bumps its `updatedDateTime`; returns how many were listed.
    pub fn modify_org_devices(&self, account: usize, serials: &[String]) -> usize {
        self.org(|o, now| {
            let inv = &mut o.account_mut(account)?.inventory;
            Ok(inv.modify(serials, now.timestamp_millis()))
        })
    }

    /// Up to `n` distinct listed serials of `account` chosen at random (insertion order).
    pub fn pick_org_devices(&self, account: usize, n: usize) -> Vec<String> {
        self.org(|o, _| Ok(o.account_mut(account)?.inventory.pick(n)))
    }

    /// Releases devices from the organisation: `releasedFromOrgDateTime` set, unassigned,
    /// gone from `/v1/orgDevices` and every server's devices (`/v1/orgDevices/{serial}` still
    /// answers). Returns how many were listed.
    pub fn release_org_devices(&self, account: usize, serials: &[String]) -> usize {
        self.org(|o, now| {
            let inv = &mut o.account_mut(account)?.inventory;
            Ok(inv.release(serials, now.timestamp_millis()))
        })
    }

    /// Assigns listed devices to the server with id `server` (`None`: unassigns them),
    /// bumping `updatedDateTime`; returns how many changed. Panics on an unknown server.
    pub fn assign_org_devices(
        &self,
        account: usize,
        serials: &[String],
        server: Option<&str>,
    ) -> usize {
        self.org(|o, now| o.assign(account, serials, server, now))
    }

    /// Makes every access token of every account invalid (`401` from then on); returns how
    /// many were still valid.
    pub fn expire_org_tokens(&self) -> usize {
        self.org(|o, now| Ok(o.expire_tokens(now)))
    }

    /// Sets the response quirks of `account`.
    pub fn set_org_quirks(&self, account: usize, quirks: OrgQuirks) {
        self.org(|o, _| {
            o.account_mut(account)?.quirks = quirks;
            Ok(())
        });
    }

    /// Sets (or with `None` lifts) the requests-per-second limit of `account`.
    pub fn set_org_rate_limit(&self, account: usize, requests_per_second: Option<f64>) {
        self.org(|o, _| {
            o.account_mut(account)?.set_rate(requests_per_second);
            Ok(())
        });
    }

    /// Queues a fault for `endpoint` of `account` (see [`Self::push_fault`]). A `Status`
    /// fault with an empty body gets a JSON:API error body for its status; `SameCursor` and
    /// `DuplicateSerial` only shape listings (`orgDevices`, `mdmServers`, a server's devices).
    pub fn push_org_fault(&self, account: usize, endpoint: OrgEndpoint, fault: Fault) {
        self.org(|o, _| {
            o.account_mut(account)?.faults.push(endpoint, fault);
            Ok(())
        });
    }

    /// Drops every queued fault of `account`.
    pub fn clear_org_faults(&self, account: usize) {
        self.org(|o, _| {
            o.account_mut(account)?.faults.clear();
            Ok(())
        });
    }

    /// The journal of `account`: its requests (attributed by bearer token or `client_id`) in
    /// the order they were answered.
    pub fn org_requests(&self, account: usize) -> Vec<OrgRequest> {
        let s = self.shared.lock();
        s.org
            .journal
            .iter()
            .filter(|r| r.account == Some(account))
            .cloned()
            .collect()
    }

    /// Every request to the organisation API, attributed or not.
    pub fn all_org_requests(&self) -> Vec<OrgRequest> {
        self.shared.lock().org.journal.clone()
    }

    /// Forgets the organisation API journal (counters stay).
    pub fn clear_org_requests(&self) {
        self.shared.lock().org.journal.clear();
    }

    /// Counters of `account` since start.
    pub fn org_stats(&self, account: usize) -> OrgStats {
        self.org(|o, _| Ok(o.account(account)?.stats()))
    }

    /// The truth: every listed device of `account`, sorted by serial, with its server id and
    /// attributes in the documented shape.
    pub fn org_devices(&self, account: usize) -> Vec<OrgDeviceTruth> {
        self.org(|o, _| Ok(o.account(account)?.truth()))
    }

    /// Serials of the devices released from `account`, sorted.
    pub fn org_released(&self, account: usize) -> Vec<String> {
        self.org(|o, _| Ok(o.account(account)?.inventory.released_serials()))
    }

    /// Asks the server to stop: no new connections; requests in flight finish.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// Resolves once the server has stopped (after [`Self::shutdown`]).
    pub async fn stopped(&self) {
        let mut rx = self.shared.stopped.subscribe();
        // The sender lives in `shared`, which `self` keeps alive: this cannot fail.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

#[cfg(test)]
mod test_http;
#[cfg(test)]
mod tests;
