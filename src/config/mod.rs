//! Configuration: the TOML file turned into a typed, validated [`Config`].
//!
//! Raw TOML is parsed into `Raw*` mirrors (unknown keys refused), then resolved into the
//! types the rest of the program uses: relative paths resolved against the config
//! file's folder, defaults filled in, every value checked. A [`ConfigError`] names the
//! key and the reason; the binary exits 78 (EX_CONFIG) on it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod assign;
mod database;
mod lenient;
mod org;
mod schedule;
mod sinks;
pub use assign::{
    overlaps, read_profile, AssignRule, AssignmentSettings, Match, ProfileConfig, Triggers,
    PROFILE_KEYS,
};
pub use database::{Database, PgTarget};
pub use lenient::{LenientConfig, TokenFiles};
pub use org::{
    OrgAccountConfig, OrgScope, ASSERTION_AUDIENCE, DEFAULT_TOKEN_URL, MAX_ORG_PAGE_SIZE,
};
pub use schedule::{parse_schedule, parse_timezone, CronSchedule, Schedule};
pub use sinks::{
    CommandConfig, EventFormat, JsonlTarget, SignatureScheme, SinkConfig, SinkKind, WebhookConfig,
    WebhookSecret, DEFAULT_EVENT_RETENTION, MAX_BATCH_LIMIT, WHSEC_PREFIX,
};

/// Default `max_response_size`: a page of 1,000 devices is about 400 KB, so 16 MiB is a
/// generous multiple that still bounds memory.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Apple's production base URL.
pub const DEFAULT_API_URL: &str = "https://mdmenrollment.apple.com";
/// Where the config file is looked for when neither `--config` nor `ADESYNC_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/adesync/config.toml";
/// The SQLite database used when the config names none.
pub const DEFAULT_DATABASE: &str = "/var/lib/adesync/adesync.db";
/// Apple's documented maximum `limit` for fetch/sync (docs/apple-dep-api.md §4.3).
pub const MAX_PAGE_SIZE: u32 = 1000;
/// `X-Server-Protocol-Version` sent unless configured (docs/apple-dep-api.md §1.1: 7 reports
/// iPadOS; 10 adds IMEI/MEID/EID, MAC addresses and replacement details).
pub const DEFAULT_PROTOCOL_VERSION: u32 = 10;

/// A configuration problem: which key, and why. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}; pass --config FILE or set ADESYNC_CONFIG")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type (toml's message names key and line).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's description.
        message: String,
    },
    /// A value that parses but is not acceptable.
    #[error("config file {path}: `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key, e.g. `tokens[0].page_size`.
        key: String,
        /// Why, and what to do.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Option<PathBuf>,
    database_password_file: Option<PathBuf>,
    instance: Option<String>,
    user_agent: Option<String>,
    protocol_version: Option<u32>,
    request_timeout: Option<String>,
    schedule: Option<String>,
    timezone: Option<String>,
    full_fetch: Option<String>,
    retry: Option<RawRetry>,
    http: Option<RawHttp>,
    event_retention: Option<String>,
    max_response_size: Option<toml::Value>,
    #[serde(default)]
    tokens: Vec<RawToken>,
    #[serde(default)]
    sinks: Vec<sinks::RawSink>,
    #[serde(default)]
    org_accounts: Vec<org::RawOrgAccount>,
    #[serde(default)]
    profiles: Vec<assign::RawProfile>,
    #[serde(default)]
    assign: Vec<assign::RawAssign>,
    assignment: Option<assign::RawAssignment>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial_delay: Option<String>,
    max_delay: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    enabled: Option<bool>,
    listen: Option<String>,
    allow_public: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    token_file: PathBuf,
    private_key_file: Option<PathBuf>,
    schedule: Option<String>,
    timezone: Option<String>,
    full_fetch: Option<String>,
    api_url: Option<String>,
    page_size: Option<i64>,
    user_agent: Option<String>,
    protocol_version: Option<u32>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    /// This adesync installation's name in the events it sends (`instance`; default: the
    /// machine's host name), e.g. in a CloudEvent's `source`.
    pub instance: String,
    /// The mirror's database: an SQLite file (created if missing) or a PostgreSQL URL.
    pub database: Database,
    /// Default schedule of each token's syncs in daemon mode.
    pub schedule: Schedule,
    /// Default schedule of each token's full re-fetch; `None`: never.
    pub full_fetch: Option<Schedule>,
    /// The time zone cron expressions are read in.
    pub timezone: chrono_tz::Tz,
    /// Per-request timeout (connect + response).
    pub request_timeout: Duration,
    /// Retry policy for transient failures.
    pub retry: RetryPolicy,
    /// The largest response body accepted from Apple (`max_response_size`).
    pub max_response_bytes: usize,
    /// The enrollment-program tokens to sync.
    pub tokens: Vec<TokenConfig>,
    /// The Apple School/Business Manager API accounts to walk.
    pub org_accounts: Vec<OrgAccountConfig>,
    /// Enrollment profiles, as files.
    pub profiles: Vec<ProfileConfig>,
    /// Profile assignment rules, first match wins.
    pub assign_rules: Vec<AssignRule>,
    /// Retry timing of assignments.
    pub assignment: AssignmentSettings,
    /// Where events are written besides the `events` table.
    pub sinks: Vec<SinkConfig>,
    /// How long events are kept once every sink has them (`None`: forever).
    pub event_retention: Option<Duration>,
    /// Address of the `/metrics` and `/healthz` listener; `None` when off.
    pub http_listen: Option<std::net::SocketAddr>,
}

/// Capped exponential backoff with jitter for transient failures.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_delay: Duration,
    /// Upper bound of any single delay (also caps `Retry-After`).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

