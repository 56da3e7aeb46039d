//! `adesync status`: each token's status and the sinks that need attention, as words.
//! The rules behind them are the library's (`adesync::status`).

use std::io::Write;

use adesync::model::SinkState;

use super::render::{csv_cell, write_table, Format};

/// After the token status: the sinks, when any is configured.
pub(super) fn print_sink_attention(
    sinks: &[adesync::sinks::SinkStatus],
    format: Format,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for s in sinks {
                let mut v = serde_json::to_value(s)?;
                v["sink"] = serde_json::Value::String(s.name.clone());
                writeln!(out, "{v}")?;
            }
        }
        Format::Csv => {}
        Format::Table if !sinks.is_empty() => {
            writeln!(out)?;
            let body: Vec<Vec<String>> = sinks
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.kind.to_owned(),
                        s.state.to_string(),
                        s.pending.to_string(),
                        s.oldest_pending_age_secs
                            .map(|a| adesync::status::human_secs(a as i64))
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            write_table(
                &mut out,
                &["sink", "type", "state", "pending", "oldest_pending"],
                &body,
            )?;
            for s in sinks.iter().filter(|s| s.state != SinkState::Ok) {
                let why = s.last_error.as_deref().unwrap_or("see `adesync sinks`");
                let todo = if s.state == SinkState::Parked {
                    " — fix the receiver, then `adesync sinks resume NAME`"
                } else {
                    ""
                };
                let why = adesync::model::printable(why);
                writeln!(out, "sink {}: {}: {why}{todo}", s.name, s.state)?;
            }
        }
        Format::Table => {}
    }
    Ok(())
}

pub(super) fn print_status(
    statuses: &[adesync::status::TokenStatus],
    format: Format,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            for s in statuses {
                writeln!(out, "{}", serde_json::to_string(s)?)?;
            }
        }
        Format::Csv => {
            writeln!(out, "token,phase,cursor_age_seconds,last_success_at,last_error_kind,devices,deleted_devices,token_days_left,attention")?;
            for s in statuses {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{}",
                    csv_cell(&s.token),
                    s.phase,
                    s.cursor_age_seconds
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    s.last_success_at.as_deref().unwrap_or(""),
                    s.last_error_kind.as_deref().unwrap_or(""),
                    s.devices,
                    s.deleted_devices,
                    s.token_days_left.map(|d| d.to_string()).unwrap_or_default(),
                    csv_cell(&s.attention.join("; "))
                )?;
            }
        }
        Format::Table => {
            let body: Vec<Vec<String>> = statuses
                .iter()
                .map(|s| {
                    vec![
                        s.token.clone(),
                        s.phase.clone(),
                        s.cursor_age_seconds
                            .map(adesync::status::human_secs)
                            .unwrap_or_else(|| "-".into()),
                        s.last_success_at.clone().unwrap_or_else(|| "never".into()),
                        s.last_error_kind.clone().unwrap_or_else(|| "-".into()),
                        s.devices.to_string(),
                        s.deleted_devices.to_string(),
                        s.token_days_left
                            .map(|d| d.to_string())
                            .unwrap_or_else(|| "-".into()),
                        if s.attention.is_empty() {
                            "ok".into()
                        } else {
                            "ATTENTION".into()
                        },
                    ]
                })
                .collect();
            write_table(
                &mut out,
                &[
                    "token",
                    "phase",
                    "cursor_age",
                    "last_success",
                    "last_error",
                    "devices",
                    "deleted",
                    "token_days_left",
                    "state",
                ],
                &body,
            )?;
            for s in statuses {
                if let Some(by) = &s.synced_by {
                    writeln!(
                        out,
                        "{}: being synced now by {}",
                        s.token,
                        adesync::model::printable(by)
                    )?;
                }
                if let (Some(n), Some(at)) = (s.full_fetch_missed, &s.last_full_fetch_at) {
                    writeln!(
                        out,
                        "{}: the last full re-fetch ({at}) found {n} change(s) the sync cursor had missed{}",
                        s.token,
                        if n > 0 { "; they are corrected and their events written" } else { "" }
                    )?;
                }
                for a in &s.attention {
                    writeln!(out, "{}: {}", s.token, adesync::model::printable(a))?;
                }
            }
        }
    }
    Ok(())
}
