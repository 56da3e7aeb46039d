//! Shared fixtures: a simulator on 127.0.0.1, a config pointing at it, and comparisons
//! between the store and the simulator's truth.

use std::path::{Path, PathBuf};

use adesync::config::Config;
use adesync::store::{DeviceFilter, Store};
use adesync_mock::{Credentials, MockConfig, MockHandle};

/// A simulator, a temp folder with a token file and a config.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub mock: MockHandle,
    pub config_path: PathBuf,
    /// The configured `database` text: a file name in `dir`, or a PostgreSQL URL.
    pub database: String,
}

impl Env {
    /// A simulator with `devices` devices and a config with one token "acme" at `page_size`.
    pub async fn new(devices: usize, page_size: u32) -> Env {
        Self::with(
            MockConfig {
                devices,
                ..Default::default()
            },
            page_size,
            "",
        )
        .await
    }

    /// Full control: simulator settings, page size, extra TOML appended to the config.
    pub async fn with(mock: MockConfig, page_size: u32, extra_toml: &str) -> Env {
        Self::on(Backend::Sqlite, mock, page_size, extra_toml).await
    }

    /// [`Env::with`] on a chosen backend: an SQLite file in the temp folder, or a schema of
    /// its own in the test PostgreSQL database.
    pub async fn on(backend: Backend, mock: MockConfig, page_size: u32, extra_toml: &str) -> Env {
        let mock = adesync_mock::start(mock).await.expect("simulator starts");
        let dir = tempfile::tempdir().unwrap();
        write_token(&dir.path().join("acme.json"), &Credentials::depsim(), 365);
        let config_path = dir.path().join("config.toml");
        let database = match backend {
            Backend::Sqlite => "adesync.db".to_owned(),
            Backend::Postgres => tokio::task::spawn_blocking(fresh_postgres_database)
                .await
                .unwrap(),
        };
        let text = format!(
            "database = \"{database}\"\n\
             [retry]\nmax_attempts = 3\ninitial_delay = \"100ms\"\nmax_delay = \"100ms\"\n\
             [[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\napi_url = \"{}\"\npage_size = {page_size}\n{extra_toml}",
            mock.base_url()
        );
        std::fs::write(&config_path, text).unwrap();
        Env {
            dir,
            mock,
            config_path,
            database,
        }
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).expect("valid config")
    }

    /// The store the config names (on PostgreSQL: call it off the async runtime).
    pub fn store(&self) -> Store {
        if adesync::config::Database::is_url(&self.database) {
            Store::open(adesync::config::Database::postgres(&self.database, None).unwrap()).unwrap()
        } else {
            Store::open(self.dir.path().join(&self.database)).unwrap()
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Writes a decrypted token file for `creds`, expiring in `days` (negative: expired).
pub fn write_token(path: &Path, creds: &Credentials, days: i64) {
    let json = creds.token_json(chrono::Utc::now() + chrono::Duration::days(days));
    std::fs::write(path, json).unwrap();
}

/// The simulator's current devices, sorted by serial, as JSON objects, in the shape the
/// mirror keeps (protocol-10 MAC addresses as lists, as `Device::normalise_v10` does).
pub fn truth(mock: &MockHandle) -> Vec<serde_json::Value> {
    mock.devices()
        .into_iter()
        .map(|v| {
            let mut d: adesync::model::Device = serde_json::from_value(v).unwrap();
            d.normalise_v10();
            d.to_json()
        })
        .collect()
}

/// The store's assigned devices of `token`, sorted by serial, as Apple-shaped JSON.
pub fn stored(store: &Store, token: &str) -> Vec<serde_json::Value> {
    store
        .devices(&DeviceFilter {
            token: Some(token.into()),
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|d| d.device.to_json())
        .collect()
}

/// Asserts the store mirrors the simulator exactly.
pub fn assert_mirrors(store: &Store, mock: &MockHandle) {
    let want = truth(mock);
    let got = stored(store, "acme");
    assert_eq!(got.len(), want.len(), "device count differs");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "stored device differs from the simulator");
    }
}

/// Counts of events by kind for a token.
pub fn event_counts(store: &Store) -> (usize, usize, usize) {
    let evs = store.events_after(0, None, u64::MAX >> 1).unwrap();
    let n = |k: &str| evs.iter().filter(|e| e.kind.as_str() == k).count();
    (n("added"), n("modified"), n("deleted"))
}

/// The built `adesync` binary with `--config` pointing at `env`'s config.
pub fn adesync(env: &Env) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_adesync"));
    c.arg("--config")
        .arg(&env.config_path)
        .env("RUST_LOG", "warn");
    c
}