/// One enrollment-program (server) token.
#[derive(Clone)]
pub struct TokenConfig {
    /// Unique name; keys every stored row of this token.
    pub name: String,
    /// The decrypted server token file.
    pub token_file: PathBuf,
    /// The private key that decrypts `token_file` when it is Apple's S/MIME `.p7m`;
    /// `None` for a decrypted JSON token.
    pub private_key_file: Option<PathBuf>,
    /// Apple's base URL (or a simulator's).
    pub api_url: reqwest::Url,
    /// `limit` sent with fetch and sync.
    pub page_size: u32,
    /// `User-Agent` header.
    pub user_agent: String,
    /// `X-Server-Protocol-Version` header.
    pub protocol_version: u32,
    /// When this token syncs in daemon mode.
    pub schedule: Schedule,
    /// When this token's full re-fetch is due; `None`: never.
    pub full_fetch: Option<Schedule>,
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("token_file", &self.token_file)
            .field("private_key_file", &self.private_key_file)
            .field("api_url", &self.api_url.as_str())
            .field("page_size", &self.page_size)
            .field("user_agent", &self.user_agent)
            .field("protocol_version", &self.protocol_version)
            .field("schedule", &self.schedule.to_config_text())
            .field(
                "full_fetch",
                &self.full_fetch.as_ref().map(Schedule::to_config_text),
            )
            .finish()
    }
}

/// The default `User-Agent`: product and version (Apple requires one; docs/apple-dep-api.md §1).
pub fn default_user_agent() -> String {
    format!("adesync/{}", env!("CARGO_PKG_VERSION"))
}

