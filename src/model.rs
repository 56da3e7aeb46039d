//! Domain types shared by the Apple client, the store and the syncer.
//!
//! Apple's vocabulary is kept end to end: a [`Device`] has exactly the JSON field names
//! Apple uses (`serial_number`, `profile_status`, ...), and the store's columns carry the
//! same names. Fields Apple adds in later protocol versions are kept in [`Device::extra`]
//! so nothing Apple sends is lost.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The Apple device fields adesync stores in named columns, in column order.
///
/// `serial_number` is the key and is not listed here.
pub const DEVICE_FIELDS: [&str; 12] = [
    "model",
    "description",
    "color",
    "asset_tag",
    "profile_status",
    "profile_uuid",
    "profile_assign_time",
    "profile_push_time",
    "device_assigned_date",
    "device_assigned_by",
    "os",
    "device_family",
];

/// How a protocol-10 field is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldShape {
    /// A string as sent.
    Text,
    /// A list of strings; a plain string from Apple is a one-element list.
    List,
    /// A boolean.
    Bool,
}

/// The fields protocol version 10 adds (docs/apple-dep-api.md §1.1, §4.5), each kept in a
/// column of its own; the rest of what Apple sends beyond [`DEVICE_FIELDS`] stays in
/// `extra`. Append only: the order is the event snapshot's.
pub const V10_FIELDS: [(&str, FieldShape); 9] = [
    ("imei", FieldShape::List),
    ("meid", FieldShape::List),
    ("eid", FieldShape::Text),
    ("wifi_mac_address", FieldShape::List),
    ("bluetooth_mac_address", FieldShape::List),
    ("ethernet_mac_address", FieldShape::List),
    ("is_replacement_device", FieldShape::Bool),
    ("mdm_migration_deadline", FieldShape::Text),
    ("released_by_replacement", FieldShape::Bool),
];

/// What Apple says happened to a device in a sync record (`op_type`).
///
/// Fetch records carry no `op_type`; they describe current membership and are
/// treated like `added`/`modified` (docs/apple-dep-api.md §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    /// The device was assigned to this device-management server.
    Added,
    /// One or more of the device's fields changed.
    Modified,
    /// The device was unassigned from this server (e.g. moved to another one).
    Deleted,
}

/// One device as Apple describes it, with Apple's field names.
///
/// Every field but `serial_number` is optional because Apple omits absent fields.
/// `extra` keeps any field not named here (e.g. protocol v8+ `mdm_migration_deadline`,
/// v10+ `imei`) exactly as Apple sent it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// The device's serial number; unique per token.
    pub serial_number: String,
    /// Marketing model name, e.g. "iPad Air".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Apple's order description, e.g. "IPAD AIR WI-FI 64GB BLUE".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Colour as Apple spells it, e.g. "SPACE GRAY".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    /// Asset tag set in ABM/ASM, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_tag: Option<String>,
    /// `empty`, `assigned`, `pushed` or `removed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_status: Option<String>,
    /// UUID of the assigned enrollment profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_uuid: Option<String>,
    /// When the profile was assigned (as Apple sent it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_assign_time: Option<String>,
    /// When the device fetched the profile (as Apple sent it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_push_time: Option<String>,
    /// When the device was assigned to this server (as Apple sent it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_assigned_date: Option<String>,
    /// Who assigned the device (usually an e-mail address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_assigned_by: Option<String>,
    /// `iOS`, `iPadOS`, `OSX`, `tvOS`, `visionOS` (protocol v2+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// `iPhone`, `iPad`, `Mac`, `AppleTV`, `Vision`, `iPod` (protocol v2+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_family: Option<String>,
    /// Every other field Apple sent, except the per-record `op_type`/`op_date`.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Device {
    /// The named fields in [`DEVICE_FIELDS`] order, for diffing and storing.
    pub fn fields(&self) -> [&Option<String>; 12] {
        [
            &self.model,
            &self.description,
            &self.color,
            &self.asset_tag,
            &self.profile_status,
            &self.profile_uuid,
            &self.profile_assign_time,
            &self.profile_push_time,
            &self.device_assigned_date,
            &self.device_assigned_by,
            &self.os,
            &self.device_family,
        ]
    }

    /// Mutable access to the named fields in [`DEVICE_FIELDS`] order.
    pub fn fields_mut(&mut self) -> [&mut Option<String>; 12] {
        [
            &mut self.model,
            &mut self.description,
            &mut self.color,
            &mut self.asset_tag,
            &mut self.profile_status,
            &mut self.profile_uuid,
            &mut self.profile_assign_time,
            &mut self.profile_push_time,
            &mut self.device_assigned_date,
            &mut self.device_assigned_by,
            &mut self.os,
            &mut self.device_family,
        ]
    }

    /// The full record as JSON, Apple's field names, absent fields omitted.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Normalises the protocol-10 fields as Apple may send them: a plain string where a
    /// list is documented becomes a one-element list (`""` stays `""`), `"true"`/`"false"`
    /// become booleans. A difference of shape alone is then no change.
    pub fn normalise_v10(&mut self) {
        for (name, shape) in V10_FIELDS {
            let Some(v) = self.extra.get_mut(name) else {
                continue;
            };
            match (shape, &*v) {
                (FieldShape::List, Value::String(s)) if !s.is_empty() => {
                    *v = Value::Array(vec![Value::String(s.clone())]);
                }
                (FieldShape::Bool, Value::String(s)) if s == "true" || s == "false" => {
                    *v = Value::Bool(s == "true");
                }
                _ => {}
            }
        }
    }

    /// A protocol-10 field's value, if Apple sent it.
    pub fn v10(&self, name: &str) -> Option<&Value> {
        self.extra.get(name).filter(|v| !v.is_null())
    }
}

