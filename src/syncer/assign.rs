//! Enrollment profile assignment: after a token's sync, the devices the `[[assign]]` rules
//! give a profile they do not have get it (docs/apple-dep-api.md §4.9).
//!
//! [`plan`] is the pure decision (rules, the mirror, past answers → which device gets which
//! profile and why), shared by the pass and `adesync assign --dry-run`. [`assign_token`]
//! defines each profile per token (again when its file changes), assigns in calls of at
//! most 1,000 serials, and commits Apple's answer for each call with its events. A crash
//! between Apple's answer and the commit repeats that one call on the next pass, nothing
//! more: the answers already committed are not asked again.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::PassStore;
use crate::apple::{ApiError, AppleClient};
use crate::config::{AssignRule, Config, TokenConfig};
use crate::model::{format_time, parse_time, Reason};
use crate::store::{
    AssignDevice, AssignInputs, AssignOutcome, ProfileDefinition, Store, StoreError,
};

/// The longest `retry_after_seconds` honoured: a week.
const MAX_RETRY_AFTER_SECS: u64 = 7 * 86_400;

/// Apple's largest assignment call (docs/apple-dep-api.md §4.9).
pub const MAX_SERIALS_PER_CALL: usize = 1000;

/// One device a rule would give its profile now, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// The rule's number (1-based).
    pub rule: usize,
    /// The profile's name.
    pub profile: String,
    /// The device.
    pub serial_number: String,
    /// Why now.
    pub why: &'static str,
}

/// A profile as the pass will assign it: its file's content and its definition state.
#[derive(Clone, Debug)]
pub struct ProfileState {
    /// The file's JSON.
    pub json: Map<String, Value>,
    /// SHA-256 of it (hex).
    pub hash: String,
    /// The token's current definition, if it matches the file.
    pub uuid: Option<String>,
    /// The file changed since the token defined it.
    pub changed: bool,
}

fn field_matches(want: &Option<String>, have: &Option<String>) -> bool {
    match want {
        None => true,
        Some(w) => have.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(w)),
    }
}

/// Whether `rule` matches `d`.
pub fn rule_matches(rule: &AssignRule, d: &AssignDevice) -> bool {
    let m = &rule.matches;
    field_matches(&m.device_family, &d.device_family)
        && field_matches(&m.model, &d.model)
        && field_matches(&m.os, &d.os)
        && field_matches(&m.purchase_source_type, &d.purchase_source_type)
        && field_matches(&m.order_number, &d.order_number)
        && m.serial
            .as_ref()
            .is_none_or(|g| g.is_match(&d.serial_number))
}

