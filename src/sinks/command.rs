//! The `command` sink: a program, run without a shell, reads a batch of events as JSON
//! lines on its standard input. Exit status 0 means it has them; anything else (a
//! non-zero status, a signal, no exit within `timeout`, not reading its input) means it
//! does not, and the batch is offered again later.
//!
//! The program gets `ADESYNC_SINK=<name>` in its environment. Its standard output is
//! discarded (it may be adesync's own, shared with a `jsonl` sink); the end of its
//! standard error is quoted in the error when it fails.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::Failure;
use crate::config::CommandConfig;

/// A configured program, ready to run once per batch.
pub(super) struct CommandRunner {
    sink: String,
    cfg: CommandConfig,
}

impl CommandRunner {
    pub(super) fn new(sink: &str, cfg: CommandConfig) -> Self {
        Self {
            sink: sink.to_owned(),
            cfg,
        }
    }

    pub(super) fn max_batch(&self) -> usize {
        self.cfg.max_batch
    }

    pub(super) async fn send(&self, events: &[Vec<u8>]) -> Result<(), Failure> {
        let program = &self.cfg.argv[0];
        let retry = |message: String| Failure::Retry {
            message,
            retry_after: None,
        };
        let mut input = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum());
        for e in events {
            input.extend_from_slice(e);
            input.push(b'\n');
        }
        let mut child = tokio::process::Command::new(program)
            .args(&self.cfg.argv[1..])
            .env("ADESYNC_SINK", &self.sink)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // On a timeout the future below is dropped, and the program with it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| retry(format!("cannot start {program}: {e}")))?;
        let stdin = child.stdin.take();
        let run = async move {
            let write = async move {
                let Some(mut stdin) = stdin else {
                    return Ok(());
                };
                stdin.write_all(&input).await?;
                // Closing stdin is the program's end-of-batch.
                stdin.shutdown().await
            };
            tokio::join!(write, child.wait_with_output())
        };
        let (written, output) =
            tokio::time::timeout(self.cfg.timeout, run)
                .await
                .map_err(|_| {
                    retry(format!(
                        "{program} did not finish within {}; it was stopped",
                        crate::status::human_duration(self.cfg.timeout)
                    ))
                })?;
        let output = output.map_err(|e| retry(format!("waiting for {program} failed: {e}")))?;
        let stderr = tail(&output.stderr);
        let said = if stderr.is_empty() {
            String::new()
        } else {
            format!(": {stderr}")
        };
        if !output.status.success() {
            return Err(retry(format!(
                "{program} {}{said}",
                describe(output.status)
            )));
        }
        // Exit 0 without reading every event is not an acknowledgement of them.
        if let Err(e) = written {
            return Err(retry(format!(
                "{program} exited before reading all {} events ({e}){said}",
                events.len()
            )));
        }
        Ok(())
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended with {status}"),
    }
}

/// The last few hundred bytes of the program's standard error, on one line.
fn tail(stderr: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(MAX)..]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
