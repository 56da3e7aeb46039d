//! The `adesync` binary: parses the command line, sets up logging, runs the command and
//! maps the outcome to an exit code (0 ok, 1 failure, 2 usage, 78 bad configuration).

use std::process::ExitCode;

fn main() -> ExitCode {
    adesync::cli::main()
}
