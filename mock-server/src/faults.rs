//! Scripted misbehaviour and the request journal: which Apple endpoint a request hit, the
//! faults queued per endpoint (modelled on depsim's per-endpoint response lists, docs/apple-dep-api.md §10.7),
//! and what was received.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::Duration;

use axum::http::Method;
use serde_json::Value;

use crate::store::PageFault;

/// An Apple endpoint of the simulated service, for faults and request counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /session`.
    Session,
    /// `GET /account`.
    Account,
    /// `POST /server/devices`.
    FetchDevices,
    /// `POST /devices/sync`.
    SyncDevices,
    /// `GET /device/replacementDetails` (protocol 10 and later).
    ReplacementDetails,
    /// `POST /profile` (or `PUT`, as depsim takes it): define a profile. Also every other
    /// method on `/profile` but `GET` (answered `405`).
    DefineProfile,
    /// `GET /profile?profile_uuid=U`.
    GetProfile,
    /// `POST /profile/devices` (or the older `PUT`): assign a profile. Also every other
    /// method on `/profile/devices` but `DELETE` (answered `405`).
    AssignProfile,
    /// `DELETE /profile/devices`: take the profile off devices.
    RemoveProfile,
    /// Faults: any of the above (consulted after the endpoint's own queue). Counts and
    /// records: every request, including paths the service does not know.
    Any,
}

impl Endpoint {
    /// The endpoint served for `method` at `path`, if any. `/profile` and `/profile/devices`
    /// each serve two endpoints, told apart by method; a method neither accepts is
    /// attributed to the define / assign endpoint (which answers `405`).
    pub(crate) fn from_request(method: &Method, path: &str) -> Option<Self> {
        match path {
            "/session" => Some(Endpoint::Session),
            "/account" => Some(Endpoint::Account),
            "/server/devices" => Some(Endpoint::FetchDevices),
            "/devices/sync" => Some(Endpoint::SyncDevices),
            "/device/replacementDetails" => Some(Endpoint::ReplacementDetails),
            "/profile" if *method == Method::GET => Some(Endpoint::GetProfile),
            "/profile" => Some(Endpoint::DefineProfile),
            "/profile/devices" if *method == Method::DELETE => Some(Endpoint::RemoveProfile),
            "/profile/devices" => Some(Endpoint::AssignProfile),
            _ => None,
        }
    }

    /// Whether the endpoint answers `method` (others get `405`).
    pub(crate) fn accepts(self, method: &Method) -> bool {
        match self {
            Endpoint::Session
            | Endpoint::Account
            | Endpoint::ReplacementDetails
            | Endpoint::GetProfile => *method == Method::GET,
            Endpoint::FetchDevices | Endpoint::SyncDevices => *method == Method::POST,
            Endpoint::DefineProfile | Endpoint::AssignProfile => {
                *method == Method::POST || *method == Method::PUT
            }
            Endpoint::RemoveProfile => *method == Method::DELETE,
            Endpoint::Any => false,
        }
    }

    /// The `Allow` header of a `405` from the endpoint's path: every method the path takes.
    pub(crate) fn allow(self) -> &'static str {
        match self {
            Endpoint::DefineProfile | Endpoint::GetProfile => "GET, POST, PUT",
            Endpoint::AssignProfile | Endpoint::RemoveProfile => "DELETE, POST, PUT",
            Endpoint::FetchDevices | Endpoint::SyncDevices => "POST",
            _ => "GET",
        }
    }

    /// The admin API's name for it (`fetch_devices`, ...).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Endpoint::Session => "session",
            Endpoint::Account => "account",
            Endpoint::FetchDevices => "fetch_devices",
            Endpoint::SyncDevices => "sync_devices",
            Endpoint::ReplacementDetails => "replacement_details",
            Endpoint::DefineProfile => "define_profile",
            Endpoint::GetProfile => "get_profile",
            Endpoint::AssignProfile => "assign_profile",
            Endpoint::RemoveProfile => "remove_profile",
            Endpoint::Any => "any",
        }
    }

    /// Every endpoint but [`Endpoint::Any`].
    pub(crate) const APPLE: [Endpoint; 9] = [
        Endpoint::Session,
        Endpoint::Account,
        Endpoint::FetchDevices,
        Endpoint::SyncDevices,
        Endpoint::ReplacementDetails,
        Endpoint::DefineProfile,
        Endpoint::GetProfile,
        Endpoint::AssignProfile,
        Endpoint::RemoveProfile,
    ];

    /// Inverse of [`Self::name`].
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::APPLE
            .into_iter()
            .chain([Endpoint::Any])
            .find(|e| e.name() == name)
    }
}

/// A misbehaviour to apply to the next `times` matching calls.
#[derive(Clone, Debug)]
pub struct Fault {
    /// How many consecutive matching calls it affects; 0 is treated as 1.
    pub times: u32,
    /// What happens.
    pub kind: FaultKind,
}

/// What a fault does to a call.
#[derive(Clone, Debug)]
pub enum FaultKind {
    /// Answer with this status, body (sent verbatim) and headers instead of the real thing;
    /// e.g. `503` + `Retry-After: 1`, `403 T_C_NOT_SIGNED`, `401 UNAUTHORIZED`.
    Status {
        /// HTTP status code.
        status: u16,
        /// Body, verbatim.
        body: String,
        /// Extra response headers.
        headers: Vec<(String, String)>,
    },
    /// `200` with a truncated, invalid JSON body.
    MalformedJson,
    /// Sleep this long (real time), then answer normally.
    Delay(Duration),
    /// Fetch/sync only: answer `200` with the normal page but the cursor the request sent and
    /// `more_to_follow: true`, Apple's 2024 bug (docs/apple-dep-api.md §5.1).
    SameCursor,
    /// Fetch/sync only: the page repeats one serial. Sync: an older-op_date record of the
    /// page's newest device placed after it, so array order is not op_date order; fetch: the
    /// page's first device again at the end.
    DuplicateSerial,
}

