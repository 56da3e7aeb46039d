//! The organisation API client against wiremock: the client assertion (decoded and
//! verified here), the access-token cache, one re-mint on 401, 429 and Retry-After,
//! redirects, cursors.

use std::path::Path;
use std::time::{Duration, Instant};

use adesync::config::{OrgAccountConfig, OrgScope, RetryPolicy, Schedule, ASSERTION_AUDIENCE};
use adesync::orgapi::{OrgApiError, OrgClient, OrgClientSettings};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::Private;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const CLIENT_ID: &str = "BUSINESSAPI.9703f56c-10ce-4876-8f59-e78e5e23a152";
const KEY_ID: &str = "d136aa66-0c3b-4bd4-9892-c20e8db024ab";

struct Setup {
    _dir: tempfile::TempDir,
    key: EcKey<Private>,
    account: OrgAccountConfig,
}

fn setup(server: &MockServer, rps: f64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap();
    let key_file = dir.path().join("org.pem");
    std::fs::write(&key_file, key.private_key_to_pem().unwrap()).unwrap();
    let account = OrgAccountConfig {
        name: "acme-org".into(),
        client_id: CLIENT_ID.into(),
        key_id: KEY_ID.into(),
        private_key_file: key_file,
        scope: OrgScope::Business,
        api_url: reqwest::Url::parse(&server.uri()).unwrap(),
        token_url: reqwest::Url::parse(&format!("{}/auth/oauth2/token", server.uri())).unwrap(),
        schedule: Schedule::Interval(Duration::from_secs(3600)),
        requests_per_second: rps,
        applecare: false,
        applecare_refresh: Duration::from_secs(86_400),
        page_size: 1000,
    };
    Setup {
        _dir: dir,
        key,
        account,
    }
}

fn client(s: &Setup) -> OrgClient {
    OrgClient::new(
        &s.account,
        OrgClientSettings {
            user_agent: "adesync-test/1".into(),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy {
                max_attempts: 3,
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(200),
            },
            max_response_bytes: 1024 * 1024,
        },
    )
    .unwrap()
}

fn token_ok(token: &str) -> Mock {
    Mock::given(method("POST"))
        .and(path("/auth/oauth2/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
        "access_token": token, "token_type": "Bearer", "expires_in": 3600, "scope": "business.api"
    })))
}

fn devices_page(serials: &[&str], next: Option<&str>) -> ResponseTemplate {
    let data: Vec<Value> = serials
        .iter()
        .map(|s| json!({"type": "orgDevices", "id": s, "attributes": {"serialNumber": s}}))
        .collect();
    let mut body =
        json!({"data": data, "links": {"self": "x"}, "meta": {"paging": {"limit": 1000}}});
    if let Some(n) = next {
        body["meta"]["paging"]["nextCursor"] = json!(n);
    }
    ResponseTemplate::new(200).set_body_json(body)
}

fn form(r: &Request) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(&r.body).into_owned().collect()
}

/// Verifies the assertion's ES256 signature with the account's public key and returns
/// (header, claims).
fn verify_jwt(jwt: &str, key: &EcKey<Private>) -> (Value, Value) {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWS compact serialisation");
    let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    assert_eq!(sig.len(), 64);
    let sig = EcdsaSig::from_private_components(
        openssl::bn::BigNum::from_slice(&sig[..32]).unwrap(),
        openssl::bn::BigNum::from_slice(&sig[32..]).unwrap(),
    )
    .unwrap();
    let public = EcKey::from_public_key(key.group(), key.public_key()).unwrap();
    let digest = openssl::sha::sha256(format!("{}.{}", parts[0], parts[1]).as_bytes());
    assert!(
        sig.verify(&digest, &public).unwrap(),
        "the signature verifies"
    );
    let decode = |p: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap();
    (decode(parts[0]), decode(parts[1]))
}