impl Config {
    /// Reads and validates the config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_checking(path, true)
    }

    /// Reads and validates the config file without looking at token and key files: for
    /// commands that only read the database (`status`, `devices`, `events`), which must
    /// keep working — and report on each token — when one token file is missing or
    /// unreadable.
    pub fn load_for_reports(path: &Path) -> Result<Self, ConfigError> {
        Self::load_checking(path, false)
    }

    fn load_checking(path: &Path, check_files: bool) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_checking(&text, path, check_files)
    }

    /// Validates config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_checking(text, path, true)
    }

    fn parse_checking(text: &str, path: &Path, check_files: bool) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };

        let database = match raw.database {
            None => Database::Sqlite(resolve(base, PathBuf::from(DEFAULT_DATABASE))),
            Some(p) if Database::is_url(&p.to_string_lossy()) => Database::postgres(
                &p.to_string_lossy(),
                raw.database_password_file.clone().map(|f| resolve(base, f)),
            )
            .map_err(|r| invalid("database", r))?,
            Some(p) => {
                let text = p.to_string_lossy();
                if text.trim().is_empty() || text.ends_with('/') {
                    return Err(invalid(
                        "database",
                        format!("{text:?} is not a file; give the SQLite file to keep the mirror in, e.g. \"{DEFAULT_DATABASE}\""),
                    ));
                }
                let p = resolve(base, p);
                if p.is_dir() {
                    return Err(invalid(
                        "database",
                        format!(
                            "{} is a folder; give a file in it, e.g. {:?}",
                            p.display(),
                            p.join("adesync.db").display().to_string()
                        ),
                    ));
                }
                Database::Sqlite(p)
            }
        };
        if let (Database::Sqlite(_), Some(_)) = (&database, &raw.database_password_file) {
            return Err(invalid(
                "database_password_file",
                "is only for a PostgreSQL database (database = \"postgres://…\"); remove it, SQLite needs no password".into(),
            ));
        }
        let instance = match raw.instance {
            Some(name) => {
                check_instance(&name).map_err(|r| invalid("instance", r))?;
                name
            }
            None => default_instance(),
        };
        let user_agent = raw.user_agent.unwrap_or_else(default_user_agent);
        check_user_agent(&user_agent).map_err(|r| invalid("user_agent", r))?;
        let protocol_version = raw.protocol_version.unwrap_or(DEFAULT_PROTOCOL_VERSION);
        check_protocol(protocol_version).map_err(|r| invalid("protocol_version", r))?;
        let request_timeout = duration_in(
            raw.request_timeout.as_deref(),
            Duration::from_secs(60),
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )
        .map_err(|r| invalid("request_timeout", r))?;
        let max_response_bytes = match &raw.max_response_size {
            None => DEFAULT_MAX_RESPONSE_BYTES,
            Some(v) => byte_size(v).map_err(|r| invalid("max_response_size", r))?,
        };
        let timezone = match raw.timezone.as_deref() {
            None => chrono_tz::UTC,
            Some(t) => parse_timezone(t).map_err(|r| invalid("timezone", r))?,
        };
        let schedule = check_schedule(
            raw.schedule.as_deref(),
            &Schedule::Interval(DEFAULT_SCHEDULE),
            timezone,
        )
        .map_err(|r| invalid("schedule", r))?;
        let full_fetch = check_full_fetch(
            raw.full_fetch.as_deref(),
            &Some(Schedule::Interval(DEFAULT_FULL_FETCH)),
            timezone,
        )
        .map_err(|r| invalid("full_fetch", r))?;
        let http_listen = match raw.http {
            Some(h) if h.enabled.unwrap_or(true) => {
                let text = h.listen.unwrap_or_else(|| DEFAULT_HTTP_LISTEN.to_owned());
                let addr: std::net::SocketAddr = text.parse().map_err(|_| {
                    invalid(
                        "http.listen",
                        format!("{text:?} is not an address:port such as \"127.0.0.1:9464\""),
                    )
                })?;
                if !addr.ip().is_loopback() && h.allow_public != Some(true) {
                    return Err(invalid(
                        "http.listen",
                        format!("{addr} is reachable from other machines; /metrics and /healthz need no credentials, so listen on 127.0.0.1 and let a local scraper or reverse proxy reach it, or set http.allow_public = true to serve it anyway"),
                    ));
                }
                Some(addr)
            }
            _ => None,
        };

        let mut retry = RetryPolicy::default();
        if let Some(r) = raw.retry {
            if let Some(n) = r.max_attempts {
                if !(1..=20).contains(&n) {
                    return Err(invalid("retry.max_attempts", "must be 1..=20".into()));
                }
                retry.max_attempts = n;
            }
            let (least, most) = (Duration::from_millis(100), Duration::from_secs(3600));
            retry.initial_delay =
                duration_in(r.initial_delay.as_deref(), retry.initial_delay, least, most)
                    .map_err(|e| invalid("retry.initial_delay", e))?;
            retry.max_delay = duration_in(r.max_delay.as_deref(), retry.max_delay, least, most)
                .map_err(|e| invalid("retry.max_delay", e))?;
            if retry.max_delay < retry.initial_delay {
                return Err(invalid(
                    "retry.max_delay",
                    "must not be less than retry.initial_delay".into(),
                ));
            }
        }

        if raw.tokens.is_empty() && raw.org_accounts.is_empty() {
            return Err(invalid(
                "tokens",
                "no [[tokens]] and no [[org_accounts]] configured; add one [[tokens]] per ABM/ASM server token, and/or one [[org_accounts]] per Apple Business/School Manager API account (see config.example.toml)".into(),
            ));
        }
        let account_names: HashSet<String> = raw
            .org_accounts
            .iter()
            .map(|a| a.name().to_owned())
            .collect();
        let mut names = HashSet::new();
        let mut tokens = Vec::with_capacity(raw.tokens.len());
        let mut schedules: HashMap<(Option<String>, chrono_tz::Tz), Schedule> =
            HashMap::from([((raw.schedule.clone(), timezone), schedule.clone())]);
        let mut full_fetches: HashMap<(Option<String>, chrono_tz::Tz), Option<Schedule>> =
            HashMap::from([((raw.full_fetch.clone(), timezone), full_fetch.clone())]);
        for (i, t) in raw.tokens.into_iter().enumerate() {
            let key = |k: &str| format!("tokens[{i}].{k}");
            check_name(&t.name).map_err(|r| invalid(&key("name"), r))?;
            if !names.insert(t.name.clone()) {
                return Err(invalid(
                    &key("name"),
                    format!(
                        "\"{}\" is used by more than one token; names must be unique",
                        t.name
                    ),
                ));
            }
            if account_names.contains(&t.name) {
                return Err(invalid(
                    &key("name"),
                    format!(
                        "\"{}\" is also the name of an [[org_accounts]] entry; names must be unique across tokens and accounts (both key rows and events)",
                        t.name
                    ),
                ));
            }
            let token_file = resolve(base, t.token_file);
            let private_key_file = t.private_key_file.map(|p| resolve(base, p));
            if check_files {
                check_secret_file(&token_file, false)
                    .map_err(|r| invalid(&key("token_file"), r))?;
                if let Some(k) = &private_key_file {
                    check_secret_file(k, true).map_err(|r| invalid(&key("private_key_file"), r))?;
                }
            }
            let api_url = parse_api_url(t.api_url.as_deref().unwrap_or(DEFAULT_API_URL))
                .map_err(|r| invalid(&key("api_url"), r))?;
            let page_size = match t.page_size {
                None => MAX_PAGE_SIZE,
                Some(n) if (1..=MAX_PAGE_SIZE as i64).contains(&n) => n as u32,
                Some(n) => {
                    return Err(invalid(
                        &key("page_size"),
                        format!("{n} is out of range; Apple accepts 1..=1000"),
                    ))
                }
            };
            let ua = t.user_agent.unwrap_or_else(|| user_agent.clone());
            check_user_agent(&ua).map_err(|r| invalid(&key("user_agent"), r))?;
            let tz = match t.timezone.as_deref() {
                None => timezone,
                Some(text) => parse_timezone(text).map_err(|r| invalid(&key("timezone"), r))?,
            };
            // A token's own time zone applies to the schedules it inherits as written. A
            // cron check looks a year ahead, so each (text, zone) is checked once, however
            // many tokens share it.
            let sched_text = t.schedule.clone().or(raw.schedule.clone());
            let token_schedule = match schedules.get(&(sched_text.clone(), tz)) {
                Some(done) => done.clone(),
                None => {
                    let checked = check_schedule(sched_text.as_deref(), &schedule, tz)
                        .map_err(|r| invalid(&key("schedule"), r))?;
                    schedules.insert((sched_text, tz), checked.clone());
                    checked
                }
            };
            let fetch_text = t.full_fetch.clone().or(raw.full_fetch.clone());
            let token_full_fetch = match full_fetches.get(&(fetch_text.clone(), tz)) {
                Some(done) => done.clone(),
                None => {
                    let checked = check_full_fetch(fetch_text.as_deref(), &full_fetch, tz)
                        .map_err(|r| invalid(&key("full_fetch"), r))?;
                    full_fetches.insert((fetch_text, tz), checked.clone());
                    checked
                }
            };
            let pv = t.protocol_version.unwrap_or(protocol_version);
            check_protocol(pv).map_err(|r| invalid(&key("protocol_version"), r))?;
            tokens.push(TokenConfig {
                name: t.name,
                token_file,
                private_key_file,
                api_url,
                page_size,
                user_agent: ua,
                protocol_version: pv,
                schedule: token_schedule,
                full_fetch: token_full_fetch,
            });
        }

        let mut org_accounts = Vec::with_capacity(raw.org_accounts.len());
        for (i, a) in raw.org_accounts.into_iter().enumerate() {
            if !names.insert(a.name().to_owned()) {
                return Err(invalid(
                    &format!("org_accounts[{i}].name"),
                    format!(
                        "\"{}\" is used by more than one account; names must be unique across tokens and accounts",
                        a.name()
                    ),
                ));
            }
            let account = org::resolve_account(i, a, base, timezone, check_files)
                .map_err(|(k, r)| invalid(&k, r))?;
            org_accounts.push(account);
        }

        let mut profiles: Vec<ProfileConfig> = Vec::with_capacity(raw.profiles.len());
        for (i, p) in raw.profiles.into_iter().enumerate() {
            let p = assign::resolve_profile(i, p, base, check_files)
                .map_err(|(k, r)| invalid(&k, r))?;
            if profiles.iter().any(|q| q.name == p.name) {
                return Err(invalid(
                    &format!("profiles[{i}].name"),
                    format!("\"{}\" is used twice", p.name),
                ));
            }
            profiles.push(p);
        }
        let token_names: Vec<String> = tokens.iter().map(|t| t.name.clone()).collect();
        let assign_rules = raw
            .assign
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                assign::resolve_rule(i, r, &profiles, &token_names, !org_accounts.is_empty())
                    .map_err(|(k, r)| invalid(&k, r))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let assignment =
            assign::resolve_assignment(raw.assignment).map_err(|(k, r)| invalid(&k, r))?;

        let mut sink_names = HashSet::new();
        let mut sinks = Vec::new();
        for (i, s) in raw.sinks.into_iter().enumerate() {
            let key = |k: &str| format!("sinks[{i}].{k}");
            check_name(&s.name).map_err(|r| invalid(&key("name"), r))?;
            if !sink_names.insert(s.name.clone()) {
                return Err(invalid(
                    &key("name"),
                    format!("\"{}\" is used twice", s.name),
                ));
            }
            sinks.push(sinks::resolve_sink(i, s, base, path)?);
        }
        let event_retention = sinks::parse_retention(raw.event_retention.as_deref())
            .map_err(|r| invalid("event_retention", r))?;

        Ok(Config {
            source: path.to_owned(),
            instance,
            database,
            schedule,
            full_fetch,
            timezone,
            request_timeout,
            retry,
            max_response_bytes,
            tokens,
            org_accounts,
            profiles,
            assign_rules,
            assignment,
            sinks,
            event_retention,
            http_listen,
        })
    }

    /// The effective configuration as TOML, secrets left out (they live only in token files).
    pub fn to_redacted_toml(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# effective configuration from {}",
            self.source.display()
        );
        let _ = writeln!(s, "instance = {:?}", self.instance);
        let _ = writeln!(s, "database = {:?}", self.database.display().to_string());
        if let Database::Postgres(t) = &self.database {
            if let Some(f) = t.password_file() {
                let _ = writeln!(s, "database_password_file = {:?}", f.display().to_string());
            }
        }
        let _ = writeln!(s, "schedule = {:?}", self.schedule.to_config_text());
        let _ = writeln!(s, "timezone = {:?}", self.timezone.name());
        let _ = writeln!(
            s,
            "full_fetch = {:?}",
            self.full_fetch
                .as_ref()
                .map_or("never".to_owned(), Schedule::to_config_text)
        );
        let _ = writeln!(
            s,
            "request_timeout = {:?}",
            humantime::format_duration(self.request_timeout).to_string()
        );
        let _ = writeln!(
            s,
            "event_retention = {:?}",
            sinks::format_retention(self.event_retention)
        );
        let _ = writeln!(s, "\n[retry]");
        let _ = writeln!(s, "max_attempts = {}", self.retry.max_attempts);
        let _ = writeln!(
            s,
            "initial_delay = {:?}",
            humantime::format_duration(self.retry.initial_delay).to_string()
        );
        let _ = writeln!(
            s,
            "max_delay = {:?}",
            humantime::format_duration(self.retry.max_delay).to_string()
        );
        if let Some(addr) = self.http_listen {
            let _ = writeln!(s, "\n[http]\nenabled = true\nlisten = \"{addr}\"");
            if !addr.ip().is_loopback() {
                let _ = writeln!(s, "allow_public = true");
            }
        }
        for t in &self.tokens {
            let _ = writeln!(s, "\n[[tokens]]");
            let _ = writeln!(s, "name = {:?}", t.name);
            let _ = writeln!(s, "token_file = {:?}", t.token_file.display().to_string());
            if let Some(k) = &t.private_key_file {
                let _ = writeln!(s, "private_key_file = {:?}", k.display().to_string());
            }
            let _ = writeln!(
                s,
                "api_url = {:?}",
                t.api_url.as_str().trim_end_matches('/')
            );
            let _ = writeln!(s, "page_size = {}", t.page_size);
            let _ = writeln!(s, "user_agent = {:?}", t.user_agent);
            let _ = writeln!(s, "protocol_version = {}", t.protocol_version);
            let _ = writeln!(s, "schedule = {:?}", t.schedule.to_config_text());
            let _ = writeln!(
                s,
                "full_fetch = {:?}",
                t.full_fetch
                    .as_ref()
                    .map_or("never".to_owned(), Schedule::to_config_text)
            );
            if let Schedule::Cron(c) = &t.schedule {
                let _ = writeln!(s, "timezone = {:?}", c.timezone.name());
            }
        }
        for a in &self.org_accounts {
            org::account_to_toml(&mut s, a);
        }
        assign::assign_to_toml(&mut s, &self.profiles, &self.assign_rules, &self.assignment);
        for k in &self.sinks {
            sinks::sink_to_toml(&mut s, k);
        }
        s
    }
}

