//! Change events: the pure decision "what the mirror holds + Apple's record → event"
//! ([`decide`]), the field diff behind it, and the event's JSON form (format version
//! [`EVENT_FORMAT_VERSION`], described by `schema/event.schema.json`).
//!
//! Events are born in the store's page transaction (`store/devices.rs` applies
//! [`decide`] to every record) together with a snapshot of the device, so an event's JSON
//! is the same whenever it is read: delivered late, replayed or listed. Delivery to sinks
//! lives in `sinks/`.

use serde_json::{json, Map, Value};

use crate::model::{is_older, Device, DeviceRecord, EventKind, OpType, Reason, DEVICE_FIELDS};
use crate::orgapi::OrgDevice;

/// What an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EventScope {
    /// A device of an ADE token (`device.*`).
    #[default]
    Device,
    /// A device of the organisation's inventory (`org_device.*`).
    OrgDevice,
    /// An enrollment profile assignment (`profile.assigned`, `profile.assign_failed`).
    Profile,
}

impl EventScope {
    /// The stored `events.scope` (NULL for ADE devices).
    pub fn stored(self) -> Option<&'static str> {
        match self {
            EventScope::Device => None,
            EventScope::OrgDevice => Some("org_device"),
            EventScope::Profile => Some("profile"),
        }
    }

    /// The JSON `type` of an event of this scope and kind.
    pub fn event_type(self, kind: EventKind) -> &'static str {
        match (self, kind) {
            (EventScope::Device, EventKind::Added) => "device.added",
            (EventScope::Device, EventKind::Modified) => "device.modified",
            (EventScope::Device, EventKind::Deleted) => "device.deleted",
            (EventScope::OrgDevice, EventKind::Added) => "org_device.added",
            (EventScope::OrgDevice, EventKind::Modified) => "org_device.modified",
            (EventScope::OrgDevice, EventKind::Deleted) => "org_device.removed",
            (EventScope::Profile, EventKind::Added) => "profile.assigned",
            (EventScope::Profile, EventKind::Modified) => "profile.assign_failed",
            (EventScope::Profile, EventKind::Deleted) => "profile.removed",
        }
    }
}

/// A stored change event.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// Monotonic id.
    pub id: i64,
    /// Token, or for an organisation device event the account.
    pub token_name: String,
    /// ADE device or organisation device.
    pub scope: EventScope,
    /// Device.
    pub serial_number: String,
    /// What happened.
    pub kind: EventKind,
    /// `{"field": [old, new]}`.
    pub changes: Value,
    /// When adesync recorded it.
    pub occurred_at: String,
    /// The device's record as stored right after the change (ADE events).
    pub device: Option<Device>,
    /// The organisation device as stored right after the change (organisation events).
    pub org_device: Option<OrgDevice>,
    /// What happened (device events; `None` for organisation events).
    pub reason: Option<Reason>,
    /// A profile event's assignment: profile, profile_uuid, status, attempts, retry_after.
    pub assignment: Option<Value>,
}

/// What the mirror holds for a device when one of Apple's records for it arrives.
#[derive(Clone, Copy, Debug)]
pub struct Known<'a> {
    /// The stored fields; `None` when they are known to equal the incoming record's (the
    /// store compares in place and skips decoding an unchanged row).
    pub device: Option<&'a Device>,
    /// The newest `op_date` applied to it.
    pub last_op_date: Option<&'a str>,
    /// It left the server (a deleted row is kept).
    pub deleted: bool,
}

/// What one incoming record does to the mirror.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// New to the mirror (`revived`: it had left and is back): insert, `added` event.
    Added {
        /// The row exists, marked deleted: bring it back.
        revived: bool,
    },
    /// Fields changed: update, `modified` event with these changes.
    Modified(Map<String, Value>),
    /// Apple says it left and the mirror had it: mark deleted, `deleted` event.
    Deleted,
    /// Present and identical: no write but a newer `op_date`; still counts as seen.
    Unchanged,
    /// A deletion of a device the mirror never had or already marked deleted: nothing.
    AlreadyGone,
    /// Older than what the mirror already applied (Apple may repeat a device across
    /// pages, docs/apple-dep-api.md §4.4): ignored, the newest wins.
    Stale,
}

