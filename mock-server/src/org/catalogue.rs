//! What organisation devices are: a catalogue of consistent products (marketing name,
//! `productType`, capacities, colours, whether they have Ethernet or cellular radios) and the
//! derivation of a device's hardware identifiers (IMEI with a Luhn digit, MEID, EID, MAC
//! addresses, part number) from one 64-bit value, so a device record stays a few dozen bytes.

use std::fmt::Write as _;

/// `productFamily` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    IPhone,
    IPad,
    Mac,
    AppleTv,
    Watch,
    Vision,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::IPhone,
        Family::IPad,
        Family::Mac,
        Family::AppleTv,
        Family::Watch,
        Family::Vision,
    ];

    /// As the API spells it.
    pub fn name(self) -> &'static str {
        match self {
            Family::IPhone => "iPhone",
            Family::IPad => "iPad",
            Family::Mac => "Mac",
            Family::AppleTv => "AppleTV",
            Family::Watch => "Watch",
            Family::Vision => "Vision",
        }
    }

    /// The ADE `device_family` spelling, to match ADE devices to products.
    pub fn from_ade(name: &str) -> Option<Self> {
        Family::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Share (percent) of generated devices.
    pub fn weight(self) -> u32 {
        match self {
            Family::IPhone => 35,
            Family::IPad => 25,
            Family::Mac => 28,
            Family::AppleTv => 4,
            Family::Watch => 5,
            Family::Vision => 3,
        }
    }

    /// `description` of this family's AppleCare+ plan.
    pub fn applecare(self) -> &'static str {
        match self {
            Family::IPhone => "AppleCare+ for iPhone",
            Family::IPad => "AppleCare+ for iPad",
            Family::Mac => "AppleCare+ for Mac",
            Family::AppleTv => "AppleCare+ for Apple TV",
            Family::Watch => "AppleCare+ for Apple Watch",
            Family::Vision => "AppleCare+ for Apple Vision Pro",
        }
    }
}

/// One product of the catalogue.
pub(crate) struct Product {
    pub family: Family,
    /// `deviceModel`.
    pub model: &'static str,
    /// `productType` (Wi-Fi model for iPads).
    pub product_type: &'static str,
    /// `productType` of an iPad's cellular variant.
    pub cellular_type: Option<&'static str>,
    pub capacities: &'static [&'static str],
    pub colors: &'static [&'static str],
    /// The ADE `model` this product corresponds to, if any.
    pub ade_model: &'static str,
    /// Has an Ethernet port (so a non-empty `ethernetMacAddress`).
    pub ethernet: bool,
}

/// One row of [`CATALOGUE`], positionally, so the table stays readable.
#[allow(clippy::too_many_arguments)]
const fn product(
    family: Family,
    model: &'static str,
    product_type: &'static str,
    cellular_type: Option<&'static str>,
    capacities: &'static [&'static str],
    colors: &'static [&'static str],
    ade_model: &'static str,
    ethernet: bool,
) -> Product {
    Product {
        family,
        model,
        product_type,
        cellular_type,
        capacities,
        colors,
        ade_model,
        ethernet,
    }
}

use Family::*;

