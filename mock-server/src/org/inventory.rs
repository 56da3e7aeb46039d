//! One organisation's truth in the Apple School and Business Manager API: its MDM servers
//! and its devices, the changes an administrator makes (devices added, edited, released,
//! assigned or unassigned), paging in insertion order, and the JSON:API resources.
//!
//! Devices are compact `Copy` records (about 70 bytes) in a `Vec` in insertion order; the
//! index in that `Vec` never changes, so "from index i on" is a cursor that stays valid however
//! the inventory changes between pages. Released devices stay in place, flagged, and are
//! skipped by listings. Each server keeps the sorted set of its devices' indices. Resources
//! are rendered on the fly, after the state lock is released.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasherDefault;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use super::catalogue::{self, Family, Product, CATALOGUE};
use crate::config::{OrgAccountConfig, OrgQuirks};
use crate::devices::{ObjectWriter, Summary};
use crate::rfc3339;
use crate::store::SerialHasher;

/// Organisation join dates of the initial devices are spread over this range (2022–2024), a
/// fixed range so that a seed always yields the same records.
const HISTORY_START_MS: i64 = 1_641_168_000_000; // 2022-01-03T00:00:00Z
const HISTORY_END_MS: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z
const DAY_MS: i64 = 86_400_000;

/// Characters of post-2021 randomised serials: digits and consonants.
const SERIAL_ALPHABET: &[u8; 31] = b"0123456789BCDFGHJKLMNPQRSTVWXYZ";

/// `server` of an unassigned device.
const NO_SERVER: u8 = u8::MAX;

/// Index of the server shared with the ADE simulation.
pub(crate) const ADE_SERVER: u8 = 0;

const CELLULAR: u8 = 1;
const DUAL_SIM: u8 = 2;
const APPLECARE: u8 = 4;

/// A serial number of up to 12 ASCII characters, zero-padded (ADE's are 12, generated
/// organisation-only ones 10).
pub(crate) type Key = [u8; 12];

/// The key for `text`, if it can be one.
pub(crate) fn key(text: &str) -> Option<Key> {
    let b = text.as_bytes();
    if b.is_empty() || b.len() > 12 || !b.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let mut k = [0u8; 12];
    k[..b.len()].copy_from_slice(b);
    Some(k)
}

/// A key as text.
pub(crate) fn key_str(k: &Key) -> &str {
    let len = k.iter().position(|&b| b == 0).unwrap_or(k.len());
    std::str::from_utf8(&k[..len]).expect("serials are ASCII")
}

type Index = HashMap<Key, u32, BuildHasherDefault<SerialHasher>>;

/// `purchaseSourceType` values.
const SOURCES: [&str; 3] = ["APPLE", "RESELLER", "MANUALLY_ADDED"];

/// An organisation device, rendered by [`render_device`].
#[derive(Clone, Copy)]
pub(crate) struct OrgDevice {
    pub serial: Key,
    /// Index into [`CATALOGUE`].
    product: u8,
    /// Index into the product's colours.
    color: u8,
    /// Index into the product's capacities.
    capacity: u8,
    /// Index of the assigned server, or [`NO_SERVER`].
    server: u8,
    /// Index into [`SOURCES`].
    source: u8,
    flags: u8,
    order_number: u32,
    source_id: u32,
    /// Seed of the hardware identifiers (see `catalogue::mix`).
    ids: u64,
    added_ms: i64,
    updated_ms: i64,
    order_ms: i64,
    released_ms: Option<i64>,
}

impl OrgDevice {
    fn product(&self) -> &'static Product {
        &CATALOGUE[usize::from(self.product)]
    }

    fn listed(&self) -> bool {
        self.released_ms.is_none()
    }

    /// The index of its server, if assigned.
    pub fn server(&self) -> Option<u8> {
        (self.server != NO_SERVER).then_some(self.server)
    }
}

/// An MDM server's attributes.
#[derive(Clone, Debug)]
pub(crate) struct ServerInfo {
    pub id: String,
    pub name: String,
    /// `MDM` or `APPLE_CONFIGURATOR`.
    pub kind: &'static str,
    pub created_ms: i64,
    pub updated_ms: i64,
}