/// Which device gets which profile now, and why: the first matching rule decides; a device
/// that already has the profile (Apple says so, or Apple accepted it and no sync has shown
/// otherwise since) is left alone; `NOT_ACCESSIBLE` is not retried (the device left the
/// server) unless it comes back; `FAILED` and `THROTTLED` wait for their `retry_after`.
pub fn plan(
    rules: &[&AssignRule],
    inputs: &AssignInputs,
    profiles: &HashMap<String, ProfileState>,
    now: DateTime<Utc>,
) -> Vec<Planned> {
    let mut out = Vec::new();
    for d in &inputs.devices {
        let Some(rule) = rules.iter().find(|r| rule_matches(r, d)) else {
            continue;
        };
        let Some(profile) = &rule.profile else {
            continue; // `profile = "none"`
        };
        let state = profiles.get(profile);
        let uuid = state.and_then(|s| s.uuid.as_deref());
        if let (Some(u), Some(have)) = (uuid, d.profile_uuid.as_deref()) {
            if have.eq_ignore_ascii_case(u) {
                continue;
            }
        }
        // The triggers, counting only what happened after `since` (a device's last answer:
        // an answer is not asked again for the trigger that led to it).
        let reasons = inputs.triggered.get(&d.serial_number);
        let trigger = |since: Option<&str>| {
            let after = |at: &str| since.is_none_or(|s| at > s);
            let has =
                |r: Reason| reasons.is_some_and(|rs| rs.iter().any(|(x, at)| *x == r && after(at)));
            if has(Reason::Returned) && rule.on.returned {
                Some("back to the server")
            } else if has(Reason::Assigned) && rule.on.assigned {
                Some("new to the server")
            } else if inputs.full_fetch_since
                && rule.on.full_fetch
                && inputs.last_full_fetch_at.as_deref().is_some_and(after)
            {
                Some("without this profile after a full fetch")
            } else {
                None
            }
        };
        let triggered = trigger(None);
        let due = |at: &Option<String>| at.as_deref().and_then(parse_time).is_none_or(|t| t <= now);
        let row = inputs.assignments.get(&d.serial_number);
        let why = match row {
            Some(r) if uuid.is_some_and(|u| u == r.profile_uuid) => match r.status.as_str() {
                // Accepted: left alone until Apple shows something else after a trigger
                // (the device came back, or a full fetch found it without the profile).
                "SUCCESS" => trigger(Some(&r.attempted_at)),
                "NOT_ACCESSIBLE" => trigger(Some(&r.attempted_at))
                    .filter(|w| *w != "without this profile after a full fetch"),
                "FAILED" if due(&r.retry_after) => {
                    Some("Apple answered FAILED; the cooldown is over")
                }
                "THROTTLED" if due(&r.retry_after) => {
                    Some("Apple answered THROTTLED; its wait is over")
                }
                _ => None,
            },
            Some(r)
                if r.profile_name == *profile
                    && r.status == "SUCCESS"
                    && state.is_some_and(|s| s.changed || s.uuid.is_none()) =>
            {
                Some("the profile file changed: defined again, assigned again")
            }
            _ => triggered,
        };
        if let Some(why) = why {
            out.push(Planned {
                rule: rule.number,
                profile: profile.clone(),
                serial_number: d.serial_number.clone(),
                why,
            });
        }
    }
    out
}

/// The rules that apply to `token`, in order.
pub fn rules_for<'a>(config: &'a Config, token: &str) -> Vec<&'a AssignRule> {
    config
        .assign_rules
        .iter()
        .filter(|r| r.token.as_deref().is_none_or(|t| t == token))
        .collect()
}

/// Reads the rules' profile files and compares them with the token's definitions.
pub fn profile_states(
    config: &Config,
    rules: &[&AssignRule],
    inputs: &AssignInputs,
) -> Result<HashMap<String, ProfileState>, String> {
    use sha2::Digest as _;
    let mut out = HashMap::new();
    for name in rules.iter().filter_map(|r| r.profile.as_ref()) {
        if out.contains_key(name) {
            continue;
        }
        let p = config
            .profiles
            .iter()
            .find(|p| &p.name == name)
            .ok_or_else(|| format!("profile {name:?} is not configured"))?;
        let json =
            crate::config::read_profile(&p.file).map_err(|e| format!("profile {name:?}: {e}"))?;
        let hash = format!(
            "{:x}",
            sha2::Sha256::digest(Value::Object(json.clone()).to_string().as_bytes())
        );
        let def = inputs.definitions.get(name);
        let uuid = def
            .filter(|d| d.file_hash == hash)
            .map(|d| d.profile_uuid.clone());
        out.insert(
            name.clone(),
            ProfileState {
                json,
                changed: def.is_some_and(|d| d.file_hash != hash),
                hash,
                uuid,
            },
        );
    }
    Ok(out)
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AssignSummary {
    /// Devices Apple accepted.
    pub success: u64,
    /// `FAILED` (tried again after the cooldown).
    pub failed: u64,
    /// `THROTTLED` (tried again after Apple's wait).
    pub throttled: u64,
    /// `NOT_ACCESSIBLE` (left the server; not tried again).
    pub not_accessible: u64,
    /// Calls to `POST /profile/devices`.
    pub calls: u64,
    /// Profiles defined (`POST /profile`).
    pub defined: u64,
}

/// A failed assignment pass.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// A profile file is unusable.
    #[error("{0}")]
    Profile(String),
    /// Apple refused a call.
    #[error("{0}")]
    Api(#[from] ApiError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A background task died.
    #[error("internal error: {0}")]
    Internal(String),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, AssignError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AssignError::Internal(e.to_string()))?
        .map_err(AssignError::Store)
}

