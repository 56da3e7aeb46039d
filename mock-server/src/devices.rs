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
//!
//! The protocol-10 hardware identifiers (IMEI, MEID, EID, MAC addresses) are not stored: they
//! are derived from the serial when a page is written (`hardware_ids`, `org::catalogue`).

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::org::catalogue;
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

/// The order keys are written in, as in Apple's samples; unknown keys follow, sorted. The
/// protocol-10 keys come last ([`V10_KEYS`]), so in a device we serialised they form one
/// contiguous run that older protocols cut out.
const KEY_ORDER: [&str; 21] = [
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
    "imei",
    "meid",
    "eid",
    "wifi_mac_address",
    "bluetooth_mac_address",
    "ethernet_mac_address",
    "is_replacement_device",
    "released_by_replacement",
];

/// The device fields protocol version 10 added (docs/apple-dep-api.md §1.1, §4.2), the tail of
/// [`KEY_ORDER`]. `released_by_replacement` belongs to `deleted` sync records, not to devices;
/// it is listed so that an edit adding it is hidden from older protocols too.
const V10_KEYS: &[&str] = KEY_ORDER.as_slice().split_at(13).1;

/// Protocol version that added the hardware identifiers, `is_replacement_device`,
/// `released_by_replacement` and `GET /device/replacementDetails` (docs/apple-dep-api.md §1.1).
pub(crate) const PROTOCOL_V10: u32 = 10;

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

    const ALL: [Family; 5] = [
        Family::Mac,
        Family::IPhone,
        Family::IPad,
        Family::AppleTv,
        Family::Vision,
    ];

    /// The family of an edited device: its `device_family`, else the look of its serial.
    fn of(device_family: Option<&str>, serial: &str) -> Family {
        Family::ALL
            .into_iter()
            .find(|f| Some(f.device_family()) == device_family)
            .or_else(|| {
                Family::ALL
                    .into_iter()
                    .find(|f| f.serial_prefixes().iter().any(|p| serial.starts_with(p)))
            })
            .unwrap_or(Family::Mac)
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
    /// Apple's replacement for another device (`is_replacement_device`, protocol 10).
    replacement: bool,
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
        /// Byte range of the protocol-10 fields in `json` (with their leading comma),
        /// which clients before protocol 10 must not see; empty if there are none.
        v10: (u32, u32),
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
    /// it (docs/apple-dep-api.md §1.1): before 2 no `os` / `device_family`; before 7 iPads say
    /// `iOS`; before 10 none of the protocol-10 fields ([`V10_KEYS`]).
    /// `profiles` are the organisation's profile UUIDs.
    pub fn render(&self, out: &mut String, proto: u32, profiles: &[String]) {
        match self {
            Device::Generated(g) => g.render(out, proto, profiles),
            Device::Json { json, v10, .. } => render_json(out, json, *v10, proto),
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

    /// An edited device with the fields of `map` (whose `serial_number` is `serial`).
    pub fn from_map(serial: Serial, map: &Map<String, Value>) -> Self {
        let (json, v10) = write_json(map);
        Device::Json {
            serial,
            json: json.into(),
            v10,
        }
    }

    /// `(family, model index)`, for a replacement of the same model: as generated, or for
    /// an edited device as its `device_family` and `description` (else `model`) name them.
    fn family_model(&self) -> (Family, u8) {
        match self {
            Device::Generated(g) => (g.family, g.model),
            Device::Json { serial, json, .. } => {
                let map: Map<String, Value> =
                    serde_json::from_str(json).expect("stored devices are JSON objects");
                let text = |k: &str| map.get(k).and_then(Value::as_str);
                let family = Family::of(text("device_family"), serial_str(serial));
                let models = family.models();
                let model = models
                    .iter()
                    .position(|m| Some(m.1) == text("description"))
                    .or_else(|| models.iter().position(|m| Some(m.0) == text("model")))
                    .unwrap_or(0);
                (family, model as u8)
            }
        }
    }

    /// The device as it comes back to the MDM server at `now` after having left it:
    /// `device_assigned_date` is now and, the profile assignment having gone with the old
    /// assignment, `profile_status` is `empty` (docs/apple-dep-api.md §4.2, §7.1).
    pub fn returned(&self, now: i64, profiles: &[String]) -> Device {
        match self {
            Device::Generated(g) => Device::Generated(Generated {
                assigned_at: now,
                profile: ProfileState::Empty,
                ..*g
            }),
            Device::Json { serial, .. } => {
                let mut map = self.to_map(profiles);
                map.insert(
                    "device_assigned_date".into(),
                    Value::String(rfc3339::format(now)),
                );
                map.insert("profile_status".into(), "empty".into());
                for key in ["profile_uuid", "profile_assign_time", "profile_push_time"] {
                    map.remove(key);
                }
                Device::from_map(*serial, &map)
            }
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
        if proto >= PROTOCOL_V10 {
            self.render_v10(&mut w, description);
        }
        w.finish();
    }

    /// The protocol-10 fields (docs/apple-dep-api.md §4.2), derived from the serial alone so
    /// that a generated device needs no memory for them: IMEIs (two on ~70% of iPhones) and
    /// an EID on iPhones and cellular iPads, an MEID on iPhones, Wi-Fi and Bluetooth MACs on
    /// every device, an Ethernet MAC on Macs.
    fn render_v10(&self, w: &mut ObjectWriter<'_>, description: &str) {
        let ids = hardware_ids(&self.serial);
        let cellular = match self.family {
            Family::IPhone => true,
            Family::IPad => description.contains("CELLULAR"),
            _ => false,
        };
        let string = |w: &mut ObjectWriter<'_>, key: &str, push: &dyn Fn(&mut String)| {
            let out = w.key(key);
            out.push('"');
            push(out);
            out.push('"');
        };
        if cellular {
            let iphone = matches!(self.family, Family::IPhone);
            let out = w.key("imei");
            out.push_str("[\"");
            let first = out.len();
            catalogue::push_imei(out, ids, 0);
            // An MEID is the first 14 digits of the IMEI on Apple's dual-mode phones.
            let meid = iphone.then(|| out[first..first + 14].to_owned());
            if iphone && catalogue::mix(ids, 1) % 10 < 7 {
                out.push_str("\",\"");
                catalogue::push_imei(out, ids, 1);
            }
            out.push_str("\"]");
            if let Some(meid) = meid {
                let out = w.key("meid");
                out.push_str("[\"");
                out.push_str(&meid);
                out.push_str("\"]");
            }
            string(w, "eid", &|out| catalogue::push_eid(out, ids));
        }
        string(w, "wifi_mac_address", &|out| {
            catalogue::push_mac(out, ids, 0, 0)
        });
        string(w, "bluetooth_mac_address", &|out| {
            catalogue::push_mac(out, ids, 0, 1)
        });
        if matches!(self.family, Family::Mac) {
            string(w, "ethernet_mac_address", &|out| {
                catalogue::push_mac(out, ids, 1, 0)
            });
        }
        w.key("is_replacement_device")
            .push_str(if self.replacement { "true" } else { "false" });
    }
}

/// The seed of a device's hardware identifiers (see `catalogue::mix`): a hash of its serial,
/// itself drawn from the store's seed.
fn hardware_ids(serial: &Serial) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(&serial[..8]);
    let mut tail = [0u8; 8];
    tail[..4].copy_from_slice(&serial[8..]);
    catalogue::mix(
        u64::from_le_bytes(head) ^ catalogue::mix(u64::from_le_bytes(tail), 0),
        70,
    )
}

/// [`Device::render`] for an edited device, whose JSON we wrote ourselves (compact, so the
/// `os` pair has exactly one spelling); `v10` is the byte range of its protocol-10 fields.
fn render_json(out: &mut String, json: &str, v10: (u32, u32), proto: u32) {
    const IPADOS: &str = r#""os":"iPadOS""#;
    let (start, end) = (v10.0 as usize, v10.1 as usize);
    let cut;
    let json = if proto >= PROTOCOL_V10 || start == end {
        json
    } else {
        cut = [&json[..start], &json[end..]].concat();
        cut.as_str()
    };
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

    /// Apple's replacement for `original`, assigned to the MDM server at `now`: the same
    /// family and model under a new serial, no asset tag or profile yet, flagged
    /// `is_replacement_device`. Its serial may collide, as with [`Self::existing`].
    pub fn replacement(&mut self, original: &Device, now: i64) -> Generated {
        let (family, model) = original.family_model();
        let serial = self.serial(family);
        let assigner = self.rng.random_range(0..ASSIGNERS.len()) as u8;
        Generated {
            serial,
            family,
            model,
            assigner,
            profile: ProfileState::Empty,
            uuid: 0,
            asset_tag: None,
            assigned_at: now,
            assign_time: 0,
            push_time: 0,
            replacement: true,
        }
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
            replacement: false,
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
    write_json(device).0
}

/// [`to_json`], with the byte range of the protocol-10 fields: from the comma before the
/// first to the end of the last (they are contiguous, see [`KEY_ORDER`]); empty if none.
fn write_json(device: &Map<String, Value>) -> (String, (u32, u32)) {
    let mut out = String::from("{");
    let put = |out: &mut String, key: &str, value: &Value| {
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&Value::String(key.to_owned()).to_string());
        out.push(':');
        out.push_str(&value.to_string());
    };
    let mut v10: Option<(usize, usize)> = None;
    for key in KEY_ORDER {
        if let Some(v) = device.get(key) {
            let start = out.len();
            put(&mut out, key, v);
            if V10_KEYS.contains(&key) {
                let span = v10.get_or_insert((start, start));
                span.1 = out.len();
            }
        }
    }
    // Sorted explicitly: serde_json's map order depends on a crate feature.
    let mut others: Vec<(&String, &Value)> = device
        .iter()
        .filter(|(k, _)| !KEY_ORDER.contains(&k.as_str()))
        .collect();
    others.sort_by(|a, b| a.0.cmp(b.0));
    for (key, value) in others {
        put(&mut out, key, value);
    }
    out.push('}');
    let (mut start, mut end) = v10.unwrap_or((0, 0));
    if start == 1 && end > start && out.as_bytes()[end] == b',' {
        // The run opens the object, so it has no leading comma: take the following one.
        end += 1;
    }
    if start == end {
        (start, end) = (0, 0);
    }
    let span = (
        u32::try_from(start).expect("devices are small"),
        u32::try_from(end).expect("devices are small"),
    );
    (out, span)
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
            v10: (0, 0),
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
    fn a_device_handle_stays_compact() {
        // A million of them live in the store; protocol 10 added one flag and no more.
        assert!(
            std::mem::size_of::<Device>() <= 64,
            "{}",
            std::mem::size_of::<Device>()
        );
    }

    #[test]
    fn edited_devices_hide_their_protocol_10_fields_from_older_protocols() {
        let profiles: Arc<[String]> = vec!["0".repeat(32)].into();
        let mut g = Generator::new(3);
        let iphone = loop {
            let d = g.new_arrival(0);
            if matches!(d.family, Family::IPhone) {
                break Device::Generated(d);
            }
        };
        let mut map = iphone.to_map(&profiles);
        assert!(map.contains_key("imei") && map.contains_key("meid"));
        map.insert("asset_tag".into(), "EDITED".into());
        map.insert("zz_custom".into(), 1.into());
        let edited = Device::from_map(iphone.serial(), &map);
        let at = |device: &Device, proto| {
            let mut out = String::new();
            device.render(&mut out, proto, &profiles);
            parse(&out)
        };
        assert_eq!(at(&edited, 10), map);
        let mut old = map.clone();
        old.retain(|k, _| !V10_KEYS.contains(&k.as_str()));
        assert_eq!(at(&edited, 9), old);
        assert_eq!(at(&edited, 1)["zz_custom"], 1);
        assert!(at(&edited, 1).get("os").is_none());
        // Generated and edited agree at every protocol where nothing was edited.
        let plain = Device::from_map(iphone.serial(), &iphone.to_map(&profiles));
        for proto in [1, 7, 9, 10] {
            assert_eq!(at(&plain, proto), at(&iphone, proto));
        }
        // A run of protocol-10 fields that opens the object takes the comma after it.
        let mut odd = Map::new();
        odd.insert("eid".into(), "1".into());
        odd.insert("zz".into(), 2.into());
        let (json, span) = write_json(&odd);
        let mut out = String::new();
        render_json(&mut out, &json, span, 7);
        assert_eq!(out, r#"{"zz":2}"#);
        odd.remove("zz");
        let (json, span) = write_json(&odd);
        out.clear();
        render_json(&mut out, &json, span, 7);
        assert_eq!(out, "{}");
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
