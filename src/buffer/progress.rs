//! `confirmed.json`: how far capture has confirmed the slot for this buffer, recorded (fsynced)
//! *before* the position is sent to the source. A buffer that ends before the position it
//! recorded as durable has lost confirmed transactions: the slot will never send them again,
//! so this is data loss, never a torn tail.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{BufferError, Result};
use super::fs::{FileSystem, StdFs};
use crate::lsn::Lsn;

/// File name of the confirmation record inside a buffer directory.
pub const PROGRESS_FILE: &str = "confirmed.json";

/// What capture had confirmed to the slot, and what the buffer held durably at that moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotProgress {
    /// Slot name.
    pub slot: String,
    /// Highest flush position sent (or about to be sent) to the slot. May pass
    /// `durable_lsn` when the server's keepalive position was confirmed while idle.
    pub confirmed_lsn: Lsn,
    /// End LSN of the buffer's last fsynced commit when this was written.
    pub durable_lsn: Lsn,
    /// When this was written, RFC 3339 UTC. A running capture rewrites it every status
    /// interval (10 s) in which the source sent anything, so its age shows when the source
    /// was last heard from.
    pub updated_at: String,
}

impl SlotProgress {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(PROGRESS_FILE)
    }

    /// Reads `dir/confirmed.json`; `None` if there is none (a buffer from before it existed,
    /// or one that never confirmed anything).
    pub fn read(dir: &Path) -> Result<Option<SlotProgress>> {
        super::meta::read_json(&Self::path(dir))
    }

    /// Writes it atomically and durably (temp file, fsync, rename, directory fsync).
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.write_with(dir, &StdFs)
    }

    pub fn write_with(&self, dir: &Path, fs: &dyn FileSystem) -> Result<()> {
        super::meta::write_json(&Self::path(dir), self, fs)
    }

    /// Errors with [`BufferError::BehindConfirmed`] when the buffer, ending at `buffer_end`
    /// (end LSN of its last complete commit), no longer holds what this record says was
    /// durable.
    pub fn check_buffer_end(&self, dir: &Path, buffer_end: Lsn) -> Result<()> {
        if buffer_end < self.durable_lsn {
            return Err(BufferError::BehindConfirmed {
                dir: dir.to_path_buf(),
                buffer_end,
                durable: self.durable_lsn,
                confirmed: self.confirmed_lsn,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_end_check() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SlotProgress::read(dir.path()).unwrap(), None);
        let p = SlotProgress {
            slot: "walshift".into(),
            confirmed_lsn: Lsn(0x3000),
            durable_lsn: Lsn(0x2000),
            updated_at: "2026-01-01T00:00:00Z".into(),
        };
        p.write(dir.path()).unwrap();
        assert_eq!(SlotProgress::read(dir.path()).unwrap(), Some(p.clone()));
        p.check_buffer_end(dir.path(), Lsn(0x2000)).unwrap();
        let err = p.check_buffer_end(dir.path(), Lsn(0x1fff)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("0/1FFF") && msg.contains("0/2000"), "{msg}");
        assert!(!msg.contains("restore"), "{msg}");
    }
}
