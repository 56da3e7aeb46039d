//! The `command` sink: a program, run without a shell, reads a batch of events as JSON
//! lines on its standard input. Exit status 0 means it has them; anything else (a
//! non-zero status, a signal, no exit within `timeout`, not reading its input) means it
//! does not, and the batch is offered again later.
//!
//! The program gets `ADESYNC_SINK=<name>` in its environment. Its standard output is
//! discarded (it may be adesync's own, shared with a `jsonl` sink); the end of its
//! standard error is quoted in the error when it fails.
//!
//! Bounded: the program runs in a process group of its own, and on a timeout the whole
//! group is killed (no grandchildren left behind each pass); of its standard error only
//! the last [`STDERR_TAIL`] bytes are kept, however much it writes; the outcome is its
//! exit status, not the end of its pipes (a background child that keeps them open does
//! not turn a success into a timeout).

use std::collections::VecDeque;
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of the program's standard error kept for the error message.
const STDERR_TAIL: usize = 4096;

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
            // Its own process group, so a timeout can stop everything it started.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| retry(format!("cannot start {program}: {e}")))?;
        let group = child.id();
        let stdin = child.stdin.take();
        let write = async move {
            let Some(mut stdin) = stdin else {
                return Ok(());
            };
            stdin.write_all(&input).await?;
            // Closing stdin is the program's end-of-batch.
            stdin.shutdown().await
        };
        // Drains standard error as it comes, keeping only its tail.
        let stderr_tail = std::sync::Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let reader = child.stderr.take().map(|mut err| {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    t.extend(&buf[..n]);
                    let excess = t.len().saturating_sub(STDERR_TAIL);
                    t.drain(..excess);
                }
            })
        });
        let run = async { tokio::join!(write, child.wait()) };
        let outcome = tokio::time::timeout(self.cfg.timeout, run).await;
        let (written, status) = match outcome {
            Ok(done) => done,
            Err(_) => {
                kill_group(group);
                let _ = child.kill().await;
                if let Some(r) = reader {
                    r.abort();
                }
                return Err(retry(format!(
                    "{program} did not finish within {}; it and every process it started were stopped",
                    crate::status::human_duration(self.cfg.timeout)
                )));
            }
        };
        // The exit status decides. What it wrote to standard error before exiting is
        // read for a moment longer; a background child holding the pipe is not waited for.
        if let Some(mut r) = reader {
            if tokio::time::timeout(std::time::Duration::from_millis(200), &mut r)
                .await
                .is_err()
            {
                r.abort(); // a background child holds the pipe: stop reading it
            }
        }
        let status = status.map_err(|e| retry(format!("waiting for {program} failed: {e}")))?;
        let stderr: Vec<u8> = stderr_tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        let stderr = tail(&stderr);
        let said = if stderr.is_empty() {
            String::new()
        } else {
            format!(": {stderr}")
        };
        if !status.success() {
            return Err(retry(format!("{program} {}{said}", describe(status))));
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

/// Kills the process group the program leads (it and whatever it started).
fn kill_group(group: Option<u32>) {
    let Some(pid) = group.and_then(|g| rustix::process::Pid::from_raw(g as i32)) else {
        return;
    };
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended with {status}"),
    }
}

/// The last few hundred bytes of the program's standard error, on one line, escaped.
fn tail(stderr: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(MAX)..]);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    crate::model::printable(&line).into_owned()
}