struct Server {
    info: ServerInfo,
    /// Indices of its devices.
    members: BTreeSet<u32>,
}

/// What a listing page holds: the items, and the index to continue from if more follow.
pub(crate) struct Slice<T> {
    pub items: Vec<T>,
    pub next: Option<u32>,
}

/// Devices and servers of one organisation.
pub(crate) struct Inventory {
    devices: Vec<OrgDevice>,
    index: Index,
    servers: Vec<Server>,
    released: usize,
    /// Shapes new devices.
    rng: ChaCha8Rng,
    /// Chooses devices and changes; separate so that changes do not alter later additions.
    mutator: ChaCha8Rng,
    /// Catalogue indices per family, for generation.
    by_family: Vec<(Family, Vec<u8>)>,
}

impl Inventory {
    /// The inventory at start: the ADE devices (if the account includes them) assigned to
    /// the ADE server, then `config.devices` generated ones. `ade_server` is that server's
    /// (id, name).
    pub fn new(
        config: &OrgAccountConfig,
        ade: &[(crate::devices::Serial, Option<Summary>)],
        ade_server: (&str, &str),
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x0E6D_0000_5EED_0001);
        let servers = initial_servers(&mut rng, ade_server);
        let by_family = Family::ALL
            .into_iter()
            .map(|f| {
                let products = (0..CATALOGUE.len() as u8)
                    .filter(|&i| CATALOGUE[usize::from(i)].family == f)
                    .collect();
                (f, products)
            })
            .collect();
        let mut inv = Self {
            devices: Vec::new(),
            index: Index::default(),
            servers,
            released: 0,
            mutator: ChaCha8Rng::seed_from_u64(config.seed ^ 0x9E37_79B9_7F4A_7C15),
            rng,
            by_family,
        };
        let ade = if config.include_ade_devices { ade } else { &[] };
        let total = ade.len() + config.devices;
        inv.devices.reserve(total);
        inv.index.reserve(total);
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); inv.servers.len()];
        let mut memo: HashMap<(&str, &str), (u8, u8)> = HashMap::new();
        for (i, (serial, summary)) in ade.iter().enumerate() {
            let mut k = [0u8; 12];
            k.copy_from_slice(serial);
            if inv.index.contains_key(&k) {
                continue;
            }
            let (product, color, cellular) = match summary {
                Some((family, model, color, cellular)) => {
                    let (p, c) = *memo
                        .entry((model, color))
                        .or_insert_with(|| catalogue::for_ade(family, model, color));
                    (p, c, *cellular)
                }
                None => {
                    let p = inv.random_product();
                    (
                        p,
                        inv.rng
                            .random_range(0..CATALOGUE[usize::from(p)].colors.len())
                            as u8,
                        false,
                    )
                }
            };
            let added = inv.history_time(i, total);
            let device = inv.draw(k, product, color, cellular, added, ADE_SERVER);
            members[usize::from(ADE_SERVER)].push(inv.push(device));
        }
        for i in ade.len()..total {
            let product = inv.random_product();
            let colors = CATALOGUE[usize::from(product)].colors.len();
            let color = inv.rng.random_range(0..colors) as u8;
            let cellular = inv.rng.random_bool(0.3);
            let server = match inv.rng.random_range(0..100u32) {
                0..60 => NO_SERVER,
                60..90 => 1,
                _ => 2,
            };
            let added = inv.history_time(i, total);
            let serial = inv.fresh_serial();
            let device = inv.draw(serial, product, color, cellular, added, server);
            let at = inv.push(device);
            if server != NO_SERVER {
                members[usize::from(server)].push(at);
            }
        }
        for (server, m) in inv.servers.iter_mut().zip(members) {
            // Indices rise: built in bulk.
            server.members = m.into_iter().collect();
        }
        inv
    }

    fn random_product(&mut self) -> u8 {
        let mut roll = self.rng.random_range(0..100u32);
        let family = Family::ALL
            .into_iter()
            .find(|f| {
                let hit = roll < f.weight();
                roll = roll.saturating_sub(f.weight());
                hit
            })
            .unwrap_or(Family::IPhone);
        let products = &self
            .by_family
            .iter()
            .find(|(f, _)| *f == family)
            .expect("every family has products")
            .1;
        products[self.rng.random_range(0..products.len())]
    }

    /// Join time of initial device `i` of `n`: rising with insertion order.
    fn history_time(&mut self, i: usize, n: usize) -> i64 {
        let span = i128::from(HISTORY_END_MS - HISTORY_START_MS);
        let slot = (span / n.max(1) as i128) as i64;
        HISTORY_START_MS
            + (span * i as i128 / n.max(1) as i128) as i64
            + self.rng.random_range(0..slot.max(1))
    }

    /// A 10-character serial no device has.
    fn fresh_serial(&mut self) -> Key {
        loop {
            let mut k = [0u8; 12];
            let mut n: u64 = self.rng.random();
            k[0] = SERIAL_ALPHABET[10 + (n % 21) as usize];
            n /= 21;
            for c in &mut k[1..10] {
                *c = SERIAL_ALPHABET[(n % 31) as usize];
                n /= 31;
            }
            if !self.index.contains_key(&k) {
                return k;
            }
        }
    }

    /// The random attributes of a device joining at `added`.
    fn draw(
        &mut self,
        serial: Key,
        product: u8,
        color: u8,
        cellular: bool,
        added: i64,
        server: u8,
    ) -> OrgDevice {
        let p = &CATALOGUE[usize::from(product)];
        let rng = &mut self.rng;
        let mut flags = 0;
        match p.family {
            Family::IPhone => {
                flags |= CELLULAR;
                if rng.random_bool(0.7) {
                    flags |= DUAL_SIM;
                }
            }
            Family::IPad if cellular => flags |= CELLULAR,
            _ => {}
        }
        if rng.random_bool(1.0 / 3.0) {
            flags |= APPLECARE;
        }
        let order_ms = added - rng.random_range(DAY_MS..30 * DAY_MS);
        let updated_ms = (added + rng.random_range(0..120 * DAY_MS)).min(HISTORY_END_MS.max(added));
        OrgDevice {
            serial,
            product,
            color,
            capacity: rng.random_range(0..p.capacities.len()) as u8,
            server,
            source: match rng.random_range(0..100u32) {
                0..55 => 0,
                55..90 => 1,
                _ => 2,
            },
            flags,
            order_number: rng.random_range(100_000_000..u32::MAX),
            source_id: rng.random_range(1_000_000..10_000_000),
            ids: rng.random(),
            added_ms: added,
            updated_ms,
            order_ms,
            released_ms: None,
        }
    }

    fn push(&mut self, device: OrgDevice) -> u32 {
        let at = u32::try_from(self.devices.len()).expect("fewer than 4 billion devices");
        self.index.insert(device.serial, at);
        self.devices.push(device);
        at
    }

    /// Devices listed now (not released).
    pub fn listed(&self) -> usize {
        self.devices.len() - self.released
    }

    /// Devices released so far.
    pub fn released(&self) -> usize {
        self.released
    }

    /// How many indices were ever handed out; no cursor position is above it.
    pub fn end(&self) -> u32 {
        self.devices.len() as u32
    }

    /// Every server.
    pub fn servers(&self) -> Vec<ServerInfo> {
        self.servers.iter().map(|s| s.info.clone()).collect()
    }

    /// How many servers there are.
    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// The index of the server with `id`.
    pub fn server_index(&self, id: &str) -> Option<u8> {
        self.servers
            .iter()
            .position(|s| s.info.id == id)
            .map(|i| i as u8)
    }

    /// The attributes of server `i`.
    pub fn server_info(&self, i: u8) -> &ServerInfo {
        &self.servers[usize::from(i)].info
    }

    /// The device with `serial`, released or not.
    pub fn get(&self, serial: &str) -> Option<&OrgDevice> {
        let at = self.index.get(&key(serial)?)?;
        Some(&self.devices[*at as usize])
    }

    /// Up to `limit` listed devices from index `start` on.
    pub fn device_page(&self, start: u32, limit: usize) -> Slice<OrgDevice> {
        let mut items = Vec::with_capacity(limit.min(self.listed()));
        let mut next = start;
        let mut rest = self
            .devices
            .iter()
            .enumerate()
            .skip(start as usize)
            .filter(|(_, d)| d.listed());
        for (i, d) in rest.by_ref().take(limit) {
            items.push(*d);
            next = i as u32 + 1;
        }
        let more = rest.next().is_some();
        Slice {
            items,
            next: more.then_some(next),
        }
    }

    /// Up to `limit` servers from index `start` on.
    pub fn server_page(&self, start: u32, limit: usize) -> Slice<ServerInfo> {
        let items: Vec<ServerInfo> = self
            .servers
            .iter()
            .skip(start as usize)
            .take(limit)
            .map(|s| s.info.clone())
            .collect();
        let next = start as usize + items.len();
        Slice {
            next: (next < self.servers.len()).then_some(next as u32),
            items,
        }
    }

    /// Serials of up to `limit` devices of server `server` from device index `start` on.
    pub fn server_devices_page(&self, server: u8, start: u32, limit: usize) -> Slice<Key> {
        let members = &self.servers[usize::from(server)].members;
        let mut items = Vec::with_capacity(limit.min(members.len()));
        let mut next = start;
        let mut rest = members.range(start..);
        for &i in rest.by_ref().take(limit) {
            items.push(self.devices[i as usize].serial);
            next = i + 1;
        }
        let more = rest.next().is_some();
        Slice {
            items,
            next: more.then_some(next),
        }
    }

    /// Adds `n` devices that joined the organisation at `now_ms`, assigned to `server` if
    /// given; returns their serials.
    pub fn add(&mut self, n: usize, server: Option<u8>, now_ms: i64) -> Vec<String> {
        let server = server.unwrap_or(NO_SERVER);
        let mut serials = Vec::with_capacity(n);
        for _ in 0..n {
            let product = self.random_product();
            let colors = CATALOGUE[usize::from(product)].colors.len();
            let color = self.rng.random_range(0..colors) as u8;
            let cellular = self.rng.random_bool(0.3);
            let serial = self.fresh_serial();
            let mut device = self.draw(serial, product, color, cellular, now_ms, server);
            device.updated_ms = now_ms;
            device.order_ms = now_ms - self.rng.random_range(DAY_MS..14 * DAY_MS);
            let at = self.push(device);
            if server != NO_SERVER {
                self.servers[usize::from(server)].members.insert(at);
            }
            serials.push(key_str(&serial).to_owned());
        }
        serials
    }

    /// The index of a listed device.
    fn listed_index(&self, serial: &str) -> Option<usize> {
        let at = *self.index.get(&key(serial)?)? as usize;
        self.devices[at].listed().then_some(at)
    }

    /// Changes one attribute of each listed device (colour, capacity or order number) and
    /// bumps `updatedDateTime`; returns how many were listed.
    pub fn modify(&mut self, serials: &[String], now_ms: i64) -> usize {
        let mut n = 0;
        for serial in serials {
            let Some(at) = self.listed_index(serial) else {
                continue;
            };
            let d = &mut self.devices[at];
            let p = d.product();
            let rng = &mut self.mutator;
            match rng.random_range(0..3u32) {
                0 if p.colors.len() > 1 => {
                    let step = rng.random_range(1..p.colors.len()) as u8;
                    d.color = (d.color + step) % p.colors.len() as u8;
                }
                1 if p.capacities.len() > 1 => {
                    let step = rng.random_range(1..p.capacities.len()) as u8;
                    d.capacity = (d.capacity + step) % p.capacities.len() as u8;
                }
                _ => d.order_number = rng.random_range(100_000_000..u32::MAX),
            }
            d.updated_ms = now_ms;
            n += 1;
        }
        n
    }

    /// Releases each listed device from the organisation: unassigned, `releasedFromOrgDateTime`
    /// set, gone from listings. Returns how many were listed.
    pub fn release(&mut self, serials: &[String], now_ms: i64) -> usize {
        let mut n = 0;
        for serial in serials {
            let Some(at) = self.listed_index(serial) else {
                continue;
            };
            self.set_server(at, NO_SERVER);
            let d = &mut self.devices[at];
            d.released_ms = Some(now_ms);
            d.updated_ms = now_ms;
            self.released += 1;
            n += 1;
        }
        n
    }

    /// Assigns each listed device to `server` (`None`: unassigns); returns how many changed.
    pub fn assign(&mut self, serials: &[String], server: Option<u8>, now_ms: i64) -> usize {
        let server = server.unwrap_or(NO_SERVER);
        let mut n = 0;
        for serial in serials {
            let Some(at) = self.listed_index(serial) else {
                continue;
            };
            if self.devices[at].server != server {
                self.set_server(at, server);
                self.devices[at].updated_ms = now_ms;
                n += 1;
            }
        }
        n
    }

    fn set_server(&mut self, at: usize, server: u8) {
        let old = self.devices[at].server;
        if old != NO_SERVER {
            self.servers[usize::from(old)].members.remove(&(at as u32));
        }
        if server != NO_SERVER {
            self.servers[usize::from(server)].members.insert(at as u32);
        }
        self.devices[at].server = server;
    }

    /// Up to `count` distinct listed serials chosen at random, in insertion order.
    pub fn pick(&mut self, count: usize) -> Vec<String> {
        let live = self.listed();
        let chosen: Vec<usize> = if count >= live {
            (0..self.devices.len())
                .filter(|&i| self.devices[i].listed())
                .collect()
        } else if count * 2 > live {
            let mut all: Vec<usize> = (0..self.devices.len())
                .filter(|&i| self.devices[i].listed())
                .collect();
            let (picked, _) = all.partial_shuffle(&mut self.mutator, count);
            let mut picked = picked.to_vec();
            picked.sort_unstable();
            picked
        } else {
            // At most half the listed devices are wanted: probing terminates quickly.
            let mut set = BTreeSet::new();
            while set.len() < count {
                let i = self.mutator.random_range(0..self.devices.len());
                if self.devices[i].listed() {
                    set.insert(i);
                }
            }
            set.into_iter().collect()
        };
        chosen
            .into_iter()
            .map(|i| key_str(&self.devices[i].serial).to_owned())
            .collect()
    }

    /// Every listed device, sorted by serial.
    pub fn listed_devices(&self) -> Vec<OrgDevice> {
        let mut all: Vec<OrgDevice> = self
            .devices
            .iter()
            .filter(|d| d.listed())
            .copied()
            .collect();
        all.sort_unstable_by_key(|d| d.serial);
        all
    }

    /// Serials of released devices, sorted.
    pub fn released_serials(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .devices
            .iter()
            .filter(|d| !d.listed())
            .map(|d| key_str(&d.serial).to_owned())
            .collect();
        all.sort_unstable();
        all
    }
}

