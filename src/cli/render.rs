//! The one renderer for listing commands: aligned tables for people, JSON lines and CSV
//! for scripts.

use std::io::Write;

use adesync::model::printable;
use clap::ValueEnum;

/// Output format of listing commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON: one object per line.
    Json,
    /// CSV with a header row.
    Csv,
}

/// Aligned columns, two spaces apart, header first. Cells are printed escaped
/// ([`printable`]): a device field or an error from outside cannot move the cursor,
/// clear the screen or fake a line.
pub fn write_table(
    out: &mut impl Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let rows = &rows;
    let columns = header.len().max(rows.first().map_or(0, Vec::len));
    let mut widths: Vec<usize> = (0..columns)
        .map(|i| header.get(i).map_or(0, |h| h.chars().count()))
        .collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    if !header.is_empty() {
        writeln!(out, "{}", line(header.to_vec()))?;
    }
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// One CSV cell, quoted when it needs to be; control characters other than line breaks
/// are escaped ([`printable`]) like everywhere text from outside is shown.
pub fn csv_cell(s: &str) -> String {
    let escaped: String = s
        .chars()
        .map(|c| match c {
            '\n' | '\r' => c.to_string(),
            c => printable(&c.to_string()).into_owned(),
        })
        .collect();
    let s = escaped.as_str();
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_when_needed() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn tables_align_columns_two_spaces_apart() {
        let mut out = Vec::new();
        write_table(
            &mut out,
            &["a", "bb"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a    bb\nxyz  1\nq    22\n"
        );
    }
}
