//! Realistic device records in Apple's fetch form (docs/apple-dep-api.md §4.2): a catalogue of consistent
//! (model, description, color, os, device_family) tuples, unique 12-character serials from a
//! seeded ChaCha generator, profile fields that only appear when the profile status implies
//! them, and the changes a device goes through in real life (profile assigned, pushed,
//! removed; asset tag edited).
//!
//! A generated device is kept as a compact record (about 60 bytes) and written as JSON when
//! a page needs it: a million devices then take under 200 MB and well under a second to
//! create, where a million pre-serialised records (~400 MB) take about a second just to be
//! paged into memory. Once edited, a device is kept as its serialised JSON. Either way a page
//! costs O(page). Optional fields are omitted, never null.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::rfc3339;

/// Device assignment dates of the initial devices are spread over this range (2022–2024), a
/// fixed range so that a seed always yields the same records.
const HISTORY_START: i64 = 1_641_168_000; // 2022-01-03T00:00:00Z
const HISTORY_END: i64 = 1_735_689_600; // 2025-01-01T00:00:00Z

/// Serial characters: Apple leaves out I and O.
const SERIAL_ALPHABET: &[u8; 34] = b"0123456789ABCDEFGHJKLMNPQRSTUVWXYZ";

/// People who assign devices to the MDM server in ABM/ASM.
const ASSIGNERS: [&str; 4] = [
    "it-admin@example.com",
    "deploy@example.com",
    "jane.appleseed@example.com",
    "procurement@example.com",
];

/// The order keys are written in, as in Apple's samples; unknown keys follow, sorted.
const KEY_ORDER: [&str; 13] = [
    "serial_number",
    "model",
    "description",
    "color",
    "asset_tag",
    "os",
    "device_family",
    "profile_status",
    "profile_uuid",
    "profile_assign_time",
    "profile_push_time",
    "device_assigned_by",
    "device_assigned_date",
];

