//! The columns of a `devices` row that mirror Apple's fields: their order, how a device
//! is written into them and read back, and the digest that recognises an unchanged row.
//! Shared by the page writer (`devices.rs`) and the event reader (`events.rs`).

use serde_json::{Map, Value};

use crate::model::{Device, FieldShape, V10_FIELDS};

pub(super) const DEVICE_COLUMNS: &str =
    "serial_number, model, description, color, asset_tag, profile_status, \
    profile_uuid, profile_assign_time, profile_push_time, device_assigned_date, \
    device_assigned_by, os, device_family, extra_json, imei, meid, eid, wifi_mac_address, \
    bluetooth_mac_address, ethernet_mac_address, is_replacement_device, \
    mdm_migration_deadline, released_by_replacement";

/// Columns of [`DEVICE_COLUMNS`]: serial, the named fields, extra_json, protocol 10.
pub(super) const DEVICE_COLUMN_COUNT: usize = 14 + V10_FIELDS.len();

/// A device's protocol-10 values in [`V10_FIELDS`] order (None when absent or null), and
/// whether `extra` holds anything else: one pass over `extra` for everything a row is made
/// of, instead of a map lookup per field in each of the functions below.
pub(super) struct V10Values<'a> {
    values: [Option<&'a Value>; V10_FIELDS.len()],
    others: bool,
}

impl<'a> V10Values<'a> {
    pub(super) fn of(d: &'a Device) -> Self {
        let mut values = [None; V10_FIELDS.len()];
        let mut others = false;
        for (k, v) in &d.extra {
            match v10_index(k) {
                Some(i) => values[i] = Some(v).filter(|v| !v.is_null()),
                None => others = true,
            }
        }
        V10Values { values, others }
    }

    fn iter(&self) -> impl Iterator<Item = (FieldShape, Option<&'a Value>)> + '_ {
        V10_FIELDS
            .iter()
            .zip(self.values)
            .map(|((_, shape), v)| (*shape, v))
    }
}

/// The position of a protocol-10 field in [`V10_FIELDS`] (a test keeps the two in step).
fn v10_index(name: &str) -> Option<usize> {
    Some(match name {
        "imei" => 0,
        "meid" => 1,
        "eid" => 2,
        "wifi_mac_address" => 3,
        "bluetooth_mac_address" => 4,
        "ethernet_mac_address" => 5,
        "is_replacement_device" => 6,
        "mdm_migration_deadline" => 7,
        "released_by_replacement" => 8,
        _ => return None,
    })
}

/// The protocol-10 fields of a device as their columns store them (in [`V10_FIELDS`]
/// order): lists as JSON text, booleans 0/1, text as text; NULL when Apple sent none.
pub(super) fn v10_sql(d: &Device) -> Vec<rusqlite::types::Value> {
    v10_sql_of(&V10Values::of(d))
}

/// [`v10_sql`] from values already picked out.
pub(super) fn v10_sql_of(v: &V10Values<'_>) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as S;
    v.iter()
        .map(|(shape, value)| match (shape, value) {
            (_, None) => S::Null,
            (_, Some(Value::String(t))) => S::Text(t.clone()),
            (FieldShape::Bool, Some(Value::Bool(b))) => S::Integer(*b as i64),
            (_, Some(Value::Number(n))) if n.is_i64() => S::Integer(n.as_i64().unwrap_or(0)),
            (_, Some(other)) => S::Text(other.to_string()),
        })
        .collect()
}

/// The protocol-10 columns read back into `extra` (see [`v10_sql`]).
fn v10_from_row(
    r: &rusqlite::Row<'_>,
    start: usize,
    extra: &mut Map<String, Value>,
) -> rusqlite::Result<()> {
    use rusqlite::types::ValueRef;
    for (i, (name, shape)) in V10_FIELDS.iter().enumerate() {
        let v = match (shape, r.get_ref(start + i)?) {
            (_, ValueRef::Null) => continue,
            (FieldShape::Bool, ValueRef::Integer(n)) => Value::Bool(n != 0),
            (_, ValueRef::Integer(n)) => Value::from(n),
            (FieldShape::List, ValueRef::Text(t)) if t.first() == Some(&b'[') => {
                serde_json::from_slice(t)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(t).into_owned()))
            }
            (_, ValueRef::Text(t)) => Value::String(String::from_utf8_lossy(t).into_owned()),
            (_, ValueRef::Real(f)) => Value::from(f),
            (_, ValueRef::Blob(_)) => continue,
        };
        extra.insert((*name).to_owned(), v);
    }
    Ok(())
}

