//! `[[profiles]]`, `[[assign]]` and `[assignment]`: enrollment profiles as files and the
//! rules that give devices their profile (docs/apple-dep-api.md §4.9).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{check_name, duration_in, resolve};

/// The keys Apple documents for a profile (docs/apple-dep-api.md §4.9, from Apple's
/// Profile schema), with the JSON type each must have.
pub const PROFILE_KEYS: [(&str, ProfileValue); 22] = [
    ("profile_name", ProfileValue::Text),
    ("url", ProfileValue::Text),
    ("configuration_web_url", ProfileValue::Text),
    ("allow_pairing", ProfileValue::Bool),
    ("is_supervised", ProfileValue::Bool),
    ("is_multi_user", ProfileValue::Bool),
    ("is_mandatory", ProfileValue::Bool),
    ("await_device_configured", ProfileValue::Bool),
    ("is_mdm_removable", ProfileValue::Bool),
    ("auto_advance_setup", ProfileValue::Bool),
    ("support_phone_number", ProfileValue::Text),
    ("support_email_address", ProfileValue::Text),
    ("org_magic", ProfileValue::Text),
    ("anchor_certs", ProfileValue::TextList),
    ("supervising_host_certs", ProfileValue::TextList),
    ("skip_setup_items", ProfileValue::TextList),
    ("department", ProfileValue::Text),
    ("devices", ProfileValue::TextList),
    ("language", ProfileValue::Text),
    ("region", ProfileValue::Text),
    ("do_not_use_profile_from_backup", ProfileValue::Bool),
    ("is_return_to_service", ProfileValue::Bool),
];

/// A profile key's JSON type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileValue {
    /// A string.
    Text,
    /// A boolean.
    Bool,
    /// A list of strings.
    TextList,
}

/// Default wait before a device Apple answered `FAILED` for is tried again.
pub const DEFAULT_FAILED_COOLDOWN: Duration = Duration::from_secs(24 * 3600);
/// Default wait after `THROTTLED` when Apple names none (`retry_after_seconds`, protocol 10).
pub const DEFAULT_THROTTLED_WAIT: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfile {
    name: String,
    file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAssign {
    token: Option<String>,
    profile: String,
    #[serde(default, rename = "match")]
    matches: RawMatch,
    on: Option<Vec<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    device_family: Option<String>,
    model: Option<String>,
    os: Option<String>,
    serial: Option<String>,
    purchase_source_type: Option<String>,
    order_number: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAssignment {
    failed_cooldown: Option<String>,
    throttled_wait: Option<String>,
}

/// One `[[profiles]]` entry: a profile as a file of Apple's profile JSON.
#[derive(Clone, Debug)]
pub struct ProfileConfig {
    /// Name rules refer to.
    pub name: String,
    /// The JSON file; read again at every assignment pass, so an edit takes effect (the
    /// profile is defined again and its devices re-assigned).
    pub file: PathBuf,
}

/// When a rule assigns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Triggers {
    /// Devices new to the server (reason `assigned`).
    pub assigned: bool,
    /// Devices back to the server (reason `returned`).
    pub returned: bool,
    /// Any matching device without the profile after a full fetch.
    pub full_fetch: bool,
}

impl Default for Triggers {
    fn default() -> Self {
        Self {
            assigned: true,
            returned: true,
            full_fetch: true,
        }
    }
}

/// What a rule matches; every given field must match (case-insensitive, the serial as a
/// glob).
#[derive(Clone, Debug, Default)]
pub struct Match {
    /// `device_family`, e.g. `Mac`.
    pub device_family: Option<String>,
    /// `model`, e.g. `iPad Air`.
    pub model: Option<String>,
    /// `os`, e.g. `iPadOS`.
    pub os: Option<String>,
    /// A glob of the serial number, e.g. `C02*`.
    pub serial: Option<globset::GlobMatcher>,
    /// The organisation's `purchase_source_type` (needs an organisation account).
    pub purchase_source_type: Option<String>,
    /// The organisation's `order_number` (needs an organisation account).
    pub order_number: Option<String>,
}

impl Match {
    /// The fields it constrains, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("device_family", &self.device_family),
            ("model", &self.model),
            ("os", &self.os),
            ("purchase_source_type", &self.purchase_source_type),
            ("order_number", &self.order_number),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k} = {v:?}"));
            }
        }
        if let Some(g) = &self.serial {
            parts.push(format!("serial = {:?}", g.glob().glob()));
        }
        if parts.is_empty() {
            "every device".into()
        } else {
            parts.join(", ")
        }
    }

    /// Whether the rule needs the organisation's inventory.
    pub fn needs_org(&self) -> bool {
        self.purchase_source_type.is_some() || self.order_number.is_some()
    }
}

