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
            let written = f.write_all(buf).and_then(|_| f.sync_data());
            if written.is_err() {
                // Cut a partly written batch off again (e.g. a full disk), so the retry
                // does not append whole lines after a torn one.
                let _ = f.set_len(len);
            }
            written
        }
    }
}
