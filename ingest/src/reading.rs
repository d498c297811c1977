//! Reading input files so that a failure of the store or disk under them (permission, network,
//! KMS, I/O) is told apart from damage in their bytes (a bad tar, a bad gzip stream, a parquet
//! file cut short). Damage is the file's fault: its samples are counted as rejected and the run
//! goes on. A failed read says nothing about the file: the run stops with an error naming it,
//! rather than publishing a manifest that silently lacks its rows.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::ops::{ControlFlow, Range};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use bytes::Bytes;
use manifests::sources::{Expected, SourceDigests, check_read};
use manifests::{Location, ObjectInfo};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::errors::ParquetError;

use crate::Error;

/// The first failure of the store or disk under a [`Watched`] reader, if any, and, for a file
/// whose bytes are checked, the digest of what the reader has read.
#[derive(Clone, Default)]
pub struct ReadFault(Arc<Watch>);

#[derive(Default)]
struct Watch {
    failure: OnceLock<String>,
    content: Option<Mutex<ReadSoFar>>,
}

struct ReadSoFar {
    hasher: blake3::Hasher,
    bytes: u64,
    /// The whole file's, once [`ReadFault::digest`] has read the rest.
    digest: Option<String>,
}

impl ReadFault {
    /// Watches a read of a local file and digests what is read ([`ReadFault::digest`]); a
    /// bucket object, whose identity is its ETag, is only watched.
    pub fn digesting(location: &Location) -> ReadFault {
        let content = location.local_path().map(|_| {
            Mutex::new(ReadSoFar {
                hasher: blake3::Hasher::new(),
                bytes: 0,
                digest: None,
            })
        });
        ReadFault(Arc::new(Watch {
            failure: OnceLock::new(),
            content,
        }))
    }

    /// Watches a read of the file at `location`, digesting it when `digests` holds what the
    /// stage's identity was taken from ([`ReadFault::finish`] checks it).
    pub fn checking(digests: &SourceDigests, location: &Location) -> ReadFault {
        match digests.expected(location) {
            Some(Expected::Digest(_)) => ReadFault::digesting(location),
            _ => ReadFault::default(),
        }
    }

    fn note(&self, error: &dyn std::fmt::Display) {
        let _ = self.0.failure.set(error.to_string());
    }

    fn read(&self, bytes: &[u8]) {
        if let Some(content) = &self.0.content {
            let mut content = content.lock().unwrap_or_else(PoisonError::into_inner);
            if content.digest.is_some() {
                return;
            }
            content.hasher.update(bytes);
            content.bytes += bytes.len() as u64;
        }
    }

    /// Whether the store or disk failed under a reader of the file.
    pub fn failed(&self) -> bool {
        self.0.failure.get().is_some()
    }

    /// The run's error for `location` if the store or disk failed under a reader of it.
    pub fn error(&self, location: &Location) -> Option<Error> {
        self.0
            .failure
            .get()
            .map(|message| Error::Io(format!("cannot read {location}: {message}")))
    }

    /// `damage` that a decoder of the file at `location` reported, unless the store or disk
    /// failed under it: then that failure, as the run's error.
    fn or_damage<T>(&self, location: &Location, damage: T) -> Result<T, Error> {
        match self.error(location) {
            Some(failed) => Err(failed),
            None => Ok(damage),
        }
    }

    /// The digest of the whole file at `location` as a digesting reader found it: what the
    /// reader read, then whatever it left unread (a tar's end padding, a pass that stopped
    /// early), read to the end now. `None` unless digesting.
    pub fn digest(&self, location: &Location) -> Result<Option<String>, Error> {
        match self.whole_file(location)? {
            None => Ok(None),
            Some(WholeFile::Digest(digest)) => Ok(Some(digest)),
            Some(WholeFile::Gone) => Err(Error::Io(format!(
                "{location} was removed while the stage read it: run the stage again"
            ))),
        }
    }

