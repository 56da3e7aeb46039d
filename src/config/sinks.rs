//! The `[[sinks]]` tables and `event_retention`: raw TOML → typed [`SinkConfig`]s.
//!
//! Each sink type accepts only its own keys, and every value is checked here, so a
//! delivery pass never meets a bad setting. A webhook's signing secrets are read from
//! their files at load time (each file must be private to its owner) and are never
//! printed: their type's `Debug` redacts them and no error quotes them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{duration, duration_in, parse_api_url, resolve, ConfigError};

/// Most events one webhook request or command run may carry.
pub const MAX_BATCH_LIMIT: usize = 1000;
/// Events kept by default after every sink has them: 90 days.
pub const DEFAULT_EVENT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
/// Shortest signing secret accepted in its raw form (the file's text), in bytes.
const MIN_SECRET_LEN: usize = 16;
/// Prefix of a secret in the Standard Webhooks form: `whsec_` and the key in base64.
pub const WHSEC_PREFIX: &str = "whsec_";
/// Key lengths the Standard Webhooks specification allows for a `whsec_` secret, in bytes.
const WHSEC_KEY_LEN: std::ops::RangeInclusive<usize> = 24..=64;

/// The command that makes a secret in `file`, for messages.
fn make_secret(file: &str) -> String {
    format!("(umask 077; echo \"{WHSEC_PREFIX}$(openssl rand -base64 32)\" > {file})")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    pub(super) name: String,
    #[serde(rename = "type")]
    kind: String,
    path: Option<String>,
    url: Option<String>,
    secret_file: Option<PathBuf>,
    secret_files: Option<Vec<PathBuf>>,
    signature: Option<String>,
    format: Option<String>,
    command: Option<Vec<String>>,
    max_batch: Option<i64>,
    timeout: Option<String>,
}

/// An event sink: a named destination with its own delivery cursor.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Unique name; keys the sink's delivery cursor in `sink_cursors`.
    pub name: String,
    /// What kind of sink, and its settings.
    pub kind: SinkKind,
    /// The shape of each event it receives (`format`).
    pub format: EventFormat,
}

/// The shape of each event a sink receives (`format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventFormat {
    /// adesync's own event object (`schema/event.schema.json`).
    #[default]
    Adesync,
    /// A CloudEvents 1.0 event in structured-mode JSON whose `data` is that object.
    CloudEvents,
}

impl EventFormat {
    /// The `format` value in the config file.
    pub fn config_name(self) -> &'static str {
        match self {
            EventFormat::Adesync => "adesync",
            EventFormat::CloudEvents => "cloudevents",
        }
    }
}

