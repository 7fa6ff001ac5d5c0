//! PostgreSQL's own programs: where an installation's binaries are ([`PgBinaries`]).
//!
//! One search rule for the whole crate, so that clusters started by `localpg` and the client
//! programs that clone and rehearsal run come from the same installation.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Failures finding PostgreSQL's programs. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgToolError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "no PostgreSQL server binaries found (looked at `pg_config --bindir` and /usr/lib/postgresql/*/bin); \
         install PostgreSQL server packages: apt-get install postgresql"
    )]
    NoServerBinaries,
}

/// A PostgreSQL installation: the directory of its programs, found once and passed around.
#[derive(Clone, Debug)]
pub struct PgBinaries {
    /// Directory holding `initdb`, `postgres`, `pg_dump`, `psql`, `pg_recvlogical`, ….
    pub bindir: PathBuf,
    /// The installation's major version, when its directory says it (Debian's
    /// `/usr/lib/postgresql/<major>/bin`); `None` otherwise.
    pub major: Option<u32>,
}

impl PgBinaries {
    /// Finds server binaries: `pg_config --bindir` if it has `initdb` and `postgres`, else
    /// the newest `/usr/lib/postgresql/<major>/bin` that has `initdb`.
    pub fn find() -> Result<Self, PgToolError> {
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return Ok(PgBinaries::at(dir));
            }
        }
        let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let major: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").is_file().then_some((major, bin))
            })
            .collect();
        candidates.sort();
        candidates
            .pop()
            .map(|(major, bindir)| PgBinaries {
                bindir,
                major: Some(major),
            })
            .ok_or(PgToolError::NoServerBinaries)
    }

    /// The installation in `bindir`.
    pub fn at(bindir: PathBuf) -> Self {
        let major = major_of(&bindir);
        PgBinaries { bindir, major }
    }

    /// Path of one program in the installation.
    pub fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }
}

/// `<major>` of a `…/<major>/bin` directory.
fn major_of(bindir: &Path) -> Option<u32> {
    if bindir.file_name()? != "bin" {
        return None;
    }
    bindir.parent()?.file_name()?.to_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_version_from_the_directory() {
        let b = PgBinaries::at(PathBuf::from("/usr/lib/postgresql/15/bin"));
        assert_eq!(b.major, Some(15));
        assert_eq!(
            b.program("psql"),
            Path::new("/usr/lib/postgresql/15/bin/psql")
        );
        assert_eq!(PgBinaries::at(PathBuf::from("/usr/bin")).major, None);
        assert_eq!(PgBinaries::at(PathBuf::from("/opt/pg/bin")).major, None);
    }
}
