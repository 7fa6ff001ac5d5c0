//! The writer: appends records to an in-memory group, hands finished groups to a sync thread
//! that writes and fdatasyncs them, and reports the durable LSN.
//!
//! # Durability contract
//!
//! The LSN returned by [`BufferWriter::flush`], [`BufferWriter::poll`] and
//! [`BufferWriter::durable_lsn`] is the end LSN of the last commit record whose bytes (and the
//! bytes of everything before it, including the segment file's directory entry) have been
//! written **and fdatasynced**. It never passes what is on stable storage. Capture confirms only
//! this LSN to the replication slot, so the source keeps everything the buffer could still lose.
//!
//! After any failed write or fsync the writer stops: every later call returns
//! [`BufferError::WriteFailed`] and the durable LSN stays where it was. There is no retry: after
//! a failed fsync the kernel may have dropped the dirty pages, so a retry could "succeed"
//! without the data. Drop the writer, exit the process, and open the buffer again; recovery
//! truncates whatever did not reach the disk and capture resumes from the durable LSN.
//!
//! After the replication stream breaks, also drop and reopen the writer before streaming again:
//! recovery cuts the incomplete transaction the server is about to send again.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::error::{BufferError, Result};
use super::format::{self, HEADER_LEN, PREAMBLE_FLAG, Pos, SegmentHeader, tag};
use super::fs::{FileSystem, WritableFile};
use super::recovery::{self, RecoveryReport, Relations};
use super::segment::{CommitInfo, TxnState, list_segments, segment_path};
use super::{BufferConfig, LOCK_FILE};
use crate::lsn::Lsn;

/// Groups handed to the sync thread and not yet synced; the next hand-off waits beyond this.
const MAX_INFLIGHT: usize = 2;
const INITIAL_CAPACITY: usize = 1 << 20;

/// Appends pgoutput messages to a buffer directory. See the module docs for the durability
/// contract.
pub struct BufferWriter {
    dir: PathBuf,
    config: BufferConfig,
    _lock: File,
    seq: u64,
    /// Length of the current segment including bytes not yet handed off.
    seg_len: u64,
    /// The current segment holds a record besides its header and preamble.
    seg_has_records: bool,
    /// `resume` of the current segment's header (used while no commit has been appended).
    seg_resume: Pos,
    /// Bytes for the current segment not yet handed to the sync thread.
    pending: Vec<u8>,
    /// `pending` starts with the header of a segment file that does not exist yet.
    pending_create: bool,
    /// Bytes of earlier (rolled) segments not yet handed off.
    sealed: Vec<Chunk>,
    state: TxnState,
    relations: Relations,
    durable: Option<CommitInfo>,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    inflight: usize,
    /// fdatasync/fsync calls the sync thread completed.
    syncs: u64,
    spare: Vec<Vec<u8>>,
    failed: Option<Arc<BufferError>>,
    thread: Option<JoinHandle<()>>,
}

struct Chunk {
    seq: u64,
    create: bool,
    data: Vec<u8>,
}

struct Job {
    chunks: Vec<Chunk>,
    commit: Option<CommitInfo>,
}

enum Done {
    Synced {
        commit: Option<CommitInfo>,
        bufs: Vec<Vec<u8>>,
        syncs: u64,
    },
    Failed(BufferError),
}

impl std::fmt::Debug for BufferWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferWriter")
            .field("dir", &self.dir)
            .field("segment", &self.seq)
            .field("segment_len", &self.seg_len)
            .field("durable_lsn", &self.durable_lsn())
            .field("failed", &self.failed.is_some())
            .finish_non_exhaustive()
    }
}

