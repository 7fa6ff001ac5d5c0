//! The replication slot and the publication on the source, over a regular SQL session.

/// The replication slot walshift creates and reads when none is named (`--slot`).
pub const DEFAULT_SLOT: &str = "walshift";

/// The publication walshift creates and streams when none is named (`--publication`).
pub const DEFAULT_PUBLICATION: &str = "walshift";

/// PostgreSQL's rule for replication slot names: 1–63 lower-case letters, digits and
/// underscores. Checked before anything is created, so a bad name never leaves a publication
/// behind.
pub fn valid_slot_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
