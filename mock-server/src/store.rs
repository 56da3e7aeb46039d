//! The simulated organisation's truth: the devices currently assigned to the MDM server and
//! the append-only change log, plus Apple's fetch/sync paging over them (docs/apple-dep-api.md §4.3, §4.4, §5).
//!
//! Devices live in insertion order (`BTreeMap<seq, Device>` plus a serial → seq index), so a
//! fetch page is a range query: O(page), never O(devices). The change log holds
//! `(op_type, op_date, snapshot)`; sync pages are slices of it. Pages copy out cheap device
//! handles under the lock and are written as JSON after it is released.
//!
//! Devices that leave are remembered (`departed`) so that they can be assigned again, and
//! replacement devices Apple assigns keep their original's serial and date (`replacements`)
//! for `GET /device/replacementDetails`; both hold only devices that changed, never the
//! initial population.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::cursor::{Cursor, Position};
use crate::devices::{self, serial_key, serial_str, Device, Generator, Serial, PROTOCOL_V10};
use crate::rfc3339;

/// Sync record kinds (docs/apple-dep-api.md §4.2 `op_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpType {
    Added,
    Modified,
    Deleted,
}

impl OpType {
    fn as_str(self) -> &'static str {
        match self {
            OpType::Added => "added",
            OpType::Modified => "modified",
            OpType::Deleted => "deleted",
        }
    }
}

/// One change, as sync reports it.
#[derive(Clone)]
struct LogEntry {
    op: OpType,
    /// Unix seconds on the simulated clock.
    op_date: i64,
    /// The device after the change (for `deleted`: its last known fields).
    device: Device,
    /// For `modified`: the device before the change, the genuinely older record a
    /// duplicate-serial fault replays.
    prev: Option<Device>,
    /// For `deleted`: the device left because Apple replaced it
    /// (`released_by_replacement`, protocol 10).
    by_replacement: bool,
}

/// One device in a page: fetch records carry no op, sync records do.
#[derive(Clone)]
pub(crate) struct Record {
    device: Device,
    op: Option<(OpType, i64)>,
    /// `released_by_replacement` of a `deleted` record.
    by_replacement: bool,
}

/// What `GET /device/replacementDetails` tells about a replacement device.
#[derive(Clone, Copy)]
struct Replacement {
    /// The device it replaced.
    original: Serial,
    /// When it was assigned in its original's place, Unix seconds (simulated clock).
    date: i64,
}

/// A page ready to be rendered.
pub(crate) struct Page {
    records: Vec<Record>,
    /// Profile UUIDs the devices refer to.
    profiles: Arc<[String]>,
    /// Wire form of the next cursor.
    cursor: String,
    more_to_follow: bool,
}

/// Page-shaping faults (the others never reach the store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageFault {
    /// Apple's 2024 bug (docs/apple-dep-api.md §5.1): the cursor sent comes back with `more_to_follow: true`.
    SameCursor,
    /// One serial appears twice on the page (docs/apple-dep-api.md §7.2).
    DuplicateSerial,
}

/// Apple's cursor errors, all `400` (docs/apple-dep-api.md §6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CursorError {
    Required,
    Invalid,
    Exhausted,
    Expired,
}

impl CursorError {
    /// The body token Apple sends.
    pub fn token(self) -> &'static str {
        match self {
            CursorError::Required => "CURSOR_REQUIRED",
            CursorError::Invalid => "INVALID_CURSOR",
            CursorError::Exhausted => "EXHAUSTED_CURSOR",
            CursorError::Expired => "EXPIRED_CURSOR",
        }
    }
}

/// What cursor checks need besides the cursor itself.
#[derive(Clone, Copy)]
pub(crate) struct CursorContext {
    /// Simulated now, Unix milliseconds.
    pub now_ms: i64,
    /// This server's instance tag.
    pub instance: u32,
    /// Cursor lifetime in milliseconds.
    pub ttl_ms: i64,
}

/// Hashes serials for the index. They are random strings, so a multiply-rotate hash (as in
/// rustc's FxHasher) spreads them well at a fraction of SipHash's cost, which matters when a
/// million are indexed at start-up. Not flood-resistant; a loopback test server need not be.
#[derive(Default, Clone, Copy)]
pub(crate) struct SerialHasher(u64);

impl Hasher for SerialHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type SerialIndex = HashMap<Serial, u64, BuildHasherDefault<SerialHasher>>;
type SerialMap<T> = HashMap<Serial, T, BuildHasherDefault<SerialHasher>>;