/// Shows only the start of a consumer key, enough to tell tokens apart.
pub fn redact_key(key: &str) -> String {
    let head: String = key.chars().take(9).collect();
    format!("{head}…")
}

/// Checks at load that a token or key file exists, is a readable file and, for a private
/// key, that not every user on the machine may read it. Its content is read at each run
/// (a renewed token needs no restart), so a broken token is that token's problem then,
/// not the whole config's.
fn check_secret_file(path: &Path, private_key: bool) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{} does not exist; put the file there or correct the path",
            path.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "{} cannot be reached by this user; give the service user access to its folder",
            path.display()
        ),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "{} is not readable by this user; chgrp adesync {0} && chmod 0640 {0}",
            path.display()
        ),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    if private_key && meta.permissions().mode() & 0o004 != 0 {
        return Err(format!(
            "the private key {0} is readable by every user on this machine; restrict it: chmod 0600 {0} (or chgrp adesync {0} && chmod 0640 {0})",
            path.display()
        ));
    }
    Ok(())
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

/// A duration that must lie in `least..=most`: a timeout of a nanosecond or of a
/// thousand days is a typo, not a wish.
fn duration_in(
    text: Option<&str>,
    default: Duration,
    least: Duration,
    most: Duration,
) -> Result<Duration, String> {
    let d = duration(text, default)?;
    if d < least || d > most {
        return Err(format!(
            "{} is outside {}..={}",
            text.unwrap_or_default().trim(),
            humantime::format_duration(least),
            humantime::format_duration(most)
        ));
    }
    Ok(d)
}

