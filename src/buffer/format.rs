//! The on-disk format, as pure functions: segment file names, the segment header, record frames
//! and the few pgoutput tags and fields the buffer itself reads (a Commit's fields come from
//! [`crate::source::pgoutput::peek_commit`], which owns that layout). No I/O here;
//! `docs/buffer-format.md` describes the same bytes for people.

use crate::lsn::Lsn;

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"WSHFTSEG";
/// Version of the segment and record layout written by this build.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the segment header in bytes.
pub const HEADER_LEN: usize = 96;
/// Size of a record frame before its payload: `len u32 | crc u32 | lsn u64 | kind u8`.
pub const RECORD_HEADER_LEN: usize = 17;
/// Largest payload a record may carry (PostgreSQL caps a single datum at 1 GiB; a message
/// carrying several of them is still below this).
pub const MAX_PAYLOAD_LEN: u32 = 0x7FFF_FFFF;
/// High bit of the kind byte: the record is a relation-preamble copy, not an original message.
pub const PREAMBLE_FLAG: u8 = 0x80;
/// Segment-header flag: the segment starts inside a transaction (a `B` without its `C` yet).
pub const FLAG_IN_TXN: u32 = 1;

/// Suffix of segment file names.
pub const SEGMENT_SUFFIX: &str = ".wseg";

/// pgoutput tags the buffer itself interprets.
pub mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
}

/// A position in the log: segment sequence number and byte offset inside that segment file.
/// Offset 0 means "the start of the segment" (before its header and preamble).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub seq: u64,
    pub offset: u64,
}

impl Pos {
    pub const fn new(seq: u64, offset: u64) -> Pos {
        Pos { seq, offset }
    }
}

/// File name of segment `seq`: 16 lowercase hex digits, so lexical order is log order.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:016x}{SEGMENT_SUFFIX}")
}

/// The sequence number of a segment file name, `None` for any other file.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(SEGMENT_SUFFIX)?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The header at the start of every segment. Everything a reader needs to start in this
/// segment without reading earlier ones (the relation preamble follows it as records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u16,
    pub seq: u64,
    /// The segment starts inside a transaction; `txn_begin` is where its `B` record is.
    pub in_txn: bool,
    /// End LSN of the last commit record before this segment (`0/0` if none).
    pub prev_commit_end: Lsn,
    /// Position just after that commit record (`(seq, 0)` when it ended the previous segment,
    /// or the log's first segment when there is no commit before this one).
    pub resume: Pos,
    /// Position of the open transaction's `B` record when `in_txn`, else zero.
    pub txn_begin: Pos,
    /// Number of commit records before this segment, counted from the log's creation.
    pub commits_before: u64,
    /// Number of preamble records right after the header.
    pub preamble_records: u32,
}