#[tokio::test]
async fn the_token_request_carries_a_verifiable_assertion_and_the_token_is_cached() {
    let server = MockServer::start().await;
    let s = setup(&server, 50.0);
    token_ok("tok-1").expect(1).mount(&server).await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(devices_page(&["C1"], None))
        .expect(3)
        .mount(&server)
        .await;
    let c = client(&s);
    for _ in 0..3 {
        let page = c.org_devices(None).await.unwrap();
        assert_eq!(page.data.len(), 1);
    }
    let reqs = server.received_requests().await.unwrap();
    let token_req = reqs
        .iter()
        .find(|r| r.url.path() == "/auth/oauth2/token")
        .unwrap();
    assert_eq!(
        token_req.headers.get("content-type").unwrap(),
        "application/x-www-form-urlencoded"
    );
    let f = form(token_req);
    assert_eq!(f["grant_type"], "client_credentials");
    assert_eq!(f["client_id"], CLIENT_ID);
    assert_eq!(f["scope"], "business.api");
    assert_eq!(
        f["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    let (header, claims) = verify_jwt(&f["client_assertion"], &s.key);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], KEY_ID);
    assert_eq!(claims["iss"], CLIENT_ID);
    assert_eq!(claims["sub"], CLIENT_ID);
    // Apple's audience even though the token URL here is the mock's.
    assert_eq!(claims["aud"], ASSERTION_AUDIENCE);
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    let now = chrono::Utc::now().timestamp();
    assert!((now - iat).abs() < 60, "iat is now");
    assert!(
        exp > iat && exp - iat <= 180 * 86_400,
        "a short, valid lifetime"
    );
    assert!(!claims["jti"].as_str().unwrap().is_empty());
    for r in reqs.iter().filter(|r| r.url.path() == "/v1/orgDevices") {
        assert_eq!(r.headers.get("authorization").unwrap(), "Bearer tok-1");
        assert_eq!(
            r.url.query_pairs().find(|(k, _)| k == "limit").unwrap().1,
            "1000"
        );
    }
}

#[tokio::test]
async fn a_401_mints_once_with_a_new_assertion_then_gives_up() {
    let server = MockServer::start().await;
    let s = setup(&server, 50.0);
    token_ok("tok").expect(3).mount(&server).await;
    // First call: 401, then fine with the new token.
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(ResponseTemplate::new(401))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(devices_page(&["C1"], None))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    let c = client(&s);
    c.org_devices(None).await.unwrap();
    let e = c.org_devices(None).await.unwrap_err();
    assert!(matches!(e, OrgApiError::Unauthorized(_)), "{e}");
    assert!(e.to_string().contains("deleted or disabled"), "{e}");
    let reqs = server.received_requests().await.unwrap();
    let jtis: std::collections::HashSet<String> = reqs
        .iter()
        .filter(|r| r.url.path() == "/auth/oauth2/token")
        .map(|r| {
            verify_jwt(&form(r)["client_assertion"], &s.key).1["jti"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(jtis.len(), 3, "a fresh jti for every token request");
}

#[tokio::test]
async fn a_429_pauses_the_whole_account_for_its_retry_after() {
    let server = MockServer::start().await;
    let s = setup(&server, 50.0);
    token_ok("tok").mount(&server).await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "2").set_body_json(
            json!({"errors":[{"status":"429","code":"RATE_LIMIT_EXCEEDED","title":"Too many requests","detail":"slow down"}]}),
        ))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(devices_page(&["C1"], None))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/mdmServers"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": []})))
        .mount(&server)
        .await;
    let c = std::sync::Arc::new(client(&s));
    let start = Instant::now();
    let c2 = c.clone();
    let walk = tokio::spawn(async move { c2.org_devices(None).await.map(|p| p.data.len()) });
    // Another request of the same account, sent while the pause is on, waits too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.mdm_servers(None).await.unwrap();
    let servers_done = start.elapsed();
    assert_eq!(walk.await.unwrap().unwrap(), 1);
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(
        servers_done >= Duration::from_secs(2),
        "the other request waited: {servers_done:?}"
    );
    assert_eq!(
        c.counters
            .rate_limited
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let reqs = server.received_requests().await.unwrap();
    let api: Vec<&Request> = reqs
        .iter()
        .filter(|r| r.url.path().starts_with("/v1/"))
        .collect();
    assert_eq!(
        api.len(),
        3,
        "the 429, then one retry and the other request"
    );
}

#[tokio::test]
async fn the_request_budget_spaces_requests() {
    let server = MockServer::start().await;
    let s = setup(&server, 2.0);
    token_ok("tok").mount(&server).await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(devices_page(&["C1"], None))
        .mount(&server)
        .await;
    let c = client(&s);
    let start = Instant::now();
    for _ in 0..5 {
        c.org_devices(None).await.unwrap();
    }
    // Six requests (the token's included) at 2 per second with a burst of 2: at least 2 s.
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_redirect_is_never_followed() {
    let server = MockServer::start().await;
    let elsewhere = MockServer::start().await;
    let s = setup(&server, 50.0);
    token_ok("secret-token").mount(&server).await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(ResponseTemplate::new(302).insert_header(
            "Location",
            format!("{}/v1/orgDevices", elsewhere.uri()).as_str(),
        ))
        .mount(&server)
        .await;
    let e = client(&s).org_devices(None).await.unwrap_err();
    assert!(matches!(e, OrgApiError::Redirected { .. }), "{e}");
    assert!(e.to_string().contains("never follows a redirect"), "{e}");
    assert!(elsewhere.received_requests().await.unwrap().is_empty());
    assert!(!e.to_string().contains("secret-token"));
}

#[tokio::test]
async fn cursors_are_percent_encoded_and_a_next_link_elsewhere_gives_only_its_cursor() {
    let server = MockServer::start().await;
    let s = setup(&server, 50.0);
    token_ok("tok").mount(&server).await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .and(wiremock::matchers::query_param("cursor", "a+b/c=&d"))
        .respond_with(devices_page(&["C2"], None))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/orgDevices"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "data": [{"type": "orgDevices", "id": "C1", "attributes": {}}],
            "links": {"next": "https://elsewhere.example/v1/orgDevices?cursor=a%2Bb%2Fc%3D%26d"}
        })))
        .mount(&server)
        .await;
    let c = client(&s);
    let first = c.org_devices(None).await.unwrap();
    let next = first.next_cursor.unwrap();
    assert_eq!(next, "a+b/c=&d");
    let second = c.org_devices(Some(&next)).await.unwrap();
    assert_eq!(second.data[0].id_text().as_deref(), Some("C2"));
    let reqs = server.received_requests().await.unwrap();
    let raw = reqs.last().unwrap().url.query().unwrap().to_owned();
    assert!(raw.contains("cursor=a%2Bb%2Fc%3D%26d"), "{raw}");
}

#[tokio::test]
async fn apple_refusing_the_account_says_what_to_check() {
    let server = MockServer::start().await;
    let s = setup(&server, 50.0);
    Mock::given(method("POST"))
        .and(path("/auth/oauth2/token"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_client"})))
        .mount(&server)
        .await;
    let e = client(&s).org_devices(None).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("the key, key ID or client ID does not match this API account"),
        "{e}"
    );
    assert!(e.kind().needs_admin());
    let dbg = format!("{:?}", client(&s));
    assert!(!dbg.contains("BEGIN"), "{dbg}");
}

#[test]
fn a_key_file_that_is_not_a_p256_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.pem");
    std::fs::write(&p, "not a key").unwrap();
    let e = adesync::orgapi::SigningKey::load(Path::new(&p)).unwrap_err();
    assert!(e.to_string().contains("k.pem"), "{e}");
}
