//! The Apple client against a wiremock server: what it sends and how it reacts.

use std::time::{Duration, Instant};

use adesync::apple::{ApiError, AppleClient, ClientSettings, CursorError};
use adesync::config::RetryPolicy;
use adesync::token::{Secret, ServerToken};
use wiremock::matchers::{header, header_exists, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

fn token() -> ServerToken {
    ServerToken {
        consumer_key: "CK_test".into(),
        consumer_secret: Secret::new("CS_secret_value"),
        access_token: Secret::new("AT_secret_value"),
        access_secret: Secret::new("AS_secret_value"),
        access_token_expiry: chrono::Utc::now() + chrono::Duration::days(100),
    }
}

fn client(server: &MockServer, attempts: u32) -> AppleClient {
    client_at(&server.uri(), attempts)
}

fn client_at(base_url: &str, attempts: u32) -> AppleClient {
    AppleClient::new(
        token(),
        ClientSettings {
            base_url: reqwest::Url::parse(base_url).unwrap(),
            user_agent: "adesync-test/1".into(),
            protocol_version: 7,
            timeout: Duration::from_secs(5),
            retry: RetryPolicy {
                max_attempts: attempts,
                initial_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
            },
            max_response_bytes: 1024 * 1024,
        },
    )
    .unwrap()
}

fn session_ok(token: &str) -> Mock {
    Mock::given(method("GET"))
        .and(path("/session"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string(format!("{{\"auth_session_token\":\"{token}\"}}")),
        )
}

fn page(cursor: &str, more: bool) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_string(format!(
        r#"{{"devices":[{{"serial_number":"C02X","model":"MacBook Air"}}],"cursor":"{cursor}","fetched_until":"2024-07-03T09:46:40Z","more_to_follow":{more}}}"#
    ))
}

fn count(reqs: &[Request], p: &str) -> usize {
    reqs.iter().filter(|r| r.url.path() == p).count()
}

#[tokio::test]
async fn every_call_carries_user_agent_protocol_version_and_session() {
    let server = MockServer::start().await;
    session_ok("S1").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/server/devices"))
        .and(header("x-adm-auth-session", "S1"))
        .and(header("user-agent", "adesync-test/1"))
        .and(header("x-server-protocol-version", "7"))
        .respond_with(page("C1", false))
        .mount(&server)
        .await;
    let c = client(&server, 1);
    let p = c.fetch_devices(None, 1000).await.unwrap();
    assert_eq!(p.cursor, "C1");
    assert_eq!(p.devices[0].device.serial_number, "C02X");
    let reqs = server.received_requests().await.unwrap();
    let session = reqs.iter().find(|r| r.url.path() == "/session").unwrap();
    let auth = session
        .headers
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(auth.starts_with("OAuth realm=\"ADM\","), "{auth}");
    assert!(auth.contains("oauth_consumer_key=\"CK_test\""), "{auth}");
    assert!(
        !auth.contains("CS_secret_value") && !auth.contains("AS_secret_value"),
        "secrets must not be sent: {auth}"
    );
    assert_eq!(session.headers.get("user-agent").unwrap(), "adesync-test/1");
    let fetch = reqs
        .iter()
        .find(|r| r.url.path() == "/server/devices")
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&fetch.body).unwrap();
    assert_eq!(body, serde_json::json!({"limit": 1000}));
    // The session is reused.
    c.fetch_devices(Some("C1"), 1000).await.unwrap();
    assert_eq!(
        count(&server.received_requests().await.unwrap(), "/session"),
        1
    );
}

