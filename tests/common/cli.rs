//! The `walshift` binary under test, run as an operator runs it.

use std::ffi::OsStr;
use std::process::{Command, Output};

/// The binary cargo built for these tests.
pub const EXE: &str = env!("CARGO_BIN_EXE_walshift");

/// `walshift <args>`, to add to, spawn or run.
pub fn command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut c = Command::new(EXE);
    c.args(args);
    c
}

/// Runs `walshift <args>` to its end: no stdin, both outputs captured.
pub fn walshift<S: AsRef<OsStr>>(args: &[S]) -> Output {
    command(args).output().expect("run walshift")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Everything it printed: stdout, then stderr.
pub fn printed(o: &Output) -> String {
    stdout(o) + &stderr(o)
}

/// The exit code and both outputs, for an assertion's message.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

/// Stdout as JSON; panics with the whole output when it is not.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}