/// One record of a fetch or sync page: the device plus Apple's per-record operation.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct DeviceRecord {
    /// What happened (sync only; `None` on fetch pages).
    #[serde(default)]
    pub op_type: Option<OpType>,
    /// When it happened, as Apple sent it (sync only).
    #[serde(default)]
    pub op_date: Option<String>,
    /// The device's fields.
    #[serde(flatten)]
    pub device: Device,
}

/// The two phases of Apple's cursor protocol, and so which of Apple's two device-list
/// endpoints a page came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Paging `POST /server/devices`: the full current membership.
    Fetch,
    /// Paging `POST /devices/sync`: changes since the cursor.
    Sync,
}

impl Phase {
    /// The stored name: `fetch` or `sync`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Fetch => "fetch",
            Phase::Sync => "sync",
        }
    }

    /// The stored name back; anything but `sync` restarts safely with a full fetch.
    pub fn parse(s: &str) -> Phase {
        if s == "sync" {
            Phase::Sync
        } else {
            Phase::Fetch
        }
    }
}

/// What an event says happened to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// New to the mirror, or back after a deletion.
    Added,
    /// Fields changed.
    Modified,
    /// Left the server.
    Deleted,
}

impl EventKind {
    /// Every kind, in the order people read them.
    pub const ALL: [EventKind; 3] = [EventKind::Added, EventKind::Modified, EventKind::Deleted];

    /// The stored and JSON name (Apple's op_type words).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "added",
            EventKind::Modified => "modified",
            EventKind::Deleted => "deleted",
        }
    }

    /// The stored name back.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a device, beyond which fields changed: every device event's
/// `reason`. When several apply, the first in [`Reason::ALL`]'s order wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Released by a replacement (`released_by_replacement`), or the original of a
    /// replacement device.
    Replaced,
    /// Deleted with no replacement, and released from the organisation (seen by an
    /// organisation API account).
    Released,
    /// Back to this server after leaving it.
    Returned,
    /// Moved to another MDM server or unassigned in ABM/ASM: Apple's `deleted`, or a
    /// `modified` whose `profile_status` became `removed`.
    Unassigned,
    /// New to this server.
    Assigned,
    /// `profile_status` became `assigned`.
    ProfileAssigned,
    /// `profile_status` became `pushed`.
    ProfilePushed,
    /// The profile was cleared back to `empty`.
    ProfileRemoved,
    /// Anything else.
    Updated,
}