/// `(device_family, model, color, cellular)` of a generated device.
pub(crate) type Summary = (&'static str, &'static str, &'static str, bool);

/// A serial number. Every device comes from the generator, so every serial is 12 ASCII
/// characters; keeping it inline saves an allocation per device.
pub(crate) type Serial = [u8; 12];

/// The serial for `text`, if it can be one.
pub(crate) fn serial_key(text: &str) -> Option<Serial> {
    text.as_bytes().try_into().ok()
}

/// A serial as text.
pub(crate) fn serial_str(serial: &Serial) -> &str {
    std::str::from_utf8(serial).expect("serials are ASCII")
}

#[derive(Clone, Copy)]
enum Family {
    Mac,
    IPhone,
    IPad,
    AppleTv,
    Vision,
}

impl Family {
    /// `os` at protocol version 7 and later (docs/apple-dep-api.md §1.1).
    fn os(self) -> &'static str {
        match self {
            Family::Mac => "OSX",
            Family::IPhone => "iOS",
            Family::IPad => "iPadOS",
            Family::AppleTv => "tvOS",
            Family::Vision => "visionOS",
        }
    }

    fn device_family(self) -> &'static str {
        match self {
            Family::Mac => "Mac",
            Family::IPhone => "iPhone",
            Family::IPad => "iPad",
            Family::AppleTv => "AppleTV",
            Family::Vision => "Vision",
        }
    }

    /// Leading characters that look like the factory/year codes of each product line.
    fn serial_prefixes(self) -> &'static [&'static str] {
        match self {
            Family::Mac => &["C02", "C07", "FVF", "C1M"],
            Family::IPhone => &["F2L", "DX3", "G6T", "FFM"],
            Family::IPad => &["DMP", "DLX", "F9F", "GG7"],
            Family::AppleTv => &["DY3", "C0H"],
            Family::Vision => &["H2W"],
        }
    }

    /// (model, description, color)
    fn models(self) -> &'static [(&'static str, &'static str, &'static str)] {
        match self {
            Family::Mac => &[
                (
                    "MacBook Air",
                    "MBA 13.6 MIDNIGHT/8C CPU/8C GPU/8GB/256GB-USA",
                    "MIDNIGHT",
                ),
                (
                    "MacBook Air",
                    "MBA 15.3 STARLIGHT/8C CPU/10C GPU/16GB/512GB-USA",
                    "STARLIGHT",
                ),
                (
                    "MacBook Pro",
                    "MBP 13.3 SPACE GRAY/2.0GHZ/8GB/256GB-USA",
                    "SPACE GRAY",
                ),
                (
                    "MacBook Pro",
                    "MBP 14.2 SPACE BLACK/M3 PRO 11C CPU/14C GPU/18GB/512GB-USA",
                    "SPACE BLACK",
                ),
                (
                    "MacBook Pro",
                    "MBP 16.2 SILVER/M3 MAX 16C CPU/40C GPU/48GB/1TB-USA",
                    "SILVER",
                ),
                ("iMac", "IMAC 24 BLUE/8C CPU/8C GPU/8GB/256GB-USA", "BLUE"),
                (
                    "Mac mini",
                    "MAC MINI M2/8C CPU/10C GPU/8GB/256GB-USA",
                    "SILVER",
                ),
                (
                    "Mac Studio",
                    "MAC STUDIO M2 MAX/12C CPU/30C GPU/32GB/512GB-USA",
                    "SILVER",
                ),
            ],
            Family::IPhone => &[
                ("iPhone 16", "IPHONE 16 128GB ULTRAMARINE", "ULTRAMARINE"),
                (
                    "iPhone 15 Pro",
                    "IPHONE 15 PRO 256GB NATURAL TITANIUM",
                    "NATURAL TITANIUM",
                ),
                ("iPhone 15", "IPHONE 15 128GB BLACK", "BLACK"),
                ("iPhone 14", "IPHONE 14 128GB MIDNIGHT", "MIDNIGHT"),
                ("iPhone 13", "IPHONE 13 128GB BLUE", "BLUE"),
                ("iPhone SE", "IPHONE SE 64GB (PRODUCT)RED", "RED"),
            ],
            Family::IPad => &[
                ("iPad Air", "IPAD AIR WI-FI 64GB BLUE", "BLUE"),
                ("iPad", "IPAD WI-FI 64GB SILVER", "SILVER"),
                (
                    "iPad Pro",
                    "IPAD PRO 11 WI-FI 256GB SPACE GRAY",
                    "SPACE GRAY",
                ),
                (
                    "iPad mini",
                    "IPAD MINI WI-FI + CELLULAR 64GB PURPLE",
                    "PURPLE",
                ),
            ],
            Family::AppleTv => &[
                ("Apple TV 4K", "APPLE TV 4K WI-FI 64GB", "BLACK"),
                ("Apple TV HD", "APPLE TV HD 32GB", "BLACK"),
            ],
            Family::Vision => &[("Apple Vision Pro", "APPLE VISION PRO 256GB", "SILVER")],
        }
    }
}

/// Where a device's enrollment profile stands (docs/apple-dep-api.md §4.2 `profile_status`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ProfileState {
    Empty,
    Assigned,
    Pushed,
    Removed,
}

/// A device as generated, written out by [`Device::render`].
#[derive(Clone, Copy)]
pub(crate) struct Generated {
    serial: Serial,
    family: Family,
    /// Index into `family.models()`.
    model: u8,
    /// Index into [`ASSIGNERS`].
    assigner: u8,
    profile: ProfileState,
    /// Index into the organisation's profiles; meaningful when assigned or pushed.
    uuid: u8,
    asset_tag: Option<u32>,
    assigned_at: i64,
    /// Meaningful when assigned or pushed.
    assign_time: i64,
    /// Meaningful when pushed.
    push_time: i64,
}

impl Generated {
    /// Its serial number.
    pub fn serial(&self) -> Serial {
        self.serial
    }
}

