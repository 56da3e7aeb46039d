//! Event delivery end to end: syncs against the Apple simulator, then sinks that deliver
//! to a real HTTP receiver on 127.0.0.1 (which checks every signature itself, with the
//! `standardwebhooks` crate or an HMAC of its own), to a program, and to a file —
//! including receivers that are down, failing, refusing, slow, and a process killed
//! while delivering; and CloudEvents checked with the `cloudevents-sdk` crate.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adesync::model::SinkState;
use adesync::sinks::{deliver_all, sink_status, SinkError, SinkStatus};
use adesync::syncer::run_all_once;
use adesync_mock::MockConfig;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use cloudevents::AttributesReader;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore};

use crate::common::{adesync, assert_valid, free_port, output, run_once, schema, Env};

/// The secret of `hook.secret`, in the raw form (the key is the text itself).
const SECRET: &str = "receiver-shared-secret-0123456789";

/// A `whsec_` secret: the key is the base64-decoded rest.
fn whsec(seed: u8) -> String {
    let key: Vec<u8> = (0..32)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i))
        .collect();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// How the receiver answers one request.
#[derive(Clone, Debug)]
enum Reply {
    /// This status, with an optional Retry-After and body.
    Status(u16, Option<&'static str>, &'static str),
    /// Wait until the test releases it, then 200.
    Hold,
}

/// How the receiver checks signatures: as the README tells receivers to.
#[derive(Clone, Debug)]
enum Verifier {
    /// Standard Webhooks, by the `standardwebhooks` crate, knowing this one secret as
    /// written in adesync's secret file (`whsec_…` or raw text).
    Standard(String),
    /// adesync-v1, recomputed here with HMAC-SHA256 over "<timestamp>.<body>".
    AdesyncV1(String),
}

/// Checks one request's signature independently of adesync's own code.
fn verified(verifier: &Verifier, headers: &HeaderMap, body: &[u8]) -> bool {
    match verifier {
        Verifier::Standard(secret) => {
            let wh = if secret.starts_with("whsec_") {
                standardwebhooks::Webhook::new(secret).unwrap()
            } else {
                standardwebhooks::Webhook::from_bytes(secret.as_bytes().to_vec()).unwrap()
            };
            wh.verify(body, headers).is_ok()
        }
        Verifier::AdesyncV1(secret) => {
            // The key: a whsec_ secret's decoded bytes, else the text itself.
            let key = match secret.strip_prefix("whsec_") {
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
                None => secret.as_bytes().to_vec(),
            };
            let header = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let (ts, sig) = (header("x-adesync-timestamp"), header("x-adesync-signature"));
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
            mac.update(format!("{ts}.").as_bytes());
            mac.update(body);
            let want: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let fresh = ts
                .parse::<i64>()
                .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() <= 300);
            fresh && sig.split(',').any(|s| s.trim() == format!("v1={want}"))
        }
    }
}

/// One request the receiver saw, in arrival order.
#[derive(Clone, Debug)]
struct Seen {
    /// The answer (0 while held).
    status: u16,
    /// The request's headers.
    headers: HeaderMap,
    /// The raw body.
    body: Vec<u8>,
    /// The adesync events in it (for CloudEvents, each one's `data`).
    events: Vec<Value>,
    /// The CloudEvents in it, as sent (empty for the adesync format).
    cloudevents: Vec<Value>,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

struct Shared {
    verifier: Verifier,
    script: Mutex<VecDeque<Reply>>,
    seen: Mutex<Vec<Seen>>,
    bad_signatures: Mutex<u32>,
    arrived: Notify,
    gate: Semaphore,
}

/// A webhook receiver on 127.0.0.1 that verifies signatures as the README tells
/// receivers to, and answers from a script (then 200).
struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn hook(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    if !verified(&s.verifier, &headers, &body) {
        *s.bad_signatures.lock().unwrap() += 1;
        return (
            StatusCode::UNAUTHORIZED,
            HeaderMap::new(),
            "bad signature".into(),
        );
    }
    let items = match serde_json::from_slice::<Value>(&body).unwrap() {
        Value::Array(items) => items,
        one => vec![one],
    };
    let cloud = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/cloudevents"));
    let (events, cloudevents) = if cloud {
        (items.iter().map(|ce| ce["data"].clone()).collect(), items)
    } else {
        (items, Vec::new())
    };
    let reply = s.script.lock().unwrap().pop_front();
    let index = {
        let mut seen = s.seen.lock().unwrap();
        seen.push(Seen {
            status: 0,
            headers: headers.clone(),
            body: body.to_vec(),
            events,
            cloudevents,
        });
        seen.len() - 1
    };
    let (status, retry_after, text) = match reply {
        None => (200, None, "ok"),
        Some(Reply::Status(code, ra, text)) => (code, ra, text),
        Some(Reply::Hold) => {
            s.arrived.notify_one();
            s.gate.acquire().await.unwrap().forget();
            (200, None, "ok")
        }
    };
    s.seen.lock().unwrap()[index].status = status;
    let mut h = HeaderMap::new();
    if let Some(ra) = retry_after {
        h.insert("retry-after", ra.parse().unwrap());
    }
    (StatusCode::from_u16(status).unwrap(), h, text.into())
}

impl Receiver {
    /// A receiver that knows `hook.secret` and checks the default scheme.
    async fn start(script: Vec<Reply>) -> Receiver {
        Self::verifying(Verifier::Standard(SECRET.into()), script).await
    }

