//! The file-system seam under the writer. Every mutation the buffer makes (create, append,
//! fdatasync, truncate, remove, directory fsync) goes through [`FileSystem`], so tests can swap
//! in [`FailpointFs`] to fail a write or an fsync, or to tear a write in half, and check that the
//! durable LSN never passes what really reached the disk. Reads use `std::fs` directly.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A file the writer appends to.
pub trait WritableFile: Send {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`: the written bytes (and the file size) are on stable storage.
    fn sync_data(&mut self) -> io::Result<()>;
}

/// The mutating file operations the buffer uses.
pub trait FileSystem: Send + Sync + std::fmt::Debug {
    /// Creates a new file; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>>;
    /// Opens an existing file for appending at its end.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>>;
    /// Cuts a file to `len` bytes and syncs it.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Writes `data` to `path` atomically: temp file, fsync, rename, directory fsync.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// fsync of a directory, making creations, renames and removals in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

struct StdFile(File);

impl WritableFile for StdFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl FileSystem for StdFs {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(super::FILE_MODE)
            .open(path)?;
        Ok(Box::new(StdFile(f)))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let f = OpenOptions::new().append(true).open(path)?;
        Ok(Box::new(StdFile(f)))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(data)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        self.sync_dir(dir)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A [`FileSystem`] for tests: the real file system plus failpoints.
///
/// Counters are shared between clones, so a test keeps one clone and arms it while the writer
/// (and its sync thread) hold another.
#[derive(Debug, Clone, Default)]
pub struct FailpointFs {
    state: Arc<FailState>,
}

#[derive(Debug, Default)]
struct FailState {
    fail_sync: AtomicBool,
    fail_write: AtomicBool,
    /// When non-zero: the next write stores only this many bytes, then fails (a torn write).
    tear_write_at: AtomicU64,
    fail_create: AtomicBool,
    writes: AtomicU64,
    syncs: AtomicU64,
}

impl FailpointFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every `sync_data` and `sync_dir` fails with an I/O error while set.
    pub fn fail_sync(&self, on: bool) {
        self.state.fail_sync.store(on, Ordering::SeqCst);
    }

    /// Every write fails (storing nothing) while set.
    pub fn fail_write(&self, on: bool) {
        self.state.fail_write.store(on, Ordering::SeqCst);
    }

    /// The next write stores only its first `bytes` bytes and then fails, as a crash in the
    /// middle of a write would leave it.
    pub fn tear_next_write(&self, bytes: u64) {
        self.state.tear_write_at.store(bytes, Ordering::SeqCst);
    }

    /// Creating files fails while set.
    pub fn fail_create(&self, on: bool) {
        self.state.fail_create.store(on, Ordering::SeqCst);
    }

    /// Successful writes so far.
    pub fn writes(&self) -> u64 {
        self.state.writes.load(Ordering::SeqCst)
    }

    /// Successful data and directory syncs so far.
    pub fn syncs(&self) -> u64 {
        self.state.syncs.load(Ordering::SeqCst)
    }

    fn sync_result(&self) -> io::Result<()> {
        if self.state.fail_sync.load(Ordering::SeqCst) {
            return Err(injected("fsync"));
        }
        self.state.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure"))
}

struct FailFile {
    inner: StdFile,
    fs: FailpointFs,
}

impl WritableFile for FailFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let st = &self.fs.state;
        if st.fail_write.load(Ordering::SeqCst) {
            return Err(injected("write"));
        }
        let tear = st.tear_write_at.swap(0, Ordering::SeqCst);
        if tear > 0 {
            let n = (tear as usize).min(buf.len());
            self.inner.write_all(&buf[..n])?;
            return Err(injected("torn write"));
        }
        self.inner.write_all(buf)?;
        st.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.fs.sync_result()?;
        self.inner.sync_data()
    }
}

impl FileSystem for FailpointFs {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        if self.state.fail_create.load(Ordering::SeqCst) {
            return Err(injected("create"));
        }
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(super::FILE_MODE)
            .open(path)?;
        Ok(Box::new(FailFile {
            inner: StdFile(f),
            fs: self.clone(),
        }))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let f = OpenOptions::new().append(true).open(path)?;
        Ok(Box::new(FailFile {
            inner: StdFile(f),
            fs: self.clone(),
        }))
    }

    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.sync_result()?;
        StdFs.truncate(path, len)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.sync_result()?;
        StdFs.write_atomic(path, data)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.sync_result()?;
        StdFs.sync_dir(dir)
    }
}