/// Why bytes are not a valid segment header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    TooShort(usize),
    BadMagic,
    BadChecksum { stored: u32, computed: u32 },
    UnsupportedVersion(u16),
    BadLength(u16),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::TooShort(n) => {
                write!(f, "segment header truncated ({n} of {HEADER_LEN} bytes)")
            }
            HeaderError::BadMagic => write!(f, "not a walshift segment (bad magic bytes)"),
            HeaderError::BadChecksum { stored, computed } => write!(
                f,
                "segment header checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
            HeaderError::UnsupportedVersion(v) => write!(
                f,
                "segment format version {v} is not supported by this build (it reads version {FORMAT_VERSION})"
            ),
            HeaderError::BadLength(n) => write!(f, "segment header length {n} is invalid"),
        }
    }
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        let flags = if self.in_txn { FLAG_IN_TXN } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.prev_commit_end.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.resume.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.resume.offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.txn_begin.seq.to_le_bytes());
        b[56..64].copy_from_slice(&self.txn_begin.offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.commits_before.to_le_bytes());
        b[72..76].copy_from_slice(&self.preamble_records.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_LEN - 4]);
        b[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if b.len() < HEADER_LEN {
            return Err(HeaderError::TooShort(b.len()));
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let stored = le_u32(&b[HEADER_LEN - 4..]);
        let computed = crc32c::crc32c(&b[..HEADER_LEN - 4]);
        if stored != computed {
            return Err(HeaderError::BadChecksum { stored, computed });
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let len = u16::from_le_bytes([b[10], b[11]]);
        if len as usize != HEADER_LEN {
            return Err(HeaderError::BadLength(len));
        }
        Ok(SegmentHeader {
            version,
            in_txn: le_u32(&b[12..16]) & FLAG_IN_TXN != 0,
            seq: le_u64(&b[16..24]),
            prev_commit_end: Lsn(le_u64(&b[24..32])),
            resume: Pos::new(le_u64(&b[32..40]), le_u64(&b[40..48])),
            txn_begin: Pos::new(le_u64(&b[48..56]), le_u64(&b[56..64])),
            commits_before: le_u64(&b[64..72]),
            preamble_records: le_u32(&b[72..76]),
        })
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Checksum of a record: crc32c over `len | lsn | kind | payload` (everything but itself).
pub fn record_crc(len: u32, lsn: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut head = [0u8; 13];
    head[0..4].copy_from_slice(&len.to_le_bytes());
    head[4..12].copy_from_slice(&lsn.to_le_bytes());
    head[12] = kind;
    crc32c::crc32c_append(crc32c::crc32c(&head), payload)
}

/// Appends one record frame to `out`. The caller checked the payload length.
pub fn encode_record(out: &mut Vec<u8>, lsn: Lsn, kind: u8, payload: &[u8]) {
    let len = payload.len() as u32;
    let crc = record_crc(len, lsn.0, kind, payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&lsn.0.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// Size of the frame holding a payload of `payload_len` bytes.
pub fn frame_len(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + payload_len
}

/// A record frame parsed from the front of a byte slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameView {
    pub lsn: Lsn,
    /// The kind byte as stored, including [`PREAMBLE_FLAG`].
    pub kind: u8,
    /// Payload byte range relative to the start of the frame.
    pub payload_start: usize,
    pub payload_len: usize,
}

impl FrameView {
    pub fn frame_len(&self) -> usize {
        self.payload_start + self.payload_len
    }

    pub fn tag(&self) -> u8 {
        self.kind & !PREAMBLE_FLAG
    }

    pub fn is_preamble(&self) -> bool {
        self.kind & PREAMBLE_FLAG != 0
    }
}

/// Result of parsing the front of a byte slice as a record frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Valid(FrameView),
    /// Not enough bytes for the whole frame; `needed` is the frame's total size if the length
    /// field was readable and plausible.
    Incomplete {
        needed: Option<usize>,
    },
    /// The bytes are not a valid frame.
    Invalid(FrameError),
}

/// Why a complete-looking frame is not valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    BadLength(u32),
    BadChecksum {
        stored: u32,
        computed: u32,
    },
    /// The kind byte does not match the payload's pgoutput tag.
    KindMismatch {
        kind: u8,
        first_byte: u8,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadLength(n) => write!(
                f,
                "record length {n} is invalid (must be 1..={MAX_PAYLOAD_LEN})"
            ),
            FrameError::BadChecksum { stored, computed } => write!(
                f,
                "record checksum mismatch (stored {stored:08x}, computed {computed:08x})"
            ),
            FrameError::KindMismatch { kind, first_byte } => write!(
                f,
                "record kind {kind:#04x} does not match its payload's tag {first_byte:#04x}"
            ),
        }
    }
}

/// Parses and verifies the record frame at the start of `b`.
pub fn decode_record(b: &[u8]) -> Frame {
    if b.len() < 4 {
        return Frame::Incomplete { needed: None };
    }
    let len = le_u32(b);
    if len == 0 || len > MAX_PAYLOAD_LEN {
        return Frame::Invalid(FrameError::BadLength(len));
    }
    let total = frame_len(len as usize);
    if b.len() < total {
        return Frame::Incomplete {
            needed: Some(total),
        };
    }
    let stored = le_u32(&b[4..8]);
    let lsn = le_u64(&b[8..16]);
    let kind = b[16];
    let payload = &b[RECORD_HEADER_LEN..total];
    let computed = record_crc(len, lsn, kind, payload);
    if stored != computed {
        return Frame::Invalid(FrameError::BadChecksum { stored, computed });
    }
    if payload[0] != kind & !PREAMBLE_FLAG {
        return Frame::Invalid(FrameError::KindMismatch {
            kind,
            first_byte: payload[0],
        });
    }
    Frame::Valid(FrameView {
        lsn: Lsn(lsn),
        kind,
        payload_start: RECORD_HEADER_LEN,
        payload_len: len as usize,
    })
}

/// Offset of the first valid, complete record frame that starts strictly after `from` in `b`.
/// Used to tell a torn tail (nothing valid follows the damage) from corruption in the middle
/// of the data. Cheap pre-checks (plausible length, kind byte equal to the payload's first
/// byte) keep the checksum work rare.
pub fn find_valid_record_after(b: &[u8], from: usize) -> Option<usize> {
    let mut at = from + 1;
    while at + RECORD_HEADER_LEN < b.len() {
        let rest = &b[at..];
        let len = le_u32(rest);
        if len != 0
            && len <= MAX_PAYLOAD_LEN
            && frame_len(len as usize) <= rest.len()
            && rest[RECORD_HEADER_LEN] == rest[16] & !PREAMBLE_FLAG
            && matches!(decode_record(rest), Frame::Valid(_))
        {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// The relation (or type) OID of an `R` or `Y` payload: big-endian u32 after the tag.
pub fn object_id(payload: &[u8]) -> Option<u32> {
    (payload.len() >= 5).then(|| be_u32(&payload[1..5]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SegmentHeader {
        SegmentHeader {
            version: FORMAT_VERSION,
            seq: 7,
            in_txn: true,
            prev_commit_end: Lsn(0x1_0000_0010),
            resume: Pos::new(5, 4242),
            txn_begin: Pos::new(6, 100),
            commits_before: 12345,
            preamble_records: 3,
        }
    }

    #[test]
    fn header_roundtrip_and_checks() {
        let h = header();
        let b = h.encode();
        assert_eq!(&b[..8], b"WSHFTSEG");
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        assert_eq!(
            SegmentHeader::decode(&b[..50]),
            Err(HeaderError::TooShort(50))
        );
        let mut bad = b;
        bad[20] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&bad),
            Err(HeaderError::BadChecksum { .. })
        ));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderError::BadMagic));
    }

    #[test]
    fn unsupported_version_is_named() {
        let mut b = header().encode();
        b[8] = 9;
        let crc = crc32c::crc32c(&b[..HEADER_LEN - 4]);
        b[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(HeaderError::UnsupportedVersion(9))
        );
    }

    #[test]
    fn record_roundtrip_layout() {
        let mut out = Vec::new();
        encode_record(&mut out, Lsn(0x0102_0304_0506_0708), b'I', b"Ihello");
        assert_eq!(out.len(), 17 + 6);
        assert_eq!(&out[0..4], &6u32.to_le_bytes());
        assert_eq!(&out[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(out[16], b'I');
        match decode_record(&out) {
            Frame::Valid(v) => {
                assert_eq!(v.lsn, Lsn(0x0102_0304_0506_0708));
                assert_eq!(v.tag(), b'I');
                assert!(!v.is_preamble());
                assert_eq!(&out[v.payload_start..v.frame_len()], b"Ihello");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn record_damage_is_detected() {
        let mut out = Vec::new();
        encode_record(&mut out, Lsn(9), b'R' | PREAMBLE_FLAG, b"R\0\0\0\x01xyz");
        assert!(matches!(decode_record(&out), Frame::Valid(v) if v.is_preamble()));
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x40;
            assert!(
                !matches!(decode_record(&bad), Frame::Valid(_)),
                "flip at {i} undetected"
            );
        }
        assert_eq!(
            decode_record(&out[..10]),
            Frame::Incomplete {
                needed: Some(out.len())
            }
        );
        assert_eq!(decode_record(&out[..3]), Frame::Incomplete { needed: None });
        assert_eq!(
            decode_record(&[0, 0, 0, 0, 1, 2, 3]),
            Frame::Invalid(FrameError::BadLength(0))
        );
    }

    #[test]
    fn finds_valid_record_after_damage() {
        let mut out = Vec::new();
        encode_record(&mut out, Lsn(1), b'B', b"Bxxxxxxxxxxxxxxxxxxxx");
        let second = out.len();
        encode_record(&mut out, Lsn(2), b'I', b"Iyy");
        out[3] = 0x7f;
        assert_eq!(find_valid_record_after(&out, 0), Some(second));
        assert_eq!(find_valid_record_after(&out, second), None);
    }

    #[test]
    fn names_sort_in_log_order() {
        assert_eq!(segment_file_name(1), "0000000000000001.wseg");
        assert!(segment_file_name(0xff) < segment_file_name(0x100));
        assert_eq!(
            parse_segment_file_name(&segment_file_name(0xabc)),
            Some(0xabc)
        );
        assert_eq!(parse_segment_file_name("buffer.json"), None);
        assert_eq!(parse_segment_file_name("000000000000000G.wseg"), None);
        assert_eq!(parse_segment_file_name("0000000000000001.wseg.tmp"), None);
    }

    #[test]
    fn object_ids() {
        assert_eq!(object_id(b"R\0\0\x01\x02rest"), Some(0x102));
        assert_eq!(object_id(b"R\0\0\x01"), None);
    }
}