    async fn verifying(verifier: Verifier, script: Vec<Reply>) -> Receiver {
        Self::on(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            verifier,
            script,
        )
    }

    async fn on_port(port: u16, script: Vec<Reply>) -> Receiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        Self::on(listener, Verifier::Standard(SECRET.into()), script)
    }

    fn on(listener: tokio::net::TcpListener, verifier: Verifier, script: Vec<Reply>) -> Receiver {
        let shared = Arc::new(Shared {
            verifier,
            script: Mutex::new(script.into()),
            seen: Mutex::default(),
            bad_signatures: Mutex::default(),
            arrived: Notify::new(),
            gate: Semaphore::new(0),
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(shared.clone());
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            addr,
            shared,
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn script(&self, replies: Vec<Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    fn seen(&self) -> Vec<Seen> {
        assert_eq!(self.bad_signatures(), 0, "a request had a bad signature");
        self.shared.seen.lock().unwrap().clone()
    }

    fn bad_signatures(&self) -> u32 {
        *self.shared.bad_signatures.lock().unwrap()
    }

    /// Ids of the events it accepted (answered 2xx), in arrival order.
    fn accepted_ids(&self) -> Vec<i64> {
        self.seen()
            .iter()
            .filter(|s| (200..300).contains(&s.status))
            .flat_map(|s| s.events.iter().map(|e| e["id"].as_i64().unwrap()))
            .collect()
    }

    async fn wait_until_held(&self) {
        tokio::time::timeout(Duration::from_secs(120), self.shared.arrived.notified())
            .await
            .expect("the receiver never got the request it should hold");
    }

    fn release(&self) {
        self.shared.gate.add_permits(1000);
    }
}

fn webhook_toml(name: &str, url: &str, max_batch: usize, timeout: &str) -> String {
    format!(
        "[[sinks]]\nname = \"{name}\"\ntype = \"webhook\"\nurl = \"{url}\"\nsecret_file = \"hook.secret\"\nmax_batch = {max_batch}\ntimeout = \"{timeout}\"\n"
    )
}

/// A simulator with `devices` devices and the given sinks; the webhook secret file is in place.
async fn env_with(devices: usize, sinks: &str) -> Env {
    let env = Env::with(
        MockConfig {
            devices,
            ..Default::default()
        },
        1000,
        sinks,
    )
    .await;
    let secret = env.path("hook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    env
}

async fn sync(env: &Env) {
    let report = run_all_once(&env.config(), None).await;
    assert!(report.failed.is_empty(), "sync failed: {:?}", report.failed);
}

fn result_of<'a>(
    results: &'a [(String, Result<u64, SinkError>)],
    name: &str,
) -> &'a Result<u64, SinkError> {
    &results
        .iter()
        .find(|(n, _)| n == name)
        .expect("a result per sink")
        .1
}

fn status_of(env: &Env, name: &str) -> SinkStatus {
    sink_status(&env.store(), &env.config())
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

fn all_ids(env: &Env) -> Vec<i64> {
    env.store()
        .events_after(0, None, 1 << 40)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_while_gets_every_event_once_in_order() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let env = env_with(40, &webhook_toml("hook", &url, 7, "5s")).await;
    sync(&env).await;

    // Down: nothing listens. The pass fails for this sink only, and says so.
    let results = deliver_all(&env.config()).await;
    let err = result_of(&results, "hook").as_ref().unwrap_err();
    assert!(matches!(err, SinkError::Unavailable { .. }), "{err}");
    assert!(
        err.to_string().contains("retried on the next pass"),
        "{err}"
    );
    let st = status_of(&env, "hook");
    assert_eq!(
        (st.state, st.cursor, st.pending, st.parked),
        (SinkState::Failing, 0, 40, false)
    );
    assert!(st.last_error.as_deref().unwrap().contains(&url), "{st:?}");
    assert!(st.oldest_pending_at.is_some());

    // More changes while it is down.
    let serials = env.mock.serials();
    env.mock.modify_devices(&serials[..5]);
    env.mock.add_devices(3);
    sync(&env).await;
    assert!(deliver_all(&env.config()).await[0].1.is_err());

    // Up again: everything arrives, once, in id order, in batches of at most 7.
    let receiver = Receiver::on_port(port, vec![]).await;
    let results = deliver_all(&env.config()).await;
    let ids = all_ids(&env);
    assert_eq!(ids.len(), 48);
    assert_eq!(result_of(&results, "hook").as_ref().unwrap(), &48);
    assert_eq!(receiver.accepted_ids(), ids);
    let schema = schema();
    for s in receiver.seen() {
        assert!(s.body.starts_with(b"["), "max_batch > 1 sends arrays");
        assert!((1..=7).contains(&s.events.len()));
        for e in &s.events {
            assert_valid(&schema, e);
        }
    }
    let st = status_of(&env, "hook");
    assert_eq!(
        (st.state, st.cursor, st.pending, st.last_error),
        (SinkState::Ok, 48, 0, None)
    );
    assert!(st.last_delivered_at.is_some());

    // Nothing new: a pass sends nothing.
    let before = receiver.seen().len();
    assert_eq!(
        result_of(&deliver_all(&env.config()).await, "hook")
            .as_ref()
            .unwrap(),
        &0
    );
    assert_eq!(receiver.seen().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_and_a_long_retry_after_is_respected() {
    let receiver = Receiver::start(vec![
        Reply::Status(500, None, "boom"),
        Reply::Status(503, Some("0"), "busy"),
    ])
    .await;
    let env = env_with(5, &webhook_toml("hook", &receiver.url(), 1, "5s")).await;
    sync(&env).await;

    // Two failures, then success: all within one pass ([retry] max_attempts = 3).
    let results = deliver_all(&env.config()).await;
    assert_eq!(result_of(&results, "hook").as_ref().unwrap(), &5);
    let seen = receiver.seen();
    assert_eq!(
        seen.iter().map(|s| s.status).collect::<Vec<_>>(),
        [500, 503, 200, 200, 200, 200, 200]
    );
    // A retry carries the very same body and webhook-id; max_batch = 1 sends single objects.
    assert_eq!(seen[0].body, seen[2].body);
    assert_eq!(
        (seen[0].header("webhook-id"), seen[2].header("webhook-id")),
        ("evt_1_1", "evt_1_1")
    );
    assert_eq!(seen[3].header("webhook-id"), "evt_2_2");
    assert_eq!(seen[0].header("content-type"), "application/json");
    assert!(seen[0].body.starts_with(b"{"));
    assert_eq!(receiver.accepted_ids(), [1, 2, 3, 4, 5]);

    // 429 with a Retry-After longer than a pass waits: the sink pauses, even across passes.
    receiver.script(vec![Reply::Status(429, Some("3600"), "slow down")]);
    env.mock.add_devices(2);
    sync(&env).await;
    let err = result_of(&deliver_all(&env.config()).await, "hook")
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(err.contains("Retry-After"), "{err}");
    let requests = receiver.seen().len();
    assert!(result_of(&deliver_all(&env.config()).await, "hook").is_err());
    assert_eq!(
        receiver.seen().len(),
        requests,
        "no request before the receiver's time"
    );
    let st = status_of(&env, "hook");
    assert_eq!((st.state, st.pending), (SinkState::Waiting, 2));
    assert!(st.retry_at.is_some());

    // An operator can lift the pause.
    adesync::sinks::resume(&env.config(), "hook").await.unwrap();
    assert_eq!(
        result_of(&deliver_all(&env.config()).await, "hook")
            .as_ref()
            .unwrap(),
        &2
    );
    assert_eq!(receiver.accepted_ids(), all_ids(&env));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_parks_the_sink_and_other_sinks_carry_on() {
    let receiver =
        Receiver::start(vec![Reply::Status(400, None, "unknown field \"device\"")]).await;
    let sinks = format!(
        "{}[[sinks]]\nname = \"archive\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n",
        webhook_toml("hook", &receiver.url(), 4, "5s")
    );
    let env = env_with(10, &sinks).await;
    sync(&env).await;

    let results = deliver_all(&env.config()).await;
    let err = result_of(&results, "hook")
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("parked") && err.contains("400 Bad Request"),
        "{err}"
    );
    assert!(err.contains("adesync sinks resume hook"), "{err}");
    // The jsonl sink was not held up by the parked webhook.
    assert_eq!(result_of(&results, "archive").as_ref().unwrap(), &10);
    let st = status_of(&env, "hook");
    assert_eq!(
        (st.state, st.parked, st.cursor, st.pending),
        (SinkState::Parked, true, 0, 10)
    );
    let why = st.last_error.unwrap();
    assert!(
        why.contains("events 1..=4") && why.contains("unknown field"),
        "{why}"
    );

    // Parked stays parked: no more requests, nothing skipped.
    let requests = receiver.seen().len();
    assert!(matches!(
        result_of(&deliver_all(&env.config()).await, "hook"),
        Err(SinkError::Parked { .. })
    ));
    assert_eq!(receiver.seen().len(), requests);

    // Fixed receiver + resume: delivery restarts with the refused batch, in order.
    assert!(adesync::sinks::resume(&env.config(), "hook").await.unwrap());
    assert_eq!(
        result_of(&deliver_all(&env.config()).await, "hook")
            .as_ref()
            .unwrap(),
        &10
    );
    assert_eq!(receiver.accepted_ids(), all_ids(&env));
    assert_eq!(status_of(&env, "hook").state, SinkState::Ok);
}

/// Writes a secret file (mode 0600) into the env's folder.
fn write_secret(env: &Env, name: &str, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = env.path(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_secrets_sign_every_request_for_receivers_knowing_either() {
    let (new, old) = (whsec(1), whsec(2));
    let knows_new = Receiver::verifying(Verifier::Standard(new.clone()), vec![]).await;
    let knows_old = Receiver::verifying(Verifier::Standard(old.clone()), vec![]).await;
    let knows_neither = Receiver::verifying(Verifier::Standard(whsec(3)), vec![]).await;
    let legacy = Receiver::verifying(Verifier::AdesyncV1(SECRET.into()), vec![]).await;
    let rotating = |name: &str, url: String| {
        format!(
            "[[sinks]]\nname = \"{name}\"\ntype = \"webhook\"\nurl = \"{url}\"\n\
             secret_files = [\"new.secret\", \"old.secret\"]\nmax_batch = 3\ntimeout = \"5s\"\n"
        )
    };
    let sinks = format!(
        "{}{}{}[[sinks]]\nname = \"legacy\"\ntype = \"webhook\"\nurl = \"{}\"\nsignature = \"adesync-v1\"\n\
         secret_files = [\"new.secret\", \"hook.secret\"]\nmax_batch = 3\ntimeout = \"5s\"\n",
        rotating("to-new", knows_new.url()),
        rotating("to-old", knows_old.url()),
        rotating("to-stranger", knows_neither.url()),
        legacy.url(),
    );
    let env = env_with(7, "").await;
    write_secret(&env, "new.secret", &new);
    write_secret(&env, "old.secret", &old);
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(&env.config_path, format!("{text}{sinks}")).unwrap();
    sync(&env).await;

    let results = deliver_all(&env.config()).await;
    let ids = all_ids(&env);
    for (name, receiver) in [
        ("to-new", &knows_new),
        ("to-old", &knows_old),
        ("legacy", &legacy),
    ] {
        assert_eq!(result_of(&results, name).as_ref().unwrap(), &7, "{name}");
        assert_eq!(receiver.accepted_ids(), ids, "{name}");
    }
    // Each request: one signature per secret, an id naming its events, a fresh timestamp.
    for s in knows_new.seen() {
        let signatures: Vec<&str> = s.header("webhook-signature").split(' ').collect();
        assert_eq!(signatures.len(), 2, "{signatures:?}");
        assert!(signatures.iter().all(|v| v.starts_with("v1,")));
        let first = s.events[0]["id"].as_i64().unwrap();
        let last = s.events.last().unwrap()["id"].as_i64().unwrap();
        assert_eq!(s.header("webhook-id"), format!("evt_{first}_{last}"));
        let ts: i64 = s.header("webhook-timestamp").parse().unwrap();
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
        assert!(s.header("x-adesync-signature").is_empty());
    }
    // adesync-v1: comma-separated v1= signatures, which adesync's own verify accepts too.
    for s in legacy.seen() {
        let sig = s.header("x-adesync-signature");
        assert_eq!(sig.matches("v1=").count(), 2, "{sig}");
        let now = chrono::Utc::now().timestamp();
        let ts = s.header("x-adesync-timestamp");
        adesync::sinks::verify(
            SECRET.as_bytes(),
            ts,
            sig,
            &s.body,
            now,
            adesync::sinks::DEFAULT_TOLERANCE,
        )
        .unwrap();
        assert!(s.header("webhook-signature").is_empty());
    }
    // A receiver that knows neither secret refuses every request: the sink parks.
    assert!(knows_neither.bad_signatures() > 0);
    let err = result_of(&results, "to-stranger")
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(err.contains("parked") && err.contains("401"), "{err}");

    // A changed body, or a changed id, no longer verifies.
    let s = &knows_new.seen()[0];
    let wh = standardwebhooks::Webhook::new(&new).unwrap();
    wh.verify(&s.body, &s.headers).unwrap();
    let mut tampered = s.body.clone();
    let at = tampered.iter().position(|b| b.is_ascii_digit()).unwrap();
    tampered[at] = if tampered[at] == b'9' {
        b'8'
    } else {
        tampered[at] + 1
    };
    assert!(wh.verify(&tampered, &s.headers).is_err());
    let mut other_id = s.headers.clone();
    other_id.insert("webhook-id", "evt_1_99".parse().unwrap());
    assert!(wh.verify(&s.body, &other_id).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_parks_the_sink_saying_the_endpoint_is_gone() {
    let receiver = Receiver::start(vec![Reply::Status(410, None, "")]).await;
    let env = env_with(3, &webhook_toml("hook", &receiver.url(), 1, "5s")).await;
    sync(&env).await;
    let results = deliver_all(&env.config()).await;
    let err = result_of(&results, "hook").as_ref().unwrap_err();
    assert!(matches!(err, SinkError::Parked { .. }), "{err}");
    let err = err.to_string();
    assert!(
        err.contains("410 Gone") && err.contains("the receiver says this endpoint is gone"),
        "{err}"
    );
    assert!(err.contains("url"), "{err}");
    assert_eq!(err.matches("adesync sinks resume hook").count(), 1, "{err}");
    assert_eq!(receiver.seen().len(), 1, "not retried");
    let st = status_of(&env, "hook");
    assert_eq!((st.state, st.cursor), (SinkState::Parked, 0));
    assert!(st.last_error.unwrap().contains("endpoint is gone"));
}

/// Parses a CloudEvent with the `cloudevents-sdk` crate, checks its attributes against
/// its data, and the data against the event schema; returns the data.
fn checked_cloudevent(schema: &jsonschema::Validator, ce: &Value, instance: &str) -> Value {
    let event: cloudevents::Event = serde_json::from_value(ce.clone())
        .unwrap_or_else(|e| panic!("{ce} is not a CloudEvent: {e}"));
    let cloudevents::Data::Json(data) = event.data().expect("data").clone() else {
        panic!("{ce}: data is not JSON")
    };
    assert_valid(schema, &data);
    assert_eq!(event.specversion(), cloudevents::event::SpecVersion::V10);
    let id = data["id"].as_i64().unwrap();
    let owner = match data["account"].as_str() {
        Some(a) => format!("org_account:{a}"),
        None => format!("token:{}", data["token"].as_str().unwrap()),
    };
    assert_eq!(
        event.source().to_string(),
        format!("urn:adesync:{instance}:{owner}")
    );
    assert_eq!(
        event.ty(),
        format!("com.github.adesync.{}", data["type"].as_str().unwrap())
    );
    assert_eq!(event.subject(), data["serial_number"].as_str());
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let occurred: chrono::DateTime<chrono::Utc> =
        data["occurred_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(event.time(), Some(&occurred));
    if id > 0 {
        assert_eq!(event.id(), id.to_string());
        assert_eq!(
            event.extension("sequence"),
            Some(&cloudevents::event::ExtensionValue::String(format!(
                "{id:020}"
            )))
        );
    } else {
        assert!(event.id().starts_with("sink-test-"), "{}", event.id());
        assert!(event.extension("sequence").is_none());
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_reach_webhooks_files_and_programs() {
    let single = Receiver::start(vec![]).await;
    let batched = Receiver::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let piped = dir.path().join("piped.jsonl");
    let cloud = |toml: String| format!("{toml}format = \"cloudevents\"\n");
    let sinks = format!(
        "{}{}{}{}",
        cloud(webhook_toml("one", &single.url(), 1, "5s")),
        cloud(webhook_toml("batch", &batched.url(), 4, "5s")),
        cloud("[[sinks]]\nname = \"lines\"\ntype = \"jsonl\"\npath = \"ce.jsonl\"\n".into()),
        cloud(format!(
            "[[sinks]]\nname = \"program\"\ntype = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >> \\\"$0\\\"\", {:?}]\n",
            piped.display().to_string()
        )),
    );
    let env = env_with(8, &sinks).await;
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(&env.config_path, format!("instance = \"mdm-test\"\n{text}")).unwrap();
    sync(&env).await;
    let serials = env.mock.serials();
    env.mock.modify_devices(&serials[..2]);
    env.mock.delete_devices(&serials[5..6]);
    sync(&env).await;

    let results = deliver_all(&env.config()).await;
    for name in ["one", "batch", "lines", "program"] {
        assert_eq!(result_of(&results, name).as_ref().unwrap(), &11, "{name}");
    }
    let stored = env.store().events_after(0, None, 100).unwrap();
    let want: Vec<Value> = stored.iter().map(adesync::events::event_json).collect();
    for k in ["added", "modified", "deleted"] {
        assert!(stored.iter().any(|e| e.kind.as_str() == k), "no {k} event");
    }
    let schema = schema();

    // A webhook with max_batch = 1: one CloudEvent per request; larger: a JSON array.
    for (receiver, content_type, opener) in [
        (&single, "application/cloudevents+json", b'{'),
        (&batched, "application/cloudevents-batch+json", b'['),
    ] {
        let seen = receiver.seen();
        let mut sent = Vec::new();
        for s in &seen {
            assert_eq!(s.header("content-type"), content_type);
            assert_eq!(s.body[0], opener);
            assert!(!s.header("webhook-signature").is_empty(), "signed");
            for ce in &s.cloudevents {
                sent.push(ce.clone());
                assert_eq!(checked_cloudevent(&schema, ce, "mdm-test"), ce["data"]);
            }
        }
        assert_eq!(
            sent.iter().map(|ce| ce["data"].clone()).collect::<Vec<_>>(),
            want
        );
    }
    assert!(batched.seen().iter().all(|s| s.events.len() <= 4));

    // A file and a program get the same CloudEvents, one per line.
    let reference: Vec<Value> = single
        .seen()
        .iter()
        .flat_map(|s| s.cloudevents.clone())
        .collect();
    for file in [env.path("ce.jsonl"), piped.clone()] {
        let lines: Vec<Value> = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for ce in &lines {
            checked_cloudevent(&schema, ce, "mdm-test");
        }
        assert_eq!(lines, reference, "{}", file.display());
    }

    // The test event comes in the sink's format too, with a webhook-id of its own.
    for name in ["lines", "one"] {
        let out = output({
            let mut c = adesync(&env);
            c.args(["sinks", "test", name]);
            c
        })
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last_line = std::fs::read_to_string(env.path("ce.jsonl")).unwrap();
    let last: Value = serde_json::from_str(last_line.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "com.github.adesync.sink.test");
    checked_cloudevent(&schema, &last, "mdm-test");
    let test = single.seen().last().unwrap().clone();
    assert!(
        test.header("webhook-id").starts_with("test_"),
        "{:?}",
        test.headers
    );
    assert_eq!(test.header("content-type"), "application/cloudevents+json");
    assert_eq!(
        checked_cloudevent(&schema, &test.cloudevents[0], "mdm-test")["id"],
        0
    );
    assert_eq!(all_ids(&env).len(), 11, "test events are not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signing_and_format_settings_exit_78_naming_the_key() {
    let env = env_with(1, "").await;
    write_secret(&env, "new.secret", &whsec(1));
    write_secret(&env, "short.secret", "whsec_c2hvcnQ=");
    write_secret(&env, "garbled.secret", "whsec_%%%not-base64%%%");
    let base = std::fs::read_to_string(&env.config_path).unwrap();
    let hook = "[[sinks]]\nname = \"h\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n";
    let cases = [
        (
            format!("{base}{hook}secret_file = \"hook.secret\"\nsignature = \"sha256\"\n"),
            "sinks[0].signature",
        ),
        (
            format!("{base}{hook}secret_file = \"hook.secret\"\nformat = \"cloudevent\"\n"),
            "sinks[0].format",
        ),
        (
            format!("{base}{hook}secret_file = \"hook.secret\"\nsecret_files = [\"new.secret\"]\n"),
            "sinks[0].secret_files",
        ),
        (
            format!("{base}{hook}secret_files = []\n"),
            "sinks[0].secret_files",
        ),
        (
            format!("{base}{hook}secret_files = [\"new.secret\", \"short.secret\"]\n"),
            "sinks[0].secret_files[1]",
        ),
        (
            format!("{base}{hook}secret_file = \"garbled.secret\"\n"),
            "sinks[0].secret_file",
        ),
        (
            format!("{base}[[sinks]]\nname = \"j\"\ntype = \"jsonl\"\nformat = \"xml\"\n"),
            "sinks[0].format",
        ),
        (format!("instance = \"my host\"\n{base}"), "instance"),
    ];
    for (text, key) in cases {
        std::fs::write(&env.config_path, &text).unwrap();
        let out = output({
            let mut c = adesync(&env);
            c.arg("check-config");
            c
        })
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{key}: {err}");
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        assert!(
            !err.contains(&whsec(1)[6..]) && !err.contains("not-base64"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_does_not_delay_the_sync() {
    let receiver = Receiver::start(vec![Reply::Hold]).await;
    let env = env_with(10, &webhook_toml("hook", &receiver.url(), 100, "600s")).await;
    sync(&env).await;
    let config = env.config();
    let delivery = tokio::spawn(async move { deliver_all(&config).await });
    receiver.wait_until_held().await;

    // The receiver holds the first batch; a sync meanwhile commits its pages and events.
    env.mock.add_devices(5);
    env.mock.modify_devices(&env.mock.serials()[..3]);
    sync(&env).await;
    assert!(
        !delivery.is_finished(),
        "delivery is still waiting for the receiver"
    );
    let ids = all_ids(&env);
    assert_eq!(
        ids.len(),
        18,
        "the sync committed while delivery was in flight"
    );
    assert_eq!(status_of(&env, "hook").cursor, 0);

    // Released: the same pass goes on to deliver what the sync added, in order.
    receiver.release();
    let results = delivery.await.unwrap();
    assert_eq!(result_of(&results, "hook").as_ref().unwrap(), &18);
    assert_eq!(receiver.accepted_ids(), ids);
}

/// SIGKILL while the receiver holds a batch: the restarted process sends that batch
/// again (same ids, same bytes) and then the rest; nothing is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_delivery_resends_only_the_batch_in_flight() {
    let receiver = Receiver::start(vec![Reply::Status(200, None, "ok"), Reply::Hold]).await;
    let env = env_with(30, &webhook_toml("hook", &receiver.url(), 10, "600s")).await;
    let mut child = adesync(&env).args(["run", "--once"]).spawn().unwrap();
    receiver.wait_until_held().await;
    child.kill().unwrap(); // SIGKILL
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();

    // The sync had committed; the first batch's cursor too, not the held one's.
    let ids = all_ids(&env);
    assert_eq!(ids.len(), 30);
    assert_eq!(status_of(&env, "hook").cursor, 10);

    let out = run_once(&env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    receiver.release();

    let seen = receiver.seen();
    let sent: Vec<i64> = seen
        .iter()
        .flat_map(|s| s.events.iter().map(|e| e["id"].as_i64().unwrap()))
        .collect();
    let mut want: Vec<i64> = (1..=10).chain(11..=20).chain(11..=30).collect();
    want.sort();
    let mut sorted = sent.clone();
    sorted.sort();
    assert_eq!(
        sorted, want,
        "each event once, the held batch twice: {sent:?}"
    );
    // Every repeat is the same event, byte for byte.
    let mut by_id: BTreeMap<i64, Value> = BTreeMap::new();
    for e in seen.iter().flat_map(|s| s.events.iter()) {
        let id = e["id"].as_i64().unwrap();
        if let Some(first) = by_id.insert(id, e.clone()) {
            assert_eq!(&first, e, "a repeat of event {id} differs");
        }
    }
    assert_eq!(
        seen[1].body, seen[2].body,
        "the held batch was sent again unchanged"
    );
    assert_eq!(
        (seen[1].header("webhook-id"), seen[2].header("webhook-id")),
        ("evt_11_20", "evt_11_20"),
        "with the same webhook-id, across processes"
    );
    assert_eq!(status_of(&env, "hook").cursor, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sink_receives_the_exact_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("deliver.sh");
    std::fs::write(&script, "#!/bin/sh\ncat >> \"$1\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.path().join("received.jsonl");
    let sinks = format!(
        "[[sinks]]\nname = \"script\"\ntype = \"command\"\ncommand = [{:?}, {:?}]\nmax_batch = 4\n\
         [[sinks]]\nname = \"broken\"\ntype = \"command\"\ncommand = [\"sh\", \"-c\", \"cat >/dev/null; echo cannot reach the CMDB >&2; exit 3\"]\n",
        script.display().to_string(),
        out.display().to_string()
    );
    let env = env_with(9, &sinks).await;
    sync(&env).await;

    let results = deliver_all(&env.config()).await;
    assert_eq!(result_of(&results, "script").as_ref().unwrap(), &9);
    let want: String = env
        .store()
        .events_after(0, None, 100)
        .unwrap()
        .iter()
        .map(|e| format!("{}\n", adesync::events::event_json(e)))
        .collect();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);

    // A failing program: retried later, its words quoted, the cursor unmoved.
    let err = result_of(&results, "broken")
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exited with status 3") && err.contains("cannot reach the CMDB"),
        "{err}"
    );
    let st = status_of(&env, "broken");
    assert_eq!(
        (st.state, st.cursor, st.pending),
        (SinkState::Failing, 0, 9)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resends_the_range_and_the_sinks_command_reports() {
    let env = env_with(
        12,
        "[[sinks]]\nname = \"archive\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n",
    )
    .await;
    let run = |args: &'static [&'static str]| {
        let mut c = adesync(&env);
        c.args(args);
        output(c)
    };
    let out = run(&["run", "--once"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = || std::fs::read_to_string(env.path("events.jsonl")).unwrap();
    let first: Vec<String> = read().lines().map(str::to_owned).collect();
    assert_eq!(first.len(), 12);

    let out = run(&["events", "replay", "--sink", "archive", "--from", "5"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sent 8 event(s) again"));
    let after: Vec<String> = read().lines().map(str::to_owned).collect();
    assert_eq!(after.len(), 20);
    assert_eq!(
        after[12..],
        first[4..],
        "events 5..=12 again, identical, in order"
    );

    // Events the sink has not received yet cannot be "replayed".
    let out = run(&["events", "replay", "--sink", "archive", "--from", "99"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has not been delivered yet"));
    let out = run(&["events", "replay", "--sink", "nope", "--from", "1"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("configured: archive"));

    let out = run(&["sinks", "--format", "json"]).await;
    assert!(out.status.success());
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            st["name"].as_str(),
            st["type"].as_str(),
            st["state"].as_str(),
            st["cursor"].as_i64(),
            st["pending"].as_u64()
        ),
        (
            Some("archive"),
            Some("jsonl"),
            Some("ok"),
            Some(12),
            Some(0)
        )
    );
    let out = run(&["sinks"]).await;
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.starts_with("name") && table.contains("archive"),
        "{table}"
    );

    // The test event: delivered, not stored, and valid.
    let out = run(&["sinks", "test", "archive"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: Value = serde_json::from_str(read().lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["id"].as_i64(), last["type"].as_str()),
        (Some(0), Some("sink.test"))
    );
    assert_valid(&schema(), &last);
    assert_eq!(all_ids(&env).len(), 12);

    let out = run(&["sinks", "resume", "archive"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("was not parked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_validates_against_the_schema() {
    let env = env_with(20, "").await;
    sync(&env).await;
    let serials = env.mock.serials();
    env.mock.modify_devices(&serials[..4]);
    env.mock.delete_devices(&serials[10..12]);
    env.mock.add_devices(2);
    sync(&env).await;
    let schema = schema();
    let events = env.store().events_after(0, None, 1000).unwrap();
    for k in ["added", "modified", "deleted"] {
        assert!(events.iter().any(|e| e.kind.as_str() == k), "no {k} event");
    }
    for e in &events {
        let json = adesync::events::event_json(e);
        assert_valid(&schema, &json);
        assert_eq!(json["device"]["serial_number"], json["serial_number"]);
    }
    assert_valid(
        &schema,
        &adesync::events::test_event("acme", "2026-01-01T00:00:00.000Z"),
    );
    // And the schema does reject what is not an event.
    let mut bad = adesync::events::event_json(&events[0]);
    bad["type"] = "device.renamed".into();
    assert!(!schema.is_valid(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_past_retention_are_pruned_and_undelivered_ones_kept() {
    let port = free_port();
    let sinks = format!(
        "{}[[sinks]]\nname = \"archive\"\ntype = \"jsonl\"\npath = \"events.jsonl\"\n",
        webhook_toml("hook", &format!("http://127.0.0.1:{port}/hook"), 50, "5s")
    );
    let env = env_with(10, &sinks).await;
    // A top-level key goes before the tables.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        format!("event_retention = \"30d\"\n{text}"),
    )
    .unwrap();
    sync(&env).await;
    // Make every event 40 days old.
    let db = rusqlite::Connection::open(env.path("adesync.db")).unwrap();
    db.execute(
        "UPDATE events SET occurred_at = '2000-01-01T00:00:00.000Z'",
        [],
    )
    .unwrap();

    // The webhook is down: old as they are, its undelivered events stay.
    let results = deliver_all(&env.config()).await;
    assert!(result_of(&results, "archive").is_ok() && result_of(&results, "hook").is_err());
    assert_eq!(all_ids(&env).len(), 10);

    // Once every sink has them, they go; newer events stay.
    let receiver = Receiver::on_port(port, vec![]).await;
    env.mock.add_devices(1);
    sync(&env).await;
    let results = deliver_all(&env.config()).await;
    assert_eq!(result_of(&results, "hook").as_ref().unwrap(), &11);
    assert_eq!(receiver.accepted_ids().len(), 11);
    assert_eq!(all_ids(&env), [11]);
}

/// Peak resident memory of this test process so far, in KiB (nextest runs each test in
/// a process of its own).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sinks_endless_stderr_keeps_only_its_tail() {
    // `yes >&2` writes hundreds of MB a second; only the tail may be kept.
    let sinks = "[[sinks]]\nname = \"noisy\"\ntype = \"command\"\ntimeout = \"2s\"\n\
                 command = [\"sh\", \"-c\", \"cat >/dev/null; yes 'noise noise noise' >&2\"]\n";
    let env = env_with(5, sinks).await;
    sync(&env).await;
    let before = peak_rss_kib();
    let results = deliver_all(&env.config()).await;
    let err = result_of(&results, "noisy")
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not finish within 2s"), "{err}");
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "stderr is drained and bounded, not kept: peak grew by {grown_mib} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_0_is_success_even_when_a_background_child_keeps_the_pipes_open() {
    let sinks = "[[sinks]]\nname = \"bg\"\ntype = \"command\"\ntimeout = \"3s\"\n\
                 command = [\"sh\", \"-c\", \"cat >/dev/null; sleep 10 & exit 0\"]\n";
    let env = env_with(6, sinks).await;
    sync(&env).await;
    let results = deliver_all(&env.config()).await;
    assert_eq!(
        result_of(&results, "bg")
            .as_ref()
            .map_err(|e| e.to_string()),
        Ok(&6)
    );
    assert_eq!(status_of(&env, "bg").cursor, 6, "acknowledged, not re-sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_command_is_stopped_with_every_process_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let sinks = format!(
        "[[sinks]]\nname = \"stuck\"\ntype = \"command\"\ntimeout = \"1s\"\n\
         command = [\"sh\", \"-c\", \"sleep 300 & echo $! > {}; sleep 300\"]\n",
        pidfile.display()
    );
    let env = env_with(4, &sinks).await;
    sync(&env).await;
    let results = deliver_all(&env.config()).await;
    let err = result_of(&results, "stuck")
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not finish within 1s"), "{err}");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Gone, or a zombie waiting for its new parent to reap it: not running either way.
    let mut alive = true;
    for _ in 0..50 {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .map(|(_, r)| r.chars().next().unwrap_or('?'))
            });
        alive = !matches!(state, None | Some('Z') | Some('X'));
        if !alive {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!alive, "the grandchild {pid} was killed with its parent");
}
