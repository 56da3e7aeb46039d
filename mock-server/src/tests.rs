//! Scenarios over loopback HTTP: a small client (with its own OAuth signer, independent of the
//! server's verifier) drives the real service the way a DEP client would.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha1::Sha1;

use crate::test_http::{mock, reply, Reply};
use crate::{AssignStatus, Credentials, Endpoint, Fault, FaultKind, MockConfig, MockHandle};

const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn pct(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

/// An `Authorization` header for `GET url`, built the way Apple's documentation shows it.
fn oauth_header(creds: &Credentials, url: &str, nonce: &str, timestamp: u64) -> String {
    let ts = timestamp.to_string();
    // Already in sorted order.
    let params = [
        ("oauth_consumer_key", creds.consumer_key.as_str()),
        ("oauth_nonce", nonce),
        ("oauth_signature_method", "HMAC-SHA1"),
        ("oauth_timestamp", ts.as_str()),
        ("oauth_token", creds.access_token.as_str()),
        ("oauth_version", "1.0"),
    ];
    let normalised: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", pct(k), pct(v)))
        .collect();
    let base = format!("GET&{}&{}", pct(url), pct(&normalised.join("&")));
    let key = format!(
        "{}&{}",
        pct(&creds.consumer_secret),
        pct(&creds.access_secret)
    );
    let mut mac = Hmac::<Sha1>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(base.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "OAuth realm=\"ADM\", oauth_consumer_key=\"{}\", oauth_token=\"{}\", \
         oauth_signature_method=\"HMAC-SHA1\", oauth_signature=\"{}\", \
         oauth_timestamp=\"{ts}\", oauth_nonce=\"{}\", oauth_version=\"1.0\"",
        pct(&creds.consumer_key),
        pct(&creds.access_token),
        pct(&signature),
        pct(nonce)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Reply {
    fn serials(&self) -> Vec<String> {
        self.json()["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["serial_number"].as_str().unwrap().to_owned())
            .collect()
    }

    fn cursor(&self) -> String {
        self.json()["cursor"].as_str().unwrap().to_owned()
    }

    fn more(&self) -> bool {
        self.json()["more_to_follow"].as_bool().unwrap()
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    session: String,
    proto: &'static str,
}

impl Client {
    async fn new(mock: &MockHandle) -> Self {
        let mut c = Self {
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: mock.base_url(),
            session: String::new(),
            proto: "7",
        };
        c.login(&mock.config().credentials).await;
        c
    }

    async fn session_with(&self, authorization: Option<&str>) -> Reply {
        let mut req = self
            .http
            .get(format!("{}/session", self.base))
            .header("User-Agent", "adesync-test/1")
            .header("X-Server-Protocol-Version", self.proto);
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        reply(req).await
    }

    async fn login(&mut self, creds: &Credentials) {
        let url = format!("{}/session", self.base);
        let nonce = format!("{:032x}", rand::random::<u128>());
        let r = self
            .session_with(Some(&oauth_header(creds, &url, &nonce, unix_now())))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        self.session = r.json()["auth_session_token"].as_str().unwrap().to_owned();
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("User-Agent", "adesync-test/1")
            .header("X-Server-Protocol-Version", self.proto)
            .header("X-ADM-Auth-Session", &self.session)
            .header("Content-Type", "application/json;charset=UTF8")
            .body(body.to_string());
        reply(req).await
    }

    /// `method path` with a raw body, as `post` sends it.
    async fn send(&self, method: reqwest::Method, path: &str, body: String) -> Reply {
        let req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("User-Agent", "adesync-test/1")
            .header("X-Server-Protocol-Version", self.proto)
            .header("X-ADM-Auth-Session", &self.session)
            .header("Content-Type", "application/json;charset=UTF8")
            .body(body);
        reply(req).await
    }

    async fn get(&self, path_and_query: &str) -> Reply {
        let req = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .header("User-Agent", "adesync-test/1")
            .header("X-Server-Protocol-Version", self.proto)
            .header("X-ADM-Auth-Session", &self.session);
        reply(req).await
    }

    async fn fetch(&self, cursor: Option<&str>, limit: u32) -> Reply {
        let mut body = json!({ "limit": limit });
        if let Some(c) = cursor {
            body["cursor"] = c.into();
        }
        self.post("/server/devices", body).await
    }

    async fn sync(&self, cursor: &str) -> Reply {
        self.post("/devices/sync", json!({ "cursor": cursor, "limit": 1000 }))
            .await
    }

    /// Pages a whole fetch; returns (serials in order, final cursor, pages).
    async fn fetch_all(&self, limit: u32) -> (Vec<String>, String, usize) {
        let mut cursor: Option<String> = None;
        let mut serials = Vec::new();
        let mut pages = 0;
        loop {
            let r = self.fetch(cursor.as_deref(), limit).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            pages += 1;
            serials.extend(r.serials());
            cursor = Some(r.cursor());
            if !r.more() {
                return (serials, cursor.unwrap(), pages);
            }
        }
    }
}

#[tokio::test]
async fn session_accepts_a_signed_request_once_and_refuses_tampering() {
    let m = mock(MockConfig::default()).await;
    let c = Client::new(&m).await;
    assert_eq!(c.session.len(), 48);
    assert!(c.session.bytes().all(|b| b.is_ascii_hexdigit()));

    let url = format!("{}/session", m.base_url());
    let creds = Credentials::depsim();
    let header = oauth_header(&creds, &url, "nonce-1", unix_now());
    let first = c.session_with(Some(&header)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.headers["content-type"],
        "application/json;charset=UTF8"
    );
    // The same nonce again is a replay.
    let replay = c.session_with(Some(&header)).await;
    assert_eq!(
        (replay.status, replay.text.as_str()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
    // Signed for another nonce than the one sent.
    let tampered = oauth_header(&creds, &url, "nonce-2", unix_now()).replace("nonce-2", "nonce-3");
    assert_eq!(
        c.session_with(Some(&tampered)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Signed for another port: the signature covers the Host header's port.
    let other_port = oauth_header(&creds, "http://127.0.0.1:1/session", "nonce-4", unix_now());
    assert_eq!(
        c.session_with(Some(&other_port)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Other credentials.
    let stranger = Credentials {
        access_secret: "AS_other".into(),
        ..Credentials::depsim()
    };
    let wrong = oauth_header(&stranger, &url, "nonce-5", unix_now());
    assert_eq!(
        c.session_with(Some(&wrong)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Ten minutes old.
    let stale = oauth_header(&creds, &url, "nonce-6", unix_now() - 600);
    assert_eq!(
        c.session_with(Some(&stale)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // A missing parameter or no header at all is a bad request.
    let missing =
        oauth_header(&creds, &url, "nonce-7", unix_now()).replace(", oauth_nonce=\"nonce-7\"", "");
    let r = c.session_with(Some(&missing)).await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::BAD_REQUEST, "BAD_REQUEST")
    );
    assert_eq!(c.session_with(None).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn fetch_pages_2500_devices_in_three_pages_then_the_cursor_is_exhausted() {
    let m = mock(MockConfig {
        devices: 2500,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let first = c.fetch(None, 1000).await;
    assert_eq!(
        first.headers["content-type"],
        "application/json;charset=UTF8"
    );
    let v = first.json();
    assert!(v["fetched_until"].as_str().unwrap().ends_with('Z'));
    assert!(v["devices"][0].get("op_type").is_none());
    assert!(v["devices"][0].get("op_date").is_none());

    let (serials, cursor, pages) = c.fetch_all(1000).await;
    assert_eq!(pages, 3);
    assert_eq!(serials.len(), 2500);
    let mut sorted = serials.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, m.serials());
    assert!(!cursor.contains('='));

    let again = c.fetch(Some(&cursor), 1000).await;
    assert_eq!(
        (again.status, again.text.as_str()),
        (StatusCode::BAD_REQUEST, "EXHAUSTED_CURSOR")
    );
    // The same cursor is a valid sync cursor with nothing new.
    let s = c.sync(&cursor).await;
    assert_eq!(s.status, StatusCode::OK);
    assert!(s.serials().is_empty());
    assert!(!s.more());
}

#[tokio::test]
async fn limit_defaults_to_the_configured_default_and_is_clamped_to_the_maximum() {
    let m = mock(MockConfig {
        devices: 1500,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    assert_eq!(
        c.post("/server/devices", json!({})).await.serials().len(),
        100
    );
    assert_eq!(c.fetch(None, 5000).await.serials().len(), 1000);
}

#[tokio::test]
async fn sync_after_add_modify_delete_returns_exactly_those_ops() {
    let m = mock(MockConfig {
        devices: 50,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let (_, cursor, _) = c.fetch_all(1000).await;

    let existing = m.serials();
    let added = m.add_devices(2);
    assert_eq!(m.modify_devices(&existing[0..1]), 1);
    assert_eq!(m.delete_devices(&existing[1..2]), 1);
    assert!(m.modify_device(&existing[2], |d| {
        d.insert("asset_tag".into(), "TAG-42".into());
    }));
    assert_eq!(m.delete_devices(&["NOSUCHSERIAL".to_string()]), 0);

    let r = c.sync(&cursor).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    let ops: Vec<(String, String)> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert!(d["op_date"].as_str().unwrap().ends_with('Z'));
            (
                d["serial_number"].as_str().unwrap().to_owned(),
                d["op_type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            (added[0].clone(), "added".into()),
            (added[1].clone(), "added".into()),
            (existing[0].clone(), "modified".into()),
            (existing[1].clone(), "deleted".into()),
            (existing[2].clone(), "modified".into()),
        ]
    );
    assert_eq!(v["devices"][4]["asset_tag"], "TAG-42");
    // The deleted record carries the device's last known fields.
    assert!(v["devices"][3]["model"].is_string());
    assert!(!r.more());

    // The next sync from the returned cursor is empty.
    let next = c.sync(&r.cursor()).await;
    assert!(next.serials().is_empty());
    assert_eq!(m.serials().len(), 51);
}

#[tokio::test]
async fn sync_pages_when_the_log_is_longer_than_the_limit() {
    let m = mock(MockConfig::default()).await;
    let c = Client::new(&m).await;
    let (_, cursor, _) = c.fetch_all(100).await;
    m.add_devices(250);
    let mut cursor = cursor;
    let mut got = Vec::new();
    loop {
        let r = c
            .post("/devices/sync", json!({ "cursor": cursor, "limit": 100 }))
            .await;
        got.extend(r.serials());
        cursor = r.cursor();
        if !r.more() {
            break;
        }
    }
    assert_eq!(got.len(), 250);
}

#[tokio::test]
async fn silently_removed_devices_vanish_from_fetch_without_a_sync_record() {
    let m = mock(MockConfig {
        devices: 10,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let (_, cursor, _) = c.fetch_all(100).await;
    let gone = m.serials()[3].clone();
    assert_eq!(m.remove_silently(std::slice::from_ref(&gone)), 1);
    assert!(c.sync(&cursor).await.serials().is_empty());
    let (serials, _, _) = c.fetch_all(100).await;
    assert_eq!(serials.len(), 9);
    assert!(!serials.contains(&gone));
}

#[tokio::test]
async fn cursors_expire_after_seven_days_on_the_simulated_clock() {
    let m = mock(MockConfig {
        devices: 30,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let mid_fetch = c.fetch(None, 10).await.cursor();
    let (_, done, _) = c.fetch_all(100).await;
    m.advance_clock(chrono::Duration::days(6));
    assert_eq!(c.sync(&done).await.status, StatusCode::OK);
    m.advance_clock(chrono::Duration::days(2));
    for r in [c.sync(&done).await, c.fetch(Some(&mid_fetch), 10).await] {
        assert_eq!(
            (r.status, r.text.as_str()),
            (StatusCode::BAD_REQUEST, "EXPIRED_CURSOR")
        );
    }
}

#[tokio::test]
async fn garbage_or_missing_cursors_get_apples_errors() {
    let m = mock(MockConfig::default()).await;
    let c = Client::new(&m).await;
    for r in [
        c.fetch(Some("bm90IGEgY3Vyc29y"), 10).await,
        c.sync("!!!").await,
        c.sync("MDowOjE1MzY0Mjc2OTg5MTQ6MTUzNjQyNzY5ODkxNDp0cnVlOjE1MzY0Mjc2OTg5MTQ")
            .await,
    ] {
        assert_eq!(
            (r.status, r.text.as_str()),
            (StatusCode::BAD_REQUEST, "INVALID_CURSOR")
        );
    }
    let r = c.post("/devices/sync", json!({ "limit": 10 })).await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::BAD_REQUEST, "CURSOR_REQUIRED")
    );
    let r = c
        .http
        .post(format!("{}/server/devices", c.base))
        .header("User-Agent", "t")
        .header("X-ADM-Auth-Session", &c.session)
        .body("{not json");
    let r = reply(r).await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::BAD_REQUEST, "MALFORMED_REQUEST_BODY")
    );
}

#[tokio::test]
async fn a_cursor_from_another_server_instance_is_invalid() {
    let a = mock(MockConfig::default()).await;
    let b = mock(MockConfig::default()).await;
    let (_, cursor, _) = Client::new(&a).await.fetch_all(100).await;
    let r = Client::new(&b).await.sync(&cursor).await;
    assert_eq!(r.text, "INVALID_CURSOR");
}

#[tokio::test]
async fn quoted_errors_are_json_strings() {
    let m = mock(MockConfig {
        quoted_errors: true,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let r = c.sync("garbage").await;
    assert_eq!(r.text, "\"INVALID_CURSOR\"");
    assert_eq!(r.json(), "INVALID_CURSOR");
}

#[tokio::test]
async fn same_cursor_fault_echoes_the_sent_cursor_with_more_to_follow() {
    let m = mock(MockConfig {
        devices: 30,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let first = c.fetch(None, 10).await.cursor();
    m.push_fault(
        Endpoint::FetchDevices,
        Fault {
            times: 2,
            kind: FaultKind::SameCursor,
        },
    );
    for _ in 0..2 {
        let r = c.fetch(Some(&first), 10).await;
        assert_eq!(r.cursor(), first);
        assert!(r.more());
        assert_eq!(r.serials().len(), 10);
    }
    // Used up: normal paging resumes.
    assert_ne!(c.fetch(Some(&first), 10).await.cursor(), first);

    let (_, done, _) = c.fetch_all(100).await;
    m.add_devices(1);
    m.push_fault(
        Endpoint::Any,
        Fault {
            times: 1,
            kind: FaultKind::SameCursor,
        },
    );
    let r = c.sync(&done).await;
    assert_eq!((r.cursor(), r.more(), r.serials().len()), (done, true, 1));
}

#[tokio::test]
async fn duplicate_serial_fault_places_an_older_record_after_the_newest() {
    let m = mock(MockConfig {
        devices: 5,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let (_, cursor, _) = c.fetch_all(100).await;
    let victim = m.serials()[0].clone();
    m.delete_devices(std::slice::from_ref(&victim));
    m.push_fault(
        Endpoint::SyncDevices,
        Fault {
            times: 1,
            kind: FaultKind::DuplicateSerial,
        },
    );
    let v = c.sync(&cursor).await.json();
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0]["serial_number"], victim.as_str());
    assert_eq!(devices[1]["serial_number"], victim.as_str());
    assert_eq!(devices[0]["op_type"], "deleted");
    // Array order says "modified" last; op_date says "deleted" is the truth.
    assert_eq!(devices[1]["op_type"], "modified");
    assert!(devices[1]["op_date"].as_str() < devices[0]["op_date"].as_str());

    m.push_fault(
        Endpoint::FetchDevices,
        Fault {
            times: 1,
            kind: FaultKind::DuplicateSerial,
        },
    );
    let serials = c.fetch(None, 100).await.serials();
    assert_eq!(serials.len(), 5);
    assert_eq!(serials.first(), serials.last());
}

#[tokio::test]
async fn status_delay_and_malformed_faults_replace_or_slow_the_answer() {
    let m = mock(MockConfig {
        devices: 3,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    m.push_fault(
        Endpoint::FetchDevices,
        Fault {
            times: 1,
            kind: FaultKind::Status {
                status: 503,
                body: "Service Unavailable".into(),
                headers: vec![("Retry-After".into(), "1".into())],
            },
        },
    );
    m.push_fault(
        Endpoint::Any,
        Fault {
            times: 1,
            kind: FaultKind::MalformedJson,
        },
    );
    m.push_fault(
        Endpoint::Any,
        Fault {
            times: 1,
            kind: FaultKind::Delay(Duration::from_millis(200)),
        },
    );
    let r = c.fetch(None, 10).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "1");
    let r = c.fetch(None, 10).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(serde_json::from_str::<Value>(&r.text).is_err());
    let t = std::time::Instant::now();
    assert_eq!(c.fetch(None, 10).await.serials().len(), 3);
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert_eq!(m.count_requests(Endpoint::FetchDevices), 3);
}

#[tokio::test]
async fn sessions_are_required_expire_and_rotate() {
    let m = mock(MockConfig {
        devices: 3,
        rotate_session_every: Some(2),
        session_ttl: Some(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    let first = c.fetch(None, 10).await;
    assert!(!first.headers.contains_key("x-adm-auth-session"));
    let second = c.fetch(None, 10).await;
    let rotated = second.headers["x-adm-auth-session"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(rotated, c.session);
    // The old token still works, and so does the new one.
    assert_eq!(c.fetch(None, 10).await.status, StatusCode::OK);
    c.session = rotated;
    assert_eq!(c.fetch(None, 10).await.status, StatusCode::OK);

    m.advance_clock(chrono::Duration::hours(2));
    let r = c.fetch(None, 10).await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
    c.login(&Credentials::depsim()).await;
    assert_eq!(c.fetch(None, 10).await.status, StatusCode::OK);
    m.expire_sessions();
    assert_eq!(c.fetch(None, 10).await.status, StatusCode::UNAUTHORIZED);
    c.session.clear();
    assert_eq!(c.fetch(None, 10).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn user_agent_is_required_and_deny_listed_agents_are_refused() {
    let m = mock(MockConfig {
        user_agent_denylist: vec!["godep".into()],
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let url = format!("{}/account", m.base_url());
    let no_ua = reply(c.http.get(&url).header("X-ADM-Auth-Session", &c.session)).await;
    assert_eq!(
        (no_ua.status, no_ua.text.as_str()),
        (StatusCode::BAD_REQUEST, "USER_AGENT_MISSING")
    );
    let denied = reply(
        c.http
            .get(&url)
            .header("User-Agent", "nanodep-godep/0")
            .header("X-ADM-Auth-Session", &c.session),
    )
    .await;
    assert_eq!(
        (denied.status, denied.text.as_str()),
        (StatusCode::BAD_REQUEST, "USER_AGENT_INVALID")
    );
}

#[tokio::test]
async fn account_lists_urls_with_the_configured_limits() {
    let m = mock(MockConfig {
        max_limit: 5000,
        default_limit: 1000,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    let r = reply(
        c.http
            .get(format!("{}/account", c.base))
            .header("User-Agent", "t")
            .header("X-Server-Protocol-Version", "3")
            .header("X-ADM-Auth-Session", &c.session),
    )
    .await;
    let v = r.json();
    assert_eq!(v["org_type"], "org");
    assert_eq!(v["org_version"], "v2");
    assert_eq!(v["server_uuid"], m.config().server_uuid.as_str());
    let urls = v["urls"].as_array().unwrap();
    for uri in ["/server/devices", "/devices/sync"] {
        let u = urls.iter().find(|u| u["uri"] == uri).unwrap();
        assert_eq!(u["limit"], json!({ "default": 1000, "maximum": 5000 }));
    }
    // Protocol 2 predates the v3 account fields.
    c.proto = "2";
    let r = reply(
        c.http
            .get(format!("{}/account", c.base))
            .header("User-Agent", "t")
            .header("X-Server-Protocol-Version", "2")
            .header("X-ADM-Auth-Session", &c.session),
    )
    .await;
    assert!(r.json().get("urls").is_none());
    assert!(r.json()["server_name"].is_string());
}

#[tokio::test]
async fn protocol_version_gates_ipad_os_and_device_family() {
    let m = mock(MockConfig {
        devices: 300,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    let ipad = |v: &Value| {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_family"] == "iPad")
            .cloned()
    };
    let v7 = c.fetch(None, 300).await.json();
    assert_eq!(ipad(&v7).unwrap()["os"], "iPadOS");
    c.proto = "6";
    let v6 = c.fetch(None, 300).await.json();
    assert_eq!(ipad(&v6).unwrap()["os"], "iOS");
    c.proto = "1";
    let v1 = c.fetch(None, 300).await.json();
    assert!(v1["devices"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d.get("os").is_none() && d.get("device_family").is_none()));
}

/// The device fields protocol 10 added (docs/apple-dep-api.md §4.2).
const V10_FIELDS: [&str; 8] = [
    "imei",
    "meid",
    "eid",
    "wifi_mac_address",
    "bluetooth_mac_address",
    "ethernet_mac_address",
    "is_replacement_device",
    "released_by_replacement",
];

fn records(r: &Reply) -> Vec<Value> {
    r.json()["devices"].as_array().unwrap().clone()
}

fn is_mac_address(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    s.len() == 17
        && s.split(':').count() == 6
        && s.split(':').all(|o| {
            o.len() == 2
                && o.bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
        })
}

/// A protocol-10 device record has the hardware fields its family implies.
fn assert_v10_device(d: &Value) {
    let family = d["device_family"].as_str().unwrap();
    let cellular = family == "iPhone"
        || (family == "iPad" && d["description"].as_str().unwrap().contains("CELLULAR"));
    assert!(is_mac_address(&d["wifi_mac_address"]), "{d}");
    assert!(is_mac_address(&d["bluetooth_mac_address"]), "{d}");
    assert_ne!(d["wifi_mac_address"], d["bluetooth_mac_address"]);
    assert_eq!(
        d.get("ethernet_mac_address").is_some(),
        family == "Mac",
        "{d}"
    );
    if family == "Mac" {
        assert!(is_mac_address(&d["ethernet_mac_address"]));
    }
    assert!(d["is_replacement_device"].is_boolean(), "{d}");
    assert_eq!(d.get("imei").is_some(), cellular, "{d}");
    assert_eq!(d.get("eid").is_some(), cellular, "{d}");
    assert_eq!(d.get("meid").is_some(), family == "iPhone", "{d}");
    if cellular {
        let imei = d["imei"].as_array().unwrap();
        assert!((1..=2).contains(&imei.len()));
        assert!(imei.iter().all(|i| {
            let i = i.as_str().unwrap();
            i.len() == 15 && i.bytes().all(|b| b.is_ascii_digit())
        }));
        assert_eq!(d["eid"].as_str().unwrap().len(), 32);
    }
    if family == "iPhone" {
        let meid = d["meid"].as_array().unwrap();
        assert_eq!(meid.len(), 1);
        assert_eq!(
            meid[0].as_str().unwrap(),
            &d["imei"][0].as_str().unwrap()[..14]
        );
    }
}

fn has_no_v10_field(d: &Value) -> bool {
    V10_FIELDS.iter().all(|k| d.get(k).is_none())
}

#[tokio::test]
async fn protocol_10_fields_are_on_every_record_at_10_and_on_none_at_7() {
    let m = mock(MockConfig {
        devices: 300,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    c.proto = "10";
    let v10 = records(&c.fetch(None, 300).await);
    assert_eq!(v10.len(), 300);
    for d in &v10 {
        assert_v10_device(d);
        assert_eq!(d["is_replacement_device"], false);
        assert!(d.get("released_by_replacement").is_none());
    }
    for family in ["iPhone", "iPad", "Mac", "AppleTV"] {
        assert!(v10.iter().any(|d| d["device_family"] == family));
    }
    assert!(v10
        .iter()
        .any(|d| d["imei"].as_array().is_some_and(|i| i.len() == 2)));
    assert!(v10
        .iter()
        .any(|d| d["device_family"] == "iPad" && d.get("imei").is_some()));
    // Derived from the serial: the same on every page, and in the truth.
    assert_eq!(records(&c.fetch(None, 300).await), v10);
    let mut truth = m.devices();
    let mut sorted = v10.clone();
    sorted.sort_by_key(|d| d["serial_number"].as_str().unwrap().to_owned());
    truth.truncate(300);
    assert_eq!(truth, sorted);

    c.proto = "7";
    let v7 = records(&c.fetch(None, 300).await);
    assert!(v7.iter().all(has_no_v10_field));
    assert_eq!(Value::Array(m.devices_at(7)), {
        let mut v = v7.clone();
        v.sort_by_key(|d| d["serial_number"].as_str().unwrap().to_owned());
        Value::Array(v)
    });

    // Sync records: added, modified (an edited device, stored as JSON), deleted.
    let (_, cursor, _) = c.fetch_all(1000).await;
    let existing = m.serials();
    m.add_devices(1);
    assert!(m.modify_device(&existing[0], |d| {
        d.insert("asset_tag".into(), "EDITED".into());
        d.insert("zz_unknown".into(), "kept".into());
    }));
    m.delete_devices(&existing[1..2]);
    m.modify_devices(&existing[2..3]);
    let at7 = records(&c.sync(&cursor).await);
    assert_eq!(at7.len(), 4);
    assert!(at7.iter().all(has_no_v10_field), "{at7:?}");
    assert_eq!(at7[1]["zz_unknown"], "kept");
    c.proto = "10";
    let at10 = records(&c.sync(&cursor).await);
    let ops: Vec<&str> = at10
        .iter()
        .map(|d| d["op_type"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["added", "modified", "deleted", "modified"]);
    for d in &at10 {
        assert_v10_device(d);
        assert_eq!(
            d.get("released_by_replacement").is_some(),
            d["op_type"] == "deleted"
        );
    }
    assert_eq!(at10[1]["zz_unknown"], "kept");
    assert_eq!(at10[2]["released_by_replacement"], false);
    // The edit kept the identifiers the device had.
    let before = v10
        .iter()
        .find(|d| d["serial_number"] == existing[0].as_str());
    if let Some(before) = before {
        assert_eq!(before["wifi_mac_address"], at10[1]["wifi_mac_address"]);
    }
    // Besides the protocol-10 fields, the records at 7 and 10 are the same.
    for (old, new) in at7.iter().zip(&at10) {
        let mut new = new.as_object().unwrap().clone();
        new.retain(|k, _| !V10_FIELDS.contains(&k.as_str()));
        assert_eq!(old, &Value::Object(new));
    }
}

#[tokio::test]
async fn a_replacement_is_a_released_deletion_and_a_replacement_addition_with_details() {
    let m = mock(MockConfig {
        devices: 20,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    c.proto = "10";
    let (_, cursor, _) = c.fetch_all(100).await;
    let original = m.serials()[4].clone();
    let before = m
        .devices()
        .into_iter()
        .find(|d| d["serial_number"] == original.as_str())
        .unwrap();
    m.advance_clock(chrono::Duration::days(3));
    let new = m.replace_devices(&[original.clone(), "NOSUCHSERIAL".into()]);
    assert_eq!(new.len(), 1);
    let new = new[0].clone();
    assert_ne!(new, original);
    assert!(!m.serials().contains(&original));
    assert!(m.serials().contains(&new));

    let sync = c.sync(&cursor).await;
    let recs = records(&sync);
    assert_eq!(recs.len(), 2, "{recs:?}");
    let (gone, added) = (&recs[0], &recs[1]);
    assert_eq!(gone["serial_number"], original.as_str());
    assert_eq!(gone["op_type"], "deleted");
    assert_eq!(gone["released_by_replacement"], true);
    assert_eq!(gone["is_replacement_device"], false);
    assert_eq!(gone["model"], before["model"]);
    assert_eq!(added["serial_number"], new.as_str());
    assert_eq!(added["op_type"], "added");
    assert_eq!(added["is_replacement_device"], true);
    assert!(added.get("released_by_replacement").is_none());
    assert_v10_device(added);
    for key in ["model", "description", "color", "os", "device_family"] {
        assert_eq!(added[key], before[key], "{key}");
    }
    assert_eq!(added["profile_status"], "empty");
    assert_eq!(added["op_date"], added["device_assigned_date"]);
    assert_ne!(added["wifi_mac_address"], before["wifi_mac_address"]);
    // At protocol 7 the same two records, without the flags.
    c.proto = "7";
    let old = records(&c.sync(&cursor).await);
    assert!(old.iter().all(has_no_v10_field));
    c.proto = "10";

    let today = m.now().format("%Y-%m-%d").to_string();
    let r = c
        .get(&format!("/device/replacementDetails?device={new}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.headers["content-type"], "application/json;charset=UTF8");
    assert_eq!(
        r.json(),
        json!({
            "serial_number": new,
            "original_device_serial_number": original,
            "replacement_date": today,
        })
    );
    assert_eq!(m.replacement_details(&new), Some(r.json()));
    for serial in [original.as_str(), m.serials()[0].as_str(), "NOSUCHSERIAL"] {
        let r = c
            .get(&format!("/device/replacementDetails?device={serial}"))
            .await;
        assert_eq!(
            (r.status, r.text.as_str()),
            (StatusCode::NOT_FOUND, "DEVICE_NOT_FOUND")
        );
    }
    assert_eq!(m.replacement_details(&original), None);
    for path in [
        "/device/replacementDetails",
        "/device/replacementDetails?device=",
    ] {
        let r = c.get(path).await;
        assert_eq!(
            (r.status, r.text.as_str()),
            (StatusCode::BAD_REQUEST, "DEVICE_ID_REQUIRED")
        );
    }
    // Before protocol 10 the endpoint does not exist.
    c.proto = "9";
    let r = c
        .get(&format!("/device/replacementDetails?device={new}"))
        .await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::NOT_FOUND, ""));
    c.proto = "10";
    // Faults, journal, session.
    m.push_fault(
        Endpoint::ReplacementDetails,
        Fault {
            times: 1,
            kind: FaultKind::Status {
                status: 503,
                body: String::new(),
                headers: vec![],
            },
        },
    );
    let path = format!("/device/replacementDetails?device={new}");
    assert_eq!(c.get(&path).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(c.get(&path).await.status, StatusCode::OK);
    assert_eq!(m.count_requests(Endpoint::ReplacementDetails), 9);
    let last = m.requests().pop().unwrap();
    assert_eq!(
        (last.endpoint, last.path.as_str(), last.status),
        (
            Endpoint::ReplacementDetails,
            "/device/replacementDetails",
            200
        )
    );
    m.expire_sessions();
    assert_eq!(c.get(&path).await.status, StatusCode::UNAUTHORIZED);
    let r = reply(
        c.http
            .post(format!("{}{path}", c.base))
            .header("User-Agent", "t")
            .header("X-Server-Protocol-Version", "10"),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    // Protocol 10 lists the endpoint in /account.
    c.login(&Credentials::depsim()).await;
    let urls = c.get("/account").await.json()["urls"].clone();
    assert!(urls
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["uri"] == "/device/replacementDetails"));
}

#[tokio::test]
async fn replacement_details_respect_quoted_errors() {
    let m = mock(MockConfig {
        devices: 3,
        quoted_errors: true,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    c.proto = "10";
    let r = c
        .get("/device/replacementDetails?device=C02000000000")
        .await;
    assert_eq!(
        (r.status, r.text.as_str()),
        (StatusCode::NOT_FOUND, "\"DEVICE_NOT_FOUND\"")
    );
}

#[tokio::test]
async fn devices_that_left_are_reassigned_with_an_added_record() {
    let m = mock(MockConfig {
        devices: 10,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    c.proto = "10";
    let serials = m.serials();
    let before = m.devices();
    let (_, cursor, _) = c.fetch_all(100).await;
    assert_eq!(m.delete_devices(&serials[0..1]), 1);
    assert_eq!(m.remove_silently(&serials[1..2]), 1);
    let replacement = m.replace_devices(&serials[2..3]);
    assert!(m.modify_device(&serials[3], |d| {
        d.insert("asset_tag".into(), "EDITED".into());
    }));
    assert_eq!(m.delete_devices(&serials[3..4]), 1);
    m.advance_clock(chrono::Duration::hours(1));
    let back = vec![
        serials[0].clone(),
        serials[1].clone(),
        serials[2].clone(),
        serials[3].clone(),
        serials[5].clone(), // still assigned
        "NOSUCHSERIAL".into(),
    ];
    assert_eq!(m.reassign_devices(&back), 4);
    // Once back, it cannot come back again.
    assert_eq!(m.reassign_devices(&back[..1]), 0);
    assert_eq!(m.serials().len(), 11);

    let recs = records(&c.sync(&cursor).await);
    let tail: Vec<(String, String)> = recs[recs.len() - 4..]
        .iter()
        .map(|d| {
            (
                d["serial_number"].as_str().unwrap().to_owned(),
                d["op_type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        tail,
        (0..4)
            .map(|i| (serials[i].clone(), "added".to_owned()))
            .collect::<Vec<_>>()
    );
    let now = &recs[recs.len() - 1]["op_date"];
    for d in &recs[recs.len() - 4..] {
        let was = before
            .iter()
            .find(|b| b["serial_number"] == d["serial_number"])
            .unwrap();
        for key in ["model", "description", "device_family", "wifi_mac_address"] {
            assert_eq!(d[key], was[key], "{key}");
        }
        assert_eq!(&d["device_assigned_date"], now);
        assert_eq!(d["profile_status"], "empty");
        assert!(d.get("profile_uuid").is_none());
        assert_eq!(d["is_replacement_device"], false);
    }
    assert_eq!(recs[recs.len() - 1]["asset_tag"], "EDITED");
    // Fetch lists them again, after the others.
    let (fetched, _, _) = c.fetch_all(100).await;
    assert_eq!(fetched.len(), 11);
    assert_eq!(fetched[7..], serials[..4]);
    assert!(fetched.contains(&replacement[0]));
}

#[tokio::test]
async fn modify_device_walks_the_profile_states_with_a_modified_record_each() {
    let m = mock(MockConfig {
        devices: 3,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let (_, mut cursor, _) = c.fetch_all(100).await;
    let serial = m.serials()[0].clone();
    let uuid = "C1F123098EB5074580041E69883004C3";
    let at = m.now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    for status in ["assigned", "pushed", "removed", "empty"] {
        assert!(m.modify_device(&serial, |d| {
            d.insert("profile_status".into(), status.into());
            match status {
                "assigned" => {
                    d.insert("profile_uuid".into(), uuid.into());
                    d.insert("profile_assign_time".into(), at.clone().into());
                    d.remove("profile_push_time");
                }
                "pushed" => {
                    d.insert("profile_push_time".into(), at.clone().into());
                }
                _ => {
                    for k in ["profile_uuid", "profile_assign_time", "profile_push_time"] {
                        d.remove(k);
                    }
                }
            }
        }));
        let r = c.sync(&cursor).await;
        let recs = records(&r);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0]["serial_number"], serial.as_str());
        assert_eq!(recs[0]["op_type"], "modified");
        assert_eq!(recs[0]["profile_status"], status);
        assert_eq!(
            recs[0].get("profile_uuid").is_some(),
            status == "assigned" || status == "pushed"
        );
        assert_eq!(
            recs[0].get("profile_push_time").is_some(),
            status == "pushed"
        );
        cursor = r.cursor();
    }
    assert!(!m.modify_device("NOSUCHSERIAL", |_| {}));
}

#[tokio::test]
async fn the_admin_api_replaces_and_reassigns() {
    let m = mock(MockConfig {
        devices: 10,
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = |path: &str, body: Value| {
        http.post(format!("{}/_mock/{path}", m.base_url()))
            .body(body.to_string())
    };
    let r = reply(admin("devices/replace", json!({ "count": 2 })))
        .await
        .json();
    assert_eq!(r["replaced"], 2);
    let originals: Vec<String> = serde_json::from_value(r["originals"].clone()).unwrap();
    let new: Vec<String> = serde_json::from_value(r["serials"].clone()).unwrap();
    assert_eq!((originals.len(), new.len()), (2, 2));
    for (o, n) in originals.iter().zip(&new) {
        assert_eq!(
            m.replacement_details(n).unwrap()["original_device_serial_number"],
            o.as_str()
        );
    }
    let r = reply(admin(
        "devices/replace",
        json!({ "serials": ["NOSUCHSERIAL"] }),
    ))
    .await
    .json();
    assert_eq!(r, json!({ "replaced": 0, "serials": [], "originals": [] }));
    let r = reply(admin("devices/reassign", json!({ "serials": originals })))
        .await
        .json();
    assert_eq!(r["reassigned"], 2);
    assert_eq!(m.serials().len(), 12);
    let bad = reply(admin("devices/reassign", json!({ "count": 1 }))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let fault = reply(admin(
        "faults",
        json!({ "endpoint": "replacement_details", "status": 500 }),
    ))
    .await;
    assert_eq!(fault.status, StatusCode::OK, "{}", fault.text);
    let stats = reply(http.get(format!("{}/_mock/stats", m.base_url())))
        .await
        .json();
    assert_eq!(stats["requests"]["replacement_details"], 0);
    assert_eq!(stats["log_length"], 6);
}

#[tokio::test]
async fn the_same_seed_gives_the_same_devices() {
    let config = MockConfig {
        devices: 200,
        seed: 99,
        ..Default::default()
    };
    let a = mock(config.clone()).await;
    let b = mock(config).await;
    assert_eq!(a.devices(), b.devices());
    assert_eq!(a.add_devices(5), b.add_devices(5));
    let c = mock(MockConfig {
        devices: 200,
        seed: 100,
        ..Default::default()
    })
    .await;
    assert_ne!(a.serials()[..200], c.serials()[..]);
    assert_eq!(a.serials().len(), 205);
}

#[tokio::test]
async fn requests_are_recorded_with_lowercase_headers_and_status() {
    let m = mock(MockConfig::default()).await;
    let c = Client::new(&m).await;
    c.fetch(None, 10).await;
    reply(
        c.http
            .get(format!("{}/nope", c.base))
            .header("User-Agent", "t"),
    )
    .await;
    let reqs = m.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].endpoint, Endpoint::Session);
    assert!(reqs[0]
        .header("authorization")
        .unwrap()
        .starts_with("OAuth "));
    assert_eq!(reqs[1].endpoint, Endpoint::FetchDevices);
    assert_eq!(reqs[1].method, "POST");
    assert_eq!(reqs[1].path, "/server/devices");
    assert_eq!(reqs[1].header("X-Server-Protocol-Version"), Some("7"));
    assert!(reqs[1].headers.iter().all(|(k, _)| *k == k.to_lowercase()));
    assert_eq!(reqs[1].body, r#"{"limit":10}"#);
    assert_eq!(reqs[1].status, 200);
    assert_eq!((reqs[2].endpoint, reqs[2].status), (Endpoint::Any, 404));
    assert_eq!(m.count_requests(Endpoint::Any), 3);
    m.clear_requests();
    assert!(m.requests().is_empty());
}

#[tokio::test]
async fn wrong_methods_get_405() {
    let m = mock(MockConfig::default()).await;
    let c = Client::new(&m).await;
    let r = reply(
        c.http
            .get(format!("{}/server/devices", c.base))
            .header("User-Agent", "t"),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn the_admin_api_changes_and_reports_the_world() {
    let m = mock(MockConfig {
        devices: 10,
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = |path: &str, body: Value| {
        http.post(format!("{}/_mock/{path}", m.base_url()))
            .body(body.to_string())
    };
    let added = reply(admin("devices", json!({ "count": 3 }))).await.json();
    assert_eq!(added["added"], 3);
    let modified = reply(admin("devices/modify", json!({ "count": 2 })))
        .await
        .json();
    assert_eq!(modified["modified"], 2);
    let serial = m.serials()[0].clone();
    let deleted = reply(admin("devices/delete", json!({ "serials": [serial] })))
        .await
        .json();
    assert_eq!(deleted["deleted"], 1);
    let before = m.now();
    reply(admin("clock/advance", json!({ "seconds": 86_400 }))).await;
    assert!(m.now() - before >= chrono::Duration::hours(23));
    let fault = reply(admin(
        "faults",
        json!({ "endpoint": "fetch_devices", "status": 500, "body": "Internal Server Error" }),
    ))
    .await;
    assert_eq!(fault.status, StatusCode::OK, "{}", fault.text);
    let bad = reply(admin("faults", json!({ "endpoint": "everything" }))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let c = Client::new(&m).await;
    assert_eq!(
        c.fetch(None, 10).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let stats = reply(http.get(format!("{}/_mock/stats", m.base_url())))
        .await
        .json();
    assert_eq!(stats["devices"], 12);
    assert_eq!(stats["log_length"], 6);
    assert_eq!(stats["requests"]["session"], 1);
    assert_eq!(stats["requests"]["fetch_devices"], 1);
    let truth = reply(http.get(format!("{}/_mock/devices", m.base_url())))
        .await
        .json();
    assert_eq!(truth.as_array().unwrap().len(), 12);
    assert_eq!(truth, Value::Array(m.devices()));
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let m = mock(MockConfig::default()).await;
    m.shutdown();
    tokio::time::timeout(Duration::from_secs(5), m.stopped())
        .await
        .expect("stopped in time");
    assert!(tokio::net::TcpStream::connect(m.addr()).await.is_err());
}

// ---------------------------------------------------------------------------------------
// Enrollment profiles (docs/apple-dep-api.md §4.9)

const ENROLL_URL: &str = "https://mdm.example.com/enroll";

/// A valid Profile object named `name`.
fn profile(name: &str) -> Value {
    json!({ "profile_name": name, "url": ENROLL_URL, "is_supervised": true, "await_device_configured": true })
}

fn is_profile_uuid(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// `(status, body)` of an error reply.
fn error_of(r: &Reply) -> (StatusCode, &str) {
    (r.status, r.text.as_str())
}

/// The device with `serial` among `devices`.
fn device_of<'a>(devices: &'a [Value], serial: &str) -> &'a Value {
    devices
        .iter()
        .find(|d| d["serial_number"] == serial)
        .unwrap_or_else(|| panic!("{serial} not found"))
}

impl Client {
    async fn define(&self, body: Value) -> Reply {
        self.post("/profile", body).await
    }

    /// Defines `profile(name)`; returns its uuid.
    async fn define_ok(&self, name: &str) -> String {
        let r = self.define(profile(name)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.json()["profile_uuid"].as_str().unwrap().to_owned()
    }

    async fn assign(&self, uuid: &str, serials: &[String]) -> Reply {
        self.post(
            "/profile/devices",
            json!({ "profile_uuid": uuid, "devices": serials }),
        )
        .await
    }

    async fn unassign(&self, body: Value) -> Reply {
        self.send(
            reqwest::Method::DELETE,
            "/profile/devices",
            body.to_string(),
        )
        .await
    }
}

#[tokio::test]
async fn define_profile_validates_like_apple_and_makes_a_new_uuid_each_time() {
    let m = mock(MockConfig {
        devices: 5,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    for (body, token) in [
        ("[1,2]", "MALFORMED_REQUEST_BODY"),
        ("{\"profile_name\":", "MALFORMED_REQUEST_BODY"),
        ("", "MALFORMED_REQUEST_BODY"),
        (
            r#"{"url":"https://mdm.example.com/enroll"}"#,
            "CONFIG_NAME_REQUIRED",
        ),
        (
            r#"{"profile_name":"","url":"https://mdm.example.com/enroll"}"#,
            "CONFIG_NAME_REQUIRED",
        ),
        (r#"{"profile_name":"Staff"}"#, "CONFIG_URL_REQUIRED"),
        (
            r#"{"profile_name":"Staff","url":""}"#,
            "CONFIG_URL_REQUIRED",
        ),
    ] {
        let r = c
            .send(reqwest::Method::POST, "/profile", body.to_owned())
            .await;
        assert_eq!(error_of(&r), (StatusCode::BAD_REQUEST, token), "{body}");
    }
    assert!(m.profiles().is_empty());

    let serials = m.serials();
    let mut staff = profile("Staff");
    staff["devices"] = json!([serials[0], "NOSUCHSERIAL"]);
    let r = c.define(staff.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.headers["content-type"], "application/json;charset=UTF8");
    let v = r.json();
    let uuid = v["profile_uuid"].as_str().unwrap().to_owned();
    assert!(is_profile_uuid(&uuid), "{uuid}");
    assert_eq!(v["devices"].as_object().unwrap().len(), 2);
    assert_eq!(v["devices"][&serials[0]], "SUCCESS");
    assert_eq!(v["devices"]["NOSUCHSERIAL"], "NOT_ACCESSIBLE");
    // The profile's own devices are assigned at once.
    let d = device_of(&m.devices(), &serials[0]).clone();
    assert_eq!(d["profile_status"], "assigned");
    assert_eq!(d["profile_uuid"], uuid.as_str());

    // PUT defines too (depsim); the same profile again gets a new uuid.
    let r = c
        .send(
            reqwest::Method::PUT,
            "/profile",
            profile("Kiosk").to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let kiosk = r.json()["profile_uuid"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["devices"], json!({}));
    let again = c.define_ok("Kiosk").await;
    assert!(is_profile_uuid(&kiosk) && is_profile_uuid(&again));
    assert!(uuid != kiosk && kiosk != again && uuid != again);
    assert_eq!(
        m.profiles(),
        vec![
            (uuid, staff),
            (kiosk, profile("Kiosk")),
            (again, profile("Kiosk"))
        ]
    );
    assert_eq!(m.count_requests(Endpoint::DefineProfile), 10);
}

#[tokio::test]
async fn get_profile_returns_the_profile_with_its_uuid_or_apples_errors() {
    let m = mock(MockConfig::default()).await;
    let c = Client::new(&m).await;
    let uuid = c.define_ok("Staff").await;
    for query in ["/profile", "/profile?profile_uuid=", "/profile?other=1"] {
        let r = c.get(query).await;
        assert_eq!(
            error_of(&r),
            (StatusCode::BAD_REQUEST, "PROFILE_UUID_REQUIRED"),
            "{query}"
        );
    }
    let r = c
        .get("/profile?profile_uuid=C1F123098EB5074580041E69883004C3")
        .await;
    assert_eq!(error_of(&r), (StatusCode::NOT_FOUND, "PROFILE_NOT_FOUND"));

    let r = c.get(&format!("/profile?profile_uuid={uuid}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let mut expected = profile("Staff");
    expected["profile_uuid"] = uuid.clone().into();
    assert_eq!(r.json(), expected);
    // Lower case with dashes names the same profile; the answer has the stored form.
    let lower = uuid.to_ascii_lowercase();
    let dashed = format!(
        "{}-{}-{}-{}-{}",
        &lower[..8],
        &lower[8..12],
        &lower[12..16],
        &lower[16..20],
        &lower[20..]
    );
    let r = c.get(&format!("/profile?profile_uuid={dashed}")).await;
    assert_eq!(r.json()["profile_uuid"], uuid.as_str());
    assert_eq!(m.count_requests(Endpoint::GetProfile), 6);
}

#[tokio::test]
async fn assign_profile_checks_the_request_and_takes_at_most_1000_serials() {
    let m = mock(MockConfig {
        devices: 5,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let uuid = c.define_ok("Staff").await;
    let serials = m.serials();
    let cases = [
        (json!({ "devices": [serials[0]] }), "PROFILE_UUID_REQUIRED"),
        (
            json!({ "profile_uuid": "", "devices": [serials[0]] }),
            "PROFILE_UUID_REQUIRED",
        ),
        (json!({ "profile_uuid": uuid }), "DEVICE_ID_REQUIRED"),
        (
            json!({ "profile_uuid": uuid, "devices": [] }),
            "DEVICE_ID_REQUIRED",
        ),
        (
            json!({ "profile_uuid": uuid, "devices": "C02X" }),
            "MALFORMED_REQUEST_BODY",
        ),
        (json!(["not", "an", "object"]), "MALFORMED_REQUEST_BODY"),
    ];
    for (body, token) in cases {
        let r = c.post("/profile/devices", body.clone()).await;
        assert_eq!(error_of(&r), (StatusCode::BAD_REQUEST, token), "{body}");
    }
    let r = c
        .assign("C1F123098EB5074580041E69883004C3", &serials[..1])
        .await;
    assert_eq!(error_of(&r), (StatusCode::NOT_FOUND, "PROFILE_NOT_FOUND"));

    // 1000 serials are fine; 1001 are refused, before the uuid is looked up.
    let mut many: Vec<String> = serials.clone();
    many.extend((0..995).map(|i| format!("UNKNOWN{i:05}")));
    assert_eq!(many.len(), 1000);
    let r = c.assign(&uuid, &many).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let answers = r.json()["devices"].as_object().unwrap().clone();
    assert_eq!(answers.len(), 1000);
    assert_eq!(answers.values().filter(|s| *s == "SUCCESS").count(), 5);
    assert_eq!(
        answers.values().filter(|s| *s == "NOT_ACCESSIBLE").count(),
        995
    );
    many.push("UNKNOWN01000".into());
    for u in [uuid.as_str(), "C1F123098EB5074580041E69883004C3"] {
        let r = c.assign(u, &many).await;
        assert_eq!(
            error_of(&r),
            (StatusCode::BAD_REQUEST, crate::TOO_MANY_DEVICES)
        );
    }
    // The journal keeps each body: serials per call can be counted.
    let per_call: Vec<usize> = m
        .requests()
        .iter()
        .filter(|r| r.endpoint == Endpoint::AssignProfile)
        .map(|r| r.serials().len())
        .collect();
    assert_eq!(per_call, [1, 1, 0, 0, 0, 0, 1, 1000, 1001, 1001]);
    assert_eq!(m.count_requests(Endpoint::AssignProfile), 10);
}

#[tokio::test]
async fn a_successful_assignment_is_exactly_one_modified_sync_record() {
    let m = mock(MockConfig {
        devices: 5,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let serial = m.serials()[0].clone();
    // A device whose profile was pushed: the push time goes with the new assignment.
    assert!(m.modify_device(&serial, |d| {
        d.insert("profile_status".into(), "pushed".into());
        d.insert(
            "profile_uuid".into(),
            "C1F123098EB5074580041E69883004C3".into(),
        );
        d.insert("profile_assign_time".into(), "2024-01-01T00:00:00Z".into());
        d.insert("profile_push_time".into(), "2024-01-02T00:00:00Z".into());
    }));
    let (_, cursor, _) = c.fetch_all(100).await;
    let uuid = c.define_ok("Staff").await;
    m.advance_clock(chrono::Duration::days(3));
    let before = m.now().timestamp();
    let r = c.assign(&uuid, std::slice::from_ref(&serial)).await;
    let after = m.now().timestamp();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({ "profile_uuid": uuid, "devices": { serial.as_str(): "SUCCESS" } })
    );

    let r = c.sync(&cursor).await;
    let recs = records(&r);
    assert_eq!(recs.len(), 1, "{}", r.text);
    let rec = &recs[0];
    assert_eq!(rec["serial_number"], serial.as_str());
    assert_eq!(rec["op_type"], "modified");
    assert_eq!(rec["profile_status"], "assigned");
    assert_eq!(rec["profile_uuid"], uuid.as_str());
    assert!(rec.get("profile_push_time").is_none());
    let at = chrono::DateTime::parse_from_rfc3339(rec["profile_assign_time"].as_str().unwrap())
        .unwrap()
        .timestamp();
    assert!(
        (before..=after).contains(&at),
        "{at} not in {before}..={after}"
    );
    assert_eq!(rec["profile_assign_time"], rec["op_date"]);
    // A fetch shows the new state too.
    let fetched = records(&c.fetch(None, 100).await);
    assert_eq!(device_of(&fetched, &serial)["profile_uuid"], uuid.as_str());
    assert_eq!(
        device_of(&fetched, &serial)["profile_assign_time"],
        rec["profile_assign_time"]
    );

    // The uuid it already has: SUCCESS, no change, no record.
    let cursor = r.cursor();
    let r = c.assign(&uuid, std::slice::from_ref(&serial)).await;
    assert_eq!(r.json()["devices"][&serial], "SUCCESS");
    let r = c.sync(&cursor).await;
    assert!(records(&r).is_empty(), "{}", r.text);

    // PUT assigns too (depsim's only method).
    let other = c.define_ok("Kiosk").await;
    let body = json!({ "profile_uuid": other, "devices": [serial] });
    let put = c
        .send(reqwest::Method::PUT, "/profile/devices", body.to_string())
        .await;
    assert_eq!(put.json()["devices"][&serial], "SUCCESS");
    let recs = records(&c.sync(&r.cursor()).await);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["profile_uuid"], other.as_str());
    assert_eq!(m.count_requests(Endpoint::AssignProfile), 3);
}

#[tokio::test]
async fn scripted_answers_replace_success_in_request_order() {
    let m = mock(MockConfig {
        devices: 10,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    c.proto = "10";
    let (_, cursor, _) = c.fetch_all(100).await;
    let uuid = c.define_ok("Staff").await;
    let s = m.serials();
    m.script_assignments(AssignStatus::Failed, 1, None);
    m.script_assignments(AssignStatus::Throttled, 2, Some(120));
    m.script_assignments(AssignStatus::NotAccessible, 1, None);
    let batch: Vec<String> = vec![
        s[0].clone(),
        "NOSUCHSERIAL".into(), // not accessible anyway: uses up no scripted answer
        s[1].clone(),
        s[2].clone(),
        s[3].clone(),
        s[4].clone(),
        s[5].clone(),
    ];
    let r = c.assign(&uuid, &batch).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    let expected = [
        "FAILED",
        "NOT_ACCESSIBLE",
        "THROTTLED",
        "THROTTLED",
        "NOT_ACCESSIBLE",
        "SUCCESS",
        "SUCCESS",
    ];
    for (serial, status) in batch.iter().zip(expected) {
        assert_eq!(v["devices"][serial], status, "{serial}");
    }
    assert_eq!(v["retry_after_seconds"], 120);
    // Only the successes changed.
    let r = c.sync(&cursor).await;
    let changed: Vec<String> = r.serials();
    assert_eq!(changed, [s[4].clone(), s[5].clone()]);
    // No throttled device, no retry_after_seconds.
    let v = c.assign(&uuid, &s[6..7]).await.json();
    assert_eq!(v["devices"][&s[6]], "SUCCESS");
    assert!(v.get("retry_after_seconds").is_none(), "{v}");
}

#[tokio::test]
async fn throttled_needs_protocol_9_and_retry_after_seconds_protocol_10() {
    let m = mock(MockConfig {
        devices: 5,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    let uuid = c.define_ok("Staff").await;
    let s = m.serials();
    for (i, (proto, status, retry)) in [
        ("10", "THROTTLED", Some(60)),
        ("9", "THROTTLED", None),
        ("7", "FAILED", None),
        ("2", "FAILED", None),
    ]
    .into_iter()
    .enumerate()
    {
        c.proto = proto;
        m.script_assignments(AssignStatus::Throttled, 1, None);
        let v = c.assign(&uuid, &s[i..=i]).await.json();
        assert_eq!(v["devices"][&s[i]], status, "protocol {proto}");
        assert_eq!(
            v.get("retry_after_seconds").and_then(Value::as_u64),
            retry,
            "protocol {proto}"
        );
    }
    // Unchanged: none of them succeeded.
    let unchanged = m.devices();
    assert!(s[..4]
        .iter()
        .all(|x| device_of(&unchanged, x)["profile_uuid"] != uuid.as_str()));
}

#[tokio::test]
async fn removing_profiles_marks_devices_removed_with_a_modified_record() {
    let m = mock(MockConfig {
        devices: 5,
        ..Default::default()
    })
    .await;
    let c = Client::new(&m).await;
    let s = m.serials();
    assert!(m.modify_device(&s[1], |d| {
        d.insert("profile_status".into(), "pushed".into());
        d.insert(
            "profile_uuid".into(),
            "C1F123098EB5074580041E69883004C3".into(),
        );
        d.insert("profile_assign_time".into(), "2024-01-01T00:00:00Z".into());
        d.insert("profile_push_time".into(), "2024-01-02T00:00:00Z".into());
    }));
    let (_, cursor, _) = c.fetch_all(100).await;
    let mut staff = profile("Staff");
    staff["devices"] = json!([s[0]]);
    assert_eq!(c.define(staff).await.status, StatusCode::OK);

    // profile_uuid is ignored, even an unknown one.
    let r = c
        .unassign(json!({
            "profile_uuid": "C1F123098EB5074580041E69883004C3",
            "devices": [s[0], s[1], "NOSUCHSERIAL"],
        }))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({ "devices": {
            s[0].as_str(): "SUCCESS", s[1].as_str(): "SUCCESS", "NOSUCHSERIAL": "NOT_ACCESSIBLE"
        } })
    );
    let r = c.sync(&cursor).await;
    let recs = records(&r);
    assert_eq!(r.serials(), [s[0].clone(), s[0].clone(), s[1].clone()]);
    assert_eq!(recs[0]["profile_status"], "assigned");
    for rec in &recs[1..] {
        assert_eq!(rec["op_type"], "modified");
        assert_eq!(rec["profile_status"], "removed");
        for k in ["profile_uuid", "profile_assign_time", "profile_push_time"] {
            assert!(rec.get(k).is_none(), "{k} in {rec}");
        }
    }
    // Removing again: SUCCESS, nothing to record.
    let again = c.unassign(json!({ "devices": [s[0]] })).await;
    assert_eq!(again.json()["devices"][&s[0]], "SUCCESS");
    assert!(records(&c.sync(&r.cursor()).await).is_empty());

    for body in [json!({ "devices": [] }), json!({})] {
        let r = c.unassign(body).await;
        assert_eq!(
            error_of(&r),
            (StatusCode::BAD_REQUEST, "DEVICE_ID_REQUIRED")
        );
    }
    let r = c
        .send(reqwest::Method::DELETE, "/profile/devices", "nope".into())
        .await;
    assert_eq!(
        error_of(&r),
        (StatusCode::BAD_REQUEST, "MALFORMED_REQUEST_BODY")
    );
    assert_eq!(m.count_requests(Endpoint::RemoveProfile), 5);
}

#[tokio::test]
async fn profile_endpoints_take_faults_sessions_methods_and_quoted_errors() {
    let m = mock(MockConfig {
        devices: 3,
        quoted_errors: true,
        ..Default::default()
    })
    .await;
    let mut c = Client::new(&m).await;
    let uuid = c.define_ok("Staff").await;
    let s = m.serials();
    m.push_fault(
        Endpoint::AssignProfile,
        Fault {
            times: 1,
            kind: FaultKind::Status {
                status: 503,
                body: String::new(),
                headers: vec![("Retry-After".into(), "2".into())],
            },
        },
    );
    let r = c.assign(&uuid, &s[..1]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "2");
    // The fault changed nothing; the next call succeeds.
    assert_eq!(
        c.assign(&uuid, &s[..1]).await.json()["devices"][&s[0]],
        "SUCCESS"
    );
    m.push_fault(
        Endpoint::GetProfile,
        Fault {
            times: 1,
            kind: FaultKind::MalformedJson,
        },
    );
    let r = c.get(&format!("/profile?profile_uuid={uuid}")).await;
    assert!(serde_json::from_str::<Value>(&r.text).is_err());

    let r = c.get("/profile").await;
    assert_eq!(r.text, "\"PROFILE_UUID_REQUIRED\"");
    for (method, path, allow) in [
        (reqwest::Method::PATCH, "/profile", "GET, POST, PUT"),
        (reqwest::Method::DELETE, "/profile", "GET, POST, PUT"),
        (
            reqwest::Method::GET,
            "/profile/devices",
            "DELETE, POST, PUT",
        ),
    ] {
        let r = c.send(method.clone(), path, "{}".into()).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(r.headers["allow"], allow);
    }
    c.session = "stale".into();
    let r = c.unassign(json!({ "devices": [s[0]] })).await;
    assert_eq!(error_of(&r), (StatusCode::UNAUTHORIZED, "\"UNAUTHORIZED\""));

    let seen: Vec<(Endpoint, String)> = m
        .requests()
        .into_iter()
        .map(|r| (r.endpoint, r.method))
        .collect();
    let expected = [
        (Endpoint::Session, "GET"),
        (Endpoint::DefineProfile, "POST"),
        (Endpoint::AssignProfile, "POST"),
        (Endpoint::AssignProfile, "POST"),
        (Endpoint::GetProfile, "GET"),
        (Endpoint::GetProfile, "GET"),
        (Endpoint::DefineProfile, "PATCH"),
        (Endpoint::DefineProfile, "DELETE"),
        (Endpoint::AssignProfile, "GET"),
        (Endpoint::RemoveProfile, "DELETE"),
    ];
    let expected: Vec<(Endpoint, String)> = expected
        .iter()
        .map(|(e, m)| (*e, (*m).to_owned()))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn the_admin_api_scripts_assignments_and_lists_profiles() {
    let m = mock(MockConfig {
        devices: 3,
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = |path: &str, body: Value| {
        http.post(format!("{}/_mock/{path}", m.base_url()))
            .body(body.to_string())
    };
    let r = reply(admin(
        "profiles/script",
        json!({ "status": "THROTTLED", "count": 1, "retry_after_seconds": 30 }),
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({ "scripted": 1, "status": "THROTTLED", "pending": 1 })
    );
    let r = reply(admin(
        "profiles/script",
        json!({ "status": "FAILED", "count": 1 }),
    ))
    .await;
    assert_eq!(r.json()["pending"], 2);
    for bad in [
        json!({ "status": "SUCCESS", "count": 1 }),
        json!({ "status": "FAILED" }),
        json!({ "status": "FAILED", "count": 1, "retry_after_seconds": "soon" }),
    ] {
        let r = reply(admin("profiles/script", bad.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let fault = reply(admin(
        "faults",
        json!({ "endpoint": "remove_profile", "status": 500 }),
    ))
    .await;
    assert_eq!(fault.json(), json!({ "queued": "remove_profile" }));

    let mut c = Client::new(&m).await;
    c.proto = "10";
    let uuid = c.define_ok("Staff").await;
    let s = m.serials();
    let v = c.assign(&uuid, &s).await.json();
    assert_eq!(v["devices"][&s[0]], "THROTTLED");
    assert_eq!(v["devices"][&s[1]], "FAILED");
    assert_eq!(v["devices"][&s[2]], "SUCCESS");
    assert_eq!(v["retry_after_seconds"], 30);
    assert_eq!(
        c.unassign(json!({ "devices": [s[2]] })).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let listed = reply(http.get(format!("{}/_mock/profiles", m.base_url())))
        .await
        .json();
    let mut expected = profile("Staff");
    expected["profile_uuid"] = uuid.into();
    assert_eq!(listed, json!([expected]));
    let stats = reply(http.get(format!("{}/_mock/stats", m.base_url())))
        .await
        .json();
    assert_eq!(stats["profiles"], 1);
    assert_eq!(stats["requests"]["define_profile"], 1);
    assert_eq!(stats["requests"]["assign_profile"], 1);
    assert_eq!(stats["requests"]["remove_profile"], 1);
    assert_eq!(stats["requests"]["get_profile"], 0);
}

/// The benchmark's shape: a million devices fetched at 1000 per page. Opt-in (release build
/// recommended): `cargo test --release -p adesync-mock -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow; measures the simulator, run on demand"]
async fn a_million_devices_fetch_in_a_thousand_pages() {
    let t = std::time::Instant::now();
    let m = mock(MockConfig {
        devices: 1_000_000,
        max_limit: 1000,
        ..Default::default()
    })
    .await;
    eprintln!("start-up with 1M devices: {:?}", t.elapsed());
    let c = Client::new(&m).await;
    let t = std::time::Instant::now();
    let mut cursor: Option<String> = None;
    let (mut pages, mut bytes, mut devices) = (0, 0, 0);
    loop {
        let r = c.fetch(cursor.as_deref(), 1000).await;
        assert_eq!(r.status, StatusCode::OK);
        let v = r.json();
        pages += 1;
        bytes += r.text.len();
        devices += v["devices"].as_array().unwrap().len();
        cursor = Some(v["cursor"].as_str().unwrap().to_owned());
        if !v["more_to_follow"].as_bool().unwrap() {
            break;
        }
    }
    eprintln!(
        "fetched {devices} devices in {pages} pages, {} MB, in {:?} (client parse included)",
        bytes >> 20,
        t.elapsed()
    );
    assert_eq!((devices, pages), (1_000_000, 1000));
}