/// One `[[assign]]` rule.
#[derive(Clone, Debug)]
pub struct AssignRule {
    /// Its position (1-based) among the rules, for messages.
    pub number: usize,
    /// Only this token; `None`: every token.
    pub token: Option<String>,
    /// The profile to give; `None` (`profile = "none"`): matching devices get none, and
    /// later rules do not apply to them.
    pub profile: Option<String>,
    /// What it matches.
    pub matches: Match,
    /// When it assigns.
    pub on: Triggers,
}

/// `[assignment]`: retry timing.
#[derive(Clone, Debug, PartialEq)]
pub struct AssignmentSettings {
    /// Wait before a `FAILED` device is tried again.
    pub failed_cooldown: Duration,
    /// Wait after `THROTTLED` when Apple names none.
    pub throttled_wait: Duration,
}

impl Default for AssignmentSettings {
    fn default() -> Self {
        Self {
            failed_cooldown: DEFAULT_FAILED_COOLDOWN,
            throttled_wait: DEFAULT_THROTTLED_WAIT,
        }
    }
}

pub(super) fn resolve_profile(
    i: usize,
    raw: RawProfile,
    base: &Path,
    check_files: bool,
) -> Result<ProfileConfig, (String, String)> {
    let key = |k: &str| format!("profiles[{i}].{k}");
    check_name(&raw.name).map_err(|r| (key("name"), r))?;
    if raw.name == "none" {
        return Err((
            key("name"),
            "\"none\" means \"no profile\" in [[assign]] rules; give the profile another name"
                .into(),
        ));
    }
    let file = resolve(base, raw.file);
    if check_files {
        read_profile(&file).map_err(|r| (key("file"), r))?;
    }
    Ok(ProfileConfig {
        name: raw.name,
        file,
    })
}

/// Reads and checks a profile file: a JSON object with only the keys Apple documents
/// ([`PROFILE_KEYS`]), each of its type, `profile_name` and `url` present.
pub fn read_profile(path: &Path) -> Result<Map<String, Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the profile {}: {e}; write Apple's profile JSON there (profile_name, url, …)",
            path.display()
        )
    })?;
    if text.len() > 1024 * 1024 {
        return Err(format!(
            "{} is larger than 1 MiB; a profile is a few KB",
            path.display()
        ));
    }
    let value: Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let Value::Object(map) = value else {
        return Err(format!(
            "{} must hold a JSON object (Apple's profile)",
            path.display()
        ));
    };
    check_profile(&map).map_err(|r| format!("{}: {r}", path.display()))?;
    Ok(map)
}

fn check_profile(map: &Map<String, Value>) -> Result<(), String> {
    for (k, v) in map {
        let Some((_, kind)) = PROFILE_KEYS.iter().find(|(name, _)| name == k) else {
            return Err(format!(
                "{:?} is not a key of Apple's profile (docs/apple-dep-api.md §4.9); the keys are: {}",
                crate::model::printable(k),
                PROFILE_KEYS.map(|p| p.0).join(", ")
            ));
        };
        let ok = match kind {
            ProfileValue::Text => v.is_string(),
            ProfileValue::Bool => v.is_boolean(),
            ProfileValue::TextList => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        };
        if !ok {
            let want = match kind {
                ProfileValue::Text => "a string",
                ProfileValue::Bool => "true or false",
                ProfileValue::TextList => "a list of strings",
            };
            return Err(format!("\"{k}\" must be {want}"));
        }
    }
    for required in ["profile_name", "url"] {
        if map
            .get(required)
            .and_then(Value::as_str)
            .is_none_or(|s| s.trim().is_empty())
        {
            return Err(format!(
                "\"{required}\" is required (Apple refuses a profile without it)"
            ));
        }
    }
    if map
        .get("profile_name")
        .and_then(Value::as_str)
        .is_some_and(|s| s.chars().count() > 125)
    {
        return Err("\"profile_name\" is longer than Apple's 125 characters".into());
    }
    if map.get("is_mdm_removable") == Some(&Value::Bool(false))
        && map.get("is_supervised") != Some(&Value::Bool(true))
    {
        return Err(
            "\"is_mdm_removable\": false needs \"is_supervised\": true (Apple's rule)".into(),
        );
    }
    Ok(())
}