/// Every product, each family's in one run.
#[rustfmt::skip]
pub(crate) const CATALOGUE: &[Product] = &[
    product(IPhone, "iPhone 16", "iPhone17,3", None, &["128GB", "256GB", "512GB"],
        &["BLACK", "WHITE", "PINK", "TEAL", "ULTRAMARINE"], "iPhone 16", false),
    product(IPhone, "iPhone 15 Pro", "iPhone16,1", None, &["128GB", "256GB", "512GB", "1TB"],
        &["NATURAL TITANIUM", "BLUE TITANIUM", "WHITE TITANIUM", "BLACK TITANIUM"],
        "iPhone 15 Pro", false),
    product(IPhone, "iPhone 15", "iPhone15,4", None, &["128GB", "256GB", "512GB"],
        &["BLACK", "BLUE", "GREEN", "YELLOW", "PINK"], "iPhone 15", false),
    product(IPhone, "iPhone 14", "iPhone14,7", None, &["128GB", "256GB", "512GB"],
        &["MIDNIGHT", "STARLIGHT", "BLUE", "PURPLE", "(PRODUCT)RED"], "iPhone 14", false),
    product(IPhone, "iPhone 13", "iPhone14,5", None, &["128GB", "256GB", "512GB"],
        &["MIDNIGHT", "STARLIGHT", "BLUE", "PINK", "GREEN"], "iPhone 13", false),
    product(IPhone, "iPhone SE (3rd generation)", "iPhone14,6", None, &["64GB", "128GB", "256GB"],
        &["MIDNIGHT", "STARLIGHT", "RED"], "iPhone SE", false),
    product(IPad, "iPad Air 11-inch (M2)", "iPad14,8", Some("iPad14,9"),
        &["128GB", "256GB", "512GB", "1TB"], &["SPACE GRAY", "BLUE", "PURPLE", "STARLIGHT"],
        "iPad Air", false),
    product(IPad, "iPad (10th generation)", "iPad13,18", Some("iPad13,19"), &["64GB", "256GB"],
        &["SILVER", "BLUE", "PINK", "YELLOW"], "iPad", false),
    product(IPad, "iPad Pro 11-inch (M4)", "iPad16,3", Some("iPad16,4"),
        &["256GB", "512GB", "1TB", "2TB"], &["SPACE BLACK", "SILVER"], "iPad Pro", false),
    product(IPad, "iPad Pro 12.9-inch (6th generation)", "iPad14,5", Some("iPad14,6"),
        &["128GB", "256GB", "512GB", "1TB", "2TB"], &["SPACE GRAY", "SILVER"], "iPad Pro", false),
    product(IPad, "iPad mini (A17 Pro)", "iPad16,1", Some("iPad16,2"), &["128GB", "256GB", "512GB"],
        &["SPACE GRAY", "BLUE", "PURPLE", "STARLIGHT"], "iPad mini", false),
    product(Mac, "MacBook Air (M2, 2022)", "Mac14,2", None, &["256GB", "512GB", "1TB", "2TB"],
        &["MIDNIGHT", "STARLIGHT", "SPACE GRAY", "SILVER"], "MacBook Air", false),
    product(Mac, "MacBook Air (15-inch, M3, 2024)", "Mac15,13", None, &["256GB", "512GB", "1TB"],
        &["MIDNIGHT", "STARLIGHT", "SPACE GRAY", "SILVER"], "MacBook Air", false),
    product(Mac, "MacBook Pro (13-inch, M2, 2022)", "Mac14,7", None, &["256GB", "512GB", "1TB"],
        &["SPACE GRAY", "SILVER"], "MacBook Pro", false),
    product(Mac, "MacBook Pro (14-inch, M3 Pro or M3 Max, Nov 2023)", "Mac15,6", None,
        &["512GB", "1TB", "2TB"], &["SPACE BLACK", "SILVER"], "MacBook Pro", false),
    product(Mac, "MacBook Pro (16-inch, Nov 2023)", "Mac15,9", None, &["1TB", "2TB", "4TB"],
        &["SPACE BLACK", "SILVER"], "MacBook Pro", false),
    product(Mac, "iMac (24-inch, 2023)", "Mac15,4", None, &["256GB", "512GB", "1TB"],
        &["BLUE", "GREEN", "PINK", "SILVER", "YELLOW", "ORANGE", "PURPLE"], "iMac", true),
    product(Mac, "Mac mini (2023)", "Mac14,3", None, &["256GB", "512GB", "1TB"], &["SILVER"],
        "Mac mini", true),
    product(Mac, "Mac Studio (2023)", "Mac14,13", None, &["512GB", "1TB", "2TB"], &["SILVER"],
        "Mac Studio", true),
    product(AppleTv, "Apple TV 4K (3rd generation)", "AppleTV14,1", None, &["64GB", "128GB"],
        &["BLACK"], "Apple TV 4K", false),
    product(AppleTv, "Apple TV HD", "AppleTV5,3", None, &["32GB"], &["BLACK"], "Apple TV HD",
        false),
    product(Watch, "Apple Watch Series 9 (GPS, 45mm)", "Watch6,15", None, &["64GB"],
        &["MIDNIGHT", "STARLIGHT", "SILVER", "PINK", "(PRODUCT)RED"], "", false),
    product(Watch, "Apple Watch SE (2nd generation, GPS, 40mm)", "Watch6,10", None, &["32GB"],
        &["MIDNIGHT", "STARLIGHT", "SILVER"], "", false),
    product(Vision, "Apple Vision Pro", "RealityDevice14,1", None, &["256GB", "512GB", "1TB"],
        &["SILVER"], "Apple Vision Pro", false),
];

/// The catalogue product closest to an ADE device: same ADE model and colour, else same
/// model, else the family's first, else the first.
pub(crate) fn for_ade(family: &str, model: &str, color: &str) -> (u8, u8) {
    let index = |p: &Product| p.colors.iter().position(|c| *c == color);
    let by_model = || CATALOGUE.iter().position(|p| p.ade_model == model);
    let found = CATALOGUE
        .iter()
        .position(|p| p.ade_model == model && index(p).is_some())
        .or_else(by_model)
        .or_else(|| {
            let family = Family::from_ade(family)?;
            CATALOGUE.iter().position(|p| p.family == family)
        })
        .unwrap_or(0);
    let color = index(&CATALOGUE[found]).unwrap_or(0);
    (found as u8, color as u8)
}

