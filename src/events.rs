//! Change events: the pure diff that decides them and their JSON form (format version
//! [`EVENT_FORMAT_VERSION`], described by `schema/event.schema.json`).
//!
//! Events are born in the store's page transaction (see `store.rs`) together with a
//! snapshot of the device, so an event's JSON is the same whenever it is read: delivered
//! late, replayed or listed. Delivery to sinks lives in `sinks/`.

use serde_json::{json, Map, Value};

use crate::model::{Device, DEVICE_FIELDS};
use crate::store::StoredEvent;

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
        "type": format!("device.{}", e.kind),
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
}
