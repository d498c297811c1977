//! Raw source data (anything not written by a parti stage), identified by content.
//!
//! The location a command names is a place; the identity is what is there. A folder is known by
//! its listing, every object below it named relative to it, so the same folder reached through
//! another spelling (relative, absolute, `file://`, a symlink) has the same identity, and a file
//! added or removed changes it. A local file is known by its size and modification time as a fast
//! check, backed by a blake3 digest of its bytes whenever either differs from what the stage's
//! previous manifest recorded (so an unchanged file is not read again). A bucket object is known
//! by what the store reports: size, ETag and version (read and digested only when the store
//! reports neither). Files that a list names (images in a CSV,
//! a COCO or a JSONL file) are identified the same way, under the name the list gives them.

use std::collections::{BTreeMap, HashMap};
use std::time::UNIX_EPOCH;

use crate::manifest::{Input, SourceFile};
use crate::storage::{Location, ObjectInfo};
use crate::{Error, digest_bytes};

/// `digest` of a file a list names that is not there (the stage rejects its samples).
pub const MISSING: &str = "missing";

/// `digest` of a file of a listed folder that a job of a batch array does not read: another job
/// identifies it by content, and `manifests merge` takes the digest from that job.
pub const UNREAD: &str = "unread";

/// Builds a source input's file list and identity.
pub struct SourceSet {
    /// What the stage's previous manifest recorded, by URI: the fast check's reference.
    previous: HashMap<String, SourceFile>,
    listed: Option<String>,
    files: Vec<SourceFile>,
    /// Named bucket objects, identified together at the end (one listing per folder, not one
    /// request per object).
    pending: Vec<(String, Location)>,
}

