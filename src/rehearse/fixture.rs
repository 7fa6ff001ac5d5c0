//! The fixture directory: its manifest (`fixture.toml`), its expectation (`expect.json`) and
//! the integrity check of its buffer. Format: `docs/fixtures.md`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::RehearseError;
use crate::buffer::{BufferReader, TxnEvent};
use crate::lsn::Lsn;
use crate::transform::{Mapping, TableName};

/// Version of the fixture format written by `walshift fixture record`.
pub const FORMAT_VERSION: u32 = 1;

/// `fixture.toml`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// Short name (the directory's name by convention).
    pub name: String,
    /// What the fixture is.
    pub description: String,
    /// What it exercises (free-form tags, e.g. `split`, `toast-unchanged`).
    #[serde(default)]
    pub exercises: Vec<String>,
    /// The source tables captured (`schema.table`), in name order: the tables verified.
    pub tables: Vec<String>,
    /// Starting rows: `data.sql` (a `pg_dump --data-only` at the slot's snapshot) or
    /// `generate.sql` (deterministic SQL producing the same rows).
    pub rows: RowsFile,
    /// Migration scripts, run in order with `walshift migrate` before replay. Default none.
    #[serde(default)]
    pub migration: Vec<String>,
    /// The mapping file replay goes through. Default none (identity).
    #[serde(default)]
    pub mapping: Option<String>,
    /// How it was recorded.
    pub recorded: Recorded,
    /// What the buffer holds, to detect a damaged or truncated copy.
    pub buffer: BufferSummary,
}

/// Which file holds the starting rows.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RowsFile {
    /// `data.sql`: `pg_dump --data-only` output, loaded with `session_replication_role = replica`.
    Data,
    /// `generate.sql`: plain SQL run once after the schema.
    Generate,
}

impl RowsFile {
    pub fn file_name(self) -> &'static str {
        match self {
            RowsFile::Data => "data.sql",
            RowsFile::Generate => "generate.sql",
        }
    }
}

/// Provenance of a recording.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    /// `server_version` of the source.
    pub server_version: String,
    /// The slot's consistent point (where the buffer starts; the snapshot of schema and rows).
    pub consistent_point: String,
    /// When recording finished (UTC, RFC 3339).
    pub at: String,
}

/// Transactions, changes and end of the buffer, and every segment's size and SHA-256.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BufferSummary {
    pub transactions: u64,
    pub changes: u64,
    /// End LSN of the last commit.
    pub end_lsn: String,
    /// Seconds between the first and the last commit.
    pub span_secs: f64,
    pub segments: Vec<SegmentSum>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SegmentSum {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `expect.json`: per target table, what the target holds after migrate + replay.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `source`: computed on the quiescent source through the mapping by `fixture record`
    /// (verify's source side); `rehearsal`: the target after the first rehearsal
    /// (`rehearse --write-expect`), i.e. a regression baseline, not an independent check.
    pub expect_from: ExpectFrom,
    /// The buffer's end the expectation corresponds to.
    pub end_lsn: String,
    pub tables: Vec<ExpectTable>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExpectFrom {
    Source,
    Rehearsal,
}

impl std::fmt::Display for ExpectFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExpectFrom::Source => "source",
            ExpectFrom::Rehearsal => "rehearsal",
        })
    }
}

/// One target table: verify's row count and checksum (`docs/verify.md`) over `columns`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExpectTable {
    pub source: String,
    pub target: String,
    pub columns: Vec<String>,
    pub rows: i64,
    pub checksum: String,
}

/// A fixture directory, its manifest read.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Fixture {
    /// Reads `fixture.toml` and checks that every file it names exists.
    pub fn open(dir: impl AsRef<Path>) -> Result<Fixture, RehearseError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join("fixture.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| RehearseError::Io {
            what: "reading the fixture manifest",
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest = toml::from_str(&text).map_err(|e| RehearseError::Manifest {
            path: path.clone(),
            message: e.message().trim().to_owned(),
        })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(RehearseError::Manifest {
                path,
                message: format!(
                    "format_version {} is not supported (this walshift reads {FORMAT_VERSION})",
                    manifest.format_version
                ),
            });
        }
        let fixture = Fixture { dir, manifest };
        let mut needed = vec![
            fixture.schema_path(),
            fixture.rows_path(),
            fixture.buffer_dir().join("buffer.json"),
        ];
        needed.extend(fixture.migration_paths());
        needed.extend(fixture.mapping_path());
        for p in needed {
            if !p.is_file() {
                return Err(RehearseError::MissingFile(p));
            }
        }
        Ok(fixture)
    }

    pub fn buffer_dir(&self) -> PathBuf {
        self.dir.join("buffer")
    }
    pub fn schema_path(&self) -> PathBuf {
        self.dir.join("schema.sql")
    }
    pub fn rows_path(&self) -> PathBuf {
        self.dir.join(self.manifest.rows.file_name())
    }
    pub fn expect_path(&self) -> PathBuf {
        self.dir.join("expect.json")
    }
    pub fn migration_paths(&self) -> Vec<PathBuf> {
        self.manifest
            .migration
            .iter()
            .map(|m| self.dir.join(m))
            .collect()
    }
    pub fn mapping_path(&self) -> Option<PathBuf> {
        self.manifest.mapping.as_ref().map(|m| self.dir.join(m))
    }

    /// The mapping replay and verify go through (identity without a mapping file).
    pub fn mapping(&self) -> Result<Mapping, RehearseError> {
        match self.mapping_path() {
            Some(p) => Ok(Mapping::load(&p)?),
            None => Ok(Mapping::identity()),
        }
    }

    /// The source tables, parsed.
    pub fn tables(&self) -> Result<Vec<TableName>, RehearseError> {
        self.manifest
            .tables
            .iter()
            .map(|t| {
                TableName::parse(t).ok_or_else(|| RehearseError::Manifest {
                    path: self.dir.join("fixture.toml"),
                    message: format!("tables: {t:?} is not a table name"),
                })
            })
            .collect()
    }

    /// `expect.json`, if present.
    pub fn expect(&self) -> Result<Option<Expect>, RehearseError> {
        let path = self.expect_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RehearseError::Io {
                    what: "reading the expectation",
                    path,
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| RehearseError::Manifest {
                path,
                message: e.to_string(),
            })
    }

    /// Writes `expect.json` (pretty, one table a block, trailing newline).
    pub fn write_expect(&self, expect: &Expect) -> Result<(), RehearseError> {
        write_json(&self.expect_path(), expect)
    }
}