impl Decision {
    /// The event this decision records, if any.
    pub fn event_kind(&self) -> Option<EventKind> {
        match self {
            Decision::Added { .. } => Some(EventKind::Added),
            Decision::Modified(_) => Some(EventKind::Modified),
            Decision::Deleted => Some(EventKind::Deleted),
            Decision::Unchanged | Decision::AlreadyGone | Decision::Stale => None,
        }
    }
}

/// The one rule for what a record does: stale records lose to what is stored; Apple's
/// `deleted` removes a device the mirror holds; anything else adds a device the mirror
/// does not hold (or holds as deleted), or modifies it when a field differs. Comparing
/// with the stored row — not trusting `op_type` alone — is what lets a full re-fetch
/// emit no duplicates.
pub fn decide(known: Option<Known<'_>>, record: &DeviceRecord) -> Decision {
    if let Some(k) = known {
        if is_older(record.op_date.as_deref(), k.last_op_date) {
            return Decision::Stale;
        }
    }
    if record.op_type == Some(OpType::Deleted) {
        return match known {
            Some(k) if !k.deleted => Decision::Deleted,
            _ => Decision::AlreadyGone,
        };
    }
    match known {
        None => Decision::Added { revived: false },
        Some(k) if k.deleted => Decision::Added { revived: true },
        Some(k) => {
            let changes = k
                .device
                .map(|d| diff(d, &record.device))
                .unwrap_or_default();
            if changes.is_empty() {
                Decision::Unchanged
            } else {
                Decision::Modified(changes)
            }
        }
    }
}

/// What the mirror knows beyond the record when it decides a reason.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReasonContext {
    /// An organisation API account saw the device released from the organisation.
    pub released_from_org: bool,
    /// A replacement device names this one as its original.
    pub original_of_replacement: bool,
}

/// Why a device event happened ([`Reason`]): the one rule, a table test below. `old` is
/// the stored device (for a deletion, the last stored record), `new` the incoming one.
pub fn reason(
    decision: &Decision,
    old: Option<&Device>,
    new: &Device,
    ctx: ReasonContext,
) -> Reason {
    fn status(d: Option<&Device>) -> Option<&str> {
        d.and_then(|d| d.profile_status.as_deref())
    }
    match decision {
        Decision::Deleted => {
            let by_replacement = new
                .v10("released_by_replacement")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if by_replacement || ctx.original_of_replacement {
                Reason::Replaced
            } else if ctx.released_from_org {
                Reason::Released
            } else {
                Reason::Unassigned
            }
        }
        Decision::Added { revived: true } => Reason::Returned,
        Decision::Added { revived: false } => Reason::Assigned,
        _ => {
            let (before, after) = (status(old), status(Some(new)));
            if before == after {
                return Reason::Updated;
            }
            match (before, after) {
                (Some("removed"), _) => Reason::Returned,
                (_, Some("removed")) => Reason::Unassigned,
                (_, Some("assigned")) => Reason::ProfileAssigned,
                (_, Some("pushed")) => Reason::ProfilePushed,
                (Some("assigned" | "pushed"), Some("empty")) => Reason::ProfileRemoved,
                _ => Reason::Updated,
            }
        }
    }
}

/// The reason of an event stored before reasons were (derived from what it holds).
pub fn derived_reason(kind: EventKind, changes: &Value) -> Reason {
    match kind {
        EventKind::Added => Reason::Assigned,
        EventKind::Deleted => Reason::Unassigned,
        EventKind::Modified => {
            let status = &changes["profile_status"];
            let (before, after) = (status[0].as_str(), status[1].as_str());
            match (before, after) {
                (Some("removed"), _) if after.is_some() => Reason::Returned,
                (_, Some("removed")) => Reason::Unassigned,
                (_, Some("assigned")) => Reason::ProfileAssigned,
                (_, Some("pushed")) => Reason::ProfilePushed,
                (Some("assigned" | "pushed"), Some("empty")) => Reason::ProfileRemoved,
                _ => Reason::Updated,
            }
        }
    }
}

/// Version of the event JSON; bumped on any incompatible change.
pub const EVENT_FORMAT_VERSION: u32 = 1;