impl SourceSet {
    /// `previous`: the same input in the stage's last manifest, whose digests are reused for
    /// files whose size and modification time are unchanged.
    pub fn new(previous: Option<&Input>) -> SourceSet {
        let previous = previous
            .map(|input| {
                input
                    .files
                    .iter()
                    .map(|f| (f.uri.clone(), f.clone()))
                    .collect()
            })
            .unwrap_or_default();
        SourceSet {
            previous,
            listed: None,
            files: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// Everything below `location` (a folder), or the file itself (named by its file name: a
    /// renamed list can mean other row keys or another format).
    pub fn list(&mut self, location: &Location) -> Result<(), Error> {
        self.list_reading(location, &|_| true)
    }

    /// [`SourceSet::list`] for a job of a batch array: of a folder's files, those `reads`
    /// picks (by URI) are identified by content, the others by name alone ([`UNREAD`]), so a
    /// job looks only at the files it reads; another job reads the others, and `manifests
    /// merge` takes their contents from it. A single file is identified by content.
    pub fn list_reading(
        &mut self,
        location: &Location,
        reads: &dyn Fn(&str) -> bool,
    ) -> Result<(), Error> {
        self.listed = Some(location.uri());
        if location.exists()? {
            let name = location.file_name().to_string();
            let file = self.identify(name, &location.info()?, false)?;
            self.files.push(file);
            return Ok(());
        }
        for object in location.list()? {
            let name = object.location.relative_to(location).unwrap_or_default();
            let file = match reads(&object.location.uri()) {
                true => self.identify(name, &object, false)?,
                false => SourceFile {
                    name,
                    uri: object.location.uri(),
                    bytes: object.size,
                    modified_ns: None,
                    digest: UNREAD.into(),
                    named: false,
                },
            };
            self.files.push(file);
        }
        Ok(())
    }

    /// The listed input is one local file the stage has read whole before taking its identity
    /// (a list it builds its rows from): the identity is of the bytes it read, whatever the
    /// previous manifest says; the time taken before the read is kept for the fast check of
    /// `manifests status`.
    pub fn list_read_whole(&mut self, location: &Location, read: ReadWhole) {
        self.listed = Some(location.uri());
        self.files.push(SourceFile {
            name: location.file_name().to_string(),
            uri: location.uri(),
            bytes: read.bytes,
            modified_ns: read.modified_ns,
            digest: read.digest,
            named: false,
        });
    }

    /// The listed input is one file whose bytes the stage has already read.
    pub fn list_read(&mut self, location: &Location, bytes: &[u8]) -> Result<(), Error> {
        if !location.is_local() {
            // Identified as any bucket object is, so `recheck` agrees without a download.
            return self.list(location);
        }
        let read = ReadWhole {
            digest: digest_bytes(bytes),
            bytes: bytes.len() as u64,
            modified_ns: location
                .local_path()
                .and_then(|path| trusted_modified_ns(&path)),
        };
        self.list_read_whole(location, read);
        Ok(())
    }

    /// A file a list names, under `name` (the list's own spelling, so the identity does not
    /// depend on where the list's folder is mounted).
    pub fn name(&mut self, name: String, location: &Location) -> Result<(), Error> {
        if !location.is_local() {
            self.pending.push((name, location.clone()));
            return Ok(());
        }
        // Not there, a path through a file, no permission: the stage rejects the sample, and
        // the input records it as missing rather than failing the run.
        let file = match location.info() {
            Ok(info) => self
                .identify(name.clone(), &info, true)
                .unwrap_or_else(|_| missing(name, location)),
            Err(_) => missing(name, location),
        };
        self.files.push(file);
        Ok(())
    }

    /// The input, named `name` and recorded at `uri`, with its identity: a digest over every
    /// file's name and content digest (never its location).
    pub fn into_input(mut self, name: &str, uri: &str) -> Result<Input, Error> {
        self.identify_pending()?;
        let mut files = self.files;
        files.sort_by(|a, b| (a.named, &a.name).cmp(&(b.named, &b.name)));
        files.dedup_by(|a, b| a.named == b.named && a.name == b.name);
        Ok(Input {
            name: name.to_string(),
            uri: uri.to_string(),
            kind: "source".into(),
            digest: identity(&files),
            stage: None,
            config_hash: None,
            listed: self.listed,
            files,
        })
    }

    fn identify_pending(&mut self) -> Result<(), Error> {
        let mut folders: BTreeMap<String, Vec<(String, Location)>> = BTreeMap::new();
        for (name, location) in std::mem::take(&mut self.pending) {
            folders
                .entry(location.parent().uri())
                .or_default()
                .push((name, location));
        }
        for named in folders.into_values() {
            let listing: HashMap<String, ObjectInfo> = named[0]
                .1
                .parent()
                .list_folder()?
                .into_iter()
                .map(|info| (info.location.uri(), info))
                .collect();
            for (name, location) in named {
                let file = match listing.get(&location.uri()) {
                    Some(info) => self.identify(name, info, true)?,
                    None => missing(name, &location),
                };
                self.files.push(file);
            }
        }
        Ok(())
    }

    fn identify(&self, name: String, info: &ObjectInfo, named: bool) -> Result<SourceFile, Error> {
        let uri = info.location.uri();
        let Some(path) = info.location.local_path() else {
            let digest = match (&info.e_tag, &info.version) {
                (None, None) => digest_bytes(&info.location.get()?),
                (e_tag, version) => format!(
                    "etag:{}/version:{}/bytes:{}",
                    e_tag.as_deref().unwrap_or_default(),
                    version.as_deref().unwrap_or_default(),
                    info.size
                ),
            };
            return Ok(SourceFile {
                name,
                uri,
                bytes: info.size,
                modified_ns: None,
                digest,
                named,
            });
        };
        let modified_ns = trusted_modified_ns(&path);
        let digest = match self.previous.get(&uri) {
            Some(previous)
                if previous.bytes == info.size
                    && modified_ns.is_some()
                    && previous.modified_ns == modified_ns =>
            {
                previous.digest.clone()
            }
            _ => digest_file(&info.location, &path)?,
        };
        Ok(SourceFile {
            name,
            uri,
            bytes: info.size,
            modified_ns,
            digest,
            named,
        })
    }
}

fn missing(name: String, location: &Location) -> SourceFile {
    SourceFile {
        name,
        uri: location.uri(),
        bytes: 0,
        modified_ns: None,
        digest: MISSING.into(),
        named: true,
    }
}

/// A local file as a stage read it whole: the digest of the bytes read, and the size and
/// modification time it had before the read. The time vouches for the digest in a later fast
/// check: a file written after it was taken has another time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadWhole {
    pub digest: String,
    pub bytes: u64,
    pub modified_ns: Option<u64>,
}

/// The modification time of the local file at `location`, taken before a stage reads it whole
/// ([`ReadWhole`]); `None` for a bucket object, or a time too recent to vouch for a digest.
pub fn time_before_reading(location: &Location) -> Option<u64> {
    trusted_modified_ns(&location.local_path()?)
}

/// Below this age a modification time is not recorded: a file rewritten with the same size
/// within the same clock tick as its digest was taken (1 s on some filesystems, a few ms on
/// Linux) would otherwise pass the fast check unread (git's "racy clean" problem).
const RACY_SECONDS: u64 = 3;

/// The file's modification time in ns, if it is old enough to vouch for the digest taken now.
fn trusted_modified_ns(path: &std::path::Path) -> Option<u64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    let age = std::time::SystemTime::now().duration_since(modified).ok()?;
    if age.as_secs() < RACY_SECONDS {
        return None;
    }
    u64::try_from(modified.duration_since(UNIX_EPOCH).ok()?.as_nanos()).ok()
}