/// A device's current fields.
#[derive(Clone)]
pub(crate) enum Device {
    /// Untouched since generation.
    Generated(Generated),
    /// Edited: the fetch-form JSON object, keys in Apple's order.
    Json {
        /// Same as the JSON's `serial_number`, kept for lookups without parsing.
        serial: Serial,
        json: Arc<str>,
    },
}

/// Appends `"key":value` pairs to a JSON object under construction; the device renderers
/// of both APIs use it. String values here are catalogue literals, serials, identifiers,
/// e-mails and timestamps: none needs escaping.
pub(crate) struct ObjectWriter<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> ObjectWriter<'a> {
    pub fn new(out: &'a mut String) -> Self {
        out.push('{');
        Self { out, first: true }
    }

    /// Appends `"key":` and returns the output for the value.
    pub fn key(&mut self, key: &str) -> &mut String {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
        self.out
    }

    pub fn str(&mut self, key: &str, value: &str) {
        let out = self.key(key);
        out.push('"');
        out.push_str(value);
        out.push('"');
    }

    /// `secs` (Unix time) as an RFC 3339 string with second precision.
    pub fn time(&mut self, key: &str, secs: i64) {
        let out = self.key(key);
        out.push('"');
        rfc3339::push(out, secs);
        out.push('"');
    }

    /// `ms` (Unix milliseconds) as an RFC 3339 string with millisecond precision.
    pub fn time_millis(&mut self, key: &str, ms: i64) {
        let out = self.key(key);
        out.push('"');
        rfc3339::push_millis(out, ms);
        out.push('"');
    }

    pub fn finish(self) {
        self.out.push('}');
    }
}

/// Protocol version from which every field is shown as is.
pub(crate) const LATEST_PROTOCOL: u32 = u32::MAX;

impl Device {
    /// Appends the device's JSON object as a client speaking protocol version `proto` sees
    /// it (docs/apple-dep-api.md §1.1): before 2 no `os` / `device_family`; before 7 iPads say `iOS`.
    /// `profiles` are the organisation's profile UUIDs.
    pub fn render(&self, out: &mut String, proto: u32, profiles: &[String]) {
        match self {
            Device::Generated(g) => g.render(out, proto, profiles),
            Device::Json { json, .. } => render_json(out, json, proto),
        }
    }

    /// Its serial number.
    pub fn serial(&self) -> Serial {
        match self {
            Device::Generated(g) => g.serial,
            Device::Json { serial, .. } => *serial,
        }
    }

    /// `(device_family, model, color, cellular)` of a device as generated; `None` once edited.
    pub fn summary(&self) -> Option<Summary> {
        match self {
            Device::Generated(g) => {
                let (model, description, color) = g.family.models()[usize::from(g.model)];
                Some((
                    g.family.device_family(),
                    model,
                    color,
                    description.contains("CELLULAR"),
                ))
            }
            Device::Json { .. } => None,
        }
    }

    /// The full fetch-form JSON.
    pub fn to_json(&self, profiles: &[String]) -> String {
        let mut out = String::with_capacity(420);
        self.render(&mut out, LATEST_PROTOCOL, profiles);
        out
    }

    /// The fields as a JSON map, for editing.
    pub fn to_map(&self, profiles: &[String]) -> Map<String, Value> {
        serde_json::from_str(&self.to_json(profiles)).expect("devices render as JSON objects")
    }
}