/// Fields that differ between a stored device and an incoming one: `{"field": [old, new]}`.
///
/// Covers the named fields and any extra field Apple sends. Empty when identical.
pub fn diff(old: &Device, new: &Device) -> Map<String, Value> {
    let mut out = Map::new();
    for ((name, a), b) in DEVICE_FIELDS.iter().zip(old.fields()).zip(new.fields()) {
        if a != b {
            out.insert((*name).to_owned(), json!([a, b]));
        }
    }
    for (k, a) in &old.extra {
        match new.extra.get(k) {
            Some(b) if b == a => {}
            b => {
                out.insert(k.clone(), json!([a, b.unwrap_or(&Value::Null)]));
            }
        }
    }
    for (k, b) in &new.extra {
        if !old.extra.contains_key(k) {
            out.insert(k.clone(), json!([Value::Null, b]));
        }
    }
    out
}

/// Changes for an `added` event: every present field as `[null, value]`.
pub fn addition_changes(d: &Device) -> Value {
    diff(&Device::default(), d).into()
}

/// Changes for a `deleted` event: every present field as `[value, null]`.
pub fn removal_changes(d: &Device) -> Value {
    diff(d, &Device::default()).into()
}

/// The event as one JSON object (format version [`EVENT_FORMAT_VERSION`]): `version`,
/// `id`, `type` (`device.added|modified|deleted`), `token`, `serial_number`,
/// `occurred_at`, `changes` (`{"field": [old, new]}`) and `device` (the record as stored
/// right after the change, Apple's field names).
pub fn event_json(e: &StoredEvent) -> Value {
    if e.scope == EventScope::Profile {
        return json!({
            "version": EVENT_FORMAT_VERSION,
            "id": e.id,
            "type": e.scope.event_type(e.kind),
            "token": e.token_name,
            "serial_number": e.serial_number,
            "occurred_at": e.occurred_at,
            "changes": {},
            "device": e.assignment.clone().unwrap_or(Value::Null),
        });
    }
    if e.scope == EventScope::OrgDevice {
        return json!({
            "version": EVENT_FORMAT_VERSION,
            "id": e.id,
            "type": e.scope.event_type(e.kind),
            "account": e.token_name,
            "serial_number": e.serial_number,
            "occurred_at": e.occurred_at,
            "changes": e.changes,
            "device": e.org_device.as_ref().map(OrgDevice::to_json).unwrap_or(Value::Null),
        });
    }
    let mut device = e
        .device
        .as_ref()
        .map(Device::to_json)
        .unwrap_or(Value::Null);
    if let Value::Object(m) = &mut device {
        m.insert(
            "serial_number".into(),
            Value::String(e.serial_number.clone()),
        );
    }
    json!({
        "version": EVENT_FORMAT_VERSION,
        "id": e.id,
        "type": e.scope.event_type(e.kind),
        "reason": e.reason.unwrap_or_else(|| derived_reason(e.kind, &e.changes)).as_str(),
        "token": e.token_name,
        "serial_number": e.serial_number,
        "occurred_at": e.occurred_at,
        "changes": e.changes,
        "device": device,
    })
}

/// `type` of the event `adesync sinks test` sends: never stored, always id 0.
pub const TEST_EVENT_TYPE: &str = "sink.test";

/// A test event for checking a receiver end to end: the shape of a real event, with
/// id 0, type [`TEST_EVENT_TYPE`] and a made-up device, so receivers can tell it apart.
pub fn test_event(token: &str, now: &str) -> Value {
    json!({
        "version": EVENT_FORMAT_VERSION,
        "id": 0,
        "type": TEST_EVENT_TYPE,
        "token": token,
        "serial_number": "ADESYNC-TEST",
        "occurred_at": now,
        "changes": {},
        "device": {"serial_number": "ADESYNC-TEST"},
    })
}

/// The CloudEvents specification version of [`cloudevent`]'s envelope.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";
/// Prefix of a CloudEvent's `type`: the event's own `type` follows it
/// (`com.github.adesync.device.added`).
pub const CLOUDEVENTS_TYPE_PREFIX: &str = "com.github.adesync.";
/// Digits of a CloudEvent's `sequence`: the event id, zero-padded so that comparing two
/// as strings orders them as numbers (the extension's rule).
const SEQUENCE_DIGITS: usize = 20;