fn digest_file(location: &Location, path: &std::path::Path) -> Result<String, Error> {
    let failed = |e: std::io::Error| Error::Storage {
        op: "read",
        uri: location.uri(),
        message: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file).map_err(failed)?;
    Ok(format!("blake3:{}", hasher.finalize().to_hex()))
}

/// A source input's identity from its files, sorted listed before named and by name, each once.
pub(crate) fn identity(files: &[SourceFile]) -> String {
    let mut lines = String::new();
    for file in files {
        let role = if file.named { "named" } else { "listed" };
        lines.push_str(&format!("{role}\t{}\t{}\n", file.name, file.digest));
    }
    digest_bytes(lines.as_bytes())
}

/// The recorded source input as it is now: its folder listed again and every named file looked
/// at again (`manifests status`; a stage rebuilds its inputs from its own arguments instead).
pub fn recheck(recorded: &Input) -> Result<Input, Error> {
    let mut set = SourceSet::new(Some(recorded));
    // A job of a batch array looked only at the files it reads: so does its check.
    let unread: std::collections::HashSet<&str> = recorded
        .files
        .iter()
        .filter(|f| !f.named && f.digest == UNREAD)
        .map(|f| f.uri.as_str())
        .collect();
    if let Some(listed) = &recorded.listed {
        set.list_reading(&Location::parse(listed)?, &|uri| !unread.contains(uri))?;
    }
    for file in recorded.files.iter().filter(|f| f.named) {
        set.name(file.name.clone(), &Location::parse(&file.uri)?)?;
    }
    set.into_input(&recorded.name, &recorded.uri)
}

/// Raw data of which every file was named by a list: what a job of a batch array whose rows
/// name no file lacks, where its neighbours record it.
pub(crate) fn names_files_only(input: &Input) -> bool {
    input.kind == "source" && !input.files.is_empty() && input.files.iter().all(|file| file.named)
}

/// Whether the files two identities of one source input found by listing its folder or file
/// (not named by a list) are the same files, by name, and `agree` on each one's digest.
fn listed_agree(a: &Input, b: &Input, agree: impl Fn(&str, &str) -> bool) -> bool {
    fn listed(input: &Input) -> Vec<(&str, &str)> {
        let files = input.files.iter().filter(|file| !file.named);
        files
            .map(|file| (file.name.as_str(), file.digest.as_str()))
            .collect()
    }
    let (a, b) = (listed(a), listed(b));
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|((a_name, a_digest), (b_name, b_digest))| {
                a_name == b_name && agree(a_digest, b_digest)
            })
}

/// Whether an identity was taken by a job of a batch array that looked at its share of the
/// files only: it names some files of a list, or lists some files of a folder unread.
pub(crate) fn looks_at_a_share(input: &Input) -> bool {
    input
        .files
        .iter()
        .any(|file| file.named || file.digest == UNREAD)
}

/// Same role, kind and upstream stage, and the same identity once the jobs' shares are set
/// aside: the same upstream manifest, or the same listed folder or list file (the same files,
/// each with the same content where both jobs read it). Jobs of a batch array over one input
/// agree so, each naming its own rows' files and reading its own files of a folder.
pub(crate) fn same_apart_from_named(a: &Input, b: &Input) -> bool {
    if !(looks_at_a_share(a) || looks_at_a_share(b)) {
        return a.same_identity(b);
    }
    a.name == b.name
        && a.kind == b.kind
        && a.stage == b.stage
        && listed_agree(a, b, |a, b| a == b || a == UNREAD || b == UNREAD)
}

/// Whether a job's inputs `now` are those `recorded` by its earlier run, except that the earlier
/// run also looked at files beyond this job's share: every input otherwise the same, every file
/// named now recorded with the same digest, every file of a folder read now recorded with the
/// same digest, and any input missing now one of named files alone. A job of a batch array
/// written before jobs looked only at their own share looked at every file of the input; this
/// keeps such a job from redoing its share for that alone.
pub fn narrows(recorded: &[Input], now: &[Input]) -> bool {
    let covered = |input: &Input| {
        recorded.iter().any(|before| {
            before.name == input.name
                && (before.same_identity(input)
                    || same_apart_from_named(before, input)
                        && listed_agree(before, input, |old, now| now == old || now == UNREAD)
                        && input.files.iter().filter(|f| f.named).all(|file| {
                            before.files.iter().any(|old| {
                                old.named && old.name == file.name && old.digest == file.digest
                            })
                        }))
        })
    };
    now.iter().all(covered)
        && recorded
            .iter()
            .all(|before| now.iter().any(|i| i.name == before.name) || names_files_only(before))
}