impl Generated {
    fn render(&self, out: &mut String, proto: u32, profiles: &[String]) {
        let (model, description, color) = self.family.models()[usize::from(self.model)];
        let mut w = ObjectWriter::new(out);
        w.str("serial_number", serial_str(&self.serial));
        w.str("model", model);
        w.str("description", description);
        w.str("color", color);
        if let Some(tag) = self.asset_tag {
            let out = w.key("asset_tag");
            out.push_str("\"AT");
            let mut digit = 100_000;
            while digit > 0 {
                out.push(char::from(b'0' + (tag / digit % 10) as u8));
                digit /= 10;
            }
            out.push('"');
        }
        if proto >= 2 {
            let os = match self.family {
                Family::IPad if proto < 7 => "iOS",
                f => f.os(),
            };
            w.str("os", os);
            w.str("device_family", self.family.device_family());
        }
        let uuid = || profiles[usize::from(self.uuid)].as_str();
        match self.profile {
            ProfileState::Empty => w.str("profile_status", "empty"),
            ProfileState::Removed => w.str("profile_status", "removed"),
            ProfileState::Assigned => {
                w.str("profile_status", "assigned");
                w.str("profile_uuid", uuid());
                w.time("profile_assign_time", self.assign_time);
            }
            ProfileState::Pushed => {
                w.str("profile_status", "pushed");
                w.str("profile_uuid", uuid());
                w.time("profile_assign_time", self.assign_time);
                w.time("profile_push_time", self.push_time);
            }
        }
        w.str("device_assigned_by", ASSIGNERS[usize::from(self.assigner)]);
        w.time("device_assigned_date", self.assigned_at);
        w.finish();
    }
}

