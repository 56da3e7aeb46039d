//! Scripted misbehaviour, rate limiting and the request journal of the Apple School and
//! Business Manager API simulation: the endpoints, one fault queue per endpoint per account
//! (the same [`Fault`](crate::Fault) model and queues as the ADE side), a token-bucket
//! limiter, and what was received.

use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::faults::{header_value, FaultEndpoint, FaultQueues};

/// An endpoint of the simulated Apple School and Business Manager API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrgEndpoint {
    /// `POST /auth/oauth2/token`.
    Token,
    /// `GET /v1/orgDevices`.
    OrgDevices,
    /// `GET /v1/orgDevices/{serial}`.
    OrgDevice,
    /// `GET /v1/mdmServers`.
    MdmServers,
    /// `GET /v1/mdmServers/{id}/relationships/devices`.
    ServerDevices,
    /// `GET /v1/orgDevices/{serial}/relationships/assignedServer` and
    /// `GET /v1/orgDevices/{serial}/assignedServer`.
    AssignedServer,
    /// `GET /v1/orgDevices/{serial}/appleCareCoverage`.
    AppleCare,
    /// Faults: any of the above (consulted after the endpoint's own queue). Records: a path
    /// the service does not know.
    Any,
}

impl OrgEndpoint {
    /// Every endpoint, [`OrgEndpoint::Any`] last.
    pub const ALL: [OrgEndpoint; 8] = [
        OrgEndpoint::Token,
        OrgEndpoint::OrgDevices,
        OrgEndpoint::OrgDevice,
        OrgEndpoint::MdmServers,
        OrgEndpoint::ServerDevices,
        OrgEndpoint::AssignedServer,
        OrgEndpoint::AppleCare,
        OrgEndpoint::Any,
    ];

    /// The admin API's name for it (`org_devices`, ...).
    pub fn name(self) -> &'static str {
        match self {
            OrgEndpoint::Token => "token",
            OrgEndpoint::OrgDevices => "org_devices",
            OrgEndpoint::OrgDevice => "org_device",
            OrgEndpoint::MdmServers => "mdm_servers",
            OrgEndpoint::ServerDevices => "server_devices",
            OrgEndpoint::AssignedServer => "assigned_server",
            OrgEndpoint::AppleCare => "applecare",
            OrgEndpoint::Any => "any",
        }
    }

    /// Inverse of [`Self::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }
}

impl FaultEndpoint for OrgEndpoint {
    const COUNT: usize = Self::ALL.len();
    const ANY: Self = OrgEndpoint::Any;

    fn slot(self) -> usize {
        self as usize
    }

    /// Listing endpoints, where the page faults (`SameCursor`, `DuplicateSerial`) apply.
    fn serves_pages(self) -> bool {
        matches!(
            self,
            OrgEndpoint::OrgDevices | OrgEndpoint::MdmServers | OrgEndpoint::ServerDevices
        )
    }
}

/// One FIFO of faults per endpoint, plus one for [`OrgEndpoint::Any`].
pub(crate) type OrgFaultQueues = FaultQueues<OrgEndpoint>;

/// A token bucket: `rate` requests per second, bursts of `max(rate, 1)`, real time.
pub(crate) struct Limiter {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Limiter {
    pub fn new(rate: f64) -> Self {
        let rate = rate.max(0.001);
        Self {
            rate,
            tokens: rate.max(1.0),
            last: Instant::now(),
        }
    }

    /// Whether a request at `now` is within the rate; if so it is counted.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A request to the Apple School and Business Manager API, with the status it got.
#[derive(Clone, Debug)]
pub struct OrgRequest {
    /// The account it was attributed to (by bearer token or `client_id`); `None` when the
    /// token or client id is unknown.
    pub account: Option<usize>,
    /// The endpoint hit; [`OrgEndpoint::Any`] for an unknown path.
    pub endpoint: OrgEndpoint,
    /// HTTP method.
    pub method: String,
    /// Path and query exactly as received (still percent-encoded).
    pub path_and_query: String,
    /// Headers in arrival order, names in lower case.
    pub headers: Vec<(String, String)>,
    /// When it arrived, on the simulated clock.
    pub at: DateTime<Utc>,
    /// When it arrived, real monotonic time (for gaps such as a `Retry-After` pause).
    pub received: Instant,
    /// Status answered.
    pub status: u16,
    /// For token requests: the `jti` of the client assertion, decoded without verification.
    pub jti: Option<String>,
}

impl OrgRequest {
    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(&self.path_and_query, |(p, _)| p)
    }

    /// The raw (still percent-encoded) query, if any.
    pub fn raw_query(&self) -> Option<&str> {
        self.path_and_query.split_once('?').map(|(_, q)| q)
    }

    /// The first value of query parameter `name`, decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.raw_query()?.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{Fault, FaultKind};
    use std::time::Duration;

    #[test]
    fn the_limiter_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(2.0);
        assert!(l.allow(t0) && l.allow(t0));
        assert!(!l.allow(t0));
        assert!(l.allow(t0 + Duration::from_millis(600)));
        assert!(!l.allow(t0 + Duration::from_millis(700)));
    }

    #[test]
    fn page_faults_only_reach_listings() {
        let mut q = OrgFaultQueues::default();
        q.push(
            OrgEndpoint::Any,
            Fault {
                times: 1,
                kind: FaultKind::SameCursor,
            },
        );
        assert!(q.take(OrgEndpoint::Token).is_none());
        assert!(matches!(
            q.take(OrgEndpoint::ServerDevices),
            Some(FaultKind::SameCursor)
        ));
        // One queue per variant, in declaration order.
        assert!(OrgEndpoint::ALL
            .iter()
            .enumerate()
            .all(|(i, e)| e.slot() == i));
        assert_eq!(
            OrgEndpoint::from_name("applecare"),
            Some(OrgEndpoint::AppleCare)
        );
    }
}