pub(super) fn resolve_rule(
    i: usize,
    raw: RawAssign,
    profiles: &[ProfileConfig],
    tokens: &[String],
    has_org: bool,
) -> Result<AssignRule, (String, String)> {
    let key = |k: &str| format!("assign[{i}].{k}");
    if let Some(t) = &raw.token {
        if !tokens.contains(t) {
            return Err((
                key("token"),
                format!(
                    "no [[tokens]] entry is named {t:?}; configured: {}",
                    if tokens.is_empty() {
                        "none".into()
                    } else {
                        tokens.join(", ")
                    }
                ),
            ));
        }
    }
    let profile = if raw.profile == "none" {
        None
    } else if profiles.iter().any(|p| p.name == raw.profile) {
        Some(raw.profile)
    } else {
        return Err((
            key("profile"),
            format!(
                "no [[profiles]] entry is named {:?}; add one (name, file) or write \"none\"",
                raw.profile
            ),
        ));
    };
    let m = raw.matches;
    let serial = match m.serial {
        None => None,
        Some(g) => Some(
            globset::GlobBuilder::new(&g)
                .case_insensitive(true)
                .build()
                .map_err(|e| (key("match.serial"), format!("{g:?} is not a glob ({e})")))?
                .compile_matcher(),
        ),
    };
    let matches = Match {
        device_family: m.device_family,
        model: m.model,
        os: m.os,
        serial,
        purchase_source_type: m.purchase_source_type,
        order_number: m.order_number,
    };
    if matches.needs_org() && !has_org {
        return Err((
            key("match"),
            "purchase_source_type and order_number come from the organisation's inventory; configure an [[org_accounts]] entry or drop them".into(),
        ));
    }
    let on = match raw.on {
        None => Triggers::default(),
        Some(list) => {
            let mut t = Triggers {
                assigned: false,
                returned: false,
                full_fetch: false,
            };
            for w in &list {
                match w.as_str() {
                    "assigned" => t.assigned = true,
                    "returned" => t.returned = true,
                    "full_fetch" => t.full_fetch = true,
                    other => {
                        return Err((
                            key("on"),
                            format!("{other:?} is not a trigger; use \"assigned\" (new to the server), \"returned\" (back to it) or \"full_fetch\" (any matching device without the profile after a full fetch)"),
                        ))
                    }
                }
            }
            if list.is_empty() {
                return Err((
                    key("on"),
                    "an empty list would never assign; leave `on` out for every trigger".into(),
                ));
            }
            t
        }
    };
    Ok(AssignRule {
        number: i + 1,
        token: raw.token,
        profile,
        matches,
        on,
    })
}

pub(super) fn resolve_assignment(
    raw: Option<RawAssignment>,
) -> Result<AssignmentSettings, (String, String)> {
    let mut s = AssignmentSettings::default();
    if let Some(r) = raw {
        s.failed_cooldown = duration_in(
            r.failed_cooldown.as_deref(),
            s.failed_cooldown,
            Duration::from_secs(60),
            Duration::from_secs(30 * 86_400),
        )
        .map_err(|e| ("assignment.failed_cooldown".into(), e))?;
        s.throttled_wait = duration_in(
            r.throttled_wait.as_deref(),
            s.throttled_wait,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )
        .map_err(|e| ("assignment.throttled_wait".into(), e))?;
    }
    Ok(s)
}

