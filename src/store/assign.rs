//! Enrollment profile assignment (`profiles`, `profile_assignments`, `assign_state`):
//! what a pass needs to plan, and a batch of Apple's answers committed with their events.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};
use serde_json::json;

use super::{Store, StoreError};
use crate::events::EventScope;
use crate::model::{EventKind, Reason};

/// A token's definition of a profile at Apple.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileDefinition {
    /// Apple's UUID.
    pub profile_uuid: String,
    /// SHA-256 (hex) of the file it was defined from.
    pub file_hash: String,
}

/// A device as assignment rules see it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AssignDevice {
    /// Serial number.
    pub serial_number: String,
    /// `device_family`.
    pub device_family: Option<String>,
    /// `model`.
    pub model: Option<String>,
    /// `os`.
    pub os: Option<String>,
    /// The profile Apple says it has.
    pub profile_uuid: Option<String>,
    /// From the organisation's inventory, when an account lists it.
    pub purchase_source_type: Option<String>,
    /// From the organisation's inventory.
    pub order_number: Option<String>,
}

/// A device's last assignment.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// The profile's configured name.
    pub profile_name: String,
    /// The UUID assigned.
    pub profile_uuid: String,
    /// Apple's answer: `SUCCESS`, `NOT_ACCESSIBLE`, `FAILED` or `THROTTLED`.
    pub status: String,
    /// When.
    pub attempted_at: String,
    /// Not before (FAILED, THROTTLED).
    pub retry_after: Option<String>,
    /// Calls so far for this device and profile.
    pub attempts: i64,
}

/// Where a token's assignment pass stands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AssignState {
    /// The last event a pass took into account.
    pub last_event_id: i64,
    /// The full fetch the last pass took into account.
    pub last_full_fetch_at: Option<String>,
    /// When a pass last ran.
    pub last_run_at: Option<String>,
}

/// One device's result, to commit.
#[derive(Clone, Debug)]
pub struct AssignOutcome {
    /// Serial number.
    pub serial_number: String,
    /// Apple's answer.
    pub status: String,
    /// Not before.
    pub retry_after: Option<String>,
}

/// Everything a pass plans from, read in one go.
#[derive(Clone, Debug, Default)]
pub struct AssignInputs {
    /// The token's assigned devices.
    pub devices: Vec<AssignDevice>,
    /// Each device's last assignment.
    pub assignments: HashMap<String, Assignment>,
    /// Devices with a device event since the last pass: serial → (reason, when).
    pub triggered: HashMap<String, Vec<(Reason, String)>>,
    /// The newest event id read.
    pub last_event_id: i64,
    /// A full fetch completed since the last pass.
    pub full_fetch_since: bool,
    /// The full fetch to remember.
    pub last_full_fetch_at: Option<String>,
    /// The token's definitions of the profiles.
    pub definitions: HashMap<String, ProfileDefinition>,
    /// The token has been synced at least once.
    pub synced: bool,
}

/// The event Apple's answer for one device makes (both backends): `added`
/// (`profile.assigned`) for SUCCESS, `modified` (`profile.assign_failed`) for FAILED and
/// NOT_ACCESSIBLE, none for THROTTLED (simply tried again later); with its snapshot, the
/// assignment as JSON.
pub(super) fn assignment_event(
    o: &AssignOutcome,
    profile: &str,
    profile_uuid: &str,
    attempts: i64,
) -> Option<(EventKind, String)> {
    let kind = match o.status.as_str() {
        "SUCCESS" => EventKind::Added,
        "THROTTLED" => return None,
        _ => EventKind::Modified,
    };
    let detail = json!({
        "profile": profile,
        "profile_uuid": profile_uuid,
        "status": o.status,
        "attempts": attempts,
        "retry_after": o.retry_after,
    });
    Some((kind, detail.to_string()))
}

