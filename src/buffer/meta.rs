//! `buffer.json`: which source a buffer was captured from. Capture writes it when it starts a
//! buffer and refuses to append to a buffer from another source.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{BufferError, Result};
use super::format::FORMAT_VERSION;
use super::fs::{FileSystem, StdFs};

/// File name of the metadata file inside a buffer directory.
pub const META_FILE: &str = "buffer.json";

/// The identity of a buffer's source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferMeta {
    /// Segment format version of the buffer.
    pub format_version: u16,
    /// The source cluster's system identifier (`IDENTIFY_SYSTEM`), stored as a string because
    /// it does not fit a JSON number exactly.
    #[serde(with = "u64_as_string")]
    pub system_identifier: u64,
    /// Source database name.
    pub database: String,
    /// Replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// When the buffer was started, RFC 3339 UTC.
    pub created_at: String,
    /// Where the slot stood when this buffer took it: the consistent point of a slot this
    /// buffer created, or the confirmed position of a slot it adopted (`--adopt-slot`).
    /// Absent in buffers written before walshift recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_start_lsn: Option<crate::lsn::Lsn>,
}

impl BufferMeta {
    /// Metadata for a new buffer, stamped with the current time.
    pub fn new(
        system_identifier: u64,
        database: impl Into<String>,
        slot: impl Into<String>,
        publication: impl Into<String>,
    ) -> BufferMeta {
        BufferMeta {
            format_version: FORMAT_VERSION,
            system_identifier,
            database: database.into(),
            slot: slot.into(),
            publication: publication.into(),
            created_at: rfc3339_utc(std::time::SystemTime::now()),
            slot_start_lsn: None,
        }
    }

    /// Records where the slot stood when this buffer took it.
    pub fn with_slot_start(mut self, lsn: crate::lsn::Lsn) -> BufferMeta {
        self.slot_start_lsn = Some(lsn);
        self
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(META_FILE)
    }

    /// Reads `dir/buffer.json`; `None` if there is none.
    pub fn read(dir: &Path) -> Result<Option<BufferMeta>> {
        read_json(&Self::path(dir))
    }

    /// Writes `dir/buffer.json` atomically (temp file, fsync, rename, directory fsync).
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.write_with(dir, &StdFs)
    }

    pub fn write_with(&self, dir: &Path, fs: &dyn FileSystem) -> Result<()> {
        write_json(&Self::path(dir), self, fs)
    }

    /// Errors unless `found` describes the same source (system identifier, database, slot,
    /// publication) as `self`.
    pub fn check_same_source(&self, found: &BufferMeta, dir: &Path) -> Result<()> {
        let fields: [(&'static str, String, String); 4] = [
            (
                "system identifier",
                self.system_identifier.to_string(),
                found.system_identifier.to_string(),
            ),
            ("database", self.database.clone(), found.database.clone()),
            ("slot", self.slot.clone(), found.slot.clone()),
            (
                "publication",
                self.publication.clone(),
                found.publication.clone(),
            ),
        ];
        for (field, expected, found) in fields {
            if expected != found {
                return Err(BufferError::SourceMismatch {
                    path: Self::path(dir),
                    field,
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }

    /// Capture's check: writes `expected` if the buffer has no metadata yet, otherwise
    /// verifies the stored metadata names the same source and returns it.
    pub fn ensure(dir: &Path, expected: &BufferMeta) -> Result<BufferMeta> {
        match Self::read(dir)? {
            Some(found) => {
                expected.check_same_source(&found, dir)?;
                Ok(found)
            }
            None => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| BufferError::io("create directory", dir, e))?;
                expected.write(dir)?;
                Ok(expected.clone())
            }
        }
    }
}

mod u64_as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a time after 1970.
pub(crate) fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Reads one of the buffer's JSON records; `None` if the file does not exist.
pub(super) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BufferError::io("read", path, e)),
    };
    serde_json::from_slice(&data)
        .map(Some)
        .map_err(|source| BufferError::Meta {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes one of the buffer's JSON records atomically and durably (temp file, fsync, rename,
/// directory fsync).
pub(super) fn write_json<T: Serialize>(path: &Path, value: &T, fs: &dyn FileSystem) -> Result<()> {
    let mut data = serde_json::to_vec_pretty(value).map_err(|source| BufferError::Meta {
        path: path.to_path_buf(),
        source,
    })?;
    data.push(b'\n');
    fs.write_atomic(path, &data)
        .map_err(|e| BufferError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_709_210_096);
        assert_eq!(rfc3339_utc(t), "2024-02-29T12:34:56Z");
        assert_eq!(rfc3339_utc(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn roundtrip_and_source_check() {
        let dir = tempfile::tempdir().unwrap();
        let m = BufferMeta::new(7_300_000_000_000_000_123, "app", "walshift", "walshift");
        assert_eq!(BufferMeta::ensure(dir.path(), &m).unwrap(), m);
        let text = std::fs::read_to_string(BufferMeta::path(dir.path())).unwrap();
        assert!(text.contains("\"7300000000000000123\""), "{text}");
        assert_eq!(BufferMeta::read(dir.path()).unwrap(), Some(m.clone()));
        let other = BufferMeta::new(1, "app", "walshift", "walshift");
        let err = BufferMeta::ensure(dir.path(), &other).unwrap_err();
        assert!(matches!(
            err,
            BufferError::SourceMismatch {
                field: "system identifier",
                ..
            }
        ));
    }
}