/// Pairs of rules a device could match both of, with different outcomes: the first wins,
/// which `check-config` says, so the order is a choice and not an accident.
pub fn overlaps(rules: &[AssignRule]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in rules.iter().enumerate() {
        for b in &rules[i + 1..] {
            if a.profile == b.profile {
                continue;
            }
            let tokens_meet = match (&a.token, &b.token) {
                (Some(x), Some(y)) => x == y,
                _ => true,
            };
            let same = |x: &Option<String>, y: &Option<String>| match (x, y) {
                (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
                _ => true,
            };
            let (ma, mb) = (&a.matches, &b.matches);
            let serials_meet = match (&ma.serial, &mb.serial) {
                (Some(x), Some(y)) => {
                    let (gx, gy) = (x.glob().glob(), y.glob().glob());
                    let literal = |g: &str| !g.contains(['*', '?', '[', '{']);
                    !(literal(gx) && literal(gy) && !gx.eq_ignore_ascii_case(gy))
                }
                _ => true,
            };
            if tokens_meet
                && serials_meet
                && same(&ma.device_family, &mb.device_family)
                && same(&ma.model, &mb.model)
                && same(&ma.os, &mb.os)
                && same(&ma.purchase_source_type, &mb.purchase_source_type)
                && same(&ma.order_number, &mb.order_number)
            {
                let name = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".into());
                out.push(format!(
                    "[[assign]] rules {} ({} → {}) and {} ({} → {}) can both match one device; rule {} wins for it. If that is not what you mean, narrow a `match` or reorder the rules",
                    a.number,
                    ma.describe(),
                    name(&a.profile),
                    b.number,
                    mb.describe(),
                    name(&b.profile),
                    a.number
                ));
            }
        }
    }
    out
}

/// Appends profiles, rules and the assignment settings to `check-config`'s TOML.
pub(super) fn assign_to_toml(
    s: &mut String,
    profiles: &[ProfileConfig],
    rules: &[AssignRule],
    settings: &AssignmentSettings,
) {
    use std::fmt::Write;
    if rules.is_empty() && profiles.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n[assignment]\nfailed_cooldown = {:?}\nthrottled_wait = {:?}",
        humantime::format_duration(settings.failed_cooldown).to_string(),
        humantime::format_duration(settings.throttled_wait).to_string()
    );
    for p in profiles {
        let _ = writeln!(
            s,
            "\n[[profiles]]\nname = {:?}\nfile = {:?}",
            p.name,
            p.file.display().to_string()
        );
    }
    for r in rules {
        let _ = writeln!(s, "\n[[assign]]");
        if let Some(t) = &r.token {
            let _ = writeln!(s, "token = {t:?}");
        }
        let _ = writeln!(s, "profile = {:?}", r.profile.as_deref().unwrap_or("none"));
        let _ = writeln!(s, "# match: {}", r.matches.describe());
        let on: Vec<&str> = [
            (r.on.assigned, "assigned"),
            (r.on.returned, "returned"),
            (r.on.full_fetch, "full_fetch"),
        ]
        .into_iter()
        .filter(|(b, _)| *b)
        .map(|(_, n)| n)
        .collect();
        let _ = writeln!(s, "on = {on:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_keys_are_those_of_apples_profile_schema() {
        // Apple's Profile object as published in micromdm/apple-device-services (see
        // tests/fixtures/apple/SOURCES.md); `profile_uuid` is Apple's answer, not input.
        let schema: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/apple/apple-device-services-Profile.schema.json"
        ))
        .unwrap();
        let props = schema["properties"].as_object().unwrap();
        let mut want: Vec<&str> = props
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "profile_uuid")
            .collect();
        want.sort();
        let mut have: Vec<&str> = PROFILE_KEYS.iter().map(|k| k.0).collect();
        have.sort();
        assert_eq!(have, want);
        for (k, kind) in PROFILE_KEYS {
            let t = props[k]["type"].as_str().unwrap();
            let expect = match kind {
                ProfileValue::Text => "string",
                ProfileValue::Bool => "boolean",
                ProfileValue::TextList => "array",
            };
            assert_eq!(t, expect, "{k}");
        }
    }

    #[test]
    fn profiles_hold_only_apples_keys_of_the_right_type() {
        let ok = json!({"profile_name": "Corp", "url": "https://mdm.example.com/enroll",
            "is_supervised": true, "skip_setup_items": ["Location"]});
        assert!(check_profile(ok.as_object().unwrap()).is_ok());
        let e = check_profile(
            json!({"profile_name": "x", "url": "u", "is_supervized": true})
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("\"is_supervized\" is not a key"), "{e}");
        let e = check_profile(
            json!({"profile_name": "x", "url": "u", "is_supervised": "yes"})
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("true or false"), "{e}");
        let e = check_profile(json!({"url": "u"}).as_object().unwrap()).unwrap_err();
        assert!(e.contains("profile_name"), "{e}");
        let e = check_profile(
            json!({"profile_name": "x", "url": "u", "is_mdm_removable": false})
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("is_supervised"), "{e}");
    }
}