/// Step `k` of a SplitMix64 stream seeded with `ids`: every identifier of a device is a
/// different step of its one random value.
pub(crate) fn mix(ids: u64, k: u64) -> u64 {
    let mut z = ids.wrapping_add(k.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// IMEI number `k` of a device: 15 digits, a plausible Apple TAC (the same for both of a
/// dual-SIM device), a serial, and the Luhn check digit.
pub(crate) fn imei(ids: u64, k: u64) -> String {
    let mut out = String::with_capacity(15);
    push_imei(&mut out, ids, k);
    out
}

/// [`imei`], appended to `out`.
pub(crate) fn push_imei(out: &mut String, ids: u64, k: u64) {
    const TACS: [&str; 4] = ["35325811", "35391110", "35467111", "35882731"];
    let tac = mix(ids, 9) % TACS.len() as u64;
    let r = mix(ids, 10 + k);
    let start = out.len();
    out.push_str(TACS[tac as usize]);
    push_digits(out, r % 1_000_000, 6);
    let check = luhn(&out[start..]);
    out.push(char::from(b'0' + check));
}

/// `n` as exactly `width` decimal digits (leading zeros; higher digits dropped).
fn push_digits(out: &mut String, n: u64, width: u32) {
    let mut div = 10u64.pow(width - 1);
    while div > 0 {
        out.push(char::from(b'0' + (n / div % 10) as u8));
        div /= 10;
    }
}

/// The Luhn check digit for `digits`.
fn luhn(digits: &str) -> u8 {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                x / 10 + x % 10
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// A 32-digit eUICC id.
pub(crate) fn eid(ids: u64) -> String {
    let mut out = String::with_capacity(32);
    push_eid(&mut out, ids);
    out
}

/// [`eid`], appended to `out`.
pub(crate) fn push_eid(out: &mut String, ids: u64) {
    let (a, b) = (mix(ids, 20), mix(ids, 21));
    out.push_str("89049032");
    push_digits(out, a % 1_000_000_000_000, 12);
    push_digits(out, b % 1_000_000_000_000, 12);
}

/// A MAC address `AA:BB:CC:DD:EE:FF` under one of Apple's OUIs; `plus` is added to the
/// last octet (Bluetooth is Wi-Fi + 1 on Apple hardware).
pub(crate) fn mac(ids: u64, k: u64, plus: u8) -> String {
    let mut out = String::with_capacity(17);
    push_mac(&mut out, ids, k, plus);
    out
}

/// [`mac`], appended to `out`.
pub(crate) fn push_mac(out: &mut String, ids: u64, k: u64, plus: u8) {
    const OUIS: [[u8; 3]; 5] = [
        [0xF0, 0x18, 0x98],
        [0xA4, 0x83, 0xE7],
        [0x3C, 0x22, 0xFB],
        [0xBC, 0xD0, 0x74],
        [0x8C, 0x85, 0x90],
    ];
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let r = mix(ids, 30 + k);
    let oui = OUIS[(r % OUIS.len() as u64) as usize];
    let [_, _, _, _, _, x, y, z] = r.to_be_bytes();
    let octets = [oui[0], oui[1], oui[2], x, y, z.wrapping_add(plus)];
    for (i, o) in octets.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push(char::from(HEX[usize::from(o >> 4)]));
        out.push(char::from(HEX[usize::from(o & 15)]));
    }
}

/// Apple-style part number (`MLY33LL/A`), fixed per product, colour and capacity.
pub(crate) fn part_number(product: u8, color: u8, capacity: u8) -> String {
    const LETTERS: &[u8; 24] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
    let r = mix(
        u64::from(product) << 16 | u64::from(color) << 8 | u64::from(capacity),
        40,
    );
    let mut out = String::with_capacity(10);
    out.push('M');
    out.push(char::from(LETTERS[(r % 24) as usize]));
    out.push(char::from(LETTERS[(r >> 8) as usize % 24]));
    let _ = write!(out, "{:02}LL/A", (r >> 16) % 100);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imeis_pass_the_luhn_check() {
        for ids in 0..500u64 {
            let imei = imei(ids.wrapping_mul(0x1234_5678_9ABC), 0);
            assert_eq!(imei.len(), 15);
            assert_eq!(luhn(&imei[..14]), imei.as_bytes()[14] - b'0');
        }
        // A published example: 49015420323751 → 8.
        assert_eq!(luhn("49015420323751"), 8);
    }

    #[test]
    fn ade_devices_map_to_matching_products() {
        let (p, c) = for_ade("Mac", "MacBook Pro", "SPACE BLACK");
        assert_eq!(CATALOGUE[p as usize].colors[c as usize], "SPACE BLACK");
        assert!(CATALOGUE[p as usize].model.starts_with("MacBook Pro"));
        let (p, _) = for_ade("iPhone", "iPhone SE", "RED");
        assert_eq!(CATALOGUE[p as usize].model, "iPhone SE (3rd generation)");
        let (p, _) = for_ade("Vision", "Unknown", "X");
        assert_eq!(CATALOGUE[p as usize].family, Family::Vision);
        assert_eq!(mac(7, 0, 0).len(), 17);
        assert_eq!(eid(7).len(), 32);
        assert_eq!(part_number(1, 2, 3).len(), 9);
    }
}