/// The ADE server, another MDM and Apple Configurator.
fn initial_servers(rng: &mut ChaCha8Rng, ade: (&str, &str)) -> Vec<Server> {
    let mut hex_id = || {
        let b: [u8; 16] = rng.random();
        b.iter().map(|x| format!("{x:02X}")).collect::<String>()
    };
    let server = |id: String, name: &str, kind, created_ms, updated_ms| Server {
        info: ServerInfo {
            id,
            name: name.to_owned(),
            kind,
            created_ms,
            updated_ms,
        },
        members: BTreeSet::new(),
    };
    vec![
        server(
            ade.0.to_owned(),
            ade.1,
            "MDM",
            1_631_610_123_456,
            1_718_000_456_789,
        ),
        server(
            hex_id(),
            "Other MDM",
            "MDM",
            1_614_607_800_120,
            1_706_521_935_442,
        ),
        server(
            hex_id(),
            "Apple Configurator",
            "APPLE_CONFIGURATOR",
            1_598_950_861_007,
            1_598_950_861_007,
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// JSON:API rendering. Values are catalogue literals, serials, digits, timestamps and our own
// URLs (already percent-encoded): none needs escaping except server names and ids, which
// come from the configuration and go through `push_json_str`.

/// Appends `s` as a JSON string.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    out.push_str(&Value::String(s.to_owned()).to_string());
}

/// Appends `values` as a JSON array of strings, or as one comma-joined string when
/// `as_string` (the `list_values_as_strings` quirk).
fn push_list(out: &mut String, values: &[String], as_string: bool) {
    if as_string {
        out.push('"');
        out.push_str(&values.join(","));
        out.push('"');
    } else {
        out.push('[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(v);
            out.push('"');
        }
        out.push(']');
    }
}

/// Appends the `attributes` object of `d`.
pub(crate) fn render_attributes(out: &mut String, d: &OrgDevice, quirks: OrgQuirks) {
    let p = d.product();
    let cellular = d.flags & CELLULAR != 0;
    let lists = quirks.list_values_as_strings;
    let mut o = ObjectWriter::new(out);
    o.str("serialNumber", key_str(&d.serial));
    o.time_millis("addedToOrgDateTime", d.added_ms);
    if let Some(released) = d.released_ms {
        o.time_millis("releasedFromOrgDateTime", released);
    }
    o.time_millis("updatedDateTime", d.updated_ms);
    o.str("deviceModel", p.model);
    o.str("productFamily", p.family.name());
    let product_type = match p.cellular_type {
        Some(t) if cellular => t,
        _ => p.product_type,
    };
    o.str("productType", product_type);
    o.str("deviceCapacity", p.capacities[usize::from(d.capacity)]);
    o.str(
        "partNumber",
        &catalogue::part_number(d.product, d.color, d.capacity),
    );
    let order = match d.source {
        0 => format!("W{:010}", d.order_number),
        1 => format!("PO-{}", d.order_number),
        _ => format!("{}", d.order_number),
    };
    o.str("orderNumber", &order);
    o.time_millis("orderDateTime", d.order_ms);
    o.str("color", p.colors[usize::from(d.color)]);
    o.str(
        "status",
        if d.server().is_some() {
            "ASSIGNED"
        } else {
            "UNASSIGNED"
        },
    );
    if cellular {
        let mut imeis = vec![catalogue::imei(d.ids, 0)];
        if d.flags & DUAL_SIM != 0 {
            imeis.push(catalogue::imei(d.ids, 1));
        }
        if p.family == Family::IPhone {
            let meid = vec![imeis[0][..14].to_owned()];
            push_list(o.key("imei"), &imeis, lists);
            push_list(o.key("meid"), &meid, lists);
        } else {
            push_list(o.key("imei"), &imeis, lists);
        }
        o.str("eid", &catalogue::eid(d.ids));
    }
    o.str("wifiMacAddress", &catalogue::mac(d.ids, 0, 0));
    o.str("bluetoothMacAddress", &catalogue::mac(d.ids, 0, 1));
    if p.family == Family::Mac {
        let ethernet = if p.ethernet {
            vec![catalogue::mac(d.ids, 1, 0)]
        } else {
            Vec::new()
        };
        push_list(o.key("ethernetMacAddress"), &ethernet, lists);
    }
    let source_key = if quirks.purchase_source_uid {
        "purchaseSourceUid"
    } else {
        "purchaseSourceId"
    };
    let source_id = match d.source {
        1 => format!("{:X}", d.source_id),
        _ => d.source_id.to_string(),
    };
    o.str(source_key, &source_id);
    o.str("purchaseSourceType", SOURCES[usize::from(d.source)]);
    if quirks.future_field {
        o.str("futureField", "future-value");
    }
    o.finish();
}

/// Appends the `orgDevices` resource of `d`; `base` is the API's `scheme://host`.
pub(crate) fn render_device(out: &mut String, d: &OrgDevice, quirks: OrgQuirks, base: &str) {
    let serial = key_str(&d.serial);
    out.push_str(r#"{"type":"orgDevices","id":""#);
    out.push_str(serial);
    out.push_str(r#"","attributes":"#);
    render_attributes(out, d, quirks);
    out.push_str(r#","relationships":{"assignedServer":{"links":{"self":""#);
    out.push_str(base);
    out.push_str("/v1/orgDevices/");
    out.push_str(serial);
    out.push_str(r#"/relationships/assignedServer","related":""#);
    out.push_str(base);
    out.push_str("/v1/orgDevices/");
    out.push_str(serial);
    out.push_str(r#"/assignedServer"}}},"links":{"self":""#);
    out.push_str(base);
    out.push_str("/v1/orgDevices/");
    out.push_str(serial);
    out.push_str("\"}}");
}

/// Appends the `mdmServers` resource of `s`.
pub(crate) fn render_server(out: &mut String, s: &ServerInfo, base: &str) {
    out.push_str(r#"{"type":"mdmServers","id":"#);
    push_json_str(out, &s.id);
    out.push_str(r#","attributes":{"serverName":"#);
    push_json_str(out, &s.name);
    out.push_str(r#","serverType":""#);
    out.push_str(s.kind);
    out.push_str(r#"","createdDateTime":""#);
    rfc3339::push_millis(out, s.created_ms);
    out.push_str(r#"","updatedDateTime":""#);
    rfc3339::push_millis(out, s.updated_ms);
    out.push_str(r#""},"relationships":{"devices":{"links":{"self":""#);
    out.push_str(base);
    out.push_str("/v1/mdmServers/");
    out.push_str(
        &percent_encoding::utf8_percent_encode(&s.id, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
    );
    out.push_str(r#"/relationships/devices"}}}}"#);
}

/// Appends the `appleCareCoverage` resources of `d` (without the enclosing array): a
/// Limited Warranty for every device, and for about a third an AppleCare+ plan. Whether a
/// coverage is `ACTIVE` depends on `now_ms`.
pub(crate) fn render_coverage(out: &mut String, d: &OrgDevice, now_ms: i64) {
    let p = d.product();
    let r = catalogue::mix(d.ids, 50);
    let start = d.order_ms + 3 * DAY_MS;
    let year = 365 * DAY_MS;
    let lw_end = start + year;
    coverage(
        out,
        &coverage_id(d.ids, 0),
        Coverage {
            active: now_ms < lw_end,
            payment: "NONE",
            description: "Limited Warranty",
            start,
            end: lw_end,
            renewable: false,
            canceled: None,
            agreement: None,
        },
    );
    if d.flags & APPLECARE == 0 {
        return;
    }
    out.push(',');
    let agreement = format!("{:010}", r % 10_000_000_000);
    let c = if r % 10 < 7 {
        let years = if p.family == Family::Mac { 3 } else { 2 };
        let end = start + years * year;
        Coverage {
            active: now_ms < end,
            payment: "PAID_UP_FRONT",
            description: p.family.applecare(),
            start,
            end,
            renewable: false,
            canceled: None,
            agreement: Some(agreement),
        }
    } else if (r >> 8).is_multiple_of(4) {
        let end = start + year;
        Coverage {
            active: now_ms < start + 200 * DAY_MS,
            payment: "SUBSCRIPTION",
            description: p.family.applecare(),
            start,
            end,
            renewable: false,
            canceled: Some(start + 200 * DAY_MS),
            agreement: Some(agreement),
        }
    } else {
        // Renewed every year: the current term ends at the next anniversary.
        let terms = ((now_ms - start).max(0) / year) + 1;
        Coverage {
            active: true,
            payment: "SUBSCRIPTION",
            description: p.family.applecare(),
            start,
            end: start + terms * year,
            renewable: true,
            canceled: None,
            agreement: Some(agreement),
        }
    };
    coverage(out, &coverage_id(d.ids, 1), c);
}

/// How many coverages `d` has.
pub(crate) fn coverage_count(d: &OrgDevice) -> usize {
    if d.flags & APPLECARE != 0 {
        2
    } else {
        1
    }
}

struct Coverage {
    active: bool,
    payment: &'static str,
    description: &'static str,
    start: i64,
    end: i64,
    renewable: bool,
    canceled: Option<i64>,
    agreement: Option<String>,
}

fn coverage_id(ids: u64, k: u64) -> String {
    let mut r = catalogue::mix(ids, 60 + k);
    (0..12)
        .map(|_| {
            let c = SERIAL_ALPHABET[(r % 31) as usize];
            r /= 31;
            char::from(c)
        })
        .collect()
}

fn coverage(out: &mut String, id: &str, c: Coverage) {
    out.push_str(r#"{"type":"appleCareCoverage","id":""#);
    out.push_str(id);
    out.push_str(r#"","attributes":"#);
    let mut o = ObjectWriter::new(out);
    o.str("status", if c.active { "ACTIVE" } else { "INACTIVE" });
    o.str("paymentType", c.payment);
    o.str("description", c.description);
    o.time_millis("startDateTime", c.start);
    o.time_millis("endDateTime", c.end);
    o.key("isRenewable")
        .push_str(if c.renewable { "true" } else { "false" });
    o.key("isCanceled").push_str(if c.canceled.is_some() {
        "true"
    } else {
        "false"
    });
    match c.canceled {
        Some(t) => o.time_millis("contractCancelDateTime", t),
        None => o.key("contractCancelDateTime").push_str("null"),
    }
    match &c.agreement {
        Some(a) => o.str("agreementNumber", a),
        None => o.key("agreementNumber").push_str("null"),
    }
    o.finish();
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(devices: usize) -> OrgAccountConfig {
        OrgAccountConfig {
            devices,
            ..OrgAccountConfig::business(3)
        }
    }

    fn attributes(d: &OrgDevice, quirks: OrgQuirks) -> serde_json::Map<String, Value> {
        let mut out = String::new();
        render_attributes(&mut out, d, quirks);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    #[test]
    fn generated_inventory_is_deterministic_and_spread_over_the_servers() {
        let ade = crate::store::Store::new(50, 1).summaries();
        let a = Inventory::new(&config(2000), &ade, ("ADE", "adesync-mock"));
        let b = Inventory::new(&config(2000), &ade, ("ADE", "adesync-mock"));
        assert_eq!(a.listed(), 2050);
        let serials = |i: &Inventory| {
            i.listed_devices()
                .iter()
                .map(|d| d.serial)
                .collect::<Vec<_>>()
        };
        assert_eq!(serials(&a), serials(&b));
        let counts: Vec<usize> = (0..3).map(|s| a.servers[s].members.len()).collect();
        assert_eq!(counts[0], 50);
        assert!((500..700).contains(&counts[1]), "{counts:?}");
        assert!((130..270).contains(&counts[2]), "{counts:?}");
        for d in &a.devices {
            let v = attributes(d, OrgQuirks::default());
            let family = v["productFamily"].as_str().unwrap();
            assert_eq!(
                v.contains_key("imei"),
                family == "iPhone" || v.contains_key("eid")
            );
            assert_eq!(v.contains_key("meid"), family == "iPhone");
            assert_eq!(v.contains_key("ethernetMacAddress"), family == "Mac");
            assert!(v["addedToOrgDateTime"].as_str().unwrap().ends_with('Z'));
            assert!(v["orderDateTime"].as_str() < v["addedToOrgDateTime"].as_str());
            let status = v["status"].as_str().unwrap();
            assert_eq!(status == "ASSIGNED", d.server().is_some());
        }
    }

    #[test]
    fn quirks_change_the_shape() {
        let inv = Inventory::new(&config(200), &[], ("ADE", "adesync-mock"));
        let iphone = inv
            .devices
            .iter()
            .find(|d| d.product().family == Family::IPhone)
            .unwrap();
        let q = OrgQuirks {
            list_values_as_strings: true,
            purchase_source_uid: true,
            future_field: true,
        };
        let plain = attributes(iphone, OrgQuirks::default());
        let odd = attributes(iphone, q);
        assert!(plain["imei"].is_array() && odd["imei"].is_string());
        assert_eq!(odd["meid"], plain["meid"][0]);
        assert_eq!(odd["purchaseSourceUid"], plain["purchaseSourceId"]);
        assert!(!odd.contains_key("purchaseSourceId"));
        assert_eq!(odd["futureField"], "future-value");
    }

    #[test]
    fn pages_survive_changes_between_them() {
        let mut inv = Inventory::new(&config(100), &[], ("ADE", "adesync-mock"));
        let first = inv.device_page(0, 40);
        let after = first.next.unwrap();
        let mut seen: Vec<Key> = first.items.iter().map(|d| d.serial).collect();
        // Release one already seen and one not yet seen; add some.
        let gone = key_str(&inv.devices[90].serial).to_owned();
        inv.release(&[key_str(&seen[0]).to_owned(), gone.clone()], 1);
        inv.add(5, None, 2);
        let mut next = Some(after);
        while let Some(a) = next {
            let page = inv.device_page(a, 40);
            seen.extend(page.items.iter().map(|d| d.serial));
            next = page.next;
        }
        assert_eq!(seen.len(), 100 - 1 + 5);
        assert!(!seen.iter().any(|k| key_str(k) == gone));
    }
}
