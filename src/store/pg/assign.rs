//! Enrollment profile assignment on PostgreSQL: the twins of `store/assign.rs`.

use std::collections::HashMap;

use super::super::assign::assignment_event;
use super::super::{
    AssignDevice, AssignInputs, AssignOutcome, AssignState, Assignment, ProfileDefinition,
    StoreError,
};
use super::write::{insert_events, PendingEvent};
use super::Pg;
use crate::events::EventScope;
use crate::model::Reason;

impl Pg {
    pub(crate) fn assign_inputs(&mut self, token: &str) -> Result<AssignInputs, StoreError> {
        let state = self.assign_state(token)?;
        let err = || self.err("read assignment state");
        let (e1, e2, e3, e4) = (err(), err(), err(), err());
        let devices = self
            .c()
            .query(
                "SELECT d.serial_number, d.device_family, d.model, d.os, d.profile_uuid,
                        (SELECT o.purchase_source_type FROM org_devices o
                          WHERE o.serial_number = d.serial_number AND o.removed_at IS NULL LIMIT 1),
                        (SELECT o.order_number FROM org_devices o
                          WHERE o.serial_number = d.serial_number AND o.removed_at IS NULL LIMIT 1)
                 FROM devices d WHERE d.token_name = $1 AND d.deleted_at IS NULL
                 ORDER BY d.serial_number",
                &[&token],
            )
            .map_err(e1)?
            .iter()
            .map(|r| AssignDevice {
                serial_number: r.get(0),
                device_family: r.get(1),
                model: r.get(2),
                os: r.get(3),
                profile_uuid: r.get(4),
                purchase_source_type: r.get(5),
                order_number: r.get(6),
            })
            .collect();
        let assignments = self
            .c()
            .query(
                "SELECT serial_number, profile_name, profile_uuid, status, attempted_at, retry_after, attempts
                 FROM profile_assignments WHERE token_name = $1",
                &[&token],
            )
            .map_err(e2)?
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    Assignment {
                        profile_name: r.get(1),
                        profile_uuid: r.get(2),
                        status: r.get(3),
                        attempted_at: r.get(4),
                        retry_after: r.get(5),
                        attempts: r.get(6),
                    },
                )
            })
            .collect();
        let mut triggered: HashMap<String, Vec<(Reason, String)>> = HashMap::new();
        let mut last_event_id = state.last_event_id;
        for r in self
            .c()
            .query(
                "SELECT id, serial_number, reason, occurred_at FROM events
                 WHERE token_name = $1 AND id > $2 AND scope IS NULL ORDER BY id",
                &[&token, &state.last_event_id],
            )
            .map_err(e3)?
        {
            last_event_id = r.get(0);
            if let Some(reason) = r.get::<_, Option<&str>>(2).and_then(Reason::parse) {
                triggered
                    .entry(r.get(1))
                    .or_default()
                    .push((reason, r.get(3)));
            }
        }
        let sync = self.sync_state(token)?;
        let full_fetch_since = match (&sync.last_full_fetch_at, &state.last_full_fetch_at) {
            (Some(now), Some(before)) => now > before,
            (Some(_), None) => true,
            _ => false,
        };
        let definitions = self
            .c()
            .query(
                "SELECT profile_name, profile_uuid, file_hash FROM profiles WHERE token_name = $1",
                &[&token],
            )
            .map_err(e4)?
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    ProfileDefinition {
                        profile_uuid: r.get(1),
                        file_hash: r.get(2),
                    },
                )
            })
            .collect();
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

    pub(crate) fn assign_state(&mut self, token: &str) -> Result<AssignState, StoreError> {
        Ok(self
            .c()
            .query_opt(
                "SELECT last_event_id, last_full_fetch_at, last_run_at FROM assign_state WHERE token_name = $1",
                &[&token],
            )
            .map_err(self.err("read assignment state"))?
            .map(|r| AssignState {
                last_event_id: r.get(0),
                last_full_fetch_at: r.get(1),
                last_run_at: r.get(2),
            })
            .unwrap_or_default())
    }

    pub(crate) fn save_profile_definition(
        &mut self,
        token: &str,
        profile: &str,
        d: &ProfileDefinition,
        now: &str,
    ) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO profiles (token_name, profile_name, profile_uuid, file_hash, defined_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (token_name, profile_name) DO UPDATE SET profile_uuid = excluded.profile_uuid,
                     file_hash = excluded.file_hash, defined_at = excluded.defined_at",
                &[&token, &profile, &d.profile_uuid, &d.file_hash, &now],
            )
            .map(drop)
            .map_err(self.err("store a profile definition"))
    }

    /// See `Store::save_assignments`: one transaction, the events' ids taken at its end.
    pub(crate) fn save_assignments(
        &mut self,
        token: &str,
        profile: &str,
        profile_uuid: &str,
        outcomes: &[AssignOutcome],
        now: &str,
    ) -> Result<(), StoreError> {
        self.in_tx("store assignment results", |tx| {
            let up = tx.prepare(
                "INSERT INTO profile_assignments AS p (token_name, serial_number, profile_name,
                     profile_uuid, status, attempted_at, retry_after, attempts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 1)
                 ON CONFLICT (token_name, serial_number) DO UPDATE SET
                     attempts = CASE WHEN p.profile_uuid = excluded.profile_uuid
                                     THEN p.attempts + 1 ELSE 1 END,
                     profile_name = excluded.profile_name, profile_uuid = excluded.profile_uuid,
                     status = excluded.status, attempted_at = excluded.attempted_at,
                     retry_after = excluded.retry_after
                 RETURNING attempts",
            )?;
            let mut events: Vec<PendingEvent> = Vec::new();
            for o in outcomes {
                let attempts: i64 = tx
                    .query_one(
                        &up,
                        &[
                            &token,
                            &o.serial_number,
                            &profile,
                            &profile_uuid,
                            &o.status,
                            &now,
                            &o.retry_after,
                        ],
                    )?
                    .get(0);
                if let Some((kind, detail)) = assignment_event(o, profile, profile_uuid, attempts) {
                    events.push(PendingEvent {
                        token: token.to_owned(),
                        serial: o.serial_number.clone(),
                        kind,
                        changes: None,
                        occurred_at: now.to_owned(),
                        snapshot: detail,
                        reason: None,
                        scope: EventScope::Profile.stored(),
                    });
                }
            }
            insert_events(tx, events)
        })
    }

    pub(crate) fn finish_assign_pass(
        &mut self,
        token: &str,
        last_event_id: i64,
        last_full_fetch_at: Option<&str>,
        now: &str,
    ) -> Result<(), StoreError> {
        self.c()
            .execute(
                "INSERT INTO assign_state (token_name, last_event_id, last_full_fetch_at, last_run_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (token_name) DO UPDATE SET last_event_id = excluded.last_event_id,
                     last_full_fetch_at = excluded.last_full_fetch_at, last_run_at = excluded.last_run_at",
                &[&token, &last_event_id, &last_full_fetch_at, &now],
            )
            .map(drop)
            .map_err(self.err("record the assignment pass"))
    }

    pub(crate) fn next_retry(
        &mut self,
        token: &str,
        profile: &str,
        status: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .c()
            .query_one(
                "SELECT MIN(retry_after) FROM profile_assignments
                 WHERE token_name = $1 AND profile_name = $2 AND status = $3",
                &[&token, &profile, &status],
            )
            .map_err(self.err("read assignments"))?
            .get(0))
    }

    pub(crate) fn assignment_counts(
        &mut self,
    ) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        Ok(self
            .c()
            .query(
                "SELECT token_name, profile_name, status, COUNT(*) FROM profile_assignments
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                &[],
            )
            .map_err(self.err("count assignments"))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get::<_, i64>(3) as u64))
            .collect())
    }
}