/// `max_response_size`: a number of bytes, or a string such as "16MiB" / "500KB"; from
/// 1 MiB (a full page must fit) to 1 GiB.
fn byte_size(v: &toml::Value) -> Result<usize, String> {
    let n: u64 = match v {
        toml::Value::Integer(n) if *n >= 0 => *n as u64,
        toml::Value::String(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let num: u64 = num
                .parse()
                .map_err(|_| format!("{t:?} is not a size; write e.g. \"16MiB\""))?;
            let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 1,
                "kb" => 1000,
                "kib" => 1024,
                "mb" => 1_000_000,
                "mib" => 1024 * 1024,
                "gb" => 1_000_000_000,
                "gib" => 1024 * 1024 * 1024,
                other => return Err(format!("unknown unit {other:?}; use KiB, MiB or GiB")),
            };
            num.saturating_mul(mult)
        }
        other => return Err(format!("{other} is not a size; write e.g. \"16MiB\"")),
    };
    if !(1024 * 1024..=1024 * 1024 * 1024).contains(&n) {
        return Err(format!("{n} bytes is outside 1MiB..=1GiB"));
    }
    Ok(n as usize)
}

fn duration(text: Option<&str>, default: Duration) -> Result<Duration, String> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t.trim()).map_err(|e| {
            format!("{t:?} is not a duration ({e}); write e.g. \"30s\", \"15m\", \"1h\"")
        }),
    }
}

/// The daemon's default interval between syncs of a token.
pub const DEFAULT_SCHEDULE: Duration = Duration::from_secs(15 * 60);
/// The default interval between full re-fetches that catch what the sync cursor missed.
pub const DEFAULT_FULL_FETCH: Duration = Duration::from_secs(7 * 86_400);
/// Where the HTTP listener binds when `[http]` is enabled without `listen`.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9464";

/// A schedule is an interval ("15m"). It must be short enough that Apple's 7-day cursor
/// never expires between syncs, even after a few failed runs: at most 24h.
fn check_interval(d: Duration) -> Result<Duration, String> {
    if d < Duration::from_secs(10) || d > Duration::from_secs(24 * 3600) {
        return Err(format!(
            "{} is outside 10s..=24h: Apple's sync cursor expires after 7 days, and syncing at least daily keeps it alive",
            humantime::format_duration(d)
        ));
    }
    Ok(d)
}

/// A sync `schedule`: an interval of 10s..=24h, or a cron expression that fires at most
/// every 10 s and leaves at most 3 days between runs (a weekday schedule's weekend), so
/// Apple's 7-day cursor outlives a gap plus a failed run or two.
fn check_schedule(
    text: Option<&str>,
    default: &Schedule,
    tz: chrono_tz::Tz,
) -> Result<Schedule, String> {
    let Some(text) = text else {
        return Ok(default.clone());
    };
    match parse_schedule(
        text,
        tz,
        Duration::from_secs(10),
        Some(Duration::from_secs(3 * 86_400)),
    )? {
        Schedule::Interval(d) => check_interval(d).map(Schedule::Interval),
        cron => Ok(cron),
    }
}

/// `full_fetch`: `"never"`, an interval of at least an hour, or a cron expression firing at
/// most hourly.
fn check_full_fetch(
    text: Option<&str>,
    default: &Option<Schedule>,
    tz: chrono_tz::Tz,
) -> Result<Option<Schedule>, String> {
    match text.map(str::trim) {
        None => Ok(default.clone()),
        Some("never") => Ok(None),
        Some(t) => parse_schedule(t, tz, Duration::from_secs(3600), None).map(Some),
    }
}

/// Checks a token or sink name: 1-64 characters of a-z, 0-9, `_` and `-`.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "{name:?} is not a valid name; use 1-64 characters of a-z, 0-9, _ and -"
        ));
    }
    Ok(())
}

/// Longest `instance` accepted (a DNS name's limit).
const MAX_INSTANCE_LEN: usize = 253;

