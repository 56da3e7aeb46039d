//! The `jsonl` sink: events as JSON lines appended to a file or written to standard
//! output. A batch counts as delivered once it is written and flushed — for a file,
//! synced to disk, so a power loss cannot lose lines whose cursor was recorded.

use std::io::Write;

use super::Failure;
use crate::config::JsonlTarget;

/// A file or standard output, opened per batch (so a rotated file is picked up).
pub(super) struct JsonlWriter {
    target: JsonlTarget,
}

impl JsonlWriter {
    pub(super) fn new(target: JsonlTarget) -> Self {
        Self { target }
    }

    pub(super) async fn send(&self, events: &[Vec<u8>]) -> Result<(), Failure> {
        let mut buf = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum());
        for e in events {
            buf.extend_from_slice(e);
            buf.push(b'\n');
        }
        let target = self.target.clone();
        let shown = match &target {
            JsonlTarget::Stdout => "standard output".to_owned(),
            JsonlTarget::File(p) => p.display().to_string(),
        };
        // Blocking file I/O stays off the async executor.
        let result = tokio::task::spawn_blocking(move || write(&target, &buf)).await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Retry {
                message: format!("cannot write to {shown}: {e}"),
                retry_after: None,
            }),
            Err(e) => Err(Failure::Retry {
                message: format!("writing to {shown} stopped: {e}"),
                retry_after: None,
            }),
        }
    }
}

fn write(target: &JsonlTarget, buf: &[u8]) -> std::io::Result<()> {
    match target {
        JsonlTarget::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(buf)?;
            out.flush()
        }
        JsonlTarget::File(p) => {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?;
            let len = f.metadata()?.len();
            // A batch cut short when the process was killed mid-write (its events are sent
            // again) gets its line ended first, so this batch's lines stay whole.
            let end_cut_line = if ends_mid_line(p, len) {
                f.write_all(b"\n")
            } else {
                Ok(())
            };
            let written = end_cut_line
                .and_then(|_| f.write_all(buf))
                .and_then(|_| f.sync_data());
            if written.is_err() {
                // Back to the length it had (e.g. a full disk), so the retry does not
                // append whole lines after a torn one. Never shorter than that: a reader
                // following the file would take a shorter file for a new one.
                let _ = f.set_len(len);
            }
            written
        }
    }
}

/// Whether the file's last byte (of `len`) is not a newline. A file that cannot be read
/// (write-only to this user) counts as ending its line.
fn ends_mid_line(p: &std::path::Path, len: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut last = [b'\n'];
    len > 0
        && std::fs::File::open(p)
            .and_then(|f| f.read_exact_at(&mut last, len - 1))
            .is_ok()
        && last[0] != b'\n'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_short_is_ended_before_the_next_batch_and_never_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let target = JsonlTarget::File(path.clone());
        write(&target, b"{\"id\":1}\n").unwrap();
        // A kill in the middle of the next batch leaves part of a line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"id\":2,\"se")
            .unwrap();
        write(&target, b"{\"id\":2}\n{\"id\":3}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"id\":1}\n{\"id\":2,\"se\n{\"id\":2}\n{\"id\":3}\n"
        );
        // A file that ends its last line is appended to as it is.
        write(&target, b"{\"id\":4}\n").unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("{\"id\":3}\n{\"id\":4}\n"));
    }
}