impl BufferWriter {
    /// Opens the buffer in `dir` for appending, creating the directory and the first segment if
    /// needed, or recovering an existing buffer (see [`RecoveryReport`]). Only one writer may
    /// hold a directory at a time.
    pub fn open(
        dir: impl AsRef<Path>,
        config: BufferConfig,
    ) -> Result<(BufferWriter, RecoveryReport)> {
        let dir = dir.as_ref().to_path_buf();
        config.validate()?;
        super::create_private_dir(&dir)?;
        let lock = lock_dir(&dir)?;
        let mut report = RecoveryReport::default();
        let recovered = recovery::recover(&dir, &config, &mut report)?;

        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(MAX_INFLIGHT);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let fs = config.fs.clone();
        let sync_dir = dir.clone();
        let thread = std::thread::Builder::new()
            .name("walshift-buffer-sync".into())
            .spawn(move || sync_thread(fs, sync_dir, jobs_rx, done_tx))
            .map_err(|e| BufferError::io("start the sync thread for", &dir, e))?;

        let mut w = BufferWriter {
            dir,
            config,
            _lock: lock,
            seq: 0,
            seg_len: 0,
            seg_has_records: false,
            seg_resume: Pos::default(),
            pending: Vec::with_capacity(INITIAL_CAPACITY),
            pending_create: false,
            sealed: Vec::new(),
            state: TxnState::default(),
            relations: Relations::new(),
            durable: None,
            jobs: Some(jobs_tx),
            done: done_rx,
            inflight: 0,
            syncs: 0,
            spare: Vec::new(),
            failed: None,
            thread: Some(thread),
        };
        match recovered {
            Some(r) => {
                w.seq = r.seq;
                w.seg_len = r.seg_len;
                w.seg_has_records = r.seg_has_records;
                w.seg_resume = r.header.resume;
                w.durable = r.state.last_commit;
                w.state = r.state;
                w.relations = r.relations;
            }
            None => {
                report.created = true;
                w.start_segment(1, Pos::new(1, 0));
                w.flush()?;
            }
        }
        report.segments = list_segments(&w.dir)?.len();
        report.durable_lsn = w.durable_lsn();
        report.last_commit = w.durable;
        Ok((w, report))
    }

    /// The buffer directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one pgoutput message. `kind` is its tag byte (`payload[0]`); `lsn` is the
    /// transaction's end LSN for a commit (`C`) and the XLogData start position otherwise.
    ///
    /// Cheap: copies into the current group in memory, no system call. Nothing is durable
    /// until a [`flush`](Self::flush) (or a [`submit`](Self::submit) that the sync thread
    /// finished) covers it.
    pub fn append(&mut self, lsn: Lsn, kind: u8, payload: &[u8]) -> Result<()> {
        self.check_failed()?;
        let invalid = |reason: String| Err(BufferError::InvalidRecord { lsn, reason });
        if kind & PREAMBLE_FLAG != 0 {
            return invalid(format!("kind {kind:#04x} is not a pgoutput tag"));
        }
        if payload.first() != Some(&kind) {
            return invalid(format!(
                "payload must start with its tag {:?}",
                kind as char
            ));
        }
        if payload.len() > format::MAX_PAYLOAD_LEN as usize {
            return invalid(format!("payload of {} bytes is too large", payload.len()));
        }
        let object = match kind {
            tag::RELATION | tag::TYPE => match format::object_id(payload) {
                Some(oid) => Some(oid),
                None => return invalid("relation/type message without an OID".into()),
            },
            _ => None,
        };
        let seq_err = |reason: String| Err(BufferError::Sequence { lsn, reason });
        match kind {
            tag::BEGIN if self.state.in_txn => {
                return seq_err(
                    "begin while a transaction is open (its commit never arrived)".into(),
                );
            }
            tag::COMMIT if !self.state.in_txn => {
                return seq_err("commit without a begin".into());
            }
            tag::COMMIT => {
                if let Some(prev) = self.state.last_commit
                    && lsn <= prev.end_lsn
                {
                    return seq_err(format!(
                        "commit end LSN does not advance past the previous commit's {}",
                        prev.end_lsn
                    ));
                }
            }
            _ => {}
        }

        let frame = format::frame_len(payload.len()) as u64;
        if self.seg_has_records && self.seg_len + frame > self.config.segment_size {
            self.roll();
        }
        let pos = Pos::new(self.seq, self.seg_len);
        format::encode_record(&mut self.pending, lsn, kind, payload);
        self.seg_len += frame;
        self.seg_has_records = true;
        match kind {
            tag::BEGIN => {
                self.state.in_txn = true;
                self.state.txn_begin = pos;
            }
            tag::COMMIT => {
                self.state.in_txn = false;
                self.state.commits += 1;
                self.state.last_commit = Some(CommitInfo::from_record(lsn, payload));
                self.state.after_commit = Some(Pos::new(self.seq, self.seg_len));
            }
            _ => {}
        }
        if let Some(oid) = object {
            let entry = self.relations.entry((kind, oid)).or_default();
            entry.0 = lsn;
            entry.1.clear();
            entry.1.extend_from_slice(payload);
        }
        Ok(())
    }