/// `/session` answers "OLD" first and "NEW" after; `api_path` refuses OLD with
/// `status`/`body` and serves a page with cursor `cursor` to NEW.
async fn stale_then_fresh_session(
    server: &MockServer,
    api_path: &str,
    status: u16,
    body: &str,
    cursor: &str,
) {
    Mock::given(method("GET"))
        .and(path("/session"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"auth_session_token":"OLD"}"#))
        .up_to_n_times(1)
        .mount(server)
        .await;
    session_ok("NEW").mount(server).await;
    Mock::given(method("POST"))
        .and(path(api_path))
        .and(header("x-adm-auth-session", "OLD"))
        .respond_with(ResponseTemplate::new(status).set_body_string(body))
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path(api_path))
        .and(header("x-adm-auth-session", "NEW"))
        .respond_with(page(cursor, false))
        .mount(server)
        .await;
}

#[tokio::test]
async fn an_expired_session_is_renewed_and_the_request_replayed() {
    let server = MockServer::start().await;
    stale_then_fresh_session(&server, "/server/devices", 401, "UNAUTHORIZED", "C1").await;
    let c = client(&server, 1);
    let p = c.fetch_devices(None, 10).await.unwrap();
    assert_eq!(p.cursor, "C1");
    let reqs = server.received_requests().await.unwrap();
    assert_eq!(count(&reqs, "/session"), 2);
    assert_eq!(count(&reqs, "/server/devices"), 2);
}

#[tokio::test]
async fn a_403_forbidden_session_is_renewed_too() {
    let server = MockServer::start().await;
    stale_then_fresh_session(&server, "/devices/sync", 403, "\"FORBIDDEN\"", "C9").await;
    let p = client(&server, 1).sync_devices("C8", 10).await.unwrap();
    assert_eq!(p.cursor, "C9");
}

#[tokio::test]
async fn a_403_forbidden_that_survives_a_fresh_session_means_a_revoked_token() {
    let server = MockServer::start().await;
    session_ok("S").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/devices/sync"))
        .respond_with(ResponseTemplate::new(403).set_body_string("FORBIDDEN"))
        .mount(&server)
        .await;
    let err = client(&server, 3).sync_devices("C", 10).await.unwrap_err();
    assert!(
        matches!(err, ApiError::TokenRejected { status: 403, .. }),
        "{err}"
    );
    assert!(err.needs_admin());
    assert!(err.to_string().contains("Download Token"), "{err}");
    assert_eq!(
        count(&server.received_requests().await.unwrap(), "/session"),
        2
    );
}

#[tokio::test]
async fn a_second_401_is_an_error_not_a_loop() {
    let server = MockServer::start().await;
    session_ok("S").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/devices/sync"))
        .respond_with(ResponseTemplate::new(401).set_body_string("UNAUTHORIZED"))
        .mount(&server)
        .await;
    let err = client(&server, 3).sync_devices("C", 10).await.unwrap_err();
    assert!(matches!(err, ApiError::SessionRejected(_)), "{err}");
    let reqs = server.received_requests().await.unwrap();
    assert_eq!(count(&reqs, "/session"), 2);
    assert_eq!(count(&reqs, "/devices/sync"), 2);
}