impl Reason {
    /// Every reason, in precedence order.
    pub const ALL: [Reason; 9] = [
        Reason::Replaced,
        Reason::Released,
        Reason::Returned,
        Reason::Unassigned,
        Reason::Assigned,
        Reason::ProfileAssigned,
        Reason::ProfilePushed,
        Reason::ProfileRemoved,
        Reason::Updated,
    ];

    /// The stored and JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Replaced => "replaced",
            Reason::Released => "released",
            Reason::Returned => "returned",
            Reason::Unassigned => "unassigned",
            Reason::Assigned => "assigned",
            Reason::ProfileAssigned => "profile_assigned",
            Reason::ProfilePushed => "profile_pushed",
            Reason::ProfileRemoved => "profile_removed",
            Reason::Updated => "updated",
        }
    }

    /// The stored name back.
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a sink stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkState {
    /// Delivering (or nothing to deliver).
    Ok,
    /// Its last delivery failed; retried on the next pass.
    Failing,
    /// The receiver asked to wait (`Retry-After`); delivery resumes after it.
    Waiting,
    /// Stopped until a person resumes it.
    Parked,
}

impl SinkState {
    /// The name shown and exported.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkState::Ok => "ok",
            SinkState::Failing => "failing",
            SinkState::Waiting => "waiting",
            SinkState::Parked => "parked",
        }
    }
}