/// Checks an `instance` name: 1-253 characters of a-z, A-Z, 0-9, `.`, `_` and `-`, so it
/// fits in a URI as it is.
fn check_instance(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_INSTANCE_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{name:?} is not a valid instance name; use 1-{MAX_INSTANCE_LEN} characters of a-z, A-Z, 0-9, ., _ and - (e.g. the machine's host name, the default)"
        ));
    }
    Ok(())
}

/// The default `instance`: the machine's host name (as `uname -n` gives it), with any
/// character an instance name cannot hold replaced by `-`; `"adesync"` when there is none.
fn default_instance() -> String {
    let name = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| {
            let text = std::fs::read_to_string(p).ok()?;
            let name = text.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .unwrap_or_default();
    instance_from_host_name(&name)
}

fn instance_from_host_name(name: &str) -> String {
    let name: String = name
        .chars()
        .take(MAX_INSTANCE_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        "adesync".to_owned()
    } else {
        name
    }
}

fn check_user_agent(ua: &str) -> Result<(), String> {
    if ua.trim().is_empty() {
        return Err("must not be empty: Apple rejects requests without a User-Agent".into());
    }
    if !ua.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("must be printable ASCII".into());
    }
    Ok(())
}

fn check_protocol(v: u32) -> Result<(), String> {
    if !(7..=99).contains(&v) {
        return Err(format!(
            "{v} is not supported: versions before 7 report iPads as iOS and lack fields adesync stores; use 7 or later (the default, 10, adds IMEI/MEID/EID, MAC addresses and replacement details)"
        ));
    }
    Ok(())
}