#[tokio::test]
async fn a_rotated_session_header_is_adopted() {
    let server = MockServer::start().await;
    session_ok("FIRST").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/devices/sync"))
        .and(header("x-adm-auth-session", "FIRST"))
        .respond_with(page("C2", true).insert_header("X-ADM-Auth-Session", "ROTATED"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/devices/sync"))
        .and(header("x-adm-auth-session", "ROTATED"))
        .respond_with(page("C3", false))
        .mount(&server)
        .await;
    let c = client(&server, 1);
    assert_eq!(c.sync_devices("C1", 10).await.unwrap().cursor, "C2");
    assert_eq!(c.sync_devices("C2", 10).await.unwrap().cursor, "C3");
    assert_eq!(
        count(&server.received_requests().await.unwrap(), "/session"),
        1
    );
}

#[tokio::test]
async fn each_cursor_error_is_typed() {
    for (body, want) in [
        ("EXHAUSTED_CURSOR", CursorError::Exhausted),
        ("\"EXPIRED_CURSOR\"", CursorError::Expired),
        ("INVALID_CURSOR\n", CursorError::Invalid),
        ("CURSOR_REQUIRED", CursorError::Required),
    ] {
        let server = MockServer::start().await;
        session_ok("S").mount(&server).await;
        Mock::given(method("POST"))
            .and(path("/devices/sync"))
            .respond_with(ResponseTemplate::new(400).set_body_string(body))
            .mount(&server)
            .await;
        let err = client(&server, 3).sync_devices("C", 10).await.unwrap_err();
        match err {
            ApiError::Cursor { kind, .. } => assert_eq!(kind, want, "{body}"),
            other => panic!("{body}: {other}"),
        }
        // Cursor errors are not retried.
        assert_eq!(
            count(&server.received_requests().await.unwrap(), "/devices/sync"),
            1
        );
    }
}

#[tokio::test]
async fn retry_after_is_honoured_then_the_call_succeeds() {
    let server = MockServer::start().await;
    session_ok("S").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/devices/sync"))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "1"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/devices/sync"))
        .respond_with(page("C2", false))
        .mount(&server)
        .await;
    let started = Instant::now();
    let p = client(&server, 3).sync_devices("C1", 10).await.unwrap();
    assert_eq!(p.cursor, "C2");
    // The configured backoff is 10-50 ms; only Retry-After explains a wait of a second.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        count(&server.received_requests().await.unwrap(), "/devices/sync"),
        2
    );
}

#[tokio::test]
async fn server_errors_are_retried_up_to_the_limit() {
    let server = MockServer::start().await;
    session_ok("S").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/devices/sync"))
        .respond_with(ResponseTemplate::new(500).set_body_string("Internal Server Error"))
        .mount(&server)
        .await;
    let err = client(&server, 3).sync_devices("C1", 10).await.unwrap_err();
    assert!(matches!(err, ApiError::Server { status: 500, .. }), "{err}");
    assert_eq!(
        count(&server.received_requests().await.unwrap(), "/devices/sync"),
        3
    );
}

#[tokio::test]
async fn a_malformed_body_is_an_error_that_names_the_endpoint() {
    let server = MockServer::start().await;
    session_ok("S").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/server/devices"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"devices\": [ {\"serial"))
        .mount(&server)
        .await;
    let err = client(&server, 2)
        .fetch_devices(None, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::MalformedBody { .. }), "{err}");
    assert!(err.to_string().contains("POST /server/devices"), "{err}");
    // A missing cursor is malformed too.
    let server = MockServer::start().await;
    session_ok("S").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/server/devices"))
        .respond_with(ResponseTemplate::new(200).set_body_string("{\"devices\": []}"))
        .mount(&server)
        .await;
    let err = client(&server, 1)
        .fetch_devices(None, 10)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cursor"), "{err}");
}

#[tokio::test]
async fn terms_not_signed_on_session_stops_with_the_remedy() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/session"))
        .and(header_exists("authorization"))
        .respond_with(ResponseTemplate::new(403).set_body_string("T_C_NOT_SIGNED"))
        .mount(&server)
        .await;
    let err = client(&server, 5)
        .fetch_devices(None, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::TermsNotSigned(_)), "{err}");
    assert!(err.to_string().contains("accept"), "{err}");
    assert_eq!(
        count(&server.received_requests().await.unwrap(), "/session"),
        1
    );
}

#[tokio::test]
async fn a_rejected_token_says_to_download_a_new_one_and_debug_hides_secrets() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/session"))
        .respond_with(ResponseTemplate::new(401).set_body_string("signature_invalid"))
        .mount(&server)
        .await;
    let c = client(&server, 5);
    let err = c.fetch_devices(None, 10).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("Download Token") && msg.contains("clock"),
        "{msg}"
    );
    let dbg = format!("{c:?} {err:?}");
    assert!(!dbg.contains("secret_value"), "{dbg}");
}

