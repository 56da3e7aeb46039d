//! The opaque cursor strings of fetch and sync (docs/apple-dep-api.md §5.1) and what they stand for.
//!
//! A cursor is unpadded standard base64 of a colon-separated text, as Apple's are:
//! - fetch in progress: `F:<last seq returned>:<log position when the fetch began>:<issued ms>:<instance>`
//! - sync position:     `S:<log position>:<issued ms>:<instance>`
//!
//! A finished fetch hands out a sync cursor at the log position where the fetch began, so
//! the following sync replays every change made while the fetch ran (at least once). The
//! instance tag (random per server start) turns a cursor from an earlier run of the mock into
//! `INVALID_CURSOR` instead of silently pointing into a different change log.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine as _};

/// Writes without padding; reads with or without it.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Apple accepts cursors "up to 1000 characters"; anything longer is not ours.
const MAX_LEN: usize = 1000;

/// Where a cursor points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Position {
    /// Inside a full fetch: the next page starts after device sequence number `last_seq`;
    /// `start_pos` is the change-log length when the fetch began.
    Fetch { last_seq: u64, start_pos: u64 },
    /// A change-log position: sync returns the entries from `pos` on.
    Sync { pos: u64 },
}

/// A decoded cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub position: Position,
    /// Simulated time the cursor was handed out, Unix milliseconds; expiry counts from here.
    pub issued_ms: i64,
    /// The server instance that issued it.
    pub instance: u32,
}

impl Cursor {
    /// The wire form.
    pub fn encode(&self) -> String {
        let text = match self.position {
            Position::Fetch {
                last_seq,
                start_pos,
            } => format!(
                "F:{last_seq}:{start_pos}:{}:{:08x}",
                self.issued_ms, self.instance
            ),
            Position::Sync { pos } => format!("S:{pos}:{}:{:08x}", self.issued_ms, self.instance),
        };
        B64.encode(text)
    }

    /// Parses the wire form; `None` for anything this server could not have issued.
    pub fn decode(s: &str) -> Option<Self> {
        if s.len() > MAX_LEN {
            return None;
        }
        let bytes = B64.decode(s.trim()).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let fields: Vec<&str> = text.split(':').collect();
        let (position, rest) = match fields.as_slice() {
            ["F", last, start, rest @ ..] => (
                Position::Fetch {
                    last_seq: last.parse().ok()?,
                    start_pos: start.parse().ok()?,
                },
                rest,
            ),
            ["S", pos, rest @ ..] => (
                Position::Sync {
                    pos: pos.parse().ok()?,
                },
                rest,
            ),
            _ => return None,
        };
        let [issued, instance] = rest else {
            return None;
        };
        Some(Self {
            position,
            issued_ms: issued.parse().ok()?,
            instance: u32::from_str_radix(instance, 16).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_kinds_as_unpadded_base64() {
        for position in [
            Position::Fetch {
                last_seq: 1000,
                start_pos: 7,
            },
            Position::Sync { pos: 0 },
        ] {
            let c = Cursor {
                position,
                issued_ms: 1_720_000_000_123,
                instance: 0xdead_beef,
            };
            let wire = c.encode();
            assert!(!wire.contains('='), "{wire}");
            assert!(wire
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'));
            assert_eq!(Cursor::decode(&wire), Some(c));
        }
    }

    #[test]
    fn garbage_does_not_decode() {
        for s in [
            "",
            "not base64!",
            "MDowOjE1MzY0Mjc2OTg5MTQ6MTUzNjQyNzY5ODkxNDp0cnVlOjE1MzY0Mjc2OTg5MTQ",
            &B64.encode("S:1:2"),
            &B64.encode("S:x:2:00000001"),
            &B64.encode("Q:1:2:00000001"),
            &"A".repeat(1001),
        ] {
            assert_eq!(Cursor::decode(s), None, "{s}");
        }
    }
}
