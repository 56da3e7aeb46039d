//! The organisation API's resources turned into rows: an `orgDevices` resource into an
//! [`OrgDevice`] (a value per column, normalised so a difference of shape alone is no
//! change), servers and AppleCare coverage likewise (docs/apple-business-api.md §4, §5).

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// How a column's value is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Apple's value as sent (a string, usually).
    Scalar,
    /// A list: a plain string where a list is documented becomes a one-element list.
    /// The MAC addresses are lists too: Apple documents them as strings but changed their
    /// type in version 1.5 (docs/apple-business-api.md §4), so either shape is read.
    List,
    /// A boolean (SQLite: 0/1).
    Bool,
}

/// The `org_devices` columns for Apple's attributes: (column, Apple's attribute, shape).
/// Append only: the order is the stored snapshot's.
pub const ORG_COLUMNS: [(&str, &str, Shape); 23] = [
    (
        "added_to_org_date_time",
        "addedToOrgDateTime",
        Shape::Scalar,
    ),
    (
        "released_from_org_date_time",
        "releasedFromOrgDateTime",
        Shape::Scalar,
    ),
    ("updated_date_time", "updatedDateTime", Shape::Scalar),
    ("device_model", "deviceModel", Shape::Scalar),
    ("product_family", "productFamily", Shape::Scalar),
    ("product_type", "productType", Shape::Scalar),
    ("device_capacity", "deviceCapacity", Shape::Scalar),
    ("part_number", "partNumber", Shape::Scalar),
    ("order_number", "orderNumber", Shape::Scalar),
    ("order_date_time", "orderDateTime", Shape::Scalar),
    ("color", "color", Shape::Scalar),
    ("status", "status", Shape::Scalar),
    ("imei", "imei", Shape::List),
    ("meid", "meid", Shape::List),
    ("eid", "eid", Shape::Scalar),
    ("wifi_mac_address", "wifiMacAddress", Shape::List),
    ("bluetooth_mac_address", "bluetoothMacAddress", Shape::List),
    ("ethernet_mac_address", "ethernetMacAddress", Shape::List),
    ("purchase_source_type", "purchaseSourceType", Shape::Scalar),
    ("purchase_source_id", "purchaseSourceId", Shape::Scalar),
    (
        "is_mdm_migration_capable",
        "isMdmMigrationCapable",
        Shape::Bool,
    ),
    ("mdm_migration_status", "mdmMigrationStatus", Shape::Scalar),
    (
        "mdm_migration_deadline_date_time",
        "mdmMigrationDeadlineDateTime",
        Shape::Scalar,
    ),
];

/// A usable serial number: 1-64 printable ASCII characters. A resource whose id is not one
/// is decoded for its `serialNumber`, or refused.
pub fn is_serial(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Index of `purchase_source_id` in [`ORG_COLUMNS`]; `purchaseSourceUid` fills it too.
const PURCHASE_SOURCE_ID: usize = 19;

/// One organisation device as the mirror keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct OrgDevice {
    /// The serial number (the resource's id).
    pub serial_number: String,
    /// One value per [`ORG_COLUMNS`] entry, normalised; `Null` when omitted or null.
    pub values: Vec<Value>,
    /// Attributes beyond the named columns, as sent.
    pub extra: Map<String, Value>,
    /// The MDM server holding it (from the servers' device lists), `None`: unassigned.
    pub server_id: Option<String>,
    /// That server's name.
    pub server_name: Option<String>,
}

impl OrgDevice {
    /// The value of `column`, if it is one.
    pub fn get(&self, column: &str) -> Option<&Value> {
        ORG_COLUMNS
            .iter()
            .position(|c| c.0 == column)
            .map(|i| &self.values[i])
    }

    /// The columns (Apple's and the server's) as a JSON object with snake_case names, as
    /// the `device` of an event; unknown attributes under `extra` when there are any.
    pub fn to_json(&self) -> Value {
        let mut m = Map::with_capacity(ORG_COLUMNS.len() + 4);
        m.insert(
            "serial_number".into(),
            Value::String(self.serial_number.clone()),
        );
        for ((col, _, _), v) in ORG_COLUMNS.iter().zip(&self.values) {
            m.insert((*col).into(), v.clone());
        }
        m.insert("assigned_server_id".into(), opt(&self.server_id));
        m.insert("assigned_server_name".into(), opt(&self.server_name));
        if !self.extra.is_empty() {
            m.insert("extra".into(), Value::Object(self.extra.clone()));
        }
        Value::Object(m)
    }

