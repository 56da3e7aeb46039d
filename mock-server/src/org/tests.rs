//! Scenarios of the Apple School and Business Manager API simulation over loopback HTTP: a
//! small client signs its own ES256 assertions with openssl (independent of the verifier)
//! and walks the JSON:API listings the way a real client would.

use std::collections::HashSet;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use openssl::ec::EcKey;
use openssl::ecdsa::EcdsaSig;
use openssl::pkey::Private;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::test_http::{mock, reply, Reply};
use crate::{
    Fault, FaultKind, MockConfig, MockHandle, OrgAccountConfig, OrgAccountInfo, OrgEndpoint,
    OrgQuirks, AUDIENCE,
};

impl Reply {
    fn ids(&self) -> Vec<String> {
        self.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect()
    }

    fn next_cursor(&self) -> Option<String> {
        self.json()["meta"]["paging"]["nextCursor"]
            .as_str()
            .map(str::to_owned)
    }

    /// The first JSON:API error's code.
    fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The OAuth error.
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A JWS ES256 compact token: DER signature from openssl, converted to raw `r || s`.
fn sign(key: &EcKey<Private>, header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = EcdsaSig::sign(&openssl::sha::sha256(input.as_bytes()), key).unwrap();
    let mut raw = sig.r().to_vec_padded(32).unwrap();
    raw.extend(sig.s().to_vec_padded(32).unwrap());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(raw))
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A client of one account.
struct Client {
    http: reqwest::Client,
    base: String,
    info: OrgAccountInfo,
    key: EcKey<Private>,
    token: String,
}

impl Client {
    async fn new(mock: &MockHandle, account: usize) -> Self {
        let info = mock.org_account(account);
        let key = EcKey::private_key_from_pem(info.private_key_pem.as_bytes()).unwrap();
        let mut c = Self {
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: mock.base_url(),
            info,
            key,
            token: String::new(),
        };
        c.login().await;
        c
    }

    fn header(&self) -> Value {
        json!({ "alg": "ES256", "kid": self.info.key_id, "typ": "JWT" })
    }

    fn claims(&self) -> Value {
        let now = unix_now();
        json!({
            "iss": self.info.client_id,
            "sub": self.info.client_id,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 30 * 86_400,
            "jti": crate::config::uuid_v4(&mut rand::rng()),
        })
    }

    fn scope(&self) -> &'static str {
        if self.info.client_id.starts_with("SCHOOLAPI.") {
            "school.api"
        } else {
            "business.api"
        }
    }