impl Store {
    /// What an assignment pass of `token` plans from.
    pub fn assign_inputs(&self, token: &str) -> Result<AssignInputs, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.assign_inputs(token);
        }
        let err = || self.err("read assignment state");
        let state = self.assign_state(token)?;
        let devices = self
            .conn()?
            .prepare_cached(
                "SELECT d.serial_number, d.device_family, d.model, d.os, d.profile_uuid,
                        (SELECT o.purchase_source_type FROM org_devices o
                          WHERE o.serial_number = d.serial_number AND o.removed_at IS NULL LIMIT 1),
                        (SELECT o.order_number FROM org_devices o
                          WHERE o.serial_number = d.serial_number AND o.removed_at IS NULL LIMIT 1)
                 FROM devices d WHERE d.token_name = ?1 AND d.deleted_at IS NULL
                 ORDER BY d.serial_number",
            )
            .and_then(|mut st| {
                st.query_map([token], |r| {
                    Ok(AssignDevice {
                        serial_number: r.get(0)?,
                        device_family: r.get(1)?,
                        model: r.get(2)?,
                        os: r.get(3)?,
                        profile_uuid: r.get(4)?,
                        purchase_source_type: r.get(5)?,
                        order_number: r.get(6)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(err())?;
        let assignments = self
            .conn()?
            .prepare_cached(
                "SELECT serial_number, profile_name, profile_uuid, status, attempted_at, retry_after, attempts
                 FROM profile_assignments WHERE token_name = ?1",
            )
            .and_then(|mut st| {
                st.query_map([token], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        Assignment {
                            profile_name: r.get(1)?,
                            profile_uuid: r.get(2)?,
                            status: r.get(3)?,
                            attempted_at: r.get(4)?,
                            retry_after: r.get(5)?,
                            attempts: r.get(6)?,
                        },
                    ))
                })?
                .collect::<Result<HashMap<_, _>, _>>()
            })
            .map_err(err())?;
        let mut triggered: HashMap<String, Vec<(Reason, String)>> = HashMap::new();
        let mut last_event_id = state.last_event_id;
        {
            let mut st = self
                .conn()?
                .prepare_cached(
                    "SELECT id, serial_number, reason, occurred_at FROM events
                     WHERE token_name = ?1 AND id > ?2 AND scope IS NULL ORDER BY id",
                )
                .map_err(err())?;
            let mut rows = st
                .query(params![token, state.last_event_id])
                .map_err(err())?;
            while let Some(r) = rows.next().map_err(err())? {
                last_event_id = r.get(0).map_err(err())?;
                let reason: Option<String> = r.get(2).map_err(err())?;
                if let Some(reason) = reason.as_deref().and_then(Reason::parse) {
                    let at: String = r.get(3).map_err(err())?;
                    triggered
                        .entry(r.get(1).map_err(err())?)
                        .or_default()
                        .push((reason, at));
                }
            }
        }
        let sync = self.sync_state(token)?;
        let full_fetch_since = match (&sync.last_full_fetch_at, &state.last_full_fetch_at) {
            (Some(now), Some(before)) => now > before,
            (Some(_), None) => true,
            _ => false,
        };
        let definitions = self
            .conn()?
            .prepare_cached(
                "SELECT profile_name, profile_uuid, file_hash FROM profiles WHERE token_name = ?1",
            )
            .and_then(|mut st| {
                st.query_map([token], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        ProfileDefinition {
                            profile_uuid: r.get(1)?,
                            file_hash: r.get(2)?,
                        },
                    ))
                })?
                .collect::<Result<HashMap<_, _>, _>>()
            })
            .map_err(err())?;
        Ok(AssignInputs {
            devices,
            assignments,
            triggered,
            last_event_id,
            full_fetch_since,
            last_full_fetch_at: sync.last_full_fetch_at.clone(),
            definitions,
            synced: sync.last_success_at.is_some(),
        })
    }

    /// Where `token`'s assignment pass stands.
    pub fn assign_state(&self, token: &str) -> Result<AssignState, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.assign_state(token);
        }
        Ok(self
            .conn()?
            .query_row(
                "SELECT last_event_id, last_full_fetch_at, last_run_at FROM assign_state WHERE token_name = ?1",
                [token],
                |r| {
                    Ok(AssignState {
                        last_event_id: r.get(0)?,
                        last_full_fetch_at: r.get(1)?,
                        last_run_at: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(self.err("read assignment state"))?
            .unwrap_or_default())
    }

    /// Stores a token's (new) definition of a profile.
    pub fn save_profile_definition(
        &mut self,
        token: &str,
        profile: &str,
        d: &ProfileDefinition,
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.save_profile_definition(token, profile, d, now);
        }
        self.conn()?
            .execute(
                "INSERT INTO profiles (token_name, profile_name, profile_uuid, file_hash, defined_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (token_name, profile_name) DO UPDATE SET profile_uuid = excluded.profile_uuid,
                     file_hash = excluded.file_hash, defined_at = excluded.defined_at",
                params![token, profile, d.profile_uuid, d.file_hash, now],
            )
            .map(drop)
            .map_err(self.err("store a profile definition"))
    }

    /// Commits Apple's answers to one assignment call, with one event per device that was
    /// assigned (`profile.assigned`) or refused for good or for now (`profile.assign_failed`
    /// for FAILED and NOT_ACCESSIBLE; a THROTTLED device is simply tried again later).
    pub fn save_assignments(
        &mut self,
        token: &str,
        profile: &str,
        profile_uuid: &str,
        outcomes: &[AssignOutcome],
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.save_assignments(token, profile, profile_uuid, outcomes, now);
        }
        self.in_tx("store assignment results", |tx| {
            let mut up = tx.prepare_cached(
                "INSERT INTO profile_assignments (token_name, serial_number, profile_name, profile_uuid,
                     status, attempted_at, retry_after, attempts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1)
                 ON CONFLICT (token_name, serial_number) DO UPDATE SET
                     attempts = CASE WHEN profile_uuid = excluded.profile_uuid THEN attempts + 1 ELSE 1 END,
                     profile_name = excluded.profile_name, profile_uuid = excluded.profile_uuid,
                     status = excluded.status, attempted_at = excluded.attempted_at,
                     retry_after = excluded.retry_after
                 RETURNING attempts",
            )?;
            let mut ev = tx.prepare_cached(
                "INSERT INTO events (token_name, serial_number, kind, changes, occurred_at, device_json, scope)
                 VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6)",
            )?;
            for o in outcomes {
                let attempts: i64 = up.query_row(
                    params![token, o.serial_number, profile, profile_uuid, o.status, now, o.retry_after],
                    |r| r.get(0),
                )?;
                let Some((kind, detail)) = assignment_event(o, profile, profile_uuid, attempts)
                else {
                    continue;
                };
                ev.execute(params![
                    token,
                    o.serial_number,
                    kind.as_str(),
                    now,
                    detail,
                    EventScope::Profile.stored()
                ])?;
            }
            Ok(())
        })
    }

    /// Records that a pass ran and what it took into account.
    pub fn finish_assign_pass(
        &mut self,
        token: &str,
        last_event_id: i64,
        last_full_fetch_at: Option<&str>,
        now: &str,
    ) -> Result<(), StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.finish_assign_pass(token, last_event_id, last_full_fetch_at, now);
        }
        self.conn()?
            .execute(
                "INSERT INTO assign_state (token_name, last_event_id, last_full_fetch_at, last_run_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (token_name) DO UPDATE SET last_event_id = excluded.last_event_id,
                     last_full_fetch_at = excluded.last_full_fetch_at, last_run_at = excluded.last_run_at",
                params![token, last_event_id, last_full_fetch_at, now],
            )
            .map(drop)
            .map_err(self.err("record the assignment pass"))
    }

    /// The earliest `retry_after` of a token's devices of `profile` in `status`.
    pub fn next_retry(
        &self,
        token: &str,
        profile: &str,
        status: &str,
    ) -> Result<Option<String>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.next_retry(token, profile, status);
        }
        self.conn()?
            .query_row(
                "SELECT MIN(retry_after) FROM profile_assignments
                 WHERE token_name = ?1 AND profile_name = ?2 AND status = ?3",
                params![token, profile, status],
                |r| r.get(0),
            )
            .map_err(self.err("read assignments"))
    }

    /// Assignment counts per (token, profile, status), for `assign status` and `/metrics`.
    pub fn assignment_counts(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        if let Some(mut pg) = self.pg() {
            return pg.assignment_counts();
        }
        let mut st = self
            .conn()?
            .prepare(
                "SELECT token_name, profile_name, status, COUNT(*) FROM profile_assignments
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            )
            .map_err(self.err("count assignments"))?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64))
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>());
        rows.map_err(self.err("count assignments"))
    }
}