/// One assignment pass of `token` after its sync.
pub async fn assign_token(
    config: &Config,
    token: &TokenConfig,
    client: &AppleClient,
) -> Result<AssignSummary, AssignError> {
    assign_token_on(
        config,
        token,
        client,
        PassStore::fresh(config.database.clone()),
    )
    .await
}

/// [`assign_token`] writing through `store` (the connection holding the token).
pub async fn assign_token_on(
    config: &Config,
    token: &TokenConfig,
    client: &AppleClient,
    store: PassStore,
) -> Result<AssignSummary, AssignError> {
    let rules = rules_for(config, &token.name);
    let mut summary = AssignSummary::default();
    if rules.is_empty() {
        return Ok(summary);
    }
    let (c, name) = (store.clone(), token.name.clone());
    let inputs = blocking(move || c.with(|s| s.assign_inputs(&name))).await?;
    let mut profiles = profile_states(config, &rules, &inputs).map_err(AssignError::Profile)?;
    let now = Utc::now();
    let planned = plan(&rules, &inputs, &profiles, now);
    let mut by_profile: Vec<(String, Vec<String>)> = Vec::new();
    for p in planned {
        match by_profile.iter_mut().find(|(name, _)| *name == p.profile) {
            Some((_, serials)) => serials.push(p.serial_number),
            None => by_profile.push((p.profile, vec![p.serial_number])),
        }
    }
    for (profile, serials) in by_profile {
        let state = profiles
            .get_mut(&profile)
            .expect("planned profiles have a state");
        for batch in serials.chunks(MAX_SERIALS_PER_CALL) {
            let mut redefined = false;
            let answer = loop {
                let uuid = match &state.uuid {
                    Some(u) => u.clone(),
                    None => {
                        let u = client.define_profile(&state.json).await.map_err(|e| {
                            AssignError::Profile(format!(
                                "Apple refused to define profile {profile:?} for token {:?}: {e}; check the profile file against docs/apple-dep-api.md §4.9",
                                token.name
                            ))
                        })?;
                        summary.defined += 1;
                        let def = ProfileDefinition {
                            profile_uuid: u.clone(),
                            file_hash: state.hash.clone(),
                        };
                        let (c, t, p) = (store.clone(), token.name.clone(), profile.clone());
                        blocking(move || {
                            c.with(|s| {
                                s.save_profile_definition(&t, &p, &def, &format_time(Utc::now()))
                            })
                        })
                        .await?;
                        state.uuid = Some(u.clone());
                        state.changed = false;
                        u
                    }
                };
                summary.calls += 1;
                match client.assign_profile(&uuid, batch).await {
                    Ok(a) => break (uuid, a),
                    // Apple no longer knows the profile: define it again, once.
                    Err(ApiError::Http { status: 404, .. }) if !redefined => {
                        tracing::warn!(token = %token.name, profile = %profile, "Apple does not know the profile's UUID any more; defining it again");
                        state.uuid = None;
                        redefined = true;
                    }
                    Err(ApiError::Http {
                        status: 400, body, ..
                    }) if body.contains("PROFILE_UUID_REQUIRED") => {
                        return Err(AssignError::Profile(format!(
                            "Apple says the assignment of profile {profile:?} lacks a profile UUID (400 PROFILE_UUID_REQUIRED); the stored definition is broken: it is defined again on the next pass"
                        )));
                    }
                    Err(e) => return Err(AssignError::Api(e)),
                }
            };
            let (uuid, answer) = answer;
            let now = Utc::now();
            let outcomes: Vec<AssignOutcome> = batch
                .iter()
                .map(|serial| {
                    let status = answer
                        .devices
                        .get(serial)
                        .map(|s| s.to_ascii_uppercase())
                        // Apple said nothing of it: as good as FAILED.
                        .filter(|s| {
                            ["SUCCESS", "NOT_ACCESSIBLE", "FAILED", "THROTTLED"]
                                .contains(&s.as_str())
                        })
                        .unwrap_or_else(|| "FAILED".into());
                    let retry_after = match status.as_str() {
                        "FAILED" => Some(now + config.assignment.failed_cooldown),
                        "THROTTLED" => Some(
                            now + answer
                                .retry_after_seconds
                                // Bounded: a week at most, whatever Apple says.
                                .map(|s| {
                                    std::time::Duration::from_secs(s.min(MAX_RETRY_AFTER_SECS))
                                })
                                .unwrap_or(config.assignment.throttled_wait),
                        ),
                        _ => None,
                    };
                    match status.as_str() {
                        "SUCCESS" => summary.success += 1,
                        "FAILED" => summary.failed += 1,
                        "THROTTLED" => summary.throttled += 1,
                        _ => summary.not_accessible += 1,
                    }
                    AssignOutcome {
                        serial_number: serial.clone(),
                        status,
                        retry_after: retry_after.map(format_time),
                    }
                })
                .collect();
            let (c, t, p) = (store.clone(), token.name.clone(), profile.clone());
            blocking(move || {
                c.with(|s| s.save_assignments(&t, &p, &uuid, &outcomes, &format_time(Utc::now())))
            })
            .await?;
        }
    }
    let (c, t) = (store.clone(), token.name.clone());
    let (last, fetch) = (inputs.last_event_id, inputs.last_full_fetch_at.clone());
    blocking(move || {
        c.with(|s| s.finish_assign_pass(&t, last, fetch.as_deref(), &format_time(Utc::now())))
    })
    .await?;
    if summary != AssignSummary::default() {
        tracing::info!(token = %token.name, success = summary.success, failed = summary.failed,
            throttled = summary.throttled, not_accessible = summary.not_accessible,
            calls = summary.calls, defined = summary.defined, "profiles assigned");
    }
    Ok(summary)
}