impl FaultKind {
    fn applies_to<E: FaultEndpoint>(&self, endpoint: E) -> bool {
        match self {
            FaultKind::SameCursor | FaultKind::DuplicateSerial => endpoint.serves_pages(),
            _ => true,
        }
    }

    /// The store's view of a page-shaping fault.
    pub(crate) fn page_fault(&self) -> Option<PageFault> {
        match self {
            FaultKind::SameCursor => Some(PageFault::SameCursor),
            FaultKind::DuplicateSerial => Some(PageFault::DuplicateSerial),
            _ => None,
        }
    }
}

/// An endpoint enum with its own fault queues: a fieldless enum whose variants number
/// [`Self::COUNT`], with a catch-all [`Self::ANY`] among them.
pub(crate) trait FaultEndpoint: Copy {
    /// How many variants, so how many queues.
    const COUNT: usize;
    /// The catch-all, consulted after the endpoint's own queue.
    const ANY: Self;
    /// The variant's queue index, below [`Self::COUNT`].
    fn slot(self) -> usize;
    /// Whether the page faults (`SameCursor`, `DuplicateSerial`) apply here.
    fn serves_pages(self) -> bool;
}

impl FaultEndpoint for Endpoint {
    // `Any` is the last variant.
    const COUNT: usize = Endpoint::Any as usize + 1;
    const ANY: Self = Endpoint::Any;

    fn slot(self) -> usize {
        self as usize
    }

    fn serves_pages(self) -> bool {
        matches!(self, Endpoint::FetchDevices | Endpoint::SyncDevices)
    }
}

/// One FIFO of faults per endpoint, plus one for the endpoint type's `ANY`.
pub(crate) struct FaultQueues<E> {
    queues: Vec<VecDeque<Fault>>,
    endpoint: PhantomData<E>,
}

impl<E: FaultEndpoint> Default for FaultQueues<E> {
    fn default() -> Self {
        Self {
            queues: (0..E::COUNT).map(|_| VecDeque::new()).collect(),
            endpoint: PhantomData,
        }
    }
}

impl<E: FaultEndpoint> FaultQueues<E> {
    pub fn push(&mut self, endpoint: E, mut fault: Fault) {
        fault.times = fault.times.max(1);
        self.queues[endpoint.slot()].push_back(fault);
    }

    /// Consumes one use of the fault due for a call to `endpoint`: the front of its own queue
    /// (a page fault there on a non-page endpoint is used up without effect), else the first
    /// applicable fault of the `ANY` queue.
    pub fn take(&mut self, endpoint: E) -> Option<FaultKind> {
        let own = &mut self.queues[endpoint.slot()];
        if let Some(kind) = use_once(own, 0) {
            return kind.applies_to(endpoint).then_some(kind);
        }
        let any = &mut self.queues[E::ANY.slot()];
        let at = any.iter().position(|f| f.kind.applies_to(endpoint))?;
        use_once(any, at)
    }

    pub fn clear(&mut self) {
        self.queues.iter_mut().for_each(VecDeque::clear);
    }
}

/// Consumes one use of the fault at `at` in `queue`, dropping it once used up.
fn use_once(queue: &mut VecDeque<Fault>, at: usize) -> Option<FaultKind> {
    let fault = queue.get_mut(at)?;
    fault.times -= 1;
    let kind = fault.kind.clone();
    if fault.times == 0 {
        queue.remove(at);
    }
    Some(kind)
}

/// A request the service received, with the status it answered.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Headers in arrival order, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body as text (lossy UTF-8).
    pub body: String,
    /// Status the service answered with.
    pub status: u16,
    /// The endpoint hit; [`Endpoint::Any`] for an unknown path.
    pub endpoint: Endpoint,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }

    /// The serial numbers the body's `devices` array lists, in order (profile assignment
    /// and removal, device details); empty when the body has no such array.
    pub fn serials(&self) -> Vec<String> {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| match v.get("devices") {
                Some(Value::Array(list)) => Some(
                    list.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    }
}

/// The first value of header `name` (case-insensitive) among journalled `headers`.
pub(crate) fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> FaultKind {
        FaultKind::Status {
            status: code,
            body: String::new(),
            headers: vec![],
        }
    }

    #[test]
    fn faults_are_used_in_order_and_the_endpoint_queue_comes_first() {
        let mut q = FaultQueues::<Endpoint>::default();
        q.push(
            Endpoint::Any,
            Fault {
                times: 1,
                kind: FaultKind::SameCursor,
            },
        );
        q.push(
            Endpoint::Any,
            Fault {
                times: 1,
                kind: status(500),
            },
        );
        q.push(
            Endpoint::FetchDevices,
            Fault {
                times: 2,
                kind: status(503),
            },
        );
        let code = |k: Option<FaultKind>| match k {
            Some(FaultKind::Status { status, .. }) => Some(status),
            Some(_) => Some(0),
            None => None,
        };
        assert_eq!(code(q.take(Endpoint::FetchDevices)), Some(503));
        assert_eq!(code(q.take(Endpoint::FetchDevices)), Some(503));
        // A session call skips the page fault it cannot use.
        assert_eq!(code(q.take(Endpoint::Session)), Some(500));
        assert!(matches!(
            q.take(Endpoint::SyncDevices),
            Some(FaultKind::SameCursor)
        ));
        assert!(q.take(Endpoint::FetchDevices).is_none());
    }
}
