//! `adesync account`: the MDM server and organisation stored for each token.

use std::io::Write;
use std::process::ExitCode;

use super::render::{csv_cell, write_table, Format};
use super::token::open_for_reading;
use adesync::config::LenientConfig;
use adesync::store::StoredAccount;

/// `org_type` in words: `org` is Apple Business Manager, `edu` Apple School Manager.
pub fn program(org_type: Option<&str>) -> &str {
    match org_type {
        Some("org") => "Apple Business Manager",
        Some("edu") => "Apple School Manager",
        Some(other) => other,
        None => "",
    }
}

/// `adesync account`: the stored account details of every token, or of one.
pub fn show(cfg: &LenientConfig, token: Option<&str>, format: Format) -> anyhow::Result<ExitCode> {
    let rows: Vec<StoredAccount> = match open_for_reading(&cfg.database)? {
        Some(store) => store
            .accounts()?
            .into_iter()
            .filter(|a| a.checked_at.is_some())
            .filter(|a| token.is_none_or(|t| a.token_name == t))
            .collect(),
        None => Vec::new(),
    };
    if rows.is_empty() {
        let whom = token.map_or("any token".to_owned(), |t| format!("token \"{t}\""));
        eprintln!(
            "no account details are stored for {whom} yet; adesync asks Apple for them at the start of every sync (run `adesync run --once`)"
        );
        return Ok(if token.is_some() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let mut out = std::io::stdout().lock();
    let cells = |a: &StoredAccount| -> Vec<String> {
        let s = |v: &Option<String>| v.clone().unwrap_or_default();
        vec![
            a.token_name.clone(),
            s(&a.server_name),
            s(&a.server_uuid),
            s(&a.org_name),
            s(&a.org_type),
            program(a.org_type.as_deref()).to_owned(),
            s(&a.org_id),
            s(&a.admin_id),
            a.page_limit_max.map(|n| n.to_string()).unwrap_or_default(),
            s(&a.checked_at),
        ]
    };
    const HEADER: [&str; 10] = [
        "token",
        "server_name",
        "server_uuid",
        "org_name",
        "org_type",
        "program",
        "org_id",
        "admin_id",
        "page_limit_max",
        "checked_at",
    ];
    match format {
        Format::Json => {
            for a in &rows {
                let obj: serde_json::Map<String, serde_json::Value> = HEADER
                    .iter()
                    .zip(cells(a))
                    .map(|(k, v)| {
                        let v = if v.is_empty() {
                            serde_json::Value::Null
                        } else if *k == "page_limit_max" {
                            v.parse::<u64>().map_or(serde_json::Value::Null, Into::into)
                        } else {
                            v.into()
                        };
                        ((*k).to_owned(), v)
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Object(obj))?;
            }
        }
        Format::Csv => {
            writeln!(out, "{}", HEADER.join(","))?;
            for a in &rows {
                let line: Vec<String> = cells(a).iter().map(|c| csv_cell(c)).collect();
                writeln!(out, "{}", line.join(","))?;
            }
        }
        Format::Table => {
            // The table leaves out org_type (program says it) and org_id to stay readable.
            let header = [
                "token",
                "server_name",
                "server_uuid",
                "org_name",
                "program",
                "admin_id",
                "page_limit_max",
                "checked_at",
            ];
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|a| {
                    let c = cells(a);
                    vec![
                        c[0].clone(),
                        c[1].clone(),
                        c[2].clone(),
                        c[3].clone(),
                        c[5].clone(),
                        c[7].clone(),
                        c[8].clone(),
                        c[9].clone(),
                    ]
                })
                .collect();
            write_table(&mut out, &header, &body)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_type_names_the_program() {
        assert_eq!(program(Some("edu")), "Apple School Manager");
        assert_eq!(program(Some("org")), "Apple Business Manager");
    }
}