impl std::fmt::Display for SinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stable name for why a sync failed: stored as the token's last error kind, counted
/// in `/metrics`, and the one place that says which failures need a person.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The server token expired.
    TokenExpired,
    /// The token file (or its key) cannot be read, decrypted or parsed.
    TokenFile,
    /// Apple refuses the token's credentials.
    TokenRejected,
    /// New terms and conditions wait in ABM/ASM.
    TermsNotSigned,
    /// Apple denies access.
    AccessDenied,
    /// Apple refuses the User-Agent.
    UserAgent,
    /// The token now belongs to another MDM server than the stored devices.
    ServerChanged,
    /// A cursor error Apple kept returning.
    Cursor,
    /// Apple refused the session.
    SessionRejected,
    /// Apple asked to slow down.
    Throttled,
    /// Apple's server failed (5xx).
    Server,
    /// Another HTTP status.
    Http,
    /// Apple's answer could not be read.
    MalformedBody,
    /// A request timed out.
    Timeout,
    /// The connection failed.
    Transport,
    /// The local database failed.
    Database,
    /// This machine ran short of something (file descriptors, memory, disk).
    LocalResource,
    /// An internal failure.
    Internal,
    /// Stopped by shutdown.
    Cancelled,
    /// An organisation API account's private key cannot be read or is not a P-256 key.
    ApiKey,
    /// Apple refuses an organisation API account (`invalid_client`, `invalid_scope`, a
    /// deleted or expired account).
    AccountRejected,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 21] = [
        ErrorKind::TokenExpired,
        ErrorKind::TokenFile,
        ErrorKind::TokenRejected,
        ErrorKind::TermsNotSigned,
        ErrorKind::AccessDenied,
        ErrorKind::UserAgent,
        ErrorKind::ServerChanged,
        ErrorKind::Cursor,
        ErrorKind::SessionRejected,
        ErrorKind::Throttled,
        ErrorKind::Server,
        ErrorKind::Http,
        ErrorKind::MalformedBody,
        ErrorKind::Timeout,
        ErrorKind::Transport,
        ErrorKind::Database,
        ErrorKind::LocalResource,
        ErrorKind::Internal,
        ErrorKind::Cancelled,
        ErrorKind::ApiKey,
        ErrorKind::AccountRejected,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::TokenExpired => "token_expired",
            ErrorKind::TokenFile => "token_file",
            ErrorKind::TokenRejected => "token_rejected",
            ErrorKind::TermsNotSigned => "terms_not_signed",
            ErrorKind::AccessDenied => "access_denied",
            ErrorKind::UserAgent => "user_agent",
            ErrorKind::ServerChanged => "server_changed",
            ErrorKind::Cursor => "cursor",
            ErrorKind::SessionRejected => "session_rejected",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Server => "server",
            ErrorKind::Http => "http",
            ErrorKind::MalformedBody => "malformed_body",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Transport => "transport",
            ErrorKind::Database => "database",
            ErrorKind::LocalResource => "local_resource",
            ErrorKind::Internal => "internal",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::ApiKey => "api_key",
            ErrorKind::AccountRejected => "account_rejected",
        }
    }

    /// The stored name back.
    pub fn parse(s: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether only a person can fix it (a new token, accepted terms, restored access,
    /// the right server): the daemon parks such a token instead of retrying, and
    /// `status` says an administrator must act. Local resource trouble (the database,
    /// the network) is never here: time or an operator's fix of the machine heals it.
    pub fn needs_admin(self) -> bool {
        matches!(
            self,
            ErrorKind::TokenExpired
                | ErrorKind::TokenFile
                | ErrorKind::TokenRejected
                | ErrorKind::TermsNotSigned
                | ErrorKind::AccessDenied
                | ErrorKind::UserAgent
                | ErrorKind::ServerChanged
                | ErrorKind::ApiKey
                | ErrorKind::AccountRejected
        )
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Keeps, for each serial number, only the record that describes its latest state.
///
/// Apple: "This service may return the same device more than once ... The record with
/// the latest op_date indicates the last known state of the device" (docs/apple-dep-api.md §4.4, §7.2).
/// Ties, and fetch records without `op_date`, resolve in array order: the later wins.
/// The result keeps the order of each serial's first appearance.
pub fn dedupe_latest(records: Vec<DeviceRecord>) -> Vec<DeviceRecord> {
    use std::collections::hash_map::{Entry, HashMap};
    // Each serial's first position, and which record fills it: the serials are borrowed,
    // and a page without repeats (nearly every page) is returned as it came.
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(records.len());
    let mut latest: Vec<usize> = (0..records.len()).collect();
    let mut repeated = vec![false; records.len()];
    for (i, rec) in records.iter().enumerate() {
        match first.entry(rec.device.serial_number.as_str()) {
            Entry::Occupied(slot) => {
                let slot = *slot.get();
                repeated[i] = true;
                if !is_older(
                    rec.op_date.as_deref(),
                    records[latest[slot]].op_date.as_deref(),
                ) {
                    latest[slot] = i;
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(i);
            }
        }
    }
    drop(first);
    if !repeated.contains(&true) {
        return records;
    }
    let mut taken: Vec<Option<DeviceRecord>> = records.into_iter().map(Some).collect();
    (0..taken.len())
        .filter(|i| !repeated[*i])
        .filter_map(|i| taken[latest[i]].take())
        .collect()
}

/// True when `a` is strictly older than `b`. Unknown or unparsable dates are never older.
pub fn is_older(a: Option<&str>, b: Option<&str>) -> bool {
    match (a.and_then(parse_time), b.and_then(parse_time)) {
        (Some(a), Some(b)) => a < b,
        _ => false,
    }
}

/// Parses Apple's RFC 3339 timestamps (e.g. `2024-07-03T09:40:00Z`).
pub fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Formats a time the way adesync stores its own timestamps: RFC 3339, UTC, milliseconds.
pub fn format_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Text from outside (Apple's bodies and device fields, a receiver's answer, a child's
/// stderr) made safe to print to a terminal or a log: control characters (escape
/// sequences, CR/LF, NUL, …) are written as `\u{..}` escapes, so they can neither fake
/// a log line nor redraw the terminal. Everything else is kept as is.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    // Controls, line and paragraph separators, and the bidirectional marks and overrides
    // that can make text read differently from what it is.
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_escapes_control_characters_only() {
        assert_eq!(
            printable("C02XL0GQJGH5 iPad (Wi-Fi)"),
            "C02XL0GQJGH5 iPad (Wi-Fi)"
        );
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\r\nERROR fake"), "x\\u{d}\\u{a}ERROR fake");
        assert_eq!(printable("nul\0"), "nul\\u{0}");
        assert_eq!(printable("Zoë ✓"), "Zoë ✓");
    }

    fn rec(serial: &str, op: Option<OpType>, date: Option<&str>, color: &str) -> DeviceRecord {
        DeviceRecord {
            op_type: op,
            op_date: date.map(str::to_owned),
            device: Device {
                serial_number: serial.into(),
                color: Some(color.into()),
                ..Device::default()
            },
        }
    }

    #[test]
    fn latest_op_date_wins_even_when_it_comes_first() {
        let page = vec![
            rec(
                "A",
                Some(OpType::Modified),
                Some("2024-07-03T10:00:00Z"),
                "new",
            ),
            rec("B", Some(OpType::Added), Some("2024-07-03T09:00:00Z"), "b"),
            rec(
                "A",
                Some(OpType::Added),
                Some("2024-07-03T09:00:00Z"),
                "old",
            ),
        ];
        let out = dedupe_latest(page);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].device.serial_number, "A");
        assert_eq!(out[0].device.color.as_deref(), Some("new"));
        assert_eq!(out[1].device.serial_number, "B");
    }

    #[test]
    fn ties_and_fetch_records_resolve_in_array_order() {
        let page = vec![
            rec("A", None, None, "first"),
            rec("A", None, None, "second"),
        ];
        assert_eq!(
            dedupe_latest(page)[0].device.color.as_deref(),
            Some("second")
        );
        let tie = vec![
            rec("A", Some(OpType::Added), Some("2024-07-03T10:00:00Z"), "x"),
            rec(
                "A",
                Some(OpType::Deleted),
                Some("2024-07-03T10:00:00Z"),
                "y",
            ),
        ];
        assert_eq!(dedupe_latest(tie)[0].op_type, Some(OpType::Deleted));
    }

    #[test]
    fn a_serial_repeated_three_times_keeps_its_first_place_and_its_latest_record() {
        let page = vec![
            rec("A", Some(OpType::Added), Some("2024-07-03T09:00:00Z"), "a1"),
            rec("B", None, None, "b"),
            rec(
                "A",
                Some(OpType::Modified),
                Some("2024-07-03T11:00:00Z"),
                "a2",
            ),
            rec("C", None, None, "c"),
            rec(
                "A",
                Some(OpType::Modified),
                Some("2024-07-03T10:00:00Z"),
                "a3",
            ),
            rec("C", None, None, "c2"),
        ];
        let out: Vec<(String, Option<String>)> = dedupe_latest(page)
            .into_iter()
            .map(|r| (r.device.serial_number, r.device.color))
            .collect();
        let want = [("A", "a2"), ("B", "b"), ("C", "c2")];
        assert_eq!(
            out,
            want.map(|(s, c)| (s.to_owned(), Some(c.to_owned())))
                .to_vec()
        );
        // Without repeats the page comes back as it was.
        let plain = vec![rec("X", None, None, "x"), rec("Y", None, None, "y")];
        let out = dedupe_latest(plain);
        assert_eq!(out[0].device.serial_number, "X");
        assert_eq!(out[1].device.serial_number, "Y");
    }

    #[test]
    fn unknown_fields_are_kept_and_op_fields_are_not() {
        let json = r#"{"serial_number":"X1","model":"iPad","op_type":"added",
            "op_date":"2024-07-03T09:40:00Z","imei":["35"],"is_replacement_device":false}"#;
        let r: DeviceRecord = serde_json::from_str(json).unwrap();
        assert_eq!(r.op_type, Some(OpType::Added));
        assert_eq!(r.device.model.as_deref(), Some("iPad"));
        assert_eq!(r.device.extra.len(), 2);
        assert!(r.device.extra.contains_key("imei"));
        assert!(!r.device.extra.contains_key("op_type"));
        let back = r.device.to_json();
        assert_eq!(back["is_replacement_device"], Value::Bool(false));
        assert!(back.get("op_date").is_none());
    }
}