/// Accepts https anywhere, and plain http only to a loopback address (a local simulator).
pub fn parse_api_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Never echo the text: it holds the credentials.
        return Err("must not carry a user name or password (user:pass@): they would show in logs, `check-config` and the database, and Apple authenticates with the server token".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?} must not have a query or fragment"));
    }
    match url.scheme() {
        "https" => {}
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(a)) => a.is_loopback(),
                Some(url::Host::Ipv6(a)) => a.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if !loopback {
                return Err(format!(
                    "{text:?} uses plain http to a non-loopback host; use https (plain http is allowed only to 127.0.0.1/localhost for a simulator)"
                ));
            }
        }
        other => {
            return Err(format!(
                "{text:?}: scheme {other} is not supported; use https"
            ))
        }
    }
    Ok(url)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A temp folder holding a valid decrypted token `acme.json`.
    pub(crate) fn dir_with_token() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("acme.json"),
            r#"{"consumer_key":"CK_1234567890","consumer_secret":"CS_s","access_token":"AT_s",
               "access_secret":"AS_s","access_token_expiry":"2099-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        dir
    }

    fn parse(dir: &tempfile::TempDir, text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, &dir.path().join("config.toml"))
    }

    const MINIMAL: &str =
        "database = \"a.db\"\n[[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\n";

    #[test]
    fn minimal_config_gets_defaults_and_resolves_relative_paths() {
        let dir = dir_with_token();
        let c = parse(&dir, MINIMAL).unwrap();
        assert_eq!(c.database, dir.path().join("a.db"));
        assert_eq!(
            c.tokens[0].api_url.as_str(),
            "https://mdmenrollment.apple.com/"
        );
        assert_eq!(c.tokens[0].page_size, 1000);
        assert_eq!(c.tokens[0].protocol_version, 10);
        assert!(c.tokens[0].user_agent.starts_with("adesync/"));
        assert_eq!(c.schedule.longest_gap(), Duration::from_secs(900));
    }

    #[test]
    fn instance_defaults_to_the_host_name_and_is_checked() {
        let dir = dir_with_token();
        let c = parse(&dir, MINIMAL).unwrap();
        assert!(check_instance(&c.instance).is_ok(), "{}", c.instance);
        let c = parse(
            &dir,
            &format!("instance = \"mdm-1.example.com\"\n{MINIMAL}"),
        )
        .unwrap();
        assert_eq!(c.instance, "mdm-1.example.com");
        assert!(c
            .to_redacted_toml()
            .contains("instance = \"mdm-1.example.com\""));
        for bad in ["", "a b", "urn:x", "é", &"x".repeat(254)] {
            let e = parse(&dir, &format!("instance = {bad:?}\n{MINIMAL}")).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { key, .. } if key == "instance"),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(instance_from_host_name("host_1.lan"), "host_1.lan");
        assert_eq!(instance_from_host_name("a b:c"), "a-b-c");
        assert_eq!(instance_from_host_name(""), "adesync");
    }

    #[test]
    fn a_postgres_url_selects_postgres_and_refuses_what_it_cannot_keep_yet() {
        let dir = dir_with_token();
        let pg = MINIMAL.replace(
            "\"a.db\"",
            "\"postgres://adesync:Zq9-secret-Zq9@127.0.0.1/mirror\"",
        );
        let c = parse(&dir, &pg).unwrap();
        assert!(c.database.is_postgres());
        let shown = c.to_redacted_toml();
        assert!(
            shown.contains("postgres://adesync@127.0.0.1/mirror"),
            "{shown}"
        );
        assert!(
            !shown.contains("Zq9-secret"),
            "the password is never shown: {shown}"
        );
        // The password file resolves against the config's folder.
        let with_file = format!("database_password_file = \"pw.txt\"\n{pg}");
        let c = parse(&dir, &with_file).unwrap();
        assert!(c
            .to_redacted_toml()
            .contains(&dir.path().join("pw.txt").display().to_string()));
        // ...and means nothing to SQLite.
        let e = parse(
            &dir,
            &format!("database_password_file = \"pw.txt\"\n{MINIMAL}"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("only for a PostgreSQL"), "{e}");
        // Sinks, profile assignment and organisation accounts work on PostgreSQL.
        let sink = "[[sinks]]\nname = \"s\"\ntype = \"jsonl\"\npath = \"-\"\n";
        assert!(parse(&dir, &format!("{pg}{sink}")).is_ok());
        std::fs::write(
            dir.path().join("all.json"),
            r#"{"profile_name":"All","url":"https://mdm.example.com/enroll"}"#,
        )
        .unwrap();
        let assign =
            "[[profiles]]\nname = \"all\"\nfile = \"all.json\"\n[[assign]]\nprofile = \"all\"\n";
        if let Err(e) = parse(&dir, &format!("{MINIMAL}{assign}")) {
            panic!("valid on SQLite: {e}");
        }
        assert!(parse(&dir, &format!("{pg}{assign}")).is_ok());
        let key = dir.path().join("org.pem");
        std::fs::write(&key, "not read at load").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let org = "[[org_accounts]]\nname = \"org\"\nclient_id = \"BUSINESSAPI.9703f56c-10ce-4876-8f59-e78e5e23a152\"\nkey_id = \"k1\"\nprivate_key_file = \"org.pem\"\n";
        if let Err(e) = parse(&dir, &format!("{MINIMAL}{org}")) {
            panic!("valid on SQLite: {e}");
        }
        if let Err(e) = parse(&dir, &format!("{pg}{org}")) {
            panic!("valid on PostgreSQL: {e}");
        }
        let e = parse(
            &dir,
            &MINIMAL.replace(
                "\"a.db\"",
                "\"postgres://u@db.example.com/m?sslmode=disable\"",
            ),
        )
        .unwrap_err();
        assert!(e.to_string().contains("in clear"), "{e}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
                .unwrap();
        let dir = dir_with_token();
        // The example points at /etc/adesync/acme.json; aim it at the temp token.
        let text = text.replace("/etc/adesync/acme.json", "acme.json");
        let c = parse(&dir, &text).unwrap();
        assert_eq!(c.tokens[0].name, "acme");
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = dir_with_token();
        let cases = [
            (format!("{MINIMAL}page_size = 0\n"), "tokens[0].page_size"),
            (
                format!("{MINIMAL}page_size = 1001\n"),
                "tokens[0].page_size",
            ),
            (
                format!("{MINIMAL}api_url = \"http://example.com\"\n"),
                "tokens[0].api_url",
            ),
            (MINIMAL.replace("acme\"", "Acme Corp\""), "tokens[0].name"),
            (
                MINIMAL.replace("acme.json", "missing.json"),
                "tokens[0].token_file",
            ),
            (
                format!("{MINIMAL}[[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\n"),
                "tokens[1].name",
            ),
            (format!("schedule = \"8d\"\n{MINIMAL}"), "schedule"),
            (format!("schedule = \"soon\"\n{MINIMAL}"), "schedule"),
            ("database = \"a.db\"\n".to_owned(), "tokens"),
            (MINIMAL.replace("\"a.db\"", "\"\""), "database"),
            (MINIMAL.replace("\"a.db\"", "\".\""), "database"),
            (MINIMAL.replace("\"a.db\"", "\"db/\""), "database"),
            (
                format!("request_timeout = \"1ns\"\n{MINIMAL}"),
                "request_timeout",
            ),
            (
                format!("request_timeout = \"1000d\"\n{MINIMAL}"),
                "request_timeout",
            ),
            (
                format!("request_timeout = \"1000000000000d\"\n{MINIMAL}"),
                "request_timeout",
            ),
            (
                format!("request_timeout = \"0s\"\n{MINIMAL}"),
                "request_timeout",
            ),
            (format!("schedule = \"9s\"\n{MINIMAL}"), "schedule"),
            (
                format!("schedule = \"0 0 2 * * Sun\"\n{MINIMAL}"),
                "schedule",
            ),
            (
                format!("timezone = \"Atlantis/Capital\"\n{MINIMAL}"),
                "timezone",
            ),
            (format!("full_fetch = \"10m\"\n{MINIMAL}"), "full_fetch"),
            (
                format!("{MINIMAL}schedule = \"0 0 2 * *\"\n"),
                "tokens[0].schedule",
            ),
            (
                format!("max_response_size = 10\n{MINIMAL}"),
                "max_response_size",
            ),
            (
                format!("max_response_size = \"2TB\"\n{MINIMAL}"),
                "max_response_size",
            ),
            (
                format!("max_response_size = \"lots\"\n{MINIMAL}"),
                "max_response_size",
            ),
            (
                format!("{MINIMAL}api_url = \"https://user:pass@mdmenrollment.apple.com\"\n"),
                "tokens[0].api_url",
            ),
            (
                format!("[retry]\ninitial_delay = \"10ms\"\n{MINIMAL}")
                    .replace("database = \"a.db\"\n", "")
                    .replace("[retry]", "database = \"a.db\"\n[retry]"),
                "retry.initial_delay",
            ),
            (
                format!("[http]\nlisten = \"0.0.0.0:9464\"\n{MINIMAL}")
                    .replace("database = \"a.db\"\n", "")
                    .replace("[http]", "database = \"a.db\"\n[http]"),
                "http.listen",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&dir, &text).unwrap_err();
            match &err {
                ConfigError::Invalid { key: k, .. } => assert_eq!(k, key, "{err}"),
                other => panic!("expected Invalid for {key}, got {other}"),
            }
        }
    }

    #[test]
    fn token_and_key_files_are_checked_at_load_but_not_decrypted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = dir_with_token();
        let with_key = format!("{MINIMAL}private_key_file = \"acme.key\"\n");
        let key_of = |text: &str| match parse(&dir, text).unwrap_err() {
            ConfigError::Invalid { key, reason, .. } => (key, reason),
            other => panic!("{other}"),
        };
        let (key, reason) = key_of(&with_key);
        assert_eq!(key, "tokens[0].private_key_file");
        assert!(reason.contains("does not exist"), "{reason}");
        let key_file = dir.path().join("acme.key");
        std::fs::write(&key_file, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (key, reason) = key_of(&with_key);
        assert_eq!(key, "tokens[0].private_key_file");
        assert!(reason.contains("chmod 0600"), "{reason}");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The content is not read at load (a broken token is that token's problem at
        // run time): a key that is not a key, or a token that is not a token, loads.
        std::fs::write(dir.path().join("acme.json"), "not a token").unwrap();
        assert!(parse(&dir, &with_key).is_ok());
        std::fs::create_dir(dir.path().join("folder")).unwrap();
        let (key, reason) = key_of(&MINIMAL.replace("acme.json", "folder"));
        assert_eq!(key, "tokens[0].token_file");
        assert!(reason.contains("not a regular file"), "{reason}");
        // Reports (status, devices, events) do not look at the files at all.
        let path = dir.path().join("config.toml");
        std::fs::write(&path, MINIMAL.replace("acme.json", "gone.json")).unwrap();
        assert!(Config::load(&path).is_err());
        assert!(Config::load_for_reports(&path).is_ok());
    }

    #[test]
    fn the_ranges_accept_what_admins_write_today() {
        let dir = dir_with_token();
        let text = "database = \"a.db\"\nrequest_timeout = \"1s\"\nschedule = \"10s\"\nmax_response_size = \"4MiB\"\n\
                    [retry]\ninitial_delay = \"100ms\"\nmax_delay = \"100ms\"\n\
                    [http]\nlisten = \"0.0.0.0:9464\"\nallow_public = true\n\
                    [[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\n";
        let c = parse(&dir, text).unwrap();
        assert!(matches!(c.full_fetch, Some(Schedule::Interval(d)) if d == DEFAULT_FULL_FETCH));
        assert_eq!(c.request_timeout, Duration::from_secs(1));
        assert_eq!(c.schedule.longest_gap(), Duration::from_secs(10));
        assert_eq!(c.retry.initial_delay, c.retry.max_delay);
        assert_eq!(c.max_response_bytes, 4 * 1024 * 1024);
        assert!(c.to_redacted_toml().contains("allow_public = true"));
        // Credentials in api_url are refused without being echoed.
        let err = parse(
            &dir,
            &format!("{MINIMAL}api_url = \"https://admin:hunter2@mdmenrollment.apple.com\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn cron_schedules_read_in_the_configured_time_zone() {
        let dir = dir_with_token();
        let text = "database = \"a.db\"\ntimezone = \"Europe/Berlin\"\nschedule = \"0 0 2 * * *\"\nfull_fetch = \"0 0 3 * * Sun\"\n\
                    [[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\n\
                    [[tokens]]\nname = \"tokyo\"\ntoken_file = \"acme.json\"\ntimezone = \"Asia/Tokyo\"\nfull_fetch = \"never\"\n";
        let c = parse(&dir, text).unwrap();
        match (&c.tokens[0].schedule, &c.tokens[1].schedule) {
            (Schedule::Cron(a), Schedule::Cron(b)) => {
                assert_eq!(a.timezone, chrono_tz::Europe::Berlin);
                assert_eq!(b.timezone, chrono_tz::Asia::Tokyo, "a token's own zone");
                let t = chrono::DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
                    .unwrap()
                    .with_timezone(&chrono::Utc);
                // 02:00 in Berlin (summer, UTC+2) is 00:00 UTC; in Tokyo (UTC+9) 17:00 UTC.
                assert_eq!(
                    a.next_after(t).unwrap().to_rfc3339(),
                    "2026-06-02T00:00:00+00:00"
                );
                assert_eq!(
                    b.next_after(t).unwrap().to_rfc3339(),
                    "2026-06-01T17:00:00+00:00"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(c.tokens[0].full_fetch.is_some());
        assert!(c.tokens[1].full_fetch.is_none());
        let shown = c.to_redacted_toml();
        assert!(
            shown.contains("schedule = \"0 0 2 * * *\"")
                && shown.contains("timezone = \"Europe/Berlin\""),
            "{shown}"
        );
        assert!(parse(&dir, &shown).is_ok(), "the shown config reads back");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let dir = dir_with_token();
        let err = parse(&dir, &format!("{MINIMAL}pagesize = 10\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pagesize"), "{err}");
        let err = parse(&dir, &format!("databse = 1\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("databse"), "{err}");
    }

    #[test]
    fn http_is_allowed_to_loopback_only() {
        assert!(parse_api_url("http://127.0.0.1:8080").is_ok());
        assert!(parse_api_url("http://localhost:8080").is_ok());
        assert!(parse_api_url("http://[::1]:8080").is_ok());
        assert!(parse_api_url("http://10.0.0.1").is_err());
        assert!(parse_api_url("https://mdmenrollment.apple.com").is_ok());
        assert!(parse_api_url("ftp://x").is_err());
    }

    #[test]
    fn redacted_output_has_no_secrets() {
        let dir = dir_with_token();
        let c = parse(&dir, MINIMAL).unwrap();
        let out = c.to_redacted_toml();
        assert!(
            !out.contains("CS_s") && !out.contains("AT_s") && !out.contains("AS_s"),
            "{out}"
        );
        assert!(out.contains("name = \"acme\""));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("\"CS_s\"") && !dbg.contains("\"AS_s\""),
            "{dbg}"
        );
    }
}