    /// Bytes appended but not yet handed to the sync thread.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len() + self.sealed.iter().map(|c| c.data.len()).sum::<usize>()
    }

    /// Hands the appended records to the sync thread and returns at once; appends continue
    /// while it writes and fsyncs. Blocks only when earlier groups are still syncing.
    /// [`poll`](Self::poll) or [`flush`](Self::flush) collect the result.
    pub fn submit(&mut self) -> Result<()> {
        self.check_failed()?;
        self.collect()?;
        if self.pending.is_empty() && self.sealed.is_empty() {
            return Ok(());
        }
        while self.inflight >= MAX_INFLIGHT {
            self.collect_one()?;
        }
        let mut chunks = std::mem::take(&mut self.sealed);
        let next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(INITIAL_CAPACITY));
        chunks.push(Chunk {
            seq: self.seq,
            create: std::mem::take(&mut self.pending_create),
            data: std::mem::replace(&mut self.pending, next),
        });
        let job = Job {
            chunks,
            commit: self.state.last_commit,
        };
        let sent = self.jobs.as_ref().map(|tx| tx.send(job).is_ok());
        if sent != Some(true) {
            return Err(self.fail(BufferError::Config(
                "the buffer sync thread stopped unexpectedly".into(),
            )));
        }
        self.inflight += 1;
        Ok(())
    }

    /// Writes and fdatasyncs everything appended so far (and fsyncs the directory when a
    /// segment file was created), then returns the durable LSN: the end LSN of the last commit
    /// now on disk. On error nothing more is durable than before, and the writer stops.
    pub fn flush(&mut self) -> Result<Lsn> {
        self.submit()?;
        while self.inflight > 0 {
            self.collect_one()?;
        }
        Ok(self.durable_lsn())
    }

    /// Collects finished syncs without blocking and returns the durable LSN. Errors if a sync
    /// failed.
    pub fn poll(&mut self) -> Result<Lsn> {
        self.check_failed()?;
        self.collect()?;
        Ok(self.durable_lsn())
    }

    /// End LSN of the last commit known to be fsynced (as of the last `flush` / `poll` /
    /// `submit`); `0/0` if none. Never passes what is on disk.
    pub fn durable_lsn(&self) -> Lsn {
        self.durable.map(|c| c.end_lsn).unwrap_or(Lsn::ZERO)
    }

    /// fdatasync and directory fsync calls completed since the writer opened (as of the last
    /// `flush` / `poll` / `submit`).
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// The last commit known to be fsynced.
    pub fn durable_commit(&self) -> Option<CommitInfo> {
        self.durable
    }

    /// The last commit appended (durable or not).
    pub fn last_commit(&self) -> Option<CommitInfo> {
        self.state.last_commit
    }

    /// True while a transaction's `B` has been appended without its `C`.
    pub fn in_transaction(&self) -> bool {
        self.state.in_txn
    }

    /// Flushes and closes; returns the durable LSN.
    pub fn close(mut self) -> Result<Lsn> {
        self.flush()
    }

    fn check_failed(&self) -> Result<()> {
        match &self.failed {
            Some(cause) => Err(BufferError::WriteFailed {
                durable: self.durable_lsn(),
                source: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail(&mut self, cause: BufferError) -> BufferError {
        let cause = Arc::new(cause);
        self.failed = Some(cause.clone());
        tracing::error!(dir = %self.dir.display(), durable_lsn = %self.durable_lsn(), "buffer writer stopped: {cause}");
        BufferError::WriteFailed {
            durable: self.durable_lsn(),
            source: cause,
        }
    }

    fn collect(&mut self) -> Result<()> {
        while self.inflight > 0 {
            match self.done.try_recv() {
                Ok(d) => self.handle_done(d)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn collect_one(&mut self) -> Result<()> {
        match self.done.recv() {
            Ok(d) => self.handle_done(d),
            Err(_) => Err(self.fail(BufferError::Config(
                "the buffer sync thread stopped unexpectedly".into(),
            ))),
        }
    }

    fn handle_done(&mut self, d: Done) -> Result<()> {
        self.inflight -= 1;
        match d {
            Done::Synced {
                commit,
                bufs,
                syncs,
            } => {
                self.syncs += syncs;
                if commit.is_some() {
                    self.durable = commit;
                }
                for mut b in bufs {
                    if self.spare.len() < MAX_INFLIGHT + 1 && b.capacity() <= 64 * INITIAL_CAPACITY
                    {
                        b.clear();
                        self.spare.push(b);
                    }
                }
                Ok(())
            }
            Done::Failed(e) => {
                if self.failed.is_some() {
                    return self.check_failed();
                }
                Err(self.fail(e))
            }
        }
    }

    /// Ends the current segment (in memory) and starts the next with its header and the
    /// relation preamble.
    fn roll(&mut self) {
        let next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(INITIAL_CAPACITY));
        let data = std::mem::replace(&mut self.pending, next);
        self.sealed.push(Chunk {
            seq: self.seq,
            create: std::mem::take(&mut self.pending_create),
            data,
        });
        let new_seq = self.seq + 1;
        let resume = match self.state.after_commit {
            Some(p) if p == Pos::new(self.seq, self.seg_len) => Pos::new(new_seq, 0),
            Some(p) => p,
            None => self.seg_resume,
        };
        self.start_segment(new_seq, resume);
    }

    fn start_segment(&mut self, seq: u64, resume: Pos) {
        let header = SegmentHeader {
            version: format::FORMAT_VERSION,
            seq,
            in_txn: self.state.in_txn,
            prev_commit_end: self
                .state
                .last_commit
                .map(|c| c.end_lsn)
                .unwrap_or_default(),
            resume,
            txn_begin: if self.state.in_txn {
                self.state.txn_begin
            } else {
                Pos::default()
            },
            commits_before: self.state.commits,
            preamble_records: self.relations.len() as u32,
        };
        self.pending.extend_from_slice(&header.encode());
        for (&(kind, _), (lsn, payload)) in &self.relations {
            format::encode_record(&mut self.pending, *lsn, kind | PREAMBLE_FLAG, payload);
        }
        self.seq = seq;
        self.seg_len = self.pending.len() as u64;
        debug_assert!(self.seg_len >= HEADER_LEN as u64);
        self.seg_has_records = false;
        self.seg_resume = resume;
        self.pending_create = true;
    }
}

impl Drop for BufferWriter {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .mode(super::FILE_MODE)
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| BufferError::io("open", &path, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(BufferError::Locked {
            dir: dir.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(f)
}

/// Writes and syncs groups in order. After a failure it syncs nothing more: every later group
/// is answered with a failure too.
fn sync_thread(fs: Arc<dyn FileSystem>, dir: PathBuf, jobs: Receiver<Job>, done: Sender<Done>) {
    let mut file: Option<(u64, Box<dyn WritableFile>)> = None;
    let mut failed = false;
    for job in jobs {
        if failed {
            let _ = done.send(Done::Failed(BufferError::Config(
                "skipped after an earlier write failure".into(),
            )));
            continue;
        }
        let result = write_job(fs.as_ref(), &dir, &mut file, &job);
        let msg = match result {
            Ok(syncs) => Done::Synced {
                commit: job.commit,
                bufs: job.chunks.into_iter().map(|c| c.data).collect(),
                syncs,
            },
            Err(e) => {
                failed = true;
                file = None;
                Done::Failed(e)
            }
        };
        if done.send(msg).is_err() {
            return;
        }
    }
}

fn write_job(
    fs: &dyn FileSystem,
    dir: &Path,
    file: &mut Option<(u64, Box<dyn WritableFile>)>,
    job: &Job,
) -> Result<u64> {
    let mut created = false;
    let mut syncs = 0;
    for chunk in &job.chunks {
        let path = segment_path(dir, chunk.seq);
        if file.as_ref().map(|(s, _)| *s) != Some(chunk.seq) {
            if let Some((seq, mut f)) = file.take() {
                // A segment is complete on disk before its successor exists.
                f.sync_data()
                    .map_err(|e| BufferError::io("fdatasync", segment_path(dir, seq), e))?;
                syncs += 1;
            }
            let f = if chunk.create {
                created = true;
                fs.create_new(&path)
                    .map_err(|e| BufferError::io("create", &path, e))?
            } else {
                fs.open_append(&path)
                    .map_err(|e| BufferError::io("open", &path, e))?
            };
            *file = Some((chunk.seq, f));
        }
        let (_, f) = file.as_mut().expect("opened above");
        f.write_all(&chunk.data)
            .map_err(|e| BufferError::io("write", &path, e))?;
    }
    if let Some((seq, f)) = file.as_mut() {
        f.sync_data()
            .map_err(|e| BufferError::io("fdatasync", segment_path(dir, *seq), e))?;
        syncs += 1;
    }
    if created {
        fs.sync_dir(dir)
            .map_err(|e| BufferError::io("fsync directory", dir, e))?;
        syncs += 1;
    }
    Ok(syncs)
}

/// True if another process (or another open file in this one) holds the buffer's writer lock,
/// that is, a capture is appending to it.
pub fn writer_running(buffer_dir: &Path) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let path = buffer_dir.join(LOCK_FILE);
    let f = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // SAFETY: flock on a descriptor we own; closing the file releases our lock.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(false);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(true)
    } else {
        Err(err)
    }
}
