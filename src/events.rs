//! Change events: the pure diff that decides them, their JSON form, and the `jsonl`
//! sink that writes them out.
//!
//! Events are born in the store's page transaction (see `store.rs`); delivery to a sink
//! is a separate step with its own cursor per sink (`sink_cursors`), so a crash between
//! commit and delivery delays an event but never loses it (at least once, in id order).

use std::io::Write;

use serde_json::{json, Map, Value};

use crate::config::{JsonlTarget, SinkConfig};
use crate::model::{Device, DEVICE_FIELDS};
use crate::store::{Store, StoreError, StoredEvent};

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

/// The event as one JSON object (format version [`EVENT_FORMAT_VERSION`]).
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

/// A sink failure.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Reading events or moving the cursor failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing failed.
    #[error("sink \"{sink}\": cannot write to {target}: {source}")]
    Write {
        /// Sink name.
        sink: String,
        /// Where it writes.
        target: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes every event the sink has not yet received, in id order, then moves its cursor.
///
/// The cursor moves only after the lines are written and flushed, so a crash repeats
/// at most the last batch (receivers de-duplicate by `id`). A new sink starts at the
/// first stored event. Returns how many were written.
pub fn deliver_jsonl(store: &mut Store, sink: &SinkConfig) -> Result<u64, SinkError> {
    const BATCH: u64 = 1000;
    let key = format!("jsonl:{}", sink.name);
    let mut cursor = store.sink_cursor(&key)?;
    let mut written = 0;
    let target_name = match &sink.target {
        JsonlTarget::Stdout => "standard output".to_owned(),
        JsonlTarget::File(p) => p.display().to_string(),
    };
    let werr = |source| SinkError::Write {
        sink: sink.name.clone(),
        target: target_name.clone(),
        source,
    };
    let mut out: Box<dyn Write> = match &sink.target {
        JsonlTarget::Stdout => Box::new(std::io::stdout().lock()),
        JsonlTarget::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(werr)?,
        ),
    };
    loop {
        let batch = store.events_after(cursor, None, BATCH)?;
        let Some(last) = batch.last().map(|e| e.id) else {
            break;
        };
        let mut buf = Vec::with_capacity(batch.len() * 512);
        for e in &batch {
            serde_json::to_writer(&mut buf, &event_json(e)).map_err(|e| werr(e.into()))?;
            buf.push(b'\n');
        }
        out.write_all(&buf)
            .and_then(|_| out.flush())
            .map_err(werr)?;
        store.set_sink_cursor(&key, last)?;
        cursor = last;
        written += batch.len() as u64;
    }
    Ok(written)
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