    async fn token_with(&self, assertion: &str, scope: &str) -> Reply {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.info.client_id.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", scope),
        ];
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        reply(
            self.http
                .post(format!("{}/auth/oauth2/token", self.base))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body),
        )
        .await
    }

    async fn login(&mut self) {
        let assertion = sign(&self.key, &self.header(), &self.claims());
        let r = self.token_with(&assertion, self.scope()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        self.token = r.json()["access_token"].as_str().unwrap().to_owned();
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Reply {
        let mut url = format!("{}{path}", self.base);
        if !query.is_empty() {
            let q: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(query)
                .finish();
            url = format!("{url}?{q}");
        }
        reply(self.http.get(url).bearer_auth(&self.token)).await
    }

    /// Walks a listing; calls `between` after each page. Returns the ids in order.
    async fn walk(&self, path: &str, limit: u32, mut between: impl FnMut(usize)) -> Vec<String> {
        let limit = limit.to_string();
        let mut cursor: Option<String> = None;
        let mut ids = Vec::new();
        for page in 0.. {
            let mut query = vec![("limit", limit.as_str())];
            if let Some(c) = &cursor {
                query.push(("cursor", c));
            }
            let r = self.get(path, &query).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            // Parsed once: a million devices make a thousand 850 kB pages.
            let v = r.json();
            let data = v["data"].as_array().unwrap();
            ids.extend(data.iter().map(|d| d["id"].as_str().unwrap().to_owned()));
            assert_eq!(v["meta"]["paging"]["limit"], limit.parse::<u32>().unwrap());
            cursor = v["meta"]["paging"]["nextCursor"]
                .as_str()
                .map(str::to_owned);
            assert_eq!(v["links"]["next"].is_string(), cursor.is_some());
            if cursor.is_none() {
                break;
            }
            between(page);
        }
        ids
    }
}

fn config(ade: usize, org: usize) -> MockConfig {
    MockConfig {
        devices: ade,
        org_accounts: vec![OrgAccountConfig {
            devices: org,
            ..OrgAccountConfig::business(1)
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_token_is_issued_for_a_valid_assertion_and_each_refusal_names_its_reason() {
    let m = mock(config(0, 10)).await;
    let c = Client::new(&m, 0).await;
    let (h, claims) = (c.header(), c.claims());

    let ok = c
        .token_with(&sign(&c.key, &h, &claims), "business.api")
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    let v = ok.json();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(v["scope"], "business.api");
    assert!(v["access_token"].as_str().unwrap().len() >= 32);

    let with = |k: &str, val: Value| {
        let mut c2 = c.claims();
        c2[k] = val;
        c2
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "bad kid",
            sign(&c.key, &json!({"alg": "ES256", "kid": "nope"}), &c.claims()),
            "business.api",
            "invalid_client",
        ),
        (
            "wrong aud",
            sign(
                &c.key,
                &h,
                &with("aud", "https://account.apple.com/auth/oauth2/token".into()),
            ),
            "business.api",
            "invalid_client",
        ),
        (
            "reused jti",
            sign(&c.key, &h, &claims),
            "business.api",
            "invalid_grant",
        ),
        (
            "wrong scope",
            sign(&c.key, &h, &c.claims()),
            "school.api",
            "invalid_scope",
        ),
        (
            "bad signature",
            sign(&EcKey::generate(c.key.group()).unwrap(), &h, &c.claims()),
            "business.api",
            "invalid_client",
        ),
        (
            "expired",
            sign(&c.key, &h, &with("exp", (unix_now() - 10).into())),
            "business.api",
            "invalid_grant",
        ),
        (
            "iat in the future",
            sign(&c.key, &h, &with("iat", (unix_now() + 600).into())),
            "business.api",
            "invalid_grant",
        ),
        (
            "lifetime over 180 days",
            sign(&c.key, &h, &with("exp", (unix_now() + 181 * 86_400).into())),
            "business.api",
            "invalid_grant",
        ),
        (
            "wrong iss",
            sign(&c.key, &h, &with("iss", "BUSINESSAPI.other".into())),
            "business.api",
            "invalid_client",
        ),
        (
            "not a JWT",
            "abc.def".to_owned(),
            "business.api",
            "invalid_client",
        ),
    ];
    for (what, assertion, scope, error) in &cases {
        let r = c.token_with(assertion, scope).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}: {}", r.text);
        assert_eq!(r.error(), *error, "{what}: {}", r.text);
        assert!(r.json()["error_description"].is_string(), "{what}");
        assert_eq!(r.headers["content-type"], "application/json");
    }

    // A DER signature (what openssl and most libraries produce) is refused with a hint.
    let input = format!("{}.{}", b64(&h), b64(&c.claims()));
    let der = EcdsaSig::sign(&openssl::sha::sha256(input.as_bytes()), &c.key)
        .unwrap()
        .to_der()
        .unwrap();
    let r = c
        .token_with(
            &format!("{input}.{}", URL_SAFE_NO_PAD.encode(der)),
            "business.api",
        )
        .await;
    assert_eq!(r.error(), "invalid_client");
    assert!(r.text.contains("DER"), "{}", r.text);

    // Unknown client, wrong grant type, missing client id.
    let http = &c.http;
    let token_url = m.org_token_url();
    let post = |body: &'static str| {
        http.post(&token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
    };
    assert_eq!(
        reply(post(
            "grant_type=client_credentials&client_id=BUSINESSAPI.x"
        ))
        .await
        .error(),
        "invalid_client"
    );
    let form = format!("grant_type=password&client_id={}", c.info.client_id);
    let r = reply(http.post(&token_url).body(form)).await;
    assert_eq!(r.error(), "unsupported_grant_type");
    assert_eq!(
        reply(post("grant_type=client_credentials")).await.error(),
        "invalid_request"
    );

    let stats = m.org_stats(0);
    assert_eq!(stats.tokens_issued, 2);
    assert_eq!(stats.token_requests, 2 + cases.len() as u64 + 1 + 1);
    for reason in [
        "wrong_kid",
        "wrong_aud",
        "reused_jti",
        "wrong_scope",
        "bad_signature",
        "expired",
        "iat_in_future",
        "lifetime_too_long",
        "wrong_iss",
        "malformed_assertion",
    ] {
        assert!(
            stats.refused.get(reason).copied().unwrap_or(0) >= 1,
            "{reason}: {stats:?}"
        );
    }
    assert_eq!(stats.refused["bad_signature"], 2);
    // The journal keeps each assertion's jti.
    let tokens: Vec<_> = m
        .org_requests(0)
        .into_iter()
        .filter(|r| r.endpoint == OrgEndpoint::Token)
        .collect();
    assert_eq!(tokens[1].jti.as_deref(), claims["jti"].as_str());
    assert_eq!(tokens[4].jti, tokens[1].jti);
    assert_eq!(tokens[4].status, 400);
}

#[tokio::test]
async fn the_account_key_comes_in_apples_pem_forms_and_debug_hides_it() {
    let m = mock(config(0, 1)).await;
    let info = m.org_account(0);
    assert!(info
        .private_key_pem
        .starts_with("-----BEGIN EC PRIVATE KEY-----"));
    assert!(info
        .private_key_pkcs8_pem
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(info
        .public_key_pem
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    let shown = format!("{info:?}");
    assert!(shown.contains(&info.client_id) && !shown.contains("EC PRIVATE"));
    assert!(info.client_id.starts_with("BUSINESSAPI."));
    assert_eq!(info.key_id.len(), 36);
    // Fresh per start.
    let other = mock(config(0, 1)).await;
    assert_eq!(other.org_account(0).client_id, info.client_id);
    assert_ne!(other.org_account(0).public_key_pem, info.public_key_pem);
}

#[tokio::test]
async fn min_token_interval_refuses_a_second_token_too_soon() {
    let mut cfg = config(0, 1);
    cfg.org_accounts[0].min_token_interval = Some(Duration::from_secs(60));
    let m = mock(cfg).await;
    let c = Client::new(&m, 0).await;
    let r = c
        .token_with(&sign(&c.key, &c.header(), &c.claims()), "business.api")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_request");
    assert_eq!(r.json()["error_description"], "too many token requests");
    m.advance_clock(chrono::Duration::seconds(61));
    let r = c
        .token_with(&sign(&c.key, &c.header(), &c.claims()), "business.api")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn walking_2500_devices_sees_each_once_despite_changes_mid_walk() {
    let m = mock(config(500, 2000)).await;
    let c = Client::new(&m, 0).await;
    let before: Vec<String> = m.org_devices(0).into_iter().map(|d| d.serial).collect();
    assert_eq!(before.len(), 2500);
    // Chosen now: one device the first page will not reach, to be released mid-walk.
    let first_page = c.get("/v1/orgDevices", &[("limit", "1000")]).await.ids();
    let late = m
        .org_devices(0)
        .into_iter()
        .map(|d| d.serial)
        .find(|s| !first_page.contains(s))
        .unwrap();
    let early = first_page[5].clone();
    let (mut added, mut changed) = (Vec::new(), Vec::new());
    let seen = c
        .walk("/v1/orgDevices", 1000, |page| {
            if page == 0 {
                added = m.add_org_devices(0, 3, None);
                assert_eq!(m.release_org_devices(0, &[late.clone(), early.clone()]), 2);
                changed = m.pick_org_devices(0, 20);
                assert_eq!(m.modify_org_devices(0, &changed), 20);
                let other = m.org_servers(0)[1].id.clone();
                m.assign_org_devices(0, &changed[..10], Some(&other));
                m.assign_org_devices(0, &changed[10..], None);
            }
        })
        .await;
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a device was repeated");
    for s in &before {
        if *s != late && *s != early {
            assert!(unique.contains(s), "{s} was skipped");
        }
    }
    assert!(!unique.contains(&late));
    // Added mid-walk: after every earlier index, so this walk reaches them.
    assert!(added.iter().all(|s| unique.contains(s)));
    assert_eq!(seen.len(), 2500 + 3 - 1);
    // The walk sent its cursors percent-encoded (they start with "+/+/").
    let pages: Vec<_> = m
        .org_requests(0)
        .into_iter()
        .filter(|r| r.endpoint == OrgEndpoint::OrgDevices && r.query_param("cursor").is_some())
        .collect();
    assert!(!pages.is_empty());
    assert!(pages
        .iter()
        .all(|r| r.raw_query().unwrap().contains("cursor=%2B%2F%2B%2F")));
    // The truth agrees with a fresh walk.
    let fresh = c.walk("/v1/orgDevices", 1000, |_| {}).await;
    let mut fresh_sorted = fresh.clone();
    fresh_sorted.sort();
    let truth: Vec<String> = m.org_devices(0).into_iter().map(|d| d.serial).collect();
    assert_eq!(fresh_sorted, truth);
    assert_eq!(m.org_released(0).len(), 2);
    // A released device still answers by serial, with its release time.
    let r = c.get(&format!("/v1/orgDevices/{late}"), &[]).await;
    let attrs = &r.json()["data"]["attributes"];
    assert!(attrs["releasedFromOrgDateTime"].is_string(), "{}", r.text);
    assert_eq!(attrs["status"], "UNASSIGNED");
}

#[tokio::test]
async fn listing_errors_are_json_api_errors() {
    let m = mock(config(0, 30)).await;
    let c = Client::new(&m, 0).await;
    let r = c.get("/v1/orgDevices", &[("limit", "1001")]).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "PARAMETER_ERROR.INVALID".into())
    );
    let r = c.get("/v1/orgDevices", &[("cursor", "MTAwMA")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A cursor sent without percent-encoding: its "+" arrives as a space.
    let next = c
        .get("/v1/orgDevices", &[("limit", "10")])
        .await
        .next_cursor()
        .unwrap();
    let raw = format!("{}/v1/orgDevices?limit=10&cursor={next}", c.base);
    let r = reply(c.http.get(raw).bearer_auth(&c.token)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    // The next link works as given.
    let first = c.get("/v1/orgDevices", &[("limit", "10")]).await.json();
    let link = first["links"]["next"].as_str().unwrap();
    let r = reply(c.http.get(link).bearer_auth(&c.token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.ids().len(), 10);

    let r = c.get("/v1/orgDevices/NOSUCHSERIAL", &[]).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::NOT_FOUND, "NOT_FOUND".into())
    );
    let r = c.get("/v1/somethingElse", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["errors"][0]["status"], "404");
    let r = reply(c.http.get(format!("{}/v1/orgDevices", c.base))).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "NOT_AUTHORIZED".into())
    );
    let e = &r.json()["errors"][0];
    assert_eq!(
        e["title"],
        "Authentication credentials are missing or invalid."
    );
    assert_eq!(e["id"].as_str().unwrap().len(), 36);
    assert_eq!(r.headers["content-type"], "application/json");
}

#[tokio::test]
async fn mdm_servers_and_their_device_relationships_page() {
    let m = mock(config(250, 300)).await;
    let c = Client::new(&m, 0).await;
    let r = c.get("/v1/mdmServers", &[]).await;
    let v = r.json();
    let servers = v["data"].as_array().unwrap();
    assert_eq!(servers.len(), 3);
    assert_eq!(servers[0]["id"], MockConfig::default().server_uuid);
    assert_eq!(servers[0]["attributes"]["serverName"], "adesync-mock");
    assert_eq!(servers[1]["attributes"]["serverName"], "Other MDM");
    assert_eq!(servers[2]["attributes"]["serverType"], "APPLE_CONFIGURATOR");
    assert!(servers[0]["attributes"]["createdDateTime"].is_string());
    assert_eq!(c.walk("/v1/mdmServers", 2, |_| {}).await.len(), 3);

    let ade_id = servers[0]["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/mdmServers/{ade_id}/relationships/devices");
    let ade = c.walk(&path, 100, |_| {}).await;
    assert_eq!(ade.len(), 250);
    let truth = m.org_devices(0);
    let expect: HashSet<String> = truth
        .iter()
        .filter(|d| d.server.as_deref() == Some(&ade_id))
        .map(|d| d.serial.clone())
        .collect();
    assert_eq!(ade.iter().cloned().collect::<HashSet<_>>(), expect);
    assert_eq!(
        c.get(&path, &[("limit", "5")]).await.json()["data"][0]["type"],
        "orgDevices"
    );

    // Unassign one, assign an unassigned one: both lists and assignedServer follow.
    let gone = ade[0].clone();
    let newcomer = truth
        .iter()
        .find(|d| d.server.is_none())
        .unwrap()
        .serial
        .clone();
    let updated_before = truth
        .iter()
        .find(|d| d.serial == newcomer)
        .unwrap()
        .attributes["updatedDateTime"]
        .clone();
    m.advance_clock(chrono::Duration::seconds(5));
    assert_eq!(
        m.assign_org_devices(0, std::slice::from_ref(&gone), None),
        1
    );
    assert_eq!(
        m.assign_org_devices(0, std::slice::from_ref(&newcomer), Some(&ade_id)),
        1
    );
    let after = c.walk(&path, 1000, |_| {}).await;
    assert!(!after.contains(&gone) && after.contains(&newcomer));
    let linkage = |s: String| {
        let c = &c;
        async move {
            c.get(
                &format!("/v1/orgDevices/{s}/relationships/assignedServer"),
                &[],
            )
            .await
            .json()
        }
    };
    assert_eq!(linkage(gone.clone()).await["data"], Value::Null);
    let l = linkage(newcomer.clone()).await;
    assert_eq!(l["data"], json!({ "type": "mdmServers", "id": ade_id }));
    let d = c
        .get(&format!("/v1/orgDevices/{newcomer}"), &[])
        .await
        .json();
    assert_eq!(d["data"]["attributes"]["status"], "ASSIGNED");
    assert_ne!(d["data"]["attributes"]["updatedDateTime"], updated_before);
    let related = c
        .get(&format!("/v1/orgDevices/{newcomer}/assignedServer"), &[])
        .await
        .json();
    assert_eq!(related["data"]["attributes"]["serverName"], "adesync-mock");

    let r = c
        .get("/v1/mdmServers/NOPE/relationships/devices", &[])
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // A cursor of one listing is no good for another.
    let other = c.get(&path, &[("limit", "1")]).await.next_cursor().unwrap();
    let r = c.get("/v1/orgDevices", &[("cursor", &other)]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn every_device_has_a_limited_warranty_and_about_a_third_applecare() {
    let m = mock(config(0, 300)).await;
    let c = Client::new(&m, 0).await;
    let mut with_plus = 0;
    for d in m.org_devices(0) {
        let r = c
            .get(
                &format!("/v1/orgDevices/{}/appleCareCoverage", d.serial),
                &[],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v = r.json();
        let data = v["data"].as_array().unwrap();
        assert_eq!(data[0]["type"], "appleCareCoverage");
        let lw = &data[0]["attributes"];
        assert_eq!(lw["description"], "Limited Warranty");
        assert_eq!(lw["paymentType"], "NONE");
        assert!(lw["startDateTime"].as_str() < lw["endDateTime"].as_str());
        assert!(v["meta"]["paging"]["limit"].is_number());
        if data.len() == 2 {
            with_plus += 1;
            let plus = &data[1]["attributes"];
            assert!(plus["description"]
                .as_str()
                .unwrap()
                .starts_with("AppleCare+ for "));
            assert!(
                ["PAID_UP_FRONT", "SUBSCRIPTION"].contains(&plus["paymentType"].as_str().unwrap())
            );
            assert!(["ACTIVE", "INACTIVE"].contains(&plus["status"].as_str().unwrap()));
            assert!(plus["isRenewable"].is_boolean() && plus["isCanceled"].is_boolean());
            assert!(plus["agreementNumber"].is_string());
        }
    }
    assert!((60..140).contains(&with_plus), "{with_plus} of 300");
}

#[tokio::test]
async fn a_scripted_429_carries_retry_after_and_the_limiter_counts_its_refusals() {
    let m = mock(config(0, 20)).await;
    let c = Client::new(&m, 0).await;
    m.push_org_fault(
        0,
        OrgEndpoint::OrgDevices,
        Fault {
            times: 1,
            kind: FaultKind::Status {
                status: 429,
                body: String::new(),
                headers: vec![("Retry-After".into(), "1".into())],
            },
        },
    );
    let r = c.get("/v1/orgDevices", &[]).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.code(), "RATE_LIMIT_EXCEEDED");
    assert_eq!(r.json()["errors"][0]["status"], "429");
    // A single device is not affected; the listing is again.
    assert_eq!(
        c.get(
            &format!("/v1/orgDevices/{}", m.org_devices(0)[0].serial),
            &[]
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(c.get("/v1/orgDevices", &[]).await.status, StatusCode::OK);
    let reqs = m.org_requests(0);
    let last_two = &reqs[reqs.len() - 3..];
    assert_eq!(last_two[0].status, 429);
    assert!(last_two[2].received > last_two[0].received);

    m.set_org_rate_limit(0, Some(2.0));
    let mut limited = 0;
    for _ in 0..6 {
        let r = c.get("/v1/mdmServers", &[]).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.headers["retry-after"], "1");
            limited += 1;
        }
    }
    assert!(limited >= 3, "{limited}");
    let stats = m.org_stats(0);
    assert_eq!(stats.rate_limited, limited);
    assert_eq!(stats.served_429, limited + 1);
    m.set_org_rate_limit(0, None);
    assert_eq!(c.get("/v1/mdmServers", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn quirks_bend_the_shape_but_not_the_truth() {
    let m = mock(config(0, 50)).await;
    let c = Client::new(&m, 0).await;
    let iphone = m
        .org_devices(0)
        .into_iter()
        .find(|d| d.attributes["productFamily"] == "iPhone")
        .unwrap();
    let path = format!("/v1/orgDevices/{}", iphone.serial);
    let plain = c.get(&path, &[]).await.json()["data"]["attributes"].clone();
    assert_eq!(plain, iphone.attributes);
    assert!(plain["imei"].is_array() && plain["meid"].is_array());
    m.set_org_quirks(
        0,
        OrgQuirks {
            list_values_as_strings: true,
            purchase_source_uid: true,
            future_field: true,
        },
    );
    let odd = c.get(&path, &[]).await.json()["data"]["attributes"].clone();
    assert_eq!(
        odd["imei"],
        plain["imei"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(odd["purchaseSourceUid"], plain["purchaseSourceId"]);
    assert!(odd.get("purchaseSourceId").is_none());
    assert_eq!(odd["futureField"], "future-value");
    assert_eq!(
        m.org_devices(0)
            .into_iter()
            .find(|d| d.serial == iphone.serial)
            .unwrap(),
        iphone
    );
}

#[tokio::test]
async fn two_accounts_are_isolated() {
    let m = mock(MockConfig {
        devices: 20,
        org_accounts: vec![
            OrgAccountConfig {
                devices: 30,
                ..OrgAccountConfig::business(1)
            },
            OrgAccountConfig {
                devices: 40,
                include_ade_devices: false,
                ..OrgAccountConfig::school(2)
            },
        ],
        ..Default::default()
    })
    .await;
    let a = Client::new(&m, 0).await;
    let b = Client::new(&m, 1).await;
    assert!(b.info.client_id.starts_with("SCHOOLAPI."));
    let seen_a = a.walk("/v1/orgDevices", 1000, |_| {}).await;
    let seen_b = b.walk("/v1/orgDevices", 1000, |_| {}).await;
    assert_eq!((seen_a.len(), seen_b.len()), (50, 40));
    assert!(seen_b.iter().all(|s| !seen_a.contains(s)));
    let r = a.get(&format!("/v1/orgDevices/{}", seen_b[0]), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // A's cursor means nothing to B.
    let cursor = a
        .get("/v1/orgDevices", &[("limit", "5")])
        .await
        .next_cursor()
        .unwrap();
    assert_eq!(
        b.get("/v1/orgDevices", &[("cursor", &cursor)]).await.status,
        StatusCode::BAD_REQUEST
    );
    // A's key cannot get B's tokens.
    let mut claims = b.claims();
    claims["jti"] = "x".into();
    let forged = sign(&a.key, &b.header(), &claims);
    assert_eq!(
        b.token_with(&forged, "school.api").await.error(),
        "invalid_client"
    );
    // Journals are per account.
    assert!(m.org_requests(1).iter().all(|r| r.account == Some(1)));
    assert_eq!(m.org_stats(1).tokens_issued, 1);
    m.add_org_devices(1, 2, None);
    assert_eq!(m.org_devices(0).len(), 50);
    assert_eq!(m.org_devices(1).len(), 42);
}

#[tokio::test]
async fn tokens_expire_on_the_simulated_clock_and_on_demand() {
    let m = mock(config(0, 5)).await;
    let mut c = Client::new(&m, 0).await;
    assert_eq!(c.get("/v1/orgDevices", &[]).await.status, StatusCode::OK);
    m.advance_clock(chrono::Duration::seconds(3601));
    let r = c.get("/v1/orgDevices", &[]).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "NOT_AUTHORIZED".into())
    );
    // The expired token is still attributed to its account.
    assert_eq!(m.org_requests(0).last().unwrap().status, 401);
    c.login().await;
    assert_eq!(c.get("/v1/orgDevices", &[]).await.status, StatusCode::OK);
    assert_eq!(m.expire_org_tokens(), 1);
    assert_eq!(
        c.get("/v1/orgDevices", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_org_admin_api_changes_and_reports_the_world() {
    let m = mock(config(10, 10)).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let admin = |path: &str, body: Value| {
        http.post(format!("{}/_mock/org/{path}", m.base_url()))
            .body(body.to_string())
    };
    let server = m.org_servers(0)[2].id.clone();
    let added = reply(admin(
        "devices",
        json!({ "account": 0, "count": 3, "server": server }),
    ))
    .await
    .json();
    assert_eq!(added["added"], 3);
    let serial = added["serials"][0].as_str().unwrap().to_owned();
    let truth = m.org_devices(0);
    let d = truth.iter().find(|d| d.serial == serial).unwrap();
    assert_eq!(d.server.as_deref(), Some(server.as_str()));
    assert_eq!(d.attributes["status"], "ASSIGNED");

    assert_eq!(
        reply(admin("devices/modify", json!({ "count": 4 })))
            .await
            .json()["modified"],
        4
    );
    let r = reply(admin(
        "devices/assign",
        json!({ "serials": [serial], "server": null }),
    ))
    .await
    .json();
    assert_eq!(r["assigned"], 1);
    assert_eq!(
        reply(admin("devices/release", json!({ "serials": [serial] })))
            .await
            .json()["released"],
        1
    );
    let bad = reply(admin(
        "devices/assign",
        json!({ "count": 1, "server": "NOPE" }),
    ))
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.text.contains("NOPE"));
    let bad = reply(admin("devices", json!({ "account": 3, "count": 1 }))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.json()["error"]
        .as_str()
        .unwrap()
        .contains("no organisation account 3"));
    let f = reply(admin(
        "faults",
        json!({ "endpoint": "token", "status": 503, "headers": [["Retry-After", "2"]] }),
    ))
    .await;
    assert_eq!(f.status, StatusCode::OK, "{}", f.text);
    assert_eq!(
        reply(admin(
            "faults",
            json!({ "endpoint": "nope", "status": 500 })
        ))
        .await
        .status,
        StatusCode::BAD_REQUEST
    );
    let q = reply(admin("quirks", json!({ "future_field": true }))).await;
    assert_eq!(q.json()["quirks"]["future_field"], true);

    let info = m.org_account(0);
    let key = EcKey::private_key_from_pem(info.private_key_pem.as_bytes()).unwrap();
    let client = Client {
        http: http.clone(),
        base: m.base_url(),
        info,
        key,
        token: String::new(),
    };
    let r = client
        .token_with(
            &sign(&client.key, &client.header(), &client.claims()),
            "business.api",
        )
        .await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.headers["retry-after"].to_str().unwrap()
        ),
        (503, "2")
    );
    let mut client = client;
    client.login().await;
    let one = client.get("/v1/orgDevices", &[("limit", "1")]).await.json();
    assert_eq!(one["data"][0]["attributes"]["futureField"], "future-value");
    assert_eq!(
        reply(admin("tokens/expire", json!({}))).await.json()["expired"],
        1
    );

    let stats = reply(http.get(format!("{}/_mock/org/stats", m.base_url())))
        .await
        .json();
    let s = &stats["accounts"][0];
    assert_eq!(s["devices"], 22);
    assert_eq!(s["released"], 1);
    assert_eq!(s["token_requests"], 2);
    assert_eq!(s["requests"]["org_devices"], 1);
    let truth = reply(http.get(format!("{}/_mock/org/devices?account=0", m.base_url())))
        .await
        .json();
    assert_eq!(truth.as_array().unwrap().len(), 22);
    assert_eq!(truth[0]["serial"], m.org_devices(0)[0].serial);
    let accounts = reply(http.get(format!("{}/_mock/org/accounts", m.base_url())))
        .await
        .json();
    assert_eq!(accounts[0]["servers"].as_array().unwrap().len(), 3);
    assert_eq!(accounts[0]["scope"], "business.api");
}

#[tokio::test]
async fn without_accounts_the_org_api_knows_no_one() {
    let m = mock(MockConfig::default()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = reply(
        http.post(m.org_token_url())
            .body("grant_type=client_credentials&client_id=BUSINESSAPI.x"),
    )
    .await;
    assert_eq!(r.error(), "invalid_client");
    let r = reply(
        http.get(format!("{}/v1/orgDevices", m.base_url()))
            .bearer_auth("x"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The ADE side does not see these requests.
    assert!(m.requests().is_empty());
    assert_eq!(m.all_org_requests().len(), 2);
}

#[tokio::test]
async fn a_hundred_thousand_org_devices_start_quickly() {
    // Debug builds are several times slower than release; the time is only logged here.
    let t = std::time::Instant::now();
    let n = if cfg!(debug_assertions) {
        100_000
    } else {
        1_000_000
    };
    let m = mock(config(0, n)).await;
    eprintln!("started with {n} org devices in {:?}", t.elapsed());
    assert_eq!(m.org_stats(0).devices, n);
    if !cfg!(debug_assertions) {
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}

#[tokio::test]
async fn page_faults_echo_the_cursor_or_repeat_a_device() {
    let m = mock(config(0, 30)).await;
    let c = Client::new(&m, 0).await;
    let first = c.get("/v1/orgDevices", &[("limit", "10")]).await;
    let cursor = first.next_cursor().unwrap();
    let fault = |kind| Fault { times: 1, kind };
    m.push_org_fault(0, OrgEndpoint::OrgDevices, fault(FaultKind::SameCursor));
    let r = c
        .get("/v1/orgDevices", &[("limit", "10"), ("cursor", &cursor)])
        .await;
    assert_eq!(r.next_cursor().as_deref(), Some(cursor.as_str()));
    m.push_org_fault(0, OrgEndpoint::Any, fault(FaultKind::DuplicateSerial));
    // Not a listing: the fault waits for one.
    let one = &first.ids()[0];
    assert_eq!(
        c.get(&format!("/v1/orgDevices/{one}"), &[]).await.status,
        StatusCode::OK
    );
    let ids = c
        .get("/v1/orgDevices", &[("limit", "10"), ("cursor", &cursor)])
        .await
        .ids();
    assert_eq!(ids.len(), 11);
    assert_eq!(ids[0], ids[10]);
    m.push_org_fault(
        0,
        OrgEndpoint::Token,
        fault(FaultKind::Delay(Duration::from_millis(300))),
    );
    let t = std::time::Instant::now();
    let r = c
        .token_with(&sign(&c.key, &c.header(), &c.claims()), "business.api")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(300));
}

/// The benchmark's shape: a million organisation devices walked at 1000 per page. Opt-in
/// (release build recommended): `cargo test --release -p adesync-mock -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow; measures the simulator, run on demand"]
async fn a_million_org_devices_walk_in_a_thousand_pages() {
    let t = std::time::Instant::now();
    let m = mock(config(0, 1_000_000)).await;
    eprintln!("start-up with 1M org devices: {:?}", t.elapsed());
    let c = Client::new(&m, 0).await;
    let t = std::time::Instant::now();
    let mut pages = 0;
    let seen = c.walk("/v1/orgDevices", 1000, |_| pages += 1).await;
    eprintln!(
        "walked {} devices in {} pages in {:?}",
        seen.len(),
        pages + 1,
        t.elapsed()
    );
    assert_eq!((seen.len(), pages + 1), (1_000_000, 1000));
}