/// One token's dry run: its name, the devices planned, and a note (nothing known yet, or
/// profiles that would be defined first).
pub type TokenPlan = (String, Vec<Planned>, Option<String>);

/// `adesync assign --dry-run`: what each rule would do now, per token, touching nothing.
pub fn dry_run(
    config: &Config,
    store: Option<&Store>,
    only: Option<&str>,
) -> Result<Vec<TokenPlan>, AssignError> {
    let mut out = Vec::new();
    let now = Utc::now();
    for t in config
        .tokens
        .iter()
        .filter(|t| only.is_none_or(|o| o == t.name))
    {
        let rules = rules_for(config, &t.name);
        if rules.is_empty() {
            continue;
        }
        let inputs = match store {
            Some(s) => s.assign_inputs(&t.name)?,
            None => AssignInputs::default(),
        };
        if !inputs.synced {
            out.push((
                t.name.clone(),
                Vec::new(),
                Some("nothing is known of this token yet: it has not synced".into()),
            ));
            continue;
        }
        let profiles = profile_states(config, &rules, &inputs).map_err(AssignError::Profile)?;
        let undefined: Vec<&String> = profiles
            .iter()
            .filter(|(_, s)| s.uuid.is_none())
            .map(|(n, _)| n)
            .collect();
        let note = (!undefined.is_empty()).then(|| {
            let mut names: Vec<&str> = undefined.iter().map(|s| s.as_str()).collect();
            names.sort();
            format!("would define at Apple first: {}", names.join(", "))
        });
        out.push((t.name.clone(), plan(&rules, &inputs, &profiles, now), note));
    }
    Ok(out)
}