/// Devices, change log, and the random streams that shape them.
pub(crate) struct Store {
    members: BTreeMap<u64, Device>,
    index: SerialIndex,
    /// Devices that were assigned once and are not now (deleted, released or replaced),
    /// with their last fields, so that they can return.
    departed: SerialMap<Device>,
    /// Replacement devices Apple assigned, by serial; kept once they leave, as history.
    replacements: SerialMap<Replacement>,
    next_seq: u64,
    log: Vec<LogEntry>,
    generator: Generator,
    /// Chooses devices and changes; separate from the generator so that modifying devices
    /// does not change which serials later additions get.
    mutator: ChaCha8Rng,
}

impl Store {
    /// `n` pre-existing devices from `seed`. They predate the simulation: no log entries.
    pub fn new(n: usize, seed: u64) -> Self {
        let mut generator = Generator::new(seed);
        let mut index = SerialIndex::with_capacity_and_hasher(n, Default::default());
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let (slot, len) = devices::history_slot(i, n);
            let seq = i as u64 + 1;
            loop {
                let device = generator.existing(slot, len);
                if let Entry::Vacant(e) = index.entry(device.serial()) {
                    e.insert(seq);
                    members.push((seq, Device::Generated(device)));
                    break;
                }
            }
        }
        Self {
            // Sorted input: built in bulk, much faster than a million inserts.
            members: members.into_iter().collect(),
            index,
            departed: SerialMap::default(),
            replacements: SerialMap::default(),
            next_seq: n as u64 + 1,
            log: Vec::new(),
            generator,
            mutator: ChaCha8Rng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15),
        }
    }

    /// The organisation's profile UUIDs.
    fn profiles(&self) -> &Arc<[String]> {
        self.generator.profiles()
    }

    /// Number of devices assigned now.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Number of change-log entries.
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Adds `n` newly assigned devices, logged `added` at `now`; returns their serials.
    pub fn add(&mut self, n: usize, now: i64) -> Vec<String> {
        let mut serials = Vec::with_capacity(n);
        while serials.len() < n {
            let device = self.generator.new_arrival(now);
            if self.admit(Device::Generated(device), now) {
                serials.push(serial_str(&device.serial()).to_owned());
            }
        }
        serials
    }

    /// Makes `device` a member at the end of the fetch order, logged `added` at `now`;
    /// `false` (nothing done) if its serial is taken, by a member or a departed device.
    fn admit(&mut self, device: Device, now: i64) -> bool {
        let serial = device.serial();
        if self.departed.contains_key(&serial) {
            return false;
        }
        let Entry::Vacant(e) = self.index.entry(serial) else {
            return false;
        };
        let seq = self.next_seq;
        e.insert(seq);
        self.next_seq += 1;
        self.members.insert(seq, device.clone());
        self.log.push(LogEntry {
            op: OpType::Added,
            op_date: now,
            device,
            prev: None,
            by_replacement: false,
        });
        true
    }

    /// Applies `edit` to the device with `serial` and logs `modified` at `now`; `false` if the
    /// serial is not assigned. The serial number itself cannot change: it is the identity.
    pub fn modify_with(
        &mut self,
        serial: &str,
        now: i64,
        edit: impl FnOnce(&mut Map<String, Value>, &mut ChaCha8Rng, &[String]),
    ) -> bool {
        self.edit(serial, now, |map, rng, profiles| {
            edit(map, rng, profiles);
            true
        })
        .is_some()
    }

    /// Whether `serial` is assigned to the MDM server now.
    pub fn contains(&self, serial: &str) -> bool {
        serial_key(serial).is_some_and(|k| self.index.contains_key(&k))
    }

    /// Like [`Self::modify_with`], but `edit` says whether it changed anything: when it
    /// returns `false` the device is left as it was and nothing is logged. `None` if the
    /// serial is not assigned, else `Some(changed)`.
    pub fn modify_if(
        &mut self,
        serial: &str,
        now: i64,
        edit: impl FnOnce(&mut Map<String, Value>) -> bool,
    ) -> Option<bool> {
        self.edit(serial, now, |map, _, _| edit(map))
    }

    /// The common part of [`Self::modify_with`] and [`Self::modify_if`].
    fn edit(
        &mut self,
        serial: &str,
        now: i64,
        edit: impl FnOnce(&mut Map<String, Value>, &mut ChaCha8Rng, &[String]) -> bool,
    ) -> Option<bool> {
        let &seq = serial_key(serial).and_then(|k| self.index.get(&k))?;
        let profiles = self.generator.profiles().clone();
        let current = self.members.get_mut(&seq).expect("index and members agree");
        let mut map = current.to_map(&profiles);
        if !edit(&mut map, &mut self.mutator, &profiles) {
            return Some(false);
        }
        map.insert(
            "serial_number".into(),
            Value::String(serial_str(&current.serial()).to_owned()),
        );
        // Per-record fields, not the device's: the page writes them.
        for key in ["op_type", "op_date", "released_by_replacement"] {
            map.remove(key);
        }
        let device = Device::from_map(current.serial(), &map);
        let prev = std::mem::replace(current, device.clone());
        self.log.push(LogEntry {
            op: OpType::Modified,
            op_date: now,
            device,
            prev: Some(prev),
            by_replacement: false,
        });
        Some(true)
    }

    /// A realistic change (docs/apple-dep-api.md §7.5) to each listed device; returns how many were assigned.
    pub fn modify(&mut self, serials: &[String], now: i64) -> usize {
        serials
            .iter()
            .filter(|s| {
                self.modify_with(s, now, |map, rng, profiles| {
                    devices::realistic_change(map, now, rng, profiles)
                })
            })
            .count()
    }

    /// Unassigns the device, remembering it among the departed.
    fn remove(&mut self, serial: &str) -> Option<Device> {
        let key = serial_key(serial)?;
        let seq = self.index.remove(&key)?;
        let device = self.members.remove(&seq).expect("index and members agree");
        self.departed.insert(key, device.clone());
        Some(device)
    }

    /// Unassigns `serial`, logged `deleted` at `now` with its last fields; `None` if it is
    /// not assigned.
    fn delete_one(&mut self, serial: &str, now: i64, by_replacement: bool) -> Option<Device> {
        let device = self.remove(serial)?;
        self.log.push(LogEntry {
            op: OpType::Deleted,
            op_date: now,
            device: device.clone(),
            prev: None,
            by_replacement,
        });
        Some(device)
    }

    /// Unassigns the listed devices, logged `deleted` with their last fields; returns how many
    /// were assigned.
    pub fn delete(&mut self, serials: &[String], now: i64) -> usize {
        serials
            .iter()
            .filter(|s| self.delete_one(s, now, false).is_some())
            .count()
    }

    /// Apple replaces each listed assigned device: the original is logged `deleted` (released
    /// by replacement) and a new device of the same family and model is logged `added` (a
    /// replacement device whose details name the original and `now`'s date). Returns
    /// `(original, replacement)` pairs in order; unassigned serials are skipped.
    pub fn replace(&mut self, serials: &[String], now: i64) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        for serial in serials {
            let Some(original) = self.delete_one(serial, now, true) else {
                continue;
            };
            let new = loop {
                let device = self.generator.replacement(&original, now);
                let key = device.serial();
                if self.admit(Device::Generated(device), now) {
                    break key;
                }
            };
            self.replacements.insert(
                new,
                Replacement {
                    original: original.serial(),
                    date: now,
                },
            );
            pairs.push((serial.clone(), serial_str(&new).to_owned()));
        }
        pairs
    }

    /// Devices that left (deleted, released or replaced) are assigned again at `now`, same
    /// serial and hardware, logged `added` (see [`Device::returned`]); returns how many of
    /// the serials had left. Assigned or never-seen serials are skipped.
    pub fn reassign(&mut self, serials: &[String], now: i64) -> usize {
        let profiles = self.profiles().clone();
        let mut n = 0;
        for serial in serials {
            let Some(key) = serial_key(serial) else {
                continue;
            };
            let Some(device) = self.departed.remove(&key) else {
                continue;
            };
            let admitted = self.admit(device.returned(now, &profiles), now);
            debug_assert!(admitted, "a departed serial is free");
            n += 1;
        }
        n
    }

    /// The original's serial and the replacement date (Unix seconds) of replacement device
    /// `serial`; `None` if it is not one.
    pub fn replacement(&self, serial: &str) -> Option<(String, i64)> {
        let r = self.replacements.get(&serial_key(serial)?)?;
        Some((serial_str(&r.original).to_owned(), r.date))
    }

    /// Unassigns without a log entry, as releasing a device from the organisation in ABM
    /// does (docs/apple-dep-api.md §7.3); returns how many were assigned.
    pub fn remove_silently(&mut self, serials: &[String]) -> usize {
        serials.iter().filter(|s| self.remove(s).is_some()).count()
    }

    /// Up to `count` distinct assigned serials chosen at random, in insertion order.
    pub fn pick(&mut self, count: usize) -> Vec<String> {
        let len = self.members.len();
        if count >= len {
            return self
                .members
                .values()
                .map(|d| serial_str(&d.serial()).to_owned())
                .collect();
        }
        let chosen: BTreeSet<u64> = if count * 2 > len {
            let mut seqs: Vec<u64> = self.members.keys().copied().collect();
            let (picked, _) = seqs.partial_shuffle(&mut self.mutator, count);
            picked.iter().copied().collect()
        } else {
            // Probing stays O(count log n) however large the store; at most half the
            // devices are wanted, so repeats are rare.
            let first = *self
                .members
                .keys()
                .next()
                .expect("count < len, so not empty");
            let last = *self.members.keys().next_back().expect("not empty");
            let mut chosen = BTreeSet::new();
            while chosen.len() < count {
                let probe = self.mutator.random_range(first..=last);
                if let Some((&seq, _)) = self.members.range(probe..).next() {
                    chosen.insert(seq);
                }
            }
            chosen
        };
        chosen
            .iter()
            .map(|seq| serial_str(&self.members[seq].serial()).to_owned())
            .collect()
    }

    /// Every assigned device with its serial, sorted by serial, and the profile UUIDs
    /// needed to render them.
    pub fn snapshot_by_serial(&self) -> (Vec<(Serial, Device)>, Arc<[String]>) {
        let mut all: Vec<(Serial, Device)> = self
            .members
            .values()
            .map(|d| (d.serial(), d.clone()))
            .collect();
        all.sort_unstable_by_key(|a| a.0);
        (all, self.profiles().clone())
    }

    /// Every assigned device in insertion order with its generated summary (see
    /// [`Device::summary`]), for the organisation inventory built at start.
    pub fn summaries(&self) -> Vec<(Serial, Option<devices::Summary>)> {
        self.members
            .values()
            .map(|d| (d.serial(), d.summary()))
            .collect()
    }

    /// Every assigned serial, sorted.
    pub fn serials_sorted(&self) -> Vec<String> {
        let mut all: Vec<&Serial> = self.index.keys().collect();
        all.sort_unstable();
        all.into_iter().map(|s| serial_str(s).to_owned()).collect()
    }

    fn decode(&self, cursor: &str, ctx: CursorContext) -> Result<Position, CursorError> {
        let c = Cursor::decode(cursor).ok_or(CursorError::Invalid)?;
        if c.instance != ctx.instance {
            return Err(CursorError::Invalid);
        }
        if ctx.now_ms.saturating_sub(c.issued_ms) > ctx.ttl_ms {
            return Err(CursorError::Expired);
        }
        let log_len = self.log.len() as u64;
        match c.position {
            Position::Fetch {
                last_seq,
                start_pos,
            } if start_pos > log_len || last_seq >= self.next_seq => Err(CursorError::Invalid),
            Position::Sync { pos } if pos > log_len => Err(CursorError::Invalid),
            p => Ok(p),
        }
    }

    fn issue(position: Position, ctx: CursorContext) -> String {
        Cursor {
            position,
            issued_ms: ctx.now_ms,
            instance: ctx.instance,
        }
        .encode()
    }

    /// `POST /server/devices`: the next page of current members after the cursor's position.
    pub fn fetch(
        &self,
        cursor: Option<&str>,
        limit: usize,
        ctx: CursorContext,
        fault: Option<PageFault>,
    ) -> Result<Page, CursorError> {
        let (last_seq, start_pos) = match cursor {
            None => (0, self.log.len() as u64),
            Some(c) => match self.decode(c, ctx)? {
                Position::Fetch {
                    last_seq,
                    start_pos,
                } => (last_seq, start_pos),
                // A finished fetch's cursor is a sync position: "the cursor had returned all
                // devices in previous calls" (docs/apple-dep-api.md §4.3).
                Position::Sync { .. } => return Err(CursorError::Exhausted),
            },
        };
        let mut records: Vec<Record> = Vec::with_capacity(limit.min(self.members.len()));
        let mut new_last = last_seq;
        for (&seq, device) in self.members.range(last_seq + 1..).take(limit) {
            records.push(Record {
                device: device.clone(),
                op: None,
                by_replacement: false,
            });
            new_last = seq;
        }
        let more = self.members.range(new_last + 1..).next().is_some();
        let next = if more {
            Position::Fetch {
                last_seq: new_last,
                start_pos,
            }
        } else {
            // Changes made while this fetch ran are in the log after `start_pos`; the
            // following sync delivers them (at least once).
            Position::Sync { pos: start_pos }
        };
        let mut page = Page {
            records,
            profiles: self.profiles().clone(),
            cursor: Self::issue(next, ctx),
            more_to_follow: more,
        };
        match fault {
            Some(PageFault::SameCursor) => {
                page.cursor = match cursor {
                    Some(c) => c.to_owned(),
                    None => Self::issue(
                        Position::Fetch {
                            last_seq,
                            start_pos,
                        },
                        ctx,
                    ),
                };
                page.more_to_follow = true;
            }
            Some(PageFault::DuplicateSerial) => {
                if let Some(first) = page.records.first().cloned() {
                    page.records.push(first);
                }
            }
            None => {}
        }
        Ok(page)
    }

    /// `POST /devices/sync`: log entries after the cursor's position.
    pub fn sync(
        &self,
        cursor: Option<&str>,
        limit: usize,
        ctx: CursorContext,
        fault: Option<PageFault>,
    ) -> Result<Page, CursorError> {
        let cursor = cursor.ok_or(CursorError::Required)?;
        let pos = match self.decode(cursor, ctx)? {
            Position::Sync { pos } => pos,
            // A cursor from the middle of a fetch: sync from where that fetch began, so
            // nothing changed since is missed.
            Position::Fetch { start_pos, .. } => start_pos,
        } as usize;
        let end = (pos + limit).min(self.log.len());
        let entries = &self.log[pos..end];
        let mut records: Vec<Record> = entries
            .iter()
            .map(|e| Record {
                device: e.device.clone(),
                op: Some((e.op, e.op_date)),
                by_replacement: e.by_replacement,
            })
            .collect();
        let more = end < self.log.len();
        let mut page = Page {
            records: Vec::new(),
            profiles: self.profiles().clone(),
            cursor: Self::issue(Position::Sync { pos: end as u64 }, ctx),
            more_to_follow: more,
        };
        match fault {
            Some(PageFault::SameCursor) => {
                page.cursor = cursor.to_owned();
                page.more_to_follow = true;
            }
            Some(PageFault::DuplicateSerial) => {
                if let Some(newest) = entries.last() {
                    records.push(stale_twin(newest));
                }
            }
            None => {}
        }
        page.records = records;
        Ok(page)
    }
}