#[tokio::test]
async fn a_redirect_to_another_host_is_refused_and_the_session_never_leaves() {
    let server = MockServer::start().await;
    let elsewhere = MockServer::start().await;
    session_ok("S1").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/server/devices"))
        .respond_with(
            ResponseTemplate::new(307)
                .insert_header("location", format!("{}/server/devices", elsewhere.uri())),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(page("EVIL", false))
        .mount(&elsewhere)
        .await;
    let err = client(&server, 3)
        .fetch_devices(None, 100)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::Redirected { status: 307, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("api_url"), "{err}");
    assert!(
        elsewhere.received_requests().await.unwrap().is_empty(),
        "nothing, least of all X-ADM-Auth-Session, reaches the other host"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_whether_announced_or_streamed_without_end() {
    // Announced: Content-Length over the 1 MiB limit of the test client.
    let server = MockServer::start().await;
    session_ok("S1").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/server/devices"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b' '; 2 * 1024 * 1024]))
        .mount(&server)
        .await;
    let err = client(&server, 1)
        .fetch_devices(None, 100)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::TooLarge { limit: 1048576, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("1048576-byte limit"), "{err}");

    // Streamed: a chunked body that never ends, from a hostile server on 127.0.0.1.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                if req.starts_with("GET /session") {
                    let body = r#"{"auth_session_token":"S1"}"#;
                    let _ = sock
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    return;
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
                // At most 64 MiB, so a client that does not stop cannot run the test forever.
                for _ in 0..1024 {
                    if sock.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let hostile = client_at(&format!("http://{addr}"), 1);
    // Without the cap the client would read all 64 MiB and then fail to parse them.
    let err = hostile.fetch_devices(None, 100).await.unwrap_err();
    assert!(matches!(err, ApiError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn apples_error_bodies_are_printed_escaped() {
    let server = MockServer::start().await;
    session_ok("S1").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/server/devices"))
        .respond_with(
            ResponseTemplate::new(418)
                .set_body_string("NOPE\r\n2026-01-01 ERROR fake line \u{1b}[2J"),
        )
        .mount(&server)
        .await;
    let err = client(&server, 1)
        .fetch_devices(None, 100)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        !text.contains('\u{1b}') && !text.contains('\n') && !text.contains('\r'),
        "{text:?}"
    );
    assert!(text.contains("\\u{1b}[2J"), "{text}");
}

#[tokio::test]
async fn records_without_a_usable_serial_are_set_aside_and_the_rest_of_the_page_kept() {
    let server = MockServer::start().await;
    session_ok("S1").mount(&server).await;
    Mock::given(method("POST"))
        .and(path("/server/devices"))
        .respond_with(ResponseTemplate::new(200).set_body_string(
            r#"{"devices":[
                {"serial_number":"","model":"iPad"},
                {"serial_number":"   "},
                {"serial_number":5},
                {"model":"no serial at all"},
                {"serial_number":"C02BAD","profile_status":5},
                {"serial_number":"C02\u0000NUL","model":"Mac"},
                {"serial_number":"C02GOOD","model":"Mac"}
            ],"cursor":"C1","more_to_follow":false}"#,
        ))
        .mount(&server)
        .await;
    let page = client(&server, 1).fetch_devices(None, 100).await.unwrap();
    let serials: Vec<&str> = page
        .devices
        .iter()
        .map(|d| d.device.serial_number.as_str())
        .collect();
    assert_eq!(serials, ["C02GOOD"]);
    assert_eq!(page.refused.len(), 6, "{:?}", page.refused);
    assert!(
        page.refused[5]
            .contains("record 6 has a control character in its serial number (C02\\u{0}NUL)"),
        "{:?}",
        page.refused
    );
    assert_eq!(
        page.unreadable_serials,
        ["C02BAD"],
        "a device whose record is unreadable is still known to be on the server"
    );
    assert!(page.refused[0].contains("record 1 has an empty serial number"));
    assert!(
        page.refused[2].starts_with("record 3 is not a device"),
        "{:?}",
        page.refused
    );
    assert_eq!(page.cursor, "C1");
}