/// Which file makes two identities of the same source input differ, in words.
pub fn changed_file(before: &Input, now: &Input) -> Option<String> {
    let index = |input: &Input| -> BTreeMap<(bool, String), SourceFile> {
        input
            .files
            .iter()
            .map(|f| ((f.named, f.name.clone()), f.clone()))
            .collect()
    };
    let (before, now) = (index(before), index(now));
    for (key, file) in &now {
        match before.get(key) {
            None => return Some(format!("{} added", file.uri)),
            Some(old) if old.digest != file.digest && file.digest == MISSING => {
                return Some(format!("{} is gone", file.uri));
            }
            Some(old) if old.digest != file.digest => {
                return Some(format!("{} changed", file.uri));
            }
            Some(_) => {}
        }
    }
    before
        .iter()
        .find(|(key, _)| !now.contains_key(*key))
        .map(|(_, file)| format!("{} removed", file.uri))
}

/// What a stage's identity holds for each local raw file it read by content, so the stage can
/// check the bytes it then reads against it: a file rewritten between the identity and the read
/// would otherwise go into the output under the identity of its old bytes, and the next run
/// would find the stage up to date. Bucket objects are known by their ETag, which says nothing
/// checkable about bytes read, and files of another job's share were not read: both are left
/// unchecked.
#[derive(Debug, Clone, Default)]
pub struct SourceDigests {
    /// By URI: `blake3:...` or [`MISSING`].
    expected: HashMap<String, String>,
}

/// What [`SourceDigests`] expects of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected<'a> {
    /// Bytes with this digest (`blake3:...`).
    Digest(&'a str),
    /// No file: a list named it and it was not there.
    Missing,
}

impl SourceDigests {
    /// The local files of the raw source inputs among `inputs`.
    pub fn of(inputs: &[Input]) -> SourceDigests {
        // A local file's URI is its absolute path (`file://` where the input was spelled so);
        // a bucket object's has its scheme. Told from the string: parsing a location per file
        // costs a lookup in the stores' cache, and a job may name millions.
        let local = |uri: &str| uri.starts_with('/') || uri.starts_with("file://");
        let expected = inputs
            .iter()
            .filter(|input| input.kind == "source")
            .flat_map(|input| &input.files)
            .filter(|file| file.digest.starts_with("blake3:") || file.digest == MISSING)
            .filter(|file| local(&file.uri))
            .map(|file| (file.uri.clone(), file.digest.clone()))
            .collect();
        SourceDigests { expected }
    }

    /// What the identity holds for the file at `location`, if it is checked.
    pub fn expected(&self, location: &Location) -> Option<Expected<'_>> {
        let digest = self.expected.get(&location.uri())?;
        Some(match digest.as_str() {
            MISSING => Expected::Missing,
            digest => Expected::Digest(digest),
        })
    }

    /// Checks a file read whole: `bytes` is what was read, `None` when there was no file.
    pub fn check(&self, location: &Location, bytes: Option<&[u8]>) -> Result<(), Error> {
        match (self.expected(location), bytes) {
            (None, _) | (Some(Expected::Missing), None) => Ok(()),
            (Some(expected), bytes) => check_read(location, expected, bytes.map(digest_bytes)),
        }
    }
}

/// Ok when `read` (the digest of the bytes read, `None`: no file) is what the identity holds;
/// otherwise the error that names the file and says to run the stage again.
pub fn check_read(
    location: &Location,
    expected: Expected<'_>,
    read: Option<String>,
) -> Result<(), Error> {
    let (recorded, now, why) = match (expected, read) {
        (Expected::Missing, None) => return Ok(()),
        (Expected::Digest(digest), Some(read)) if digest == read => return Ok(()),
        (Expected::Missing, Some(read)) => (
            "no file".to_string(),
            format!("a file ({read})"),
            "it was written after the identity was taken",
        ),
        (Expected::Digest(digest), None) => (
            digest.to_string(),
            "no file".to_string(),
            "it was removed after the identity was taken",
        ),
        (Expected::Digest(digest), Some(read)) => (
            digest.to_string(),
            read,
            "it changed after the identity was taken, or was rewritten keeping its size and \
             modification time, which the identity's fast check trusts",
        ),
    };
    Err(Error::SourceChanged {
        uri: location.uri(),
        recorded,
        now,
        why,
    })
}
