//! The `adesync` binary: parses the command line, sets up logging, runs the command and
//! maps the outcome to an exit code (0 ok, 1 failure, 2 usage, 78 bad configuration).
//! Every word for people lives in [`cli`]; the library never prints.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    cli::main()
}