    /// [`Self::to_json`] read back (an event's stored snapshot).
    pub fn from_json(v: &Value) -> Option<OrgDevice> {
        let m = v.as_object()?;
        let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(OrgDevice {
            serial_number: text("serial_number")?,
            values: ORG_COLUMNS
                .iter()
                .map(|c| m.get(c.0).cloned().unwrap_or(Value::Null))
                .collect(),
            extra: m
                .get("extra")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            server_id: text("assigned_server_id"),
            server_name: text("assigned_server_name"),
        })
    }

    /// `{"column": [old, new]}` for every column (server included) that differs.
    pub fn changes_from(&self, old: &OrgDevice) -> Map<String, Value> {
        let mut changes = Map::new();
        for (i, (col, _, _)) in ORG_COLUMNS.iter().enumerate() {
            if old.values[i] != self.values[i] {
                changes.insert(
                    (*col).into(),
                    Value::Array(vec![old.values[i].clone(), self.values[i].clone()]),
                );
            }
        }
        for (col, a, b) in [
            ("assigned_server_id", &old.server_id, &self.server_id),
            ("assigned_server_name", &old.server_name, &self.server_name),
        ] {
            if a != b {
                changes.insert(col.into(), Value::Array(vec![opt(a), opt(b)]));
            }
        }
        changes
    }

    /// Every set column as `[null, value]` (an addition) or, `removed`, `[value, null]`.
    pub fn all_changes(&self, removed: bool) -> Map<String, Value> {
        let empty = OrgDevice {
            serial_number: self.serial_number.clone(),
            values: vec![Value::Null; ORG_COLUMNS.len()],
            extra: Map::new(),
            server_id: None,
            server_name: None,
        };
        if removed {
            empty.changes_from(self)
        } else {
            self.changes_from(&empty)
        }
    }
}

fn opt(s: &Option<String>) -> Value {
    s.as_ref().map_or(Value::Null, |s| Value::String(s.clone()))
}

/// A JSON:API resource as the list endpoints send it.
#[derive(Debug, Deserialize)]
pub struct Resource {
    /// `orgDevices`, `mdmServers`, `appleCareCoverage`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The resource's id.
    pub id: Option<Value>,
    /// Its attributes.
    #[serde(default)]
    pub attributes: Option<Map<String, Value>>,
}

