//! The opaque `cursor` of the Apple School and Business Manager API's listings.
//!
//! A cursor names the listing it belongs to, the index the next page starts from, the
//! account and this server's instance (random per start): `d:<start>:<account>:<instance>`
//! for `orgDevices`, `m:...` for `mdmServers`, `s<server>:...` for a server's devices. The
//! wire form is padded standard base64 of three marker bytes and that text, so it always
//! starts with `+/+/` and often ends in `=`: a client that does not percent-encode query
//! values sends a cursor that no longer decodes, and finds out at once.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Bytes whose base64 is `+/+/`.
const MARKER: [u8; 3] = [0xFB, 0xFF, 0xBF];

/// Which listing a cursor walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listing {
    Devices,
    Servers,
    ServerDevices(u8),
}

/// A decoded cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OrgCursor {
    pub listing: Listing,
    /// The next page starts at this index.
    pub start: u32,
    pub account: u32,
    pub instance: u32,
}

impl OrgCursor {
    /// The wire form.
    pub fn encode(&self) -> String {
        let tag = match self.listing {
            Listing::Devices => "d".to_owned(),
            Listing::Servers => "m".to_owned(),
            Listing::ServerDevices(s) => format!("s{s}"),
        };
        let text = format!(
            "{tag}:{}:{}:{:08x}",
            self.start, self.account, self.instance
        );
        let mut bytes = MARKER.to_vec();
        bytes.extend_from_slice(text.as_bytes());
        STANDARD.encode(bytes)
    }

    /// Parses the wire form; `None` for anything this server could not have issued.
    pub fn decode(s: &str) -> Option<Self> {
        if s.len() > 200 {
            return None;
        }
        let bytes = STANDARD.decode(s).ok()?;
        let text = std::str::from_utf8(bytes.strip_prefix(&MARKER)?).ok()?;
        let [tag, start, account, instance] = text.split(':').collect::<Vec<_>>()[..] else {
            return None;
        };
        let listing = match tag {
            "d" => Listing::Devices,
            "m" => Listing::Servers,
            _ => Listing::ServerDevices(tag.strip_prefix('s')?.parse().ok()?),
        };
        Some(Self {
            listing,
            start: start.parse().ok()?,
            account: account.parse().ok()?,
            instance: u32::from_str_radix(instance, 16).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_needs_percent_encoding() {
        for listing in [
            Listing::Devices,
            Listing::Servers,
            Listing::ServerDevices(2),
        ] {
            let c = OrgCursor {
                listing,
                start: 1234,
                account: 1,
                instance: 0xdead_beef,
            };
            let wire = c.encode();
            assert!(wire.starts_with("+/+/"), "{wire}");
            assert_eq!(OrgCursor::decode(&wire), Some(c));
            // What a server sees when the client forgot to encode the `+`.
            assert_eq!(OrgCursor::decode(&wire.replace('+', " ")), None);
        }
        assert_eq!(OrgCursor::decode("MTAwMA"), None);
        assert_eq!(OrgCursor::decode(""), None);
    }
}