/// An event object ([`event_json`] or [`test_event`]) as a CloudEvents 1.0 event in
/// structured-mode JSON:
///
/// - `specversion` `"1.0"`; `id` the event id as a string (for the test event
///   `sink-test-<occurred_at>`, so each test is a new event);
/// - `source` `urn:adesync:<instance>:token:<token>`, or `…:org_account:<account>` for an
///   organisation device event, so `source` + `id` is unique;
/// - `type` [`CLOUDEVENTS_TYPE_PREFIX`] + the event's `type`; `subject` the serial number;
///   `time` `occurred_at`; `datacontenttype` `application/json`; `data` the event object;
/// - the `sequence` extension: the id zero-padded to 20 digits (absent on the test event,
///   which is outside the sequence).
pub fn cloudevent(event: Value, instance: &str) -> Value {
    let id = event["id"].as_i64().unwrap_or(0);
    let text = |k: &str| event[k].as_str().unwrap_or_default().to_owned();
    let occurred_at = text("occurred_at");
    let source = match (event["account"].as_str(), event["token"].as_str()) {
        (Some(account), _) => format!("urn:adesync:{instance}:org_account:{account}"),
        (None, Some(token)) if !token.is_empty() => {
            format!("urn:adesync:{instance}:token:{token}")
        }
        _ => format!("urn:adesync:{instance}"),
    };
    let mut ce = Map::new();
    ce.insert("specversion".into(), CLOUDEVENTS_SPEC_VERSION.into());
    ce.insert(
        "id".into(),
        if id > 0 {
            id.to_string()
        } else {
            format!("sink-test-{occurred_at}")
        }
        .into(),
    );
    ce.insert("source".into(), source.into());
    ce.insert(
        "type".into(),
        format!("{CLOUDEVENTS_TYPE_PREFIX}{}", text("type")).into(),
    );
    ce.insert("subject".into(), text("serial_number").into());
    ce.insert("time".into(), occurred_at.into());
    ce.insert("datacontenttype".into(), "application/json".into());
    if id > 0 {
        ce.insert(
            "sequence".into(),
            format!("{id:0width$}", width = SEQUENCE_DIGITS).into(),
        );
    }
    ce.insert("data".into(), event);
    Value::Object(ce)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(color: Option<&str>, tag: Option<&str>) -> Device {
        Device {
            serial_number: "S".into(),
            model: Some("iPhone 15".into()),
            color: color.map(str::to_owned),
            asset_tag: tag.map(str::to_owned),
            ..Device::default()
        }
    }

    #[test]
    fn each_reason_has_its_rule_and_the_first_that_applies_wins() {
        let with = |status: Option<&str>, extra: &[(&str, Value)]| {
            let mut d = dev(Some("BLACK"), None);
            d.profile_status = status.map(str::to_owned);
            for (k, v) in extra {
                d.extra.insert((*k).into(), v.clone());
            }
            d
        };
        let none = ReasonContext::default();
        let released = ReasonContext {
            released_from_org: true,
            ..none
        };
        let original = ReasonContext {
            original_of_replacement: true,
            ..none
        };
        let modified = Decision::Modified(Map::new());
        let by_replacement = with(None, &[("released_by_replacement", json!(true))]);
        let plain = with(Some("assigned"), &[]);
        let cases: Vec<(&Decision, Option<Device>, Device, ReasonContext, Reason)> = vec![
            (
                &Decision::Deleted,
                Some(plain.clone()),
                by_replacement.clone(),
                none,
                Reason::Replaced,
            ),
            // released_by_replacement outranks a release the organisation saw.
            (
                &Decision::Deleted,
                Some(plain.clone()),
                by_replacement,
                released,
                Reason::Replaced,
            ),
            (
                &Decision::Deleted,
                Some(plain.clone()),
                plain.clone(),
                original,
                Reason::Replaced,
            ),
            (
                &Decision::Deleted,
                Some(plain.clone()),
                plain.clone(),
                released,
                Reason::Released,
            ),
            (
                &Decision::Deleted,
                Some(plain.clone()),
                plain.clone(),
                none,
                Reason::Unassigned,
            ),
            (
                &Decision::Added { revived: true },
                None,
                plain.clone(),
                none,
                Reason::Returned,
            ),
            (
                &Decision::Added { revived: false },
                None,
                plain.clone(),
                none,
                Reason::Assigned,
            ),
            (
                &modified,
                Some(with(Some("removed"), &[])),
                with(Some("empty"), &[]),
                none,
                Reason::Returned,
            ),
            (
                &modified,
                Some(plain.clone()),
                with(Some("removed"), &[]),
                none,
                Reason::Unassigned,
            ),
            (
                &modified,
                Some(with(Some("empty"), &[])),
                plain.clone(),
                none,
                Reason::ProfileAssigned,
            ),
            (
                &modified,
                Some(plain.clone()),
                with(Some("pushed"), &[]),
                none,
                Reason::ProfilePushed,
            ),
            (
                &modified,
                Some(with(Some("pushed"), &[])),
                with(Some("empty"), &[]),
                none,
                Reason::ProfileRemoved,
            ),
            (
                &modified,
                Some(plain.clone()),
                plain.clone(),
                none,
                Reason::Updated,
            ),
        ];
        for (decision, old, new, ctx, want) in cases {
            assert_eq!(
                reason(decision, old.as_ref(), &new, ctx),
                want,
                "{decision:?} {old:?} -> {new:?}"
            );
        }
        // Events stored before reasons existed get the same answer from their changes.
        assert_eq!(
            derived_reason(
                EventKind::Modified,
                &json!({"profile_status": ["removed", "empty"]})
            ),
            Reason::Returned
        );
        assert_eq!(
            derived_reason(
                EventKind::Modified,
                &json!({"profile_status": ["pushed", "empty"]})
            ),
            Reason::ProfileRemoved
        );
        assert_eq!(
            derived_reason(EventKind::Modified, &json!({"color": ["A", "B"]})),
            Reason::Updated
        );
        assert_eq!(
            derived_reason(EventKind::Deleted, &json!({})),
            Reason::Unassigned
        );
    }

    #[test]
    fn identical_devices_have_no_diff() {
        assert!(diff(&dev(Some("BLACK"), None), &dev(Some("BLACK"), None)).is_empty());
    }

    #[test]
    fn diff_names_exactly_the_changed_fields() {
        let d = diff(&dev(Some("BLACK"), None), &dev(Some("BLUE"), Some("A-1")));
        assert_eq!(
            Value::Object(d),
            json!({"color": ["BLACK", "BLUE"], "asset_tag": [null, "A-1"]})
        );
        let d = diff(&dev(Some("BLACK"), Some("A-1")), &dev(Some("BLACK"), None));
        assert_eq!(Value::Object(d), json!({"asset_tag": ["A-1", null]}));
    }

    #[test]
    fn additions_and_removals_list_present_fields() {
        let a = addition_changes(&dev(Some("BLACK"), None));
        assert_eq!(
            a,
            json!({"model": [null, "iPhone 15"], "color": [null, "BLACK"]})
        );
        let r = removal_changes(&dev(Some("BLACK"), None));
        assert_eq!(
            r,
            json!({"model": ["iPhone 15", null], "color": ["BLACK", null]})
        );
    }

    #[test]
    fn each_stored_row_and_record_pair_decides_one_thing() {
        let black = dev(Some("BLACK"), None);
        let blue = dev(Some("BLUE"), None);
        let rec = |d: &Device, op: Option<OpType>, date: Option<&str>| DeviceRecord {
            op_type: op,
            op_date: date.map(str::to_owned),
            device: d.clone(),
        };
        let known = |d: Option<&'static Device>, date: Option<&'static str>, deleted| Known {
            device: d,
            last_op_date: date,
            deleted,
        };
        static BLACK: std::sync::LazyLock<Device> =
            std::sync::LazyLock::new(|| dev(Some("BLACK"), None));
        let (added, modified, deleted) = (
            Some(OpType::Added),
            Some(OpType::Modified),
            Some(OpType::Deleted),
        );
        let t1 = Some("2026-01-01T00:00:00Z");
        let t2 = Some("2026-01-02T00:00:00Z");
        let live = |d| Some(known(d, t1, false));
        let gone = Some(known(Some(&*BLACK), t1, true));
        let color = {
            let mut m = Map::new();
            m.insert("color".into(), json!(["BLACK", "BLUE"]));
            m
        };
        let table: Vec<(&str, Option<Known<'_>>, DeviceRecord, Decision)> = vec![
            (
                "new device, fetch record",
                None,
                rec(&black, None, None),
                Decision::Added { revived: false },
            ),
            (
                "new device, sync added",
                None,
                rec(&black, added, t1),
                Decision::Added { revived: false },
            ),
            (
                "new device arriving as modified",
                None,
                rec(&black, modified, t1),
                Decision::Added { revived: false },
            ),
            (
                "back after leaving",
                gone,
                rec(&black, added, t2),
                Decision::Added { revived: true },
            ),
            (
                "same fields (compared in place)",
                live(None),
                rec(&black, None, None),
                Decision::Unchanged,
            ),
            (
                "same fields (decoded)",
                live(Some(&*BLACK)),
                rec(&black, modified, t2),
                Decision::Unchanged,
            ),
            (
                "Apple says added, nothing differs",
                live(Some(&*BLACK)),
                rec(&black, added, t2),
                Decision::Unchanged,
            ),
            (
                "a field changed",
                live(Some(&*BLACK)),
                rec(&blue, modified, t2),
                Decision::Modified(color.clone()),
            ),
            (
                "a field changed in a re-fetch",
                live(Some(&*BLACK)),
                rec(&blue, None, None),
                Decision::Modified(color),
            ),
            (
                "deleted while held",
                live(Some(&*BLACK)),
                rec(&black, deleted, t2),
                Decision::Deleted,
            ),
            (
                "deleted twice",
                gone,
                rec(&black, deleted, t2),
                Decision::AlreadyGone,
            ),
            (
                "deleted, never held",
                None,
                rec(&black, deleted, t2),
                Decision::AlreadyGone,
            ),
            (
                "older than applied",
                Some(known(Some(&*BLACK), t2, false)),
                rec(&blue, modified, t1),
                Decision::Stale,
            ),
            (
                "older deletion than applied",
                Some(known(Some(&*BLACK), t2, false)),
                rec(&black, deleted, t1),
                Decision::Stale,
            ),
        ];
        for (case, k, r, want) in table {
            assert_eq!(decide(k, &r), want, "{case}");
        }
        assert_eq!(Decision::Deleted.event_kind(), Some(EventKind::Deleted));
        assert_eq!(Decision::Stale.event_kind(), None);
    }

    #[test]
    fn cloudevents_wrap_the_event_with_its_source_type_and_sequence() {
        let event = json!({"version": 1, "id": 42, "type": "device.added", "token": "acme",
            "serial_number": "C02X", "occurred_at": "2026-01-01T00:00:00.000Z",
            "changes": {}, "device": {}});
        let ce = cloudevent(event.clone(), "mdm-1");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "42");
        assert_eq!(ce["source"], "urn:adesync:mdm-1:token:acme");
        assert_eq!(ce["type"], "com.github.adesync.device.added");
        assert_eq!(ce["subject"], "C02X");
        assert_eq!(ce["time"], "2026-01-01T00:00:00.000Z");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["sequence"], "00000000000000000042");
        assert_eq!(ce["data"], event);
        // Sequences compare as strings the way ids compare as numbers.
        let seq = |id: i64| {
            let mut e = event.clone();
            e["id"] = id.into();
            cloudevent(e, "h")["sequence"].as_str().unwrap().to_owned()
        };
        assert!(seq(9) < seq(10) && seq(99_999) < seq(100_000));

        let mut org = event.clone();
        org.as_object_mut().unwrap().remove("token");
        org["account"] = "acme-org".into();
        org["type"] = "org_device.removed".into();
        let ce = cloudevent(org, "mdm-1");
        assert_eq!(ce["source"], "urn:adesync:mdm-1:org_account:acme-org");
        assert_eq!(ce["type"], "com.github.adesync.org_device.removed");

        let ce = cloudevent(test_event("acme", "2026-01-01T00:00:00.000Z"), "mdm-1");
        assert_eq!(ce["id"], "sink-test-2026-01-01T00:00:00.000Z");
        assert_eq!(ce["type"], "com.github.adesync.sink.test");
        assert!(ce.get("sequence").is_none());
    }
}