pub(crate) fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), RehearseError> {
    let mut text = serde_json::to_string_pretty(v).expect("serializable");
    text.push('\n');
    std::fs::write(path, text).map_err(|source| RehearseError::Io {
        what: "writing",
        path: path.to_owned(),
        source,
    })
}

/// One committed transaction of the buffer: its end, commit time and row changes.
#[derive(Clone, Copy, Debug)]
pub struct TxnSummary {
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time_us: i64,
    pub changes: u64,
}

/// Reads every record of the buffer (each record's CRC is checked by the reader: damage is
/// an error naming the segment and offset) and returns its transactions in commit order.
pub fn scan_transactions(buffer_dir: &Path) -> Result<Vec<TxnSummary>, RehearseError> {
    let reader = BufferReader::open(buffer_dir)?;
    let mut out = Vec::new();
    let mut changes = 0u64;
    for ev in reader.transactions_from(Lsn::ZERO)? {
        match ev? {
            TxnEvent::Begin(_) => changes = 0,
            TxnEvent::Change(r) => {
                if matches!(r.payload.first(), Some(b'I' | b'U' | b'D')) && !r.preamble {
                    changes += 1;
                }
            }
            TxnEvent::Commit { commit, .. } => out.push(TxnSummary {
                end_lsn: commit.end_lsn,
                commit_time_us: commit.commit_time_us.unwrap_or(0),
                changes,
            }),
            TxnEvent::Standalone(_) => {}
        }
    }
    Ok(out)
}

/// Segment files of the buffer, in order, with size and SHA-256.
pub fn segment_sums(buffer_dir: &Path) -> Result<Vec<SegmentSum>, RehearseError> {
    let io = |path: &Path, source| RehearseError::Io {
        what: "reading the buffer",
        path: path.to_owned(),
        source,
    };
    let mut names: Vec<String> = std::fs::read_dir(buffer_dir)
        .map_err(|e| io(buffer_dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wseg"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|file| {
            let path = buffer_dir.join(&file);
            let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
            Ok(SegmentSum {
                bytes: bytes.len() as u64,
                sha256: hex(&Sha256::digest(&bytes)),
                file,
            })
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Summary of a buffer for the manifest.
pub fn summarize(buffer_dir: &Path) -> Result<BufferSummary, RehearseError> {
    let txns = scan_transactions(buffer_dir)?;
    Ok(BufferSummary {
        transactions: txns.len() as u64,
        changes: txns.iter().map(|t| t.changes).sum(),
        end_lsn: txns
            .last()
            .map(|t| t.end_lsn)
            .unwrap_or(Lsn::ZERO)
            .to_string(),
        span_secs: match (txns.first(), txns.last()) {
            (Some(a), Some(b)) => (b.commit_time_us - a.commit_time_us) as f64 / 1e6,
            _ => 0.0,
        },
        segments: segment_sums(buffer_dir)?,
    })
}

/// Checks the buffer against the manifest: every record readable and CRC-valid, then the
/// same transactions, changes and end, then the same segment files byte for byte. A damaged
/// record at the very end of the last segment looks like a torn write to the buffer reader;
/// the manifest's end LSN and checksums catch it.
pub fn check_buffer(fixture: &Fixture) -> Result<Vec<TxnSummary>, RehearseError> {
    let dir = fixture.buffer_dir();
    let txns = scan_transactions(&dir)?;
    let want = &fixture.manifest.buffer;
    let end = txns
        .last()
        .map(|t| t.end_lsn)
        .unwrap_or(Lsn::ZERO)
        .to_string();
    let changes: u64 = txns.iter().map(|t| t.changes).sum();
    if txns.len() as u64 != want.transactions || changes != want.changes || end != want.end_lsn {
        return Err(RehearseError::Corrupt {
            dir,
            detail: format!(
                "the buffer reads as {} transactions, {changes} changes, ending at {end}; fixture.toml \
                 says {} transactions, {} changes, ending at {} (a truncated or damaged segment)",
                txns.len(),
                want.transactions,
                want.changes,
                want.end_lsn
            ),
        });
    }
    let sums = segment_sums(&dir)?;
    for w in &want.segments {
        match sums.iter().find(|s| s.file == w.file) {
            None => {
                return Err(RehearseError::Corrupt {
                    dir,
                    detail: format!("segment {} is missing", w.file),
                });
            }
            Some(s) if s.bytes != w.bytes || s.sha256 != w.sha256 => {
                return Err(RehearseError::Corrupt {
                    dir,
                    detail: format!(
                        "segment {} differs from the recording ({} bytes, sha256 {}; recorded {} bytes, sha256 {})",
                        w.file, s.bytes, s.sha256, w.bytes, w.sha256
                    ),
                });
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = sums
        .iter()
        .find(|s| !want.segments.iter().any(|w| w.file == s.file))
    {
        return Err(RehearseError::Corrupt {
            dir,
            detail: format!("segment {} is not part of the recording", extra.file),
        });
    }
    Ok(txns)
}