/// [`Device::render`] for an edited device, whose JSON we wrote ourselves (compact, so the
/// `os` pair has exactly one spelling).
fn render_json(out: &mut String, json: &str, proto: u32) {
    const IPADOS: &str = r#""os":"iPadOS""#;
    if proto >= 7 || (proto >= 2 && !json.contains(IPADOS)) {
        out.push_str(json);
    } else if proto >= 2 {
        out.push_str(&json.replace(IPADOS, r#""os":"iOS""#));
    } else {
        let mut map: Map<String, Value> =
            serde_json::from_str(json).expect("stored devices are JSON objects");
        map.remove("os");
        map.remove("device_family");
        out.push_str(&to_json(&map));
    }
}

/// Makes new devices. One instance per store; its random stream only moves when a device is
/// generated, so a seed and a sequence of additions always yield the same devices.
pub(crate) struct Generator {
    rng: ChaCha8Rng,
    /// The few enrollment profiles this organisation uses (32 upper-hex UUIDs).
    profiles: Arc<[String]>,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let profiles = (0..3).map(|_| profile_uuid(&mut rng)).collect();
        Self { rng, profiles }
    }

    /// The organisation's profile UUIDs, which rendering needs.
    pub fn profiles(&self) -> &Arc<[String]> {
        &self.profiles
    }

    fn family(&mut self) -> Family {
        match self.rng.random_range(0..100u32) {
            0..35 => Family::IPhone,
            35..65 => Family::Mac,
            65..90 => Family::IPad,
            90..96 => Family::AppleTv,
            _ => Family::Vision,
        }
    }

    fn serial(&mut self, family: Family) -> Serial {
        let prefixes = family.serial_prefixes();
        let prefix = prefixes[self.rng.random_range(0..prefixes.len())].as_bytes();
        let mut serial = [0u8; 12];
        serial[..3].copy_from_slice(prefix);
        // 34^9 < 2^64, so one draw gives all nine characters with negligible bias.
        let mut n: u64 = self.rng.random();
        for c in &mut serial[3..] {
            *c = SERIAL_ALPHABET[(n % 34) as usize];
            n /= 34;
        }
        serial
    }

    /// A device that was assigned to the MDM server some time in the slot starting at
    /// `slot_start` (seconds) and `slot_len` long, with a realistic profile history. Its
    /// serial may collide with an existing one (odds ~1e-13); the caller draws again.
    pub fn existing(&mut self, slot_start: i64, slot_len: i64) -> Generated {
        let assigned_at = slot_start + self.rng.random_range(0..slot_len.max(1));
        let profile = match self.rng.random_range(0..100u32) {
            0..20 => ProfileState::Empty,
            20..45 => ProfileState::Assigned,
            45..95 => ProfileState::Pushed,
            _ => ProfileState::Removed,
        };
        let uuid = self.rng.random_range(0..self.profiles.len()) as u8;
        let assign_time = assigned_at + self.rng.random_range(600..30 * 86_400);
        let push_time = assign_time + self.rng.random_range(60..14 * 86_400);
        let mut g = self.device(assigned_at);
        g.profile = profile;
        g.uuid = uuid;
        g.assign_time = assign_time;
        g.push_time = push_time;
        g
    }

    /// A device assigned to the MDM server just now: no profile yet, since assigning one is
    /// the MDM's job once it has seen the device.
    pub fn new_arrival(&mut self, now: i64) -> Generated {
        self.device(now)
    }

    fn device(&mut self, assigned_at: i64) -> Generated {
        let family = self.family();
        let model = self.rng.random_range(0..family.models().len()) as u8;
        let serial = self.serial(family);
        let asset_tag = self
            .rng
            .random_bool(0.6)
            .then(|| self.rng.random_range(0..1_000_000u32));
        let assigner = self.rng.random_range(0..ASSIGNERS.len()) as u8;
        Generated {
            serial,
            family,
            model,
            assigner,
            profile: ProfileState::Empty,
            uuid: 0,
            asset_tag,
            assigned_at,
            assign_time: 0,
            push_time: 0,
        }
    }
}

/// Assignment slot of initial device `i` of `n`: dates rise with insertion order, as Apple
/// sorts fetch results chronologically (docs/apple-dep-api.md §4.3).
pub(crate) fn history_slot(i: usize, n: usize) -> (i64, i64) {
    let span = i128::from(HISTORY_END - HISTORY_START);
    let start = HISTORY_START + (span * i as i128 / n.max(1) as i128) as i64;
    (start, (span / n.max(1) as i128) as i64)
}

fn profile_uuid(rng: &mut ChaCha8Rng) -> String {
    let bytes: [u8; 16] = rng.random();
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Applies the next step of a device's life, as ABM shows it to the MDM (docs/apple-dep-api.md §7.5): an empty
/// or removed profile gets assigned, an assigned one gets pushed, a pushed one is either
/// removed or the device gets a new asset tag.
pub(crate) fn realistic_change(
    device: &mut Map<String, Value>,
    now: i64,
    rng: &mut ChaCha8Rng,
    profiles: &[String],
) {
    let status = device
        .get("profile_status")
        .and_then(Value::as_str)
        .unwrap_or("empty")
        .to_owned();
    let stamp = Value::String(rfc3339::format(now));
    match status.as_str() {
        "assigned" => {
            device.insert("profile_status".into(), "pushed".into());
            device.insert("profile_push_time".into(), stamp);
        }
        "pushed" if rng.random_bool(0.5) => {
            let tag = format!("AT{:06}", rng.random_range(0..1_000_000u32));
            device.insert("asset_tag".into(), tag.into());
        }
        "pushed" => {
            device.insert("profile_status".into(), "removed".into());
            for key in ["profile_uuid", "profile_assign_time", "profile_push_time"] {
                device.remove(key);
            }
        }
        _ => {
            let uuid = profiles[rng.random_range(0..profiles.len())].clone();
            device.insert("profile_status".into(), "assigned".into());
            device.insert("profile_uuid".into(), uuid.into());
            device.insert("profile_assign_time".into(), stamp);
            device.remove("profile_push_time");
        }
    }
}

/// Serialises a device edited as a map, known keys in Apple's order, then any others.
pub(crate) fn to_json(device: &Map<String, Value>) -> String {
    let mut out = String::from("{");
    let mut put = |key: &str, value: &Value| {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&Value::String(key.to_owned()).to_string());
        out.push(':');
        out.push_str(&value.to_string());
    };
    for key in KEY_ORDER {
        if let Some(v) = device.get(key) {
            put(key, v);
        }
    }
    // Sorted explicitly: serde_json's map order depends on a crate feature.
    let mut others: Vec<(&String, &Value)> = device
        .iter()
        .filter(|(k, _)| !KEY_ORDER.contains(&k.as_str()))
        .collect();
    others.sort_by(|a, b| a.0.cmp(b.0));
    for (key, value) in others {
        put(key, value);
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn generated_devices_are_consistent_records() {
        let mut g = Generator::new(7);
        let profiles = g.profiles().clone();
        for i in 0..2000 {
            let (slot, len) = history_slot(i, 2000);
            let generated = g.existing(slot, len);
            let serial = serial_str(&generated.serial).to_owned();
            let json = Device::Generated(generated).to_json(&profiles);
            let d = parse(&json);
            assert!(serial.bytes().all(|b| SERIAL_ALPHABET.contains(&b)));
            assert_eq!(d["serial_number"], serial.as_str());
            let family = d["device_family"].as_str().unwrap();
            let os = d["os"].as_str().unwrap();
            let expected_os = match family {
                "Mac" => "OSX",
                "iPhone" => "iOS",
                "iPad" => "iPadOS",
                "AppleTV" => "tvOS",
                "Vision" => "visionOS",
                other => panic!("unexpected family {other}"),
            };
            assert_eq!(os, expected_os);
            let status = d["profile_status"].as_str().unwrap();
            let has = |k: &str| d.contains_key(k);
            let (uuid, assign, push) = (
                has("profile_uuid"),
                has("profile_assign_time"),
                has("profile_push_time"),
            );
            match status {
                "empty" | "removed" => assert!(!uuid && !assign && !push),
                "assigned" => assert!(uuid && assign && !push),
                "pushed" => {
                    assert!(uuid && assign && push);
                    assert!(d["profile_push_time"].as_str() > d["profile_assign_time"].as_str());
                }
                other => panic!("unexpected status {other}"),
            }
            if let Some(uuid) = d.get("profile_uuid") {
                let uuid = uuid.as_str().unwrap();
                assert_eq!(uuid.len(), 32);
                assert!(uuid
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)));
            }
            if let Some(tag) = d.get("asset_tag") {
                assert_eq!(tag.as_str().unwrap().len(), 8);
            }
            assert!(d.values().all(|v| !v.is_null()));
            assert!(d["device_assigned_by"].as_str().unwrap().contains('@'));
            assert!(d["device_assigned_date"].as_str().unwrap().ends_with('Z'));
            // The compact writer and the map writer agree byte for byte, so an edited
            // device differs from its generated self only where it was edited.
            assert_eq!(to_json(&d), json);
        }
    }

    #[test]
    fn old_protocols_see_ios_ipads_and_no_os_fields() {
        let profiles: Arc<[String]> = vec!["0".repeat(32)].into();
        let json = r#"{"serial_number":"DMP000000001","os":"iPadOS","device_family":"iPad"}"#;
        let edited = Device::Json {
            serial: serial_key("DMP000000001").unwrap(),
            json: json.into(),
        };
        let mut g = Generator::new(1);
        let ipad = loop {
            let d = g.new_arrival(0);
            if matches!(d.family, Family::IPad) {
                break Device::Generated(d);
            }
        };
        for device in [edited, ipad] {
            let at = |proto| {
                let mut out = String::new();
                device.render(&mut out, proto, &profiles);
                parse(&out)
            };
            assert_eq!(at(7)["os"], "iPadOS");
            assert_eq!(at(3)["os"], "iOS");
            assert_eq!(at(3)["device_family"], "iPad");
            assert!(!at(1).contains_key("os") && !at(1).contains_key("device_family"));
        }
    }

    #[test]
    fn a_device_walks_through_the_profile_states() {
        let mut g = Generator::new(1);
        let profiles = g.profiles().clone();
        let mut d = Device::Generated(g.new_arrival(1_720_000_000)).to_map(&profiles);
        assert_eq!(d["profile_status"], "empty");
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        realistic_change(&mut d, 1_720_000_100, &mut rng, &profiles);
        assert_eq!(d["profile_status"], "assigned");
        assert_eq!(d["profile_assign_time"], "2024-07-03T09:48:20Z");
        realistic_change(&mut d, 1_720_000_200, &mut rng, &profiles);
        assert_eq!(d["profile_status"], "pushed");
        assert!(d.contains_key("profile_push_time"));
    }
}