    /// The run's error for `location` once its reader is done with it: a failed read, or a
    /// file whose bytes are not those `digests` holds (it changed since the stage's identity
    /// was taken).
    pub fn finish(&self, digests: &SourceDigests, location: &Location) -> Result<(), Error> {
        let read = match self.whole_file(location)? {
            None => return Ok(()),
            Some(WholeFile::Digest(digest)) => Some(digest),
            Some(WholeFile::Gone) => None,
        };
        match digests.expected(location) {
            Some(expected) => Ok(check_read(location, expected, read)?),
            None => Ok(()),
        }
    }

    fn whole_file(&self, location: &Location) -> Result<Option<WholeFile>, Error> {
        if let Some(failed) = self.error(location) {
            return Err(failed);
        }
        let Some(content) = &self.0.content else {
            return Ok(None);
        };
        let mut content = content.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(digest) = &content.digest {
            return Ok(Some(WholeFile::Digest(digest.clone())));
        }
        let cannot = |e: &dyn std::fmt::Display| Error::Io(format!("cannot read {location}: {e}"));
        let rest = match location.reader_from(content.bytes) {
            Ok(rest) => rest,
            Err(manifests::Error::NotFound { .. }) => return Ok(Some(WholeFile::Gone)),
            Err(e) => return Err(cannot(&e)),
        };
        content.hasher.update_reader(rest).map_err(|e| cannot(&e))?;
        let digest = format!("blake3:{}", content.hasher.finalize().to_hex());
        Ok(Some(WholeFile::Digest(
            content.digest.insert(digest).clone(),
        )))
    }
}

/// A file as a digesting reader found it, once read to its end.
enum WholeFile {
    Digest(String),
    /// Removed before its end was read.
    Gone,
}

/// A reader over the raw bytes of a file that notes in its [`ReadFault`] any error of the
/// source itself, before a decoder above it turns that error into one of its own.
pub struct Watched<R> {
    inner: R,
    fault: ReadFault,
}

impl<R> Watched<R> {
    pub fn new(inner: R, fault: &ReadFault) -> Watched<R> {
        Watched {
            inner,
            fault: fault.clone(),
        }
    }
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.inner
            .read(out)
            .inspect_err(|e| {
                // Interrupted reads are retried by every caller; they are no failure.
                if e.kind() != ErrorKind::Interrupted {
                    self.fault.note(e);
                }
            })
            .inspect(|&read| self.fault.read(&out[..read]))
    }
}

/// Whether a local read error means "no file there" (the sample's rejection) rather than a
/// failing disk or a permission problem.
fn is_absent(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::NotFound | ErrorKind::NotADirectory | ErrorKind::IsADirectory
    )
}

/// A file read up to a cap.
pub enum Capped {
    Bytes(Bytes),
    /// Longer than the cap; told from its size before any of it is read where the store says
    /// it, so a mislabelled video or disk image is not taken into memory.
    TooLarge,
    /// No file there.
    Missing,
}

/// The bytes of the file at `location`, unless it is longer than `max_bytes`. A missing file
/// is a rejection of its sample; a store or disk that fails to read one is an error naming it,
/// and so is a file that is not what `digests` says the stage's identity was taken from.
pub fn read_capped(
    location: &Location,
    max_bytes: u64,
    digests: &SourceDigests,
) -> Result<Capped, Error> {
    let read = read_capped_unchecked(location, max_bytes)?;
    match &read {
        Capped::Bytes(bytes) => digests.check(location, Some(bytes))?,
        Capped::Missing => digests.check(location, None)?,
        Capped::TooLarge => {}
    }
    Ok(read)
}