/// Runs a command off the async runtime (the simulator lives on it) and waits for it.
pub async fn output(mut cmd: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// `adesync run --once` against `env`, to the end.
pub async fn run_once(env: &Env) -> std::process::Output {
    let mut c = adesync(env);
    c.args(["run", "--once"]);
    output(c).await
}

/// Starts `cmd` (output discarded), kills it with SIGKILL after `delay` if it is still
/// running, and waits for it; whether it was killed.
pub async fn kill_after(mut cmd: std::process::Command, delay: std::time::Duration) -> bool {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(delay).await;
    let killed = child.try_wait().unwrap().is_none();
    if killed {
        child.kill().unwrap(); // SIGKILL
    }
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    killed
}

/// A child process killed (and reaped) when this is dropped: a test that fails while a
/// daemon it started runs does not leave the daemon running. A child already reaped is
/// not signalled again (`Child::kill` knows its exit status).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// A loopback port with nothing listening on it (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The published event JSON Schema, ready to validate.
pub fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/event.schema.json"
    ))
    .unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&serde_json::from_str(&text).unwrap())
        .expect("the schema itself is valid")
}

/// Asserts `event` matches the schema, naming every error.
pub fn assert_valid(schema: &jsonschema::Validator, event: &serde_json::Value) {
    let errors: Vec<String> = schema.iter_errors(event).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{event} does not match the schema: {errors:?}"
    );
}

/// The store backends the conformance battery runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The test PostgreSQL server (`ADESYNC_TEST_POSTGRES_URL`, which `.ci/postgres start`
/// prints). None when unset, and the test says it was skipped by name; with
/// `ADESYNC_REQUIRE_POSTGRES=1` (as `.ci/run` sets) a missing URL fails the test instead.
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("ADESYNC_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("ADESYNC_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "{test}: ADESYNC_TEST_POSTGRES_URL is not set but ADESYNC_REQUIRE_POSTGRES=1"
            );
            eprintln!("SKIPPED {test} on PostgreSQL: ADESYNC_TEST_POSTGRES_URL is not set (`.ci/postgres start` prints one)");
            None
        }
    }
}

/// A URL whose tables live in a new, empty schema of the test database (the connection's
/// `search_path`), so every test starts from an empty PostgreSQL mirror.
pub fn fresh_postgres_database() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let base = std::env::var("ADESYNC_TEST_POSTGRES_URL").expect("postgres_url checked first");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let schema = format!(
        "t_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = postgres::Client::connect(&base, postgres::NoTls).expect("test server up");
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}application_name={schema}&options=-c%20search_path%3D{schema}")
}

/// Defines a `sqlite` and a `postgres` test for each scenario `fn name(Backend)`, the
/// latter skipped by name when no test server is configured (see [`postgres_url`]).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name($crate::common::Backend::Sqlite)
            }
            #[test]
            fn postgres() {
                if $crate::common::postgres_url(module_path!()).is_some() {
                    super::$name($crate::common::Backend::Postgres)
                }
            }
        }
    )*};
}

/// A multi-threaded runtime for a synchronous test that drives async parts with
/// `block_on` and uses the store (which may be PostgreSQL's blocking client) directly.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The `application_name` of a test database URL (the replica name the server reports).
pub fn application_name(url: &str) -> String {
    url.split("application_name=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned()
}

/// The daemon's `/metrics` on `port` once they contain `want` (or after 15 s, whatever
/// they are then).
pub fn metrics_once_they_show(rt: &tokio::runtime::Runtime, port: u16, want: &str) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let started = std::time::Instant::now();
    loop {
        let body = rt
            .block_on(async {
                reqwest::Client::new()
                    .get(&url)
                    .timeout(std::time::Duration::from_secs(2))
                    .send()
                    .await?
                    .text()
                    .await
            })
            .unwrap_or_default();
        if body.contains(want) || started.elapsed() > std::time::Duration::from_secs(15) {
            return body;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A store of each backend, empty (the temp folder lives as long as the store is used).
pub fn empty_store(b: Backend) -> (tempfile::TempDir, adesync::store::Store) {
    use adesync::store::Store;
    let dir = tempfile::tempdir().unwrap();
    let store = match b {
        Backend::Sqlite => Store::open(dir.path().join("a.db")).unwrap(),
        Backend::Postgres => Store::open(
            adesync::config::Database::postgres(&fresh_postgres_database(), None).unwrap(),
        )
        .unwrap(),
    };
    (dir, store)
}

/// Ends every session of the test server whose application_name is `name` (a restart or a
/// cut network, as the client sees it); returns how many.
pub fn terminate_sessions(name: &str) -> usize {
    let mut admin = postgres::Client::connect(
        &std::env::var("ADESYNC_TEST_POSTGRES_URL").unwrap(),
        postgres::NoTls,
    )
    .unwrap();
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .unwrap()
        .len()
}
