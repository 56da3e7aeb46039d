//! Whole sync passes against the bundled Apple simulator: faults, schedules and several
//! tokens. The storage scenarios every backend must pass are in `backends.rs`.

use adesync::syncer::{run_all_once, run_token, SyncError};
use adesync_mock::{Credentials, Endpoint, Fault, FaultKind, MockConfig};

use crate::common::{assert_mirrors, event_counts, write_token, Env};

#[tokio::test]
async fn the_same_cursor_bug_stops_the_pass_and_the_next_run_continues() {
    let env = Env::new(100, 1000).await;
    let config = env.config();
    run_token(&config, &config.tokens[0], None).await.unwrap();
    env.mock.add_devices(2500);
    env.mock.push_fault(
        Endpoint::SyncDevices,
        Fault {
            times: 1,
            kind: FaultKind::SameCursor,
        },
    );
    env.mock.clear_requests();
    let s = run_token(&config, &config.tokens[0], None).await.unwrap();
    assert!(s.stopped_on_same_cursor);
    // It stopped instead of spinning.
    assert_eq!(env.mock.count_requests(Endpoint::SyncDevices), 1);
    // Apple recovers; the next run continues from the stored cursor and completes.
    let s = run_token(&config, &config.tokens[0], None).await.unwrap();
    assert!(!s.stopped_on_same_cursor);
    let store = env.store();
    assert_mirrors(&store, &env.mock);
    assert_eq!(event_counts(&store), (2600, 0, 0));
}

#[tokio::test]
async fn one_failing_token_does_not_stop_the_others() {
    let env = Env::with(
        MockConfig {
            devices: 20,
            ..Default::default()
        },
        100,
        "[[tokens]]\nname = \"revoked\"\ntoken_file = \"revoked.json\"\napi_url = \"API\"\n",
    )
    .await;
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("API", &env.mock.base_url());
    std::fs::write(&env.config_path, text).unwrap();
    let mut wrong = Credentials::depsim();
    wrong.access_secret = "AS_not_the_right_secret".into();
    write_token(&env.path("revoked.json"), &wrong, 30);
    let report = run_all_once(&env.config(), None).await;
    assert_eq!(report.ok.len(), 1);
    assert_eq!(report.ok[0].stats.added, 20);
    assert_eq!(report.failed.len(), 1);
    let (name, err) = &report.failed[0];
    assert_eq!(name, "revoked");
    assert!(
        matches!(
            err,
            SyncError::Api(adesync::apple::ApiError::TokenRejected { .. })
        ),
        "{err}"
    );
    assert!(err.needs_admin());
    let state = env.store().sync_state("revoked").unwrap();
    assert_eq!(state.last_error_kind.as_deref(), Some("token_rejected"));
    assert!(!state
        .last_error
        .unwrap()
        .contains("AS_not_the_right_secret"));
}

#[tokio::test]
async fn an_expired_token_is_refused_before_any_call_to_apple() {
    let env = Env::new(5, 100).await;
    write_token(&env.path("acme.json"), &Credentials::depsim(), -1);
    let config = env.config();
    let err = run_token(&config, &config.tokens[0], None)
        .await
        .unwrap_err();
    assert_eq!(err.kind().as_str(), "token_expired");
    assert!(err.to_string().contains("\"acme\""), "{err}");
    assert!(env.mock.requests().is_empty());
}

#[tokio::test]
async fn terms_not_signed_fails_the_run_with_the_remedy_and_keeps_the_cursor() {
    let env = Env::new(30, 100).await;
    let config = env.config();
    run_token(&config, &config.tokens[0], None).await.unwrap();
    let cursor = env.store().sync_state("acme").unwrap().cursor;
    env.mock.expire_sessions();
    env.mock.push_fault(
        Endpoint::Session,
        Fault {
            times: 1,
            kind: FaultKind::Status {
                status: 403,
                body: "T_C_NOT_SIGNED".into(),
                headers: vec![],
            },
        },
    );
    let err = run_token(&config, &config.tokens[0], None)
        .await
        .unwrap_err();
    assert_eq!(err.kind().as_str(), "terms_not_signed");
    assert!(err.to_string().contains("accept"), "{err}");
    assert_eq!(env.store().sync_state("acme").unwrap().cursor, cursor);
    // Once accepted, the next run succeeds.
    run_token(&config, &config.tokens[0], None).await.unwrap();
}

#[tokio::test]
async fn transient_server_errors_are_retried_within_the_run() {
    let env = Env::new(250, 100).await;
    let config = env.config();
    env.mock.push_fault(
        Endpoint::FetchDevices,
        Fault {
            times: 1,
            kind: FaultKind::Status {
                status: 503,
                body: String::new(),
                headers: vec![("Retry-After".into(), "0".into())],
            },
        },
    );
    env.mock.push_fault(
        Endpoint::FetchDevices,
        Fault {
            times: 1,
            kind: FaultKind::MalformedJson,
        },
    );
    let s = run_token(&config, &config.tokens[0], None).await;
    let s = s.unwrap();
    assert_eq!(s.stats.added, 250);
    assert_mirrors(&env.store(), &env.mock);
}

#[tokio::test]
async fn a_full_fetch_comes_due_on_its_schedule_and_never_with_never() {
    let env = Env::with(
        MockConfig {
            devices: 40,
            ..Default::default()
        },
        100,
        "full_fetch = \"1h\"\n",
    )
    .await;
    let config = env.config();
    let first = run_token(&config, &config.tokens[0], None).await.unwrap();
    assert!(
        first.fetched && !first.full_refetch,
        "the first fetch is not a re-fetch"
    );
    let again = run_token(&config, &config.tokens[0], None).await.unwrap();
    assert!(!again.fetched, "not due yet: a sync");
    // Two hours pass since the last full fetch.
    let earlier = adesync::model::format_time(chrono::Utc::now() - chrono::Duration::hours(2));
    set_last_full_fetch(&env, &earlier);
    let due = run_token(&config, &config.tokens[0], None).await.unwrap();
    assert!(due.full_refetch && due.fetched);
    assert_eq!(due.stats.events(), 0, "nothing missed, nothing written");
    assert_eq!(
        env.mock.count_requests(Endpoint::FetchDevices),
        2,
        "the first fetch and the re-fetch, one page each"
    );
    // With "never", no re-fetch however long ago.
    let text = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("full_fetch = \"1h\"", "full_fetch = \"never\"");
    std::fs::write(&env.config_path, text).unwrap();
    let config = env.config();
    set_last_full_fetch(&env, "2000-01-01T00:00:00Z");
    let never = run_token(&config, &config.tokens[0], None).await.unwrap();
    assert!(!never.full_refetch && !never.fetched);
}

fn set_last_full_fetch(env: &Env, when: &str) {
    rusqlite::Connection::open(env.path("adesync.db"))
        .unwrap()
        .execute(
            "UPDATE sync_state SET last_full_fetch_at = ?1 WHERE token_name = 'acme'",
            [when],
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_does_not_wait_for_a_slow_account_call() {
    let env = Env::new(10, 100).await;
    env.mock.push_fault(
        Endpoint::Account,
        Fault {
            times: 1,
            kind: FaultKind::Delay(std::time::Duration::from_secs(30)),
        },
    );
    let config = env.config();
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stop.cancel();
    });
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        adesync::syncer::run_token_cancellable(&config, &config.tokens[0], None, &cancel),
    )
    .await
    .expect("stops long before Apple's 30 s answer");
    assert!(matches!(outcome, Err(SyncError::Cancelled)), "{outcome:?}");
}