impl Resource {
    /// The id as text (Apple sends strings; a number is accepted).
    pub fn id_text(&self) -> Option<String> {
        match &self.id {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// An `orgDevices` resource as it came: its id, and its attributes as sent, decoded only
/// when the device is new or changed. A re-walk recognises an unchanged device by a digest
/// of these bytes, without building a single value.
#[derive(Debug, Deserialize)]
pub struct RawResource {
    /// The resource's id (the serial number).
    #[serde(default)]
    pub id: Option<Value>,
    /// The attributes' JSON text.
    #[serde(default)]
    pub attributes: Option<Box<RawValue>>,
}

impl RawResource {
    /// The id as text.
    pub fn id_text(&self) -> Option<String> {
        match &self.id {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }

    /// A digest of the attributes as sent and of the server holding the device: equal
    /// digests, nothing to write.
    pub fn digest(&self, server_id: Option<&str>, server_name: Option<&str>) -> i64 {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(self.attributes.as_ref().map_or("", |a| a.get()).as_bytes());
        for s in [server_id, server_name] {
            h.update([0, s.is_some() as u8]);
            h.update(s.unwrap_or_default().as_bytes());
        }
        let d = h.finalize();
        i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
    }

    /// The device it describes, fully decoded (see [`org_device`]).
    pub fn decode(&self) -> Result<OrgDevice, Refused> {
        let attributes = match &self.attributes {
            None => None,
            Some(a) => Some(
                serde_json::from_str::<Map<String, Value>>(a.get()).map_err(|e| Refused {
                    id: self
                        .id_text()
                        .map(|i| crate::model::printable(&i).into_owned()),
                    reason: format!("the attributes are not an object ({e})"),
                })?,
            ),
        };
        org_device(Resource {
            kind: None,
            id: self.id.clone(),
            attributes,
        })
    }
}

/// Why one resource could not be stored.
#[derive(Debug, PartialEq)]
pub struct Refused {
    /// Its id, escaped, if it had one.
    pub id: Option<String>,
    /// Why.
    pub reason: String,
}

/// An `orgDevices` resource as a row. The serial number is the attribute
/// `serialNumber`, or the resource id when the attribute is missing; one that is neither
/// printable nor of sane length is refused (the rest of the page is kept).
pub fn org_device(r: Resource) -> Result<OrgDevice, Refused> {
    let id = r.id_text();
    let mut attrs = r.attributes.unwrap_or_default();
    let serial = match attrs.remove("serialNumber") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        _ => id.clone().unwrap_or_default(),
    };
    let refuse = |reason: &str| Refused {
        id: id
            .as_deref()
            .map(|i| crate::model::printable(i).into_owned()),
        reason: reason.to_owned(),
    };
    if serial.is_empty() {
        return Err(refuse("no serial number (neither serialNumber nor id)"));
    }
    if !is_serial(&serial) {
        return Err(refuse(
            "the serial number is not 1-64 printable ASCII characters",
        ));
    }
    let mut values = Vec::with_capacity(ORG_COLUMNS.len());
    for (i, (_, attr, shape)) in ORG_COLUMNS.iter().enumerate() {
        let mut v = attrs.remove(*attr);
        if i == PURCHASE_SOURCE_ID {
            // Apple's documentation has used both names.
            let uid = attrs.remove("purchaseSourceUid");
            if v.as_ref().is_none_or(Value::is_null) {
                v = uid;
            }
        }
        values.push(normalise(v.unwrap_or(Value::Null), *shape));
    }
    Ok(OrgDevice {
        serial_number: serial,
        values,
        extra: attrs,
        server_id: None,
        server_name: None,
    })
}

/// A plain string where a list is documented is a one-element list; `""` stays `""` and
/// `[]` stays `[]`; a boolean sent as text is read.
fn normalise(v: Value, shape: Shape) -> Value {
    match (shape, v) {
        (Shape::List, Value::String(s)) if !s.is_empty() => Value::Array(vec![Value::String(s)]),
        (Shape::Bool, Value::String(s)) if s == "true" || s == "false" => Value::Bool(s == "true"),
        (_, v) => v,
    }
}

/// An MDM server as Apple lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct MdmServer {
    /// Apple's id.
    pub id: String,
    /// `serverName`.
    pub server_name: Option<String>,
    /// `serverType`.
    pub server_type: Option<String>,
    /// `createdDateTime`.
    pub created_date_time: Option<String>,
    /// `updatedDateTime`.
    pub updated_date_time: Option<String>,
    /// Other attributes.
    pub extra: Map<String, Value>,
}

/// An `mdmServers` resource; `None` without an id.
pub fn mdm_server(r: Resource) -> Option<MdmServer> {
    let id = r.id_text()?;
    let mut a = r.attributes.unwrap_or_default();
    let mut text = |k: &str| match a.remove(k) {
        Some(Value::String(s)) => Some(s),
        Some(Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    };
    Some(MdmServer {
        id,
        server_name: text("serverName"),
        server_type: text("serverType"),
        created_date_time: text("createdDateTime"),
        updated_date_time: text("updatedDateTime"),
        extra: a,
    })
}

/// The `applecare_coverage` columns: (column, Apple's attribute, shape).
pub const COVERAGE_COLUMNS: [(&str, &str, Shape); 9] = [
    ("status", "status", Shape::Scalar),
    ("payment_type", "paymentType", Shape::Scalar),
    ("description", "description", Shape::Scalar),
    ("start_date_time", "startDateTime", Shape::Scalar),
    ("end_date_time", "endDateTime", Shape::Scalar),
    ("is_renewable", "isRenewable", Shape::Bool),
    ("is_canceled", "isCanceled", Shape::Bool),
    (
        "contract_cancel_date_time",
        "contractCancelDateTime",
        Shape::Scalar,
    ),
    ("agreement_number", "agreementNumber", Shape::Scalar),
];

/// One AppleCare coverage of a device.
#[derive(Clone, Debug, PartialEq)]
pub struct Coverage {
    /// Apple's id of the coverage.
    pub id: String,
    /// One value per [`COVERAGE_COLUMNS`] entry.
    pub values: Vec<Value>,
    /// Other attributes.
    pub extra: Map<String, Value>,
}

/// An `appleCareCoverage` resource. Apple's id when it has one; otherwise one made from
/// the description and start, so a coverage keeps one row across fetches.
pub fn coverage(r: Resource, index: usize) -> Coverage {
    let mut a = r.attributes.clone().unwrap_or_default();
    let values: Vec<Value> = COVERAGE_COLUMNS
        .iter()
        .map(|(_, attr, shape)| normalise(a.remove(*attr).unwrap_or(Value::Null), *shape))
        .collect();
    let id = r.id_text().unwrap_or_else(|| {
        format!(
            "{}:{}:{index}",
            values[2].as_str().unwrap_or_default(),
            values[3].as_str().unwrap_or_default()
        )
    });
    Coverage {
        id,
        values,
        extra: a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn res(v: Value) -> Resource {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn shapes_are_normalised_so_a_change_of_shape_is_no_change() {
        let a = org_device(res(json!({"type":"orgDevices","id":"C1","attributes":{
            "serialNumber":"C1","imei":["35"],"meid":[],"eid":"","purchaseSourceId":"P1",
            "ethernetMacAddress":["aa"],"isMdmMigrationCapable":true,"newThing":1}})))
        .unwrap();
        let b = org_device(res(json!({"type":"orgDevices","id":"C1","attributes":{
            "serialNumber":"C1","imei":"35","meid":[],"eid":"","purchaseSourceUid":"P1",
            "ethernetMacAddress":"aa","isMdmMigrationCapable":"true","newThing":1}})))
        .unwrap();
        assert_eq!(a, b);
        assert!(a.changes_from(&b).is_empty());
        assert_eq!(a.get("meid"), Some(&json!([])), "[] stays []");
        assert_eq!(a.get("eid"), Some(&json!("")), "\"\" stays \"\"");
        assert_eq!(a.get("color"), Some(&Value::Null), "omitted is null");
        assert_eq!(a.extra["newThing"], 1);
        assert_eq!(OrgDevice::from_json(&a.to_json()).unwrap(), a);
    }

    #[test]
    fn the_server_is_part_of_the_row_and_of_its_changes() {
        let mut a = org_device(res(json!({"id":"C1","attributes":{"color":"red"}}))).unwrap();
        let old = a.clone();
        a.server_id = Some("S1".into());
        a.server_name = Some("MDM".into());
        a.values[10] = json!("blue");
        let c = a.changes_from(&old);
        assert_eq!(c["assigned_server_id"], json!([null, "S1"]));
        assert_eq!(c["color"], json!(["red", "blue"]));
    }

    #[test]
    fn the_digest_covers_the_attributes_as_sent_and_the_server() {
        let raw = |attrs: &str| -> RawResource {
            serde_json::from_str(&format!(
                r#"{{"type":"orgDevices","id":"C1","attributes":{attrs}}}"#
            ))
            .unwrap()
        };
        let a = raw(r#"{"color":"red"}"#);
        assert_eq!(
            a.digest(None, None),
            raw(r#"{"color":"red"}"#).digest(None, None)
        );
        assert_ne!(
            a.digest(None, None),
            raw(r#"{"color":"blue"}"#).digest(None, None)
        );
        assert_ne!(a.digest(None, None), a.digest(Some("S1"), Some("MDM")));
        assert_ne!(a.digest(Some("S1"), None), a.digest(None, Some("S1")));
        assert_eq!(a.decode().unwrap().get("color"), Some(&json!("red")));
        assert!(raw("[1]").decode().is_err());
    }

    #[test]
    fn resources_without_a_usable_serial_are_refused_alone() {
        assert!(org_device(res(json!({"attributes":{}}))).is_err());
        let e = org_device(res(json!({"id":"a\u{1b}b","attributes":{}}))).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("a\\u{1b}b"));
    }
}