fn read_capped_unchecked(location: &Location, max_bytes: u64) -> Result<Capped, Error> {
    if let Some(path) = location.local_path() {
        let opened = File::open(&path).and_then(|file| Ok((file.metadata()?.len(), file)));
        let (size, file) = match opened {
            Ok(opened) => opened,
            Err(e) if is_absent(e.kind()) => return Ok(Capped::Missing),
            Err(e) => return Err(Error::Io(format!("cannot read {location}: {e}"))),
        };
        if size > max_bytes {
            return Ok(Capped::TooLarge);
        }
        // Read to the cap and a byte more: a path naming a pipe or a device has no size.
        let mut bytes = Vec::with_capacity(size as usize);
        return match file
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
        {
            Ok(read) if read as u64 > max_bytes => Ok(Capped::TooLarge),
            Ok(_) => Ok(Capped::Bytes(Bytes::from(bytes))),
            Err(e) => Err(Error::Io(format!("cannot read {location}: {e}"))),
        };
    }
    Ok(match location.get_at_most(max_bytes)? {
        Some(Ok(bytes)) => Capped::Bytes(bytes),
        Some(Err(_)) => Capped::TooLarge,
        None => Capped::Missing,
    })
}

/// A sequential reader of the file at `location` from its start, watched by `fault`; `None`
/// when there is no file there.
pub fn open_watched(
    location: &Location,
    fault: &ReadFault,
) -> Result<Option<Watched<Box<dyn Read + Send>>>, Error> {
    match location.reader_from(0) {
        Ok(reader) => Ok(Some(Watched::new(reader, fault))),
        Err(manifests::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A parquet file's bytes, local or in a bucket, with every failed read noted.
struct WatchedParquet {
    source: ParquetSource,
    size: u64,
    fault: ReadFault,
    /// A bucket object's last [`FOOTER_PREFETCH`] bytes, fetched once: the footer's length and
    /// the footer itself then cost one request, not two.
    tail: Arc<OnceLock<Bytes>>,
}

/// How much of a bucket object's end is fetched at the first read near it.
const FOOTER_PREFETCH: u64 = 64 << 10;

enum ParquetSource {
    Local(File),
    Bucket(Location),
}

impl WatchedParquet {
    /// A read past the end is damage (a file cut short), not a failed read.
    fn check_range(&self, start: u64, length: u64) -> parquet::errors::Result<()> {
        if start.saturating_add(length) > self.size {
            return Err(ParquetError::EOF(format!(
                "{length} bytes at offset {start} of a {}-byte file",
                self.size
            )));
        }
        Ok(())
    }

    /// The same bytes again, for another reader of them; failures are noted in the same place.
    fn try_clone(&self, location: &Location) -> Result<WatchedParquet, Error> {
        let source = match &self.source {
            ParquetSource::Local(file) => ParquetSource::Local(
                file.try_clone()
                    .map_err(|e| Error::Io(format!("cannot read {location}: {e}")))?,
            ),
            ParquetSource::Bucket(location) => ParquetSource::Bucket(location.clone()),
        };
        Ok(WatchedParquet {
            source,
            size: self.size,
            fault: self.fault.clone(),
            tail: self.tail.clone(),
        })
    }

    /// A bucket object's bytes from `start` to its end, when `start` lies in its last
    /// [`FOOTER_PREFETCH`] bytes: fetched at the first such read, then kept.
    fn tail_from(&self, location: &Location, start: u64) -> parquet::errors::Result<Option<Bytes>> {
        let tail_start = self.size.saturating_sub(FOOTER_PREFETCH);
        if start < tail_start {
            return Ok(None);
        }
        let tail = match self.tail.get() {
            Some(tail) => tail.clone(),
            None => {
                let tail = location
                    .get_range(tail_start..self.size)
                    .map_err(|e| self.failed(e))?;
                self.tail.get_or_init(|| tail).clone()
            }
        };
        let at = ((start - tail_start) as usize).min(tail.len());
        Ok(Some(tail.slice(at..)))
    }

    fn failed(&self, error: impl std::fmt::Display) -> ParquetError {
        self.fault.note(&error);
        ParquetError::General(error.to_string())
    }

    fn local_at(&self, file: &File, start: u64) -> parquet::errors::Result<File> {
        let mut file = file.try_clone().map_err(|e| self.failed(e))?;
        file.seek(SeekFrom::Start(start))
            .map_err(|e| self.failed(e))?;
        Ok(file)
    }
}

impl parquet::file::reader::Length for WatchedParquet {
    fn len(&self) -> u64 {
        self.size
    }
}

impl parquet::file::reader::ChunkReader for WatchedParquet {
    type T = Watched<Box<dyn Read + Send>>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        self.check_range(start, 0)?;
        let reader: Box<dyn Read + Send> = match &self.source {
            ParquetSource::Local(file) => {
                Box::new(std::io::BufReader::new(self.local_at(file, start)?))
            }
            ParquetSource::Bucket(location) => match self.tail_from(location, start)? {
                Some(tail) => Box::new(std::io::Cursor::new(tail)),
                None => location.ranged_reader(start, self.size),
            },
        };
        Ok(Watched::new(reader, &self.fault))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.check_range(start, length as u64)?;
        match &self.source {
            ParquetSource::Local(file) => {
                let mut buffer = vec![0; length];
                match self.local_at(file, start)?.read_exact(&mut buffer) {
                    Ok(()) => Ok(Bytes::from(buffer)),
                    // The file shrank since its size was read: cut short, as damage.
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                        Err(ParquetError::EOF(e.to_string()))
                    }
                    Err(e) => Err(self.failed(e)),
                }
            }
            ParquetSource::Bucket(location) => match self.tail_from(location, start)? {
                Some(tail) if tail.len() >= length => Ok(tail.slice(..length)),
                // The store gave fewer bytes than the object's size said: cut short.
                Some(_) => Err(ParquetError::EOF(format!(
                    "{length} bytes at offset {start} of {location}"
                ))),
                None => location
                    .get_range(start..start + length as u64)
                    .map_err(|e| self.failed(e)),
            },
        }
    }
}

/// Hands `each` the record batches of the parquet file at `location`, `batch_rows` rows at a
/// time, holding at most one row group's column chunks in memory, until `each` breaks.
/// `Ok(Err(why))`: the file is damaged (not parquet, cut short), after the batches before the
/// damage. `Err`: the store or disk failed, or `each` did: the run stops.
pub fn stream_parquet(
    location: &Location,
    batch_rows: usize,
    each: &mut dyn FnMut(RecordBatch) -> Result<ControlFlow<()>, Error>,
) -> Result<Result<(), String>, Error> {
    stream_watched(open_parquet(location, None)?, location, batch_rows, each)
}

/// Hands `each` the rows `rows` of the parquet file at `location` in record batches of at most
/// `batch_rows`, each with the index of its first row in the file. Only the row groups that
/// hold those rows are read, each on its own: a damaged row group costs its own rows and
/// no others. Returns the rows that could not be read (damage, or a file with fewer rows than
/// asked for); `Err`: the store or disk failed, or `each` did.
pub fn stream_parquet_rows(
    location: &Location,
    batch_rows: usize,
    rows: Range<usize>,
    each: &mut dyn FnMut(usize, RecordBatch) -> Result<(), Error>,
) -> Result<Vec<Range<usize>>, Error> {
    let reader = open_parquet(location, None)?;
    let damaged = |error: ParquetError| reader.fault.or_damage(location, error);
    let metadata = match ArrowReaderMetadata::load(&reader, Default::default()) {
        Ok(metadata) => metadata,
        Err(e) => {
            damaged(e)?;
            return Ok(vec![rows]);
        }
    };
    let mut lost = Vec::new();
    let mut group_start = 0usize;
    for (index, group) in metadata.metadata().row_groups().iter().enumerate() {
        let claimed = usize::try_from(group.num_rows()).unwrap_or(0);
        let group_rows = group_start..group_start.saturating_add(claimed);
        group_start = group_rows.end;
        let share = rows.start.max(group_rows.start)..rows.end.min(group_rows.end);
        if share.is_empty() {
            continue;
        }
        let mut next = share.start;
        let batches = ParquetRecordBatchReaderBuilder::new_with_metadata(
            reader.try_clone(location)?,
            metadata.clone(),
        )
        .with_batch_size(batch_rows.max(1))
        .with_row_groups(vec![index])
        .with_offset(share.start - group_rows.start)
        .with_limit(share.len())
        .build();
        match batches {
            Ok(batches) => {
                for batch in batches {
                    match batch {
                        Ok(batch) => {
                            let read = batch.num_rows();
                            each(next, batch)?;
                            next += read;
                        }
                        Err(e) => {
                            damaged(e.into())?;
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                damaged(e)?;
            }
        }
        if next < share.end {
            lost.push(next..share.end);
        }
    }
    if group_start < rows.end {
        lost.push(rows.start.max(group_start)..rows.end);
    }
    Ok(lost)
}

/// More rows than any writer puts in one row group (they cut groups at about a million): a
/// footer claiming more is taken for damage, so it cannot make a job count billions of rows.
const MAX_ROW_GROUP_ROWS: i64 = i32::MAX as i64;

/// What a parquet file's footer says, read without its data: its columns and its rows.
pub struct ParquetFooter {
    pub schema: SchemaRef,
    pub rows: usize,
    /// The file as it was when the footer was read, to tell if it changes before its rows are.
    pub info: ObjectInfo,
}

/// The footer of the parquet file at `location`. `Ok(Err(why))`: the file is damaged (not
/// parquet, cut short); `Err`: the store or disk failed.
pub fn parquet_footer(location: &Location) -> Result<Result<ParquetFooter, String>, Error> {
    let info = location.info()?;
    let reader = open_parquet(location, Some(info.size))?;
    match ArrowReaderMetadata::load(&reader, Default::default()) {
        Ok(footer) => {
            let metadata = footer.metadata();
            let claimed = metadata.file_metadata().num_rows();
            let groups: Option<i64> = metadata.row_groups().iter().try_fold(0i64, |sum, group| {
                (0..=MAX_ROW_GROUP_ROWS)
                    .contains(&group.num_rows())
                    .then(|| sum.checked_add(group.num_rows()))
                    .flatten()
            });
            // The row count is the file's claim: one its row groups do not add up to is damage.
            match groups.filter(|rows| *rows == claimed).map(usize::try_from) {
                Some(Ok(rows)) => Ok(Ok(ParquetFooter {
                    schema: footer.schema().clone(),
                    rows,
                    info,
                })),
                _ => Ok(Err(format!(
                    "the footer's row count ({claimed}) is not its row groups' sum"
                ))),
            }
        }
        Err(e) => reader.fault.or_damage(location, Err(e.to_string())),
    }
}

/// The parquet file at `location`; `size`, when the caller has it, saves a bucket a request.
fn open_parquet(location: &Location, size: Option<u64>) -> Result<WatchedParquet, Error> {
    let (source, size) = match location.local_path() {
        Some(path) => {
            let (file, size) = File::open(&path)
                .and_then(|file| Ok((file.metadata()?.len(), file)))
                .map(|(size, file)| (file, size))
                .map_err(|e| Error::Io(format!("cannot read {location}: {e}")))?;
            (ParquetSource::Local(file), size)
        }
        None => {
            let size = match size {
                Some(size) => size,
                None => location.size()?,
            };
            (ParquetSource::Bucket(location.clone()), size)
        }
    };
    Ok(WatchedParquet {
        source,
        size,
        fault: ReadFault::default(),
        tail: Arc::default(),
    })
}

/// [`stream_parquet`] over bytes already opened.
fn stream_watched(
    reader: WatchedParquet,
    location: &Location,
    batch_rows: usize,
    each: &mut dyn FnMut(RecordBatch) -> Result<ControlFlow<()>, Error>,
) -> Result<Result<(), String>, Error> {
    let fault = reader.fault.clone();
    let damaged = |error: ParquetError| fault.or_damage(location, Err(error.to_string()));
    let batches = match ParquetRecordBatchReaderBuilder::try_new(reader)
        .and_then(|builder| builder.with_batch_size(batch_rows.max(1)).build())
    {
        Ok(batches) => batches,
        Err(e) => return damaged(e),
    };
    for batch in batches {
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) => return damaged(e.into()),
        };
        if each(batch)?.is_break() {
            break;
        }
    }
    Ok(Ok(()))
}

/// A source that gives `good` bytes, then fails as a disk or a network does.
#[cfg(test)]
pub(crate) struct FailingAfter {
    pub good: std::io::Cursor<Vec<u8>>,
}

#[cfg(test)]
impl Read for FailingAfter {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        match self.good.read(out)? {
            0 => Err(std::io::Error::other("connection reset by the store")),
            n => Ok(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digesting_read_digests_the_whole_file_however_much_of_it_the_reader_took() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.bin");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let location = Location::parse(path.to_str().unwrap()).unwrap();
        let whole = manifests::digest_bytes(&bytes);
        for took in [0, 1, 4096, 300_000] {
            let fault = ReadFault::digesting(&location);
            let mut reader = open_watched(&location, &fault).unwrap().unwrap();
            reader.read_exact(&mut vec![0; took]).unwrap();
            assert_eq!(
                fault.digest(&location).unwrap(),
                Some(whole.clone()),
                "{took}"
            );
            // Asked again, the same digest: the rest is not read twice.
            assert_eq!(
                fault.digest(&location).unwrap(),
                Some(whole.clone()),
                "{took}"
            );
        }
        // A file rewritten under the reader: the digest is of what was read and what is there.
        let fault = ReadFault::digesting(&location);
        let mut reader = open_watched(&location, &fault).unwrap().unwrap();
        reader.read_exact(&mut [0; 1000]).unwrap();
        std::fs::write(&path, vec![7u8; 300_000]).unwrap();
        assert_ne!(fault.digest(&location).unwrap(), Some(whole));
        // Gone before the rest was read: an error naming the file.
        let fault = ReadFault::digesting(&location);
        let mut reader = open_watched(&location, &fault).unwrap().unwrap();
        reader.read_exact(&mut [0; 10]).unwrap();
        std::fs::remove_file(&path).unwrap();
        let error = fault.digest(&location).unwrap_err().to_string();
        assert!(
            error.contains("file.bin was removed while the stage read it"),
            "{error}"
        );
    }

    /// A parquet file whose reads fail as a disk does (`EIO`), even for root: the first page
    /// of `/proc/self/mem` is never mapped.
    fn failing_parquet(size: u64) -> WatchedParquet {
        WatchedParquet {
            source: ParquetSource::Local(File::open("/proc/self/mem").unwrap()),
            size,
            fault: ReadFault::default(),
            tail: Arc::default(),
        }
    }

    #[test]
    fn a_failed_parquet_read_stops_the_run_and_damage_does_not() {
        let location = Location::parse("/data/part-0.parquet").unwrap();
        let mut each = |_| Ok(ControlFlow::Continue(()));
        let failed = stream_watched(failing_parquet(4096), &location, 8, &mut each);
        let error = failed.expect_err("a failed read is an error").to_string();
        assert!(error.contains("/data/part-0.parquet"), "{error}");

        // A file cut short (here: of zero bytes) is damage: the caller counts a rejection.
        let damaged = stream_watched(failing_parquet(0), &location, 8, &mut each);
        assert!(matches!(damaged, Ok(Err(_))), "{damaged:?}");
    }

    #[test]
    fn a_failed_source_read_is_noted_and_a_clean_end_is_not() {
        let location = Location::parse("/data/x.tar").unwrap();
        let fault = ReadFault::default();
        let mut reader = Watched::new(
            FailingAfter {
                good: std::io::Cursor::new(vec![1, 2, 3]),
            },
            &fault,
        );
        let mut all = Vec::new();
        assert!(reader.read_to_end(&mut all).is_err());
        let error = fault.error(&location).unwrap().to_string();
        assert!(
            error.contains("/data/x.tar") && error.contains("reset"),
            "{error}"
        );

        let clean = ReadFault::default();
        let mut reader = Watched::new(std::io::Cursor::new(vec![1, 2, 3]), &clean);
        reader.read_to_end(&mut all).unwrap();
        assert!(clean.error(&location).is_none());
    }
}