/// An older record of the same device than `newest`, to be placed after it so that array
/// order and op_date order disagree (docs/apple-dep-api.md §4.4: "the record with the latest op_date indicates
/// the last known state"). A client that trusts array order ends in a visibly wrong state:
/// a re-added device deleted, a deleted one resurrected, a modification undone.
fn stale_twin(newest: &LogEntry) -> Record {
    let (device, op) = match newest.op {
        OpType::Added => (newest.device.clone(), OpType::Deleted),
        OpType::Modified => (
            newest.prev.clone().unwrap_or_else(|| newest.device.clone()),
            OpType::Modified,
        ),
        OpType::Deleted => (newest.device.clone(), OpType::Modified),
    };
    Record {
        device,
        op: Some((op, newest.op_date - 60)),
        by_replacement: false,
    }
}

impl Page {
    /// The response body, `application/json;charset=UTF8`.
    pub fn render(&self, fetched_until: i64, proto: u32) -> String {
        let mut out = String::with_capacity(self.records.len() * 420 + 200);
        out.push_str(r#"{"devices":["#);
        for (i, record) in self.records.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            record.device.render(&mut out, proto, &self.profiles);
            if let Some((op, op_date)) = record.op {
                // Reopen the object just written to append the sync fields.
                out.pop();
                if !out.ends_with('{') {
                    out.push(',');
                }
                out.push_str(r#""op_type":""#);
                out.push_str(op.as_str());
                out.push_str(r#"","op_date":""#);
                rfc3339::push(&mut out, op_date);
                out.push('"');
                if op == OpType::Deleted && proto >= PROTOCOL_V10 {
                    out.push_str(r#","released_by_replacement":"#);
                    out.push_str(if record.by_replacement {
                        "true"
                    } else {
                        "false"
                    });
                }
                out.push('}');
            }
        }
        out.push_str(r#"],"cursor":"#);
        // A cursor echoed by the same-cursor fault is client text: escape it.
        out.push_str(&Value::String(self.cursor.clone()).to_string());
        out.push_str(r#","fetched_until":""#);
        rfc3339::push(&mut out, fetched_until);
        out.push_str(r#"","more_to_follow":"#);
        out.push_str(if self.more_to_follow { "true" } else { "false" });
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_720_000_000_000;

    fn ctx() -> CursorContext {
        CursorContext {
            now_ms: NOW_MS,
            instance: 42,
            ttl_ms: 7 * 86_400_000,
        }
    }

    impl Store {
        /// A sync cursor at the end of the log, as a finished fetch would hand out.
        fn sync_start(&self, ctx: CursorContext) -> String {
            Store::issue(
                Position::Sync {
                    pos: self.log.len() as u64,
                },
                ctx,
            )
        }
    }

    fn body(page: &Page) -> Value {
        serde_json::from_str(&page.render(NOW_MS / 1000, 7)).unwrap()
    }

    fn serials(v: &Value) -> Vec<String> {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["serial_number"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn fetch_pages_through_every_member_once() {
        let store = Store::new(2500, 1);
        let mut cursor: Option<String> = None;
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let page = store.fetch(cursor.as_deref(), 1000, ctx(), None).unwrap();
            let v = body(&page);
            pages += 1;
            seen.extend(serials(&v));
            assert!(v["devices"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d.get("op_type").is_none()));
            cursor = Some(v["cursor"].as_str().unwrap().to_owned());
            if !v["more_to_follow"].as_bool().unwrap() {
                break;
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.len(), 2500);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 2500);
        assert_eq!(
            store.fetch(cursor.as_deref(), 1000, ctx(), None).err(),
            Some(CursorError::Exhausted)
        );
    }

    #[test]
    fn changes_during_a_fetch_reach_the_following_sync() {
        let mut store = Store::new(10, 1);
        let first = store.fetch(None, 5, ctx(), None).unwrap();
        let added = store.add(1, NOW_MS / 1000);
        let c = first.cursor.clone();
        let last = store.fetch(Some(&c), 100, ctx(), None).unwrap();
        assert!(!last.more_to_follow);
        // The added device is a member, so the fetch returns it...
        assert!(serials(&body(&last)).contains(&added[0]));
        // ...and the sync from the finished fetch's cursor reports it too.
        let sync = store.sync(Some(&last.cursor), 100, ctx(), None).unwrap();
        let v = body(&sync);
        assert_eq!(serials(&v), added);
        assert_eq!(v["devices"][0]["op_type"], "added");
    }

    #[test]
    fn an_edit_cannot_change_the_serial_and_the_duplicate_twin_is_the_state_before_it() {
        let mut store = Store::new(3, 1);
        let start = store.sync_start(ctx());
        let serial = store.serials_sorted()[0].clone();
        assert!(store.modify_with(&serial, NOW_MS / 1000, |d, _, _| {
            d.insert("serial_number".into(), "HIJACKED0000".into());
            d.insert("asset_tag".into(), "NEW-TAG".into());
        }));
        assert!(store.serials_sorted().contains(&serial));
        let page = store
            .sync(Some(&start), 100, ctx(), Some(PageFault::DuplicateSerial))
            .unwrap();
        let v = body(&page);
        assert_eq!(serials(&v), vec![serial.clone(), serial]);
        let (newest, twin) = (&v["devices"][0], &v["devices"][1]);
        assert_eq!(newest["asset_tag"], "NEW-TAG");
        assert_ne!(twin["asset_tag"], "NEW-TAG");
        assert_eq!(twin["op_type"], "modified");
        assert!(twin["op_date"].as_str() < newest["op_date"].as_str());
    }

    #[test]
    fn a_million_devices_are_generated_quickly() {
        // Debug builds are several times slower than release; the bound is for release
        // (well under 2 s) and only logged here.
        let t = std::time::Instant::now();
        let store = Store::new(
            if cfg!(debug_assertions) {
                100_000
            } else {
                1_000_000
            },
            1,
        );
        eprintln!("generated {} devices in {:?}", store.len(), t.elapsed());
        if !cfg!(debug_assertions) {
            assert!(t.elapsed() < std::time::Duration::from_secs(2));
        }
    }
}