/// `DEVICE_COLUMNS` prefixed with a table alias, for joins.
pub(super) fn qualified_device_columns(alias: &str) -> String {
    DEVICE_COLUMNS
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A digest of the device's Apple fields as stored (`devices.content_hash`): equal
/// digests, equal rows. XXH3 (a published, fixed algorithm) over each column with its
/// length, so the digest of a stored row never changes between versions.
pub(super) fn content_hash(d: &Device, extra: Option<&str>) -> i64 {
    content_hash_of(d, extra, &V10Values::of(d))
}

/// [`content_hash`] with the protocol-10 values already picked out.
pub(super) fn content_hash_of(d: &Device, extra: Option<&str>, v10: &V10Values<'_>) -> i64 {
    fn text(buf: &mut Vec<u8>, t: Option<&str>) {
        match t {
            None => buf.push(0),
            Some(t) => {
                buf.push(1);
                buf.extend_from_slice(&(t.len() as u64).to_le_bytes());
                buf.extend_from_slice(t.as_bytes());
            }
        }
    }
    // The columns laid out in one buffer, hashed at once (cheaper than a streaming
    // update per column; the bytes, and so the digest, are the same either way).
    let mut buf = Vec::with_capacity(512);
    for f in d.fields() {
        text(&mut buf, f.as_deref());
    }
    text(&mut buf, extra);
    for (shape, value) in v10.iter() {
        match (shape, value) {
            (_, None) => buf.push(0),
            (_, Some(Value::String(t))) => text(&mut buf, Some(t)),
            (FieldShape::Bool, Some(Value::Bool(b))) => buf.extend_from_slice(&[2, *b as u8]),
            (_, Some(Value::Number(n))) if n.is_i64() => {
                buf.push(3);
                buf.extend_from_slice(&n.as_i64().unwrap_or(0).to_le_bytes());
            }
            // A list or another shape: its compact JSON, as `to_string` writes it, written
            // in place (no String per value) with its length put in front afterwards.
            (_, Some(other)) => {
                buf.push(1);
                let at = buf.len();
                buf.extend_from_slice(&[0; 8]);
                serde_json::to_writer(&mut buf, other).expect("a JSON value always serialises");
                let len = (buf.len() - at - 8) as u64;
                buf[at..at + 8].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
    xxhash_rust::xxh3::xxh3_64(&buf) as i64
}

pub(super) fn device_from_row(r: &rusqlite::Row<'_>, start: usize) -> rusqlite::Result<Device> {
    let mut d = Device {
        serial_number: r.get(start)?,
        ..Device::default()
    };
    for (i, f) in d.fields_mut().into_iter().enumerate() {
        *f = r.get(start + 1 + i)?;
    }
    let extra: Option<String> = r.get(start + 13)?;
    if let Some(text) = extra {
        if let Ok(Value::Object(m)) = serde_json::from_str(&text) {
            d.extra = m;
        }
    }
    v10_from_row(r, start + 14, &mut d.extra)?;
    Ok(d)
}

/// `extra_json` for a device: its extra fields beyond the protocol-10 columns as a JSON
/// object, None when it has none.
pub(super) fn extra_json(d: &Device) -> Option<String> {
    extra_json_of(d, &V10Values::of(d))
}

/// [`extra_json`] with the protocol-10 values already picked out.
pub(super) fn extra_json_of(d: &Device, v10: &V10Values<'_>) -> Option<String> {
    if !v10.others {
        return None;
    }
    let is_v10 = |k: &str| v10_index(k).is_some();
    // Written as serde_json writes a map (keys in order), without copying the map.
    let mut out = String::new();
    for (k, v) in d.extra.iter().filter(|(k, _)| !is_v10(k)) {
        out.push(if out.is_empty() { '{' } else { ',' });
        out.push_str(&serde_json::to_string(k).expect("strings always serialise"));
        out.push(':');
        out.push_str(&v.to_string());
    }
    if out.is_empty() {
        return None;
    }
    out.push('}');
    Some(out)
}

/// Whether the row written for a device (given its protocol-10 values) reads back as the
/// device itself ([`v10_sql`] then [`device_from_row`]): the protocol-10 values in the
/// shapes Apple documents — lists as lists (or a string that is not itself a JSON list),
/// text as text, booleans as booleans. Anything else may not: the columns' affinity turns
/// a number into text, or text such as "1" into a number. Only then may an event's snapshot
/// be the row (see `PageEvents::push_deferred`).
pub(super) fn reads_back_exactly(v10: &V10Values<'_>) -> bool {
    v10.iter().all(|(shape, value)| match (shape, value) {
        (_, None) => true,
        (FieldShape::List, Some(Value::Array(_))) => true,
        (FieldShape::List, Some(Value::String(t))) => {
            !(t.starts_with('[') && serde_json::from_str::<Value>(t).is_ok())
        }
        (FieldShape::Text, Some(Value::String(_))) => true,
        (FieldShape::Bool, Some(Value::Bool(_))) => true,
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_10_field_is_found_at_its_place() {
        for (i, (name, _)) in V10_FIELDS.iter().enumerate() {
            assert_eq!(v10_index(name), Some(i), "{name}");
        }
        assert_eq!(v10_index("serial_number"), None);
        assert_eq!(v10_index("IMEI"), None);
    }

    /// The digest of a device with every kind of protocol-10 value. Stored digests are
    /// compared with new ones on every re-fetch, so the bytes it is made of must never
    /// change: a change would make every stored device look modified.
    #[test]
    fn the_content_digest_is_stable() {
        let mut d = Device {
            serial_number: "C02XL0GZJGH5".into(),
            model: Some("MacBook Pro".into()),
            color: Some("SPACE GRAY".into()),
            profile_status: Some("assigned".into()),
            ..Device::default()
        };
        let extra = serde_json::json!({
            "imei": ["358827312806247", "358827312806248"], "meid": ["35882731280624"],
            "eid": "89049032239957267180587455049202",
            "wifi_mac_address": ["BC:D0:74:B5:33:3A"], "bluetooth_mac_address": "BC:D0:74:B5:33:3B",
            "is_replacement_device": false, "mdm_migration_deadline": 42,
            "released_by_replacement": {"odd": [1, "two"]}, "future_field": "x"
        });
        if let Value::Object(m) = extra {
            d.extra = m;
        }
        let extra = extra_json(&d);
        assert_eq!(content_hash(&d, extra.as_deref()), 8902975220534423927);
    }
}