/// How a webhook request is signed (`signature`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SignatureScheme {
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp` and `webhook-signature`
    /// (`v1,<base64 HMAC-SHA256>`, one per secret, space-separated).
    #[default]
    StandardWebhooks,
    /// adesync's first scheme: `X-Adesync-Timestamp` and `X-Adesync-Signature`
    /// (`v1=<hex HMAC-SHA256>`, one per secret, comma-separated).
    AdesyncV1,
}

impl SignatureScheme {
    /// The `signature` value in the config file.
    pub fn config_name(self) -> &'static str {
        match self {
            SignatureScheme::StandardWebhooks => "standard-webhooks",
            SignatureScheme::AdesyncV1 => "adesync-v1",
        }
    }
}
/// The sink types.
#[derive(Clone, Debug)]
pub enum SinkKind {
    /// JSON lines appended to a file or written to standard output.
    Jsonl(JsonlTarget),
    /// Signed HTTPS POSTs.
    Webhook(WebhookConfig),
    /// A program that reads JSON lines on its standard input.
    Command(CommandConfig),
}

impl SinkKind {
    /// The `type` value in the config file.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::Jsonl(_) => "jsonl",
            SinkKind::Webhook(_) => "webhook",
            SinkKind::Command(_) => "command",
        }
    }
}

/// Destination of a `jsonl` sink.
#[derive(Clone, Debug, PartialEq)]
pub enum JsonlTarget {
    /// Standard output (`path = "-"`).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
}

/// A `webhook` sink.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Where events are POSTed (https; plain http only to loopback).
    pub url: reqwest::Url,
    /// The files the signing secrets were read from, the newest first (for messages;
    /// never their content).
    pub secret_files: Vec<PathBuf>,
    /// Whether they were given as `secret_files` (a list) rather than `secret_file`.
    pub secret_list: bool,
    /// The HMAC-SHA256 keys, one per file in the same order: every request is signed
    /// with each, so a receiver may know any one of them (a key being rotated).
    pub secrets: Vec<WebhookSecret>,
    /// How requests are signed.
    pub signature: SignatureScheme,
    /// Events per request: 1 sends one event object, more sends a JSON array.
    pub max_batch: usize,
    /// Timeout of one request (connect + response).
    pub timeout: Duration,
}

/// A `command` sink.
#[derive(Clone, Debug)]
pub struct CommandConfig {
    /// The program and its arguments, run without a shell.
    pub argv: Vec<String>,
    /// Events per run, written as JSON lines to its standard input.
    pub max_batch: usize,
    /// How long one run may take before it is killed and retried later.
    pub timeout: Duration,
}

/// A webhook signing key: the bytes HMAC-SHA256 is keyed with (for a `whsec_` secret the
/// decoded base64, otherwise the file's text). `Debug` never shows it.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    /// Wraps secret bytes (leading and trailing whitespace are the caller's business).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }
    /// The secret, for computing signatures only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// Reads `event_retention`: a duration of at least one hour, or `"forever"` (None).
pub(super) fn parse_retention(text: Option<&str>) -> Result<Option<Duration>, String> {
    match text.map(str::trim) {
        None => Ok(Some(DEFAULT_EVENT_RETENTION)),
        Some("forever") => Ok(None),
        Some(t) => {
            let d = duration(Some(t), DEFAULT_EVENT_RETENTION)?;
            if d < Duration::from_secs(3600) {
                return Err(format!(
                    "{t:?} is shorter than 1h; keep events at least a day (e.g. \"90d\"), or write \"forever\""
                ));
            }
            Ok(Some(d))
        }
    }
}

/// Formats a retention the way it is written in the file (`"90d"`), or `"forever"`.
pub(super) fn format_retention(r: Option<Duration>) -> String {
    match r {
        None => "forever".into(),
        Some(d) if d.as_secs() % 86_400 == 0 => format!("{}d", d.as_secs() / 86_400),
        Some(d) => humantime::format_duration(d).to_string(),
    }
}

/// Turns `sinks[i]` into a [`SinkConfig`]. The name was checked by the caller.
pub(super) fn resolve_sink(
    i: usize,
    raw: RawSink,
    base: &Path,
    file: &Path,
) -> Result<SinkConfig, ConfigError> {
    let invalid = |k: &str, reason: String| ConfigError::Invalid {
        path: file.to_owned(),
        key: format!("sinks[{i}].{k}"),
        reason,
    };
    // Keys a type does not take are refused by name, so a typo cannot pass silently.
    let allowed: &[&str] = match raw.kind.as_str() {
        "jsonl" => &["path", "format"],
        "webhook" => &[
            "url",
            "secret_file",
            "secret_files",
            "signature",
            "format",
            "max_batch",
            "timeout",
        ],
        "command" => &["command", "format", "max_batch", "timeout"],
        other => {
            return Err(invalid(
                "type",
                format!("unknown sink type \"{other}\"; supported: jsonl, webhook, command"),
            ))
        }
    };
    let present = [
        ("path", raw.path.is_some()),
        ("url", raw.url.is_some()),
        ("secret_file", raw.secret_file.is_some()),
        ("secret_files", raw.secret_files.is_some()),
        ("signature", raw.signature.is_some()),
        ("format", raw.format.is_some()),
        ("command", raw.command.is_some()),
        ("max_batch", raw.max_batch.is_some()),
        ("timeout", raw.timeout.is_some()),
    ];
    for (k, set) in present {
        if set && !allowed.contains(&k) {
            return Err(invalid(
                k,
                format!(
                    "not a setting of a {} sink (it takes: {})",
                    raw.kind,
                    allowed.join(", ")
                ),
            ));
        }
    }
    let max_batch = |default: usize| match raw.max_batch {
        None => Ok(default),
        Some(n) if (1..=MAX_BATCH_LIMIT as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(invalid(
            "max_batch",
            format!("{n} is out of range; use 1..={MAX_BATCH_LIMIT}"),
        )),
    };
    let format = match raw.format.as_deref() {
        None | Some("adesync") => EventFormat::Adesync,
        Some("cloudevents") => EventFormat::CloudEvents,
        Some(other) => {
            return Err(invalid(
                "format",
                format!("unknown event format {other:?}; supported: \"adesync\" (adesync's event object, the default), \"cloudevents\" (CloudEvents 1.0, structured-mode JSON)"),
            ))
        }
    };
    let timeout = |default: Duration| {
        duration_in(
            raw.timeout.as_deref(),
            default,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )
        .map_err(|r| invalid("timeout", r))
    };
    let kind = match raw.kind.as_str() {
        "jsonl" => SinkKind::Jsonl(match raw.path.as_deref() {
            None | Some("-") => JsonlTarget::Stdout,
            Some(p) if p.trim().is_empty() || p.ends_with('/') => {
                return Err(invalid(
                    "path",
                    format!(
                    "{p:?} is not a file; give a file to append to, or \"-\" for standard output"
                ),
                ))
            }
            Some(p) => {
                let file = resolve(base, PathBuf::from(p));
                if file.is_dir() {
                    return Err(invalid(
                        "path",
                        format!(
                            "{} is a folder; give a file in it to append to, e.g. {:?}",
                            file.display(),
                            file.join("events.jsonl").display().to_string()
                        ),
                    ));
                }
                JsonlTarget::File(file)
            }
        }),
        "webhook" => {
            let text = raw
                .url
                .as_deref()
                .ok_or_else(|| invalid("url", "a webhook sink needs url = \"https://…\"".into()))?;
            let url = parse_api_url(text).map_err(|r| invalid("url", r))?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(invalid(
                    "url",
                    "must not carry a user name or password: it would show in logs; receivers authenticate requests by their signature".into(),
                ));
            }
            let signature = match raw.signature.as_deref() {
                None | Some("standard-webhooks") => SignatureScheme::StandardWebhooks,
                Some("adesync-v1") => SignatureScheme::AdesyncV1,
                Some(other) => {
                    return Err(invalid(
                        "signature",
                        format!("unknown signature scheme {other:?}; supported: \"standard-webhooks\" (the default; webhook-id, webhook-timestamp and webhook-signature headers), \"adesync-v1\" (the X-Adesync-Timestamp and X-Adesync-Signature headers of earlier versions)"),
                    ))
                }
            };
            let files: Vec<(String, PathBuf)> = match (raw.secret_file.clone(), raw.secret_files.clone()) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "secret_files",
                        "give either secret_file (one secret) or secret_files (several, the newest first, while the receiver switches to a new one), not both".into(),
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        "secret_file",
                        format!("a webhook sink needs secret_file, a file (mode 0600) holding the signing secret; create one with `{}`", make_secret("FILE")),
                    ))
                }
                (Some(f), None) => vec![("secret_file".to_owned(), f)],
                (None, Some(list)) if list.is_empty() => {
                    return Err(invalid(
                        "secret_files",
                        "is empty; list at least one secret file, the newest first (or use secret_file for a single one)".into(),
                    ))
                }
                (None, Some(list)) => list
                    .into_iter()
                    .enumerate()
                    .map(|(j, f)| (format!("secret_files[{j}]"), f))
                    .collect(),
            };
            let mut secret_files = Vec::with_capacity(files.len());
            let mut secrets = Vec::with_capacity(files.len());
            for (key, file) in files {
                let file = resolve(base, file);
                if secret_files.contains(&file) {
                    return Err(invalid(&key, format!("{} is listed twice", file.display())));
                }
                secrets.push(read_secret(&file).map_err(|r| invalid(&key, r))?);
                secret_files.push(file);
            }
            SinkKind::Webhook(WebhookConfig {
                url,
                secret_files,
                secret_list: raw.secret_files.is_some(),
                secrets,
                signature,
                max_batch: max_batch(1)?,
                timeout: timeout(Duration::from_secs(10))?,
            })
        }
        _ => {
            let argv = raw.command.clone().unwrap_or_default();
            if argv.first().is_none_or(|p| p.trim().is_empty()) {
                return Err(invalid(
                    "command",
                    "a command sink needs command = [\"/path/to/program\", \"arg\", …] (run without a shell)".into(),
                ));
            }
            let mut argv = argv;
            // A program named with a path is checked now (relative to the config file);
            // a bare name is looked up in PATH when it runs.
            if argv[0].contains('/') {
                let p = resolve(base, PathBuf::from(&argv[0]));
                if !p.is_file() {
                    return Err(invalid(
                        "command",
                        format!("program {} does not exist", p.display()),
                    ));
                }
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&p)
                    .map(|m| m.permissions().mode())
                    .unwrap_or(0);
                if mode & 0o111 == 0 {
                    return Err(invalid(
                        "command",
                        format!("program {} is not executable; chmod +x it", p.display()),
                    ));
                }
                argv[0] = p.display().to_string();
            }
            SinkKind::Command(CommandConfig {
                argv,
                max_batch: max_batch(1000)?,
                timeout: timeout(Duration::from_secs(60))?,
            })
        }
    };
    Ok(SinkConfig {
        name: raw.name,
        kind,
        format,
    })
}

/// Reads a signing secret: the file must be private to its owner. Its content without
/// surrounding whitespace is either `whsec_` and the base64 of a 24 to 64-byte key (the
/// Standard Webhooks form; the key is the decoded bytes), or any other text of at least
/// [`MIN_SECRET_LEN`] bytes (the key is that text). Messages never quote it.
fn read_secret(path: &Path) -> Result<WebhookSecret, String> {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "secret file {shown} has mode {mode:04o}, so others can read the signing secret; run `chmod 600 {shown}`"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    let secret = bytes.trim_ascii();
    if let Some(encoded) = secret.strip_prefix(WHSEC_PREFIX.as_bytes()) {
        // The decoder's own error is not quoted: it names the offending byte.
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ];
        let key = engines
            .iter()
            .find_map(|e| e.decode(encoded).ok())
            .ok_or_else(|| {
                format!(
                    "secret file {shown} starts with {WHSEC_PREFIX} but the rest is not base64; a Standard Webhooks secret is {WHSEC_PREFIX} followed by the base64 of 24 to 64 random bytes: `{}`",
                    make_secret(&shown.to_string())
                )
            })?;
        if !WHSEC_KEY_LEN.contains(&key.len()) {
            return Err(format!(
                "the {WHSEC_PREFIX} secret in {shown} decodes to {} bytes; Standard Webhooks secrets are {} to {} bytes: `{}`",
                key.len(),
                WHSEC_KEY_LEN.start(),
                WHSEC_KEY_LEN.end(),
                make_secret(&shown.to_string())
            ));
        }
        return Ok(WebhookSecret::new(key));
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "secret file {shown} holds {} bytes; a signing secret needs at least {MIN_SECRET_LEN}: `{}`",
            secret.len(),
            make_secret(&shown.to_string())
        ));
    }
    Ok(WebhookSecret::new(secret))
}

/// The sink as TOML for `check-config`; the secret stays in its file.
pub(super) fn sink_to_toml(out: &mut String, k: &SinkConfig) {
    use std::fmt::Write;
    let _ = writeln!(out, "\n[[sinks]]");
    let _ = writeln!(out, "name = {:?}", k.name);
    let _ = writeln!(out, "type = \"{}\"", k.kind.type_name());
    let _ = writeln!(out, "format = \"{}\"", k.format.config_name());
    let secs = |d: Duration| humantime::format_duration(d).to_string();
    match &k.kind {
        SinkKind::Jsonl(JsonlTarget::Stdout) => {
            let _ = writeln!(out, "path = \"-\"");
        }
        SinkKind::Jsonl(JsonlTarget::File(p)) => {
            let _ = writeln!(out, "path = {:?}", p.display().to_string());
        }
        SinkKind::Webhook(w) => {
            let _ = writeln!(out, "url = {:?}", w.url.as_str());
            let files: Vec<String> = w
                .secret_files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            if w.secret_list {
                let _ = writeln!(out, "secret_files = {files:?}  # secrets redacted");
            } else {
                let _ = writeln!(out, "secret_file = {:?}  # secret redacted", files[0]);
            }
            let _ = writeln!(out, "signature = \"{}\"", w.signature.config_name());
            let _ = writeln!(out, "max_batch = {}", w.max_batch);
            let _ = writeln!(out, "timeout = {:?}", secs(w.timeout));
        }
        SinkKind::Command(c) => {
            let _ = writeln!(out, "command = {:?}", c.argv);
            let _ = writeln!(out, "max_batch = {}", c.max_batch);
            let _ = writeln!(out, "timeout = {:?}", secs(c.timeout));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::Config;
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn dir() -> tempfile::TempDir {
        let dir = crate::config::tests::dir_with_token();
        write_secret(&dir, "hook.secret", &format!("{SECRET}\n"), 0o600);
        dir
    }

    fn write_secret(dir: &tempfile::TempDir, name: &str, text: &str, mode: u32) {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn parse(dir: &tempfile::TempDir, sinks: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "database = \"a.db\"\n[[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\n{sinks}"
        );
        Config::parse(&text, &dir.path().join("config.toml"))
    }

    fn key_of(e: ConfigError) -> (String, String) {
        match e {
            ConfigError::Invalid { key, reason, .. } => (key, reason),
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn webhook_sinks_read_their_secret_and_never_show_it() {
        let d = dir();
        let c = parse(
            &d,
            "[[sinks]]\nname = \"cmdb\"\ntype = \"webhook\"\nurl = \"https://cmdb.example.com/hook\"\nsecret_file = \"hook.secret\"\nmax_batch = 50\n",
        )
        .unwrap();
        let SinkKind::Webhook(w) = &c.sinks[0].kind else {
            panic!("not a webhook")
        };
        assert_eq!(w.secrets.len(), 1);
        assert_eq!(
            w.secrets[0].expose(),
            SECRET.as_bytes(),
            "whitespace trimmed"
        );
        assert_eq!((w.max_batch, w.timeout), (50, Duration::from_secs(10)));
        assert_eq!(
            w.signature,
            SignatureScheme::StandardWebhooks,
            "the default"
        );
        assert_eq!(c.sinks[0].format, EventFormat::Adesync, "the default");
        assert!(!format!("{c:?}").contains(SECRET));
        let shown = c.to_redacted_toml();
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("type = \"webhook\""), "{shown}");
        assert!(
            shown.contains("signature = \"standard-webhooks\""),
            "{shown}"
        );
        assert!(shown.contains("format = \"adesync\""), "{shown}");
        assert!(shown.contains("event_retention = \"90d\""), "{shown}");
    }

    #[test]
    fn whsec_secrets_are_decoded_and_rotation_signs_with_each() {
        use base64::Engine;
        let d = dir();
        let key: Vec<u8> = (0u8..32).collect();
        let whsec = format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(&key)
        );
        write_secret(&d, "new.secret", &format!("{whsec}\n"), 0o600);
        let c = parse(
            &d,
            "[[sinks]]\nname = \"h\"\ntype = \"webhook\"\nurl = \"https://x.example/\"\n\
             secret_files = [\"new.secret\", \"hook.secret\"]\nsignature = \"adesync-v1\"\nformat = \"cloudevents\"\n\
             [[sinks]]\nname = \"j\"\ntype = \"jsonl\"\nformat = \"cloudevents\"\n\
             [[sinks]]\nname = \"c\"\ntype = \"command\"\ncommand = [\"cat\"]\nformat = \"cloudevents\"\n",
        )
        .unwrap();
        let SinkKind::Webhook(w) = &c.sinks[0].kind else {
            panic!("not a webhook")
        };
        let keys: Vec<&[u8]> = w.secrets.iter().map(WebhookSecret::expose).collect();
        assert_eq!(keys, [&key[..], SECRET.as_bytes()], "the newest first");
        assert_eq!(w.signature, SignatureScheme::AdesyncV1);
        assert!(c.sinks.iter().all(|s| s.format == EventFormat::CloudEvents));
        let shown = format!("{c:?}{}", c.to_redacted_toml());
        assert!(
            !shown.contains(&whsec[6..]) && !shown.contains(SECRET),
            "{shown}"
        );
        assert!(shown.contains("secret_files = ["), "{shown}");
    }

    #[test]
    fn a_secret_file_others_can_read_is_refused_with_the_fix() {
        let d = dir();
        write_secret(&d, "open.secret", SECRET, 0o644);
        let (key, reason) = key_of(
            parse(
                &d,
                "[[sinks]]\nname = \"h\"\ntype = \"webhook\"\nurl = \"https://x.example\"\nsecret_file = \"open.secret\"\n",
            )
            .unwrap_err(),
        );
        assert_eq!(key, "sinks[0].secret_file");
        assert!(
            reason.contains("0644") && reason.contains("chmod 600"),
            "{reason}"
        );
        assert!(!reason.contains(SECRET));
    }

    #[test]
    fn bad_sink_settings_name_their_key() {
        let d = dir();
        write_secret(&d, "short.secret", "abc", 0o600);
        // Not base64, and base64 of 16 bytes (Standard Webhooks wants 24 to 64).
        write_secret(&d, "garbled.secret", "whsec_not*base64*at*all!", 0o600);
        write_secret(&d, "weak.secret", "whsec_AAAAAAAAAAAAAAAAAAAAAA==", 0o600);
        write_secret(&d, "plain.txt", "not a program", 0o644);
        let hook = "[[sinks]]\nname = \"h\"\ntype = \"webhook\"\n";
        let cases = [
            (format!("{hook}url = \"http://10.0.0.1/x\"\nsecret_file = \"hook.secret\"\n"), "sinks[0].url"),
            (format!("{hook}url = \"https://u:p@x.example/\"\nsecret_file = \"hook.secret\"\n"), "sinks[0].url"),
            (format!("{hook}url = \"https://x.example/\"\n"), "sinks[0].secret_file"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"short.secret\"\n"), "sinks[0].secret_file"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"garbled.secret\"\n"), "sinks[0].secret_file"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_files = [\"hook.secret\", \"weak.secret\"]\n"), "sinks[0].secret_files[1]"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_files = [\"hook.secret\", \"hook.secret\"]\n"), "sinks[0].secret_files[1]"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_files = []\n"), "sinks[0].secret_files"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"hook.secret\"\nsecret_files = [\"hook.secret\"]\n"), "sinks[0].secret_files"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"hook.secret\"\nsignature = \"hmac\"\n"), "sinks[0].signature"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"hook.secret\"\nformat = \"cloudevent\"\n"), "sinks[0].format"),
            ("[[sinks]]\nname = \"j\"\ntype = \"jsonl\"\nsignature = \"adesync-v1\"\n".into(), "sinks[0].signature"),
            ("[[sinks]]\nname = \"j\"\ntype = \"jsonl\"\nformat = \"xml\"\n".into(), "sinks[0].format"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"hook.secret\"\nmax_batch = 0\n"), "sinks[0].max_batch"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"hook.secret\"\npath = \"x\"\n"), "sinks[0].path"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"hook.secret\"\ntimeout = \"0s\"\n"), "sinks[0].timeout"),
            ("[[sinks]]\nname = \"c\"\ntype = \"command\"\ncommand = []\n".into(), "sinks[0].command"),
            ("[[sinks]]\nname = \"c\"\ntype = \"command\"\ncommand = [\"./missing.sh\"]\n".into(), "sinks[0].command"),
            ("[[sinks]]\nname = \"q\"\ntype = \"kafka\"\n".into(), "sinks[0].type"),
            ("[[sinks]]\nname = \"j\"\ntype = \"jsonl\"\npath = \"\"\n".into(), "sinks[0].path"),
            ("[[sinks]]\nname = \"j\"\ntype = \"jsonl\"\npath = \".\"\n".into(), "sinks[0].path"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"hook.secret\"\ntimeout = \"1ns\"\n"), "sinks[0].timeout"),
            (format!("{hook}url = \"https://x.example/\"\nsecret_file = \"hook.secret\"\ntimeout = \"1000d\"\n"), "sinks[0].timeout"),
            ("[[sinks]]\nname = \"c\"\ntype = \"command\"\ncommand = [\"./plain.txt\"]\n".into(), "sinks[0].command"),
        ];
        for (text, key) in cases {
            let (k, reason) = key_of(parse(&d, &text).unwrap_err());
            assert_eq!(k, key, "{reason}");
            assert!(
                !reason.contains(SECRET) && !reason.contains("base64*at"),
                "{reason}"
            );
        }
        // A top-level key goes before the first table.
        let text = "event_retention = \"10m\"\ndatabase = \"a.db\"\n[[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\n";
        let e = Config::parse(text, &d.path().join("config.toml")).unwrap_err();
        assert_eq!(key_of(e).0, "event_retention");
    }

    #[test]
    fn command_sinks_resolve_a_relative_program_and_keep_a_bare_name() {
        let d = dir();
        write_secret(&d, "hook.sh", "#!/bin/sh\ncat\n", 0o755);
        let c = parse(
            &d,
            "[[sinks]]\nname = \"a\"\ntype = \"command\"\ncommand = [\"./hook.sh\", \"--x\"]\n\
             [[sinks]]\nname = \"b\"\ntype = \"command\"\ncommand = [\"logger\", \"-t\", \"adesync\"]\ntimeout = \"5s\"\nmax_batch = 10\n",
        )
        .unwrap();
        let SinkKind::Command(a) = &c.sinks[0].kind else {
            panic!()
        };
        assert_eq!(a.argv[0], d.path().join("./hook.sh").display().to_string());
        assert_eq!((a.max_batch, a.timeout), (1000, Duration::from_secs(60)));
        let SinkKind::Command(b) = &c.sinks[1].kind else {
            panic!()
        };
        assert_eq!(b.argv, ["logger", "-t", "adesync"]);
        assert_eq!((b.max_batch, b.timeout), (10, Duration::from_secs(5)));
    }

    #[test]
    fn the_example_sinks_are_valid_once_uncommented() {
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
                .unwrap();
        let d = dir();
        write_secret(&d, "tickets", "#!/bin/sh\ncat\n", 0o755);
        let section = &example[example.find("# Event sinks").unwrap()..];
        let sinks: String = section
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            // Keep tables, `key = value` lines and nested comments; drop the prose.
            .filter(|l| {
                let key = l.split(" = ").next().unwrap_or("");
                l.starts_with("[[sinks]]")
                    || l.starts_with('#')
                    || (l.contains(" = ")
                        && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .replace("/etc/adesync/cmdb.secret", "hook.secret")
            .replace("/usr/local/bin/adesync-to-tickets", "./tickets");
        let retention = example
            .lines()
            .find_map(|l| l.strip_prefix("# event_retention"))
            .unwrap();
        let text = format!(
            "event_retention{retention}\ndatabase = \"a.db\"\n[[tokens]]\nname = \"acme\"\ntoken_file = \"acme.json\"\n{sinks}"
        );
        let c = Config::parse(&text, &d.path().join("config.toml")).unwrap();
        let types: Vec<&str> = c.sinks.iter().map(|s| s.kind.type_name()).collect();
        assert_eq!(types, ["jsonl", "jsonl", "webhook", "command"]);
        assert_eq!(c.event_retention, Some(DEFAULT_EVENT_RETENTION));
    }

    #[test]
    fn retention_defaults_to_90_days_and_can_be_forever() {
        assert_eq!(
            parse_retention(None).unwrap(),
            Some(DEFAULT_EVENT_RETENTION)
        );
        assert_eq!(parse_retention(Some("forever")).unwrap(), None);
        assert_eq!(
            parse_retention(Some("30d")).unwrap(),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(format_retention(Some(DEFAULT_EVENT_RETENTION)), "90d");
        assert_eq!(format_retention(None), "forever");
    }
}
