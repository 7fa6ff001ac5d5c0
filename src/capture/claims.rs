//! What ties a buffer directory to what it started on the source: the slot it is about to
//! create ([`CLAIM_FILE`]) and the clones it began ([`CLONES_FILE`]). Both let a start that was
//! interrupted recognise its own leftovers instead of refusing them as another buffer's.

use super::{CaptureConfig, CaptureError};
use crate::clone::{self, CloneStatus};
use crate::lsn::Lsn;

/// File a new buffer directory gets just before capture creates its slot (`{"system_identifier",
/// "slot"}`), removed once `buffer.json` records the slot. A start interrupted in between
/// finds it and takes over the slot it created, instead of refusing it as another buffer's.
pub const CLAIM_FILE: &str = "slot-claim.json";

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SlotClaim {
    pub(super) system_identifier: String,
    pub(super) slot: String,
}

/// File listing every clone this buffer started (`{"clones": [{"system_identifier",
/// "database", "slot", "consistent_lsn"}]}`), each entry written before its clone records
/// itself on the target. A target whose unfinished (`copying`) clone record names one of them
/// is this buffer's own interrupted clone, redone without `--force`; any other is refused.
pub const CLONES_FILE: &str = "clones.json";

#[derive(Default, serde::Serialize, serde::Deserialize)]
pub(super) struct CloneAttempts {
    clones: Vec<CloneAttempt>,
}

#[derive(PartialEq, serde::Serialize, serde::Deserialize)]
struct CloneAttempt {
    system_identifier: String,
    database: String,
    slot: String,
    consistent_lsn: Lsn,
}

impl From<&clone::CloneOrigin> for CloneAttempt {
    fn from(o: &clone::CloneOrigin) -> Self {
        CloneAttempt {
            system_identifier: o.system_identifier.to_string(),
            database: o.database.clone(),
            slot: o.slot.clone(),
            consistent_lsn: o.consistent_lsn,
        }
    }
}

pub(super) fn read_clone_attempts(dir: &std::path::Path) -> Result<CloneAttempts, CaptureError> {
    let path = dir.join(CLONES_FILE);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data).map_err(|e| {
            crate::Error::io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "not a walshift clone list ({e}); restore it or remove the buffer directory"
                    ),
                ),
            )
            .into()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CloneAttempts::default()),
        Err(e) => Err(crate::Error::io(&path, e).into()),
    }
}

/// Adds `origin` to [`CLONES_FILE`] (fsynced) unless it is there.
pub(super) fn record_clone_attempt(
    config: &CaptureConfig,
    origin: &clone::CloneOrigin,
) -> Result<(), CaptureError> {
    let mut attempts = read_clone_attempts(&config.buffer_dir)?;
    let attempt = CloneAttempt::from(origin);
    if attempts.clones.contains(&attempt) {
        return Ok(());
    }
    attempts.clones.push(attempt);
    let path = config.buffer_dir.join(CLONES_FILE);
    let data = serde_json::to_vec_pretty(&attempts).expect("serializable");
    crate::buffer::fs::FileSystem::write_atomic(config.buffer.fs.as_ref(), &path, &data)
        .map_err(|e| crate::Error::io(&path, e))?;
    Ok(())
}

/// Whether `state` is an unfinished clone this buffer started (see [`CLONES_FILE`]).
pub(super) fn own_unfinished_clone(
    state: Option<&clone::CloneState>,
    attempts: &CloneAttempts,
) -> bool {
    state.is_some_and(|s| {
        s.status == CloneStatus::Copying
            && s.origin
                .as_ref()
                .is_some_and(|o| attempts.clones.contains(&CloneAttempt::from(o)))
    })
}
