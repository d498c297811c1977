//! Streaming training rows out of shards: a seeded shuffle over shards, rows and a shuffle
//! buffer, read and decoded on a background thread, memory bounded whatever the data size, and
//! exactly resumable from a row position.
//!
//! The visiting order is a pure function of the seed and the shard sizes. Epoch `e` takes the
//! shards in a random order, the rows of each shard in a random order, and passes them through a
//! buffer of `shuffle_buffer` rows from which a random row leaves each time; the buffer drains at
//! the end of the epoch, so every epoch is a permutation of all rows. Position `p` (rows emitted
//! since the start) is therefore the same row in every run: a checkpoint stores `p`, and resuming
//! replays the order up to `p` on row indices alone (no shard read, no decode), then loads only
//! the shards whose rows sit in the buffer at that point.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or decoding failed; the message names the shard and row.
    #[error("{0}")]
    Data(String),
    #[error("the data stream has no rows to train on")]
    Empty,
    #[error("the data stream stopped: its reader thread is gone")]
    Stopped,
}

pub use manifests::shards::is_held_out;

/// The held-out rows an evaluation reads, gathered during one scan of the data: up to `limit`
/// of them, and beside them the first `limit` training rows, which stand in when the data
/// holds nothing out (tiny inputs).
#[derive(Debug)]
pub struct HeldOutSample<T> {
    limit: usize,
    held_out: Vec<T>,
    stand_in: Vec<T>,
}

impl<T> HeldOutSample<T> {
    pub fn new(limit: usize) -> Self {
        HeldOutSample {
            limit,
            held_out: Vec::new(),
            stand_in: Vec::new(),
        }
    }

    /// Whether a row on this side would be kept: callers decode only those.
    pub fn wants(&self, held_out: bool) -> bool {
        let side = if held_out {
            &self.held_out
        } else {
            &self.stand_in
        };
        side.len() < self.limit
    }

    /// Keeps `item` if its side wants it.
    pub fn offer(&mut self, held_out: bool, item: T) {
        if self.wants(held_out) {
            let side = if held_out {
                &mut self.held_out
            } else {
                &mut self.stand_in
            };
            side.push(item);
        }
    }

    /// Enough held-out rows: the scan can stop.
    pub fn is_full(&self) -> bool {
        !self.wants(true)
    }

    /// The held-out rows, or the stand-ins and `true` when nothing was held out.
    pub fn finish(self) -> (Vec<T>, bool) {
        if self.held_out.is_empty() {
            (self.stand_in, true)
        } else {
            (self.held_out, false)
        }
    }
}

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub seed: u64,
    /// Rows held for shuffling across shard boundaries (0: shards and rows are still shuffled).
    pub shuffle_buffer: usize,
    /// Decoded rows the reader keeps ready ahead of the consumer.
    pub prefetch: usize,
}

/// A row by shard (index into the shard list) and row within the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowRef {
    pub shard: usize,
    pub row: usize,
}

fn rng_for(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    // Distinct streams per (epoch, purpose) without correlations between nearby seeds.
    let mut seeder = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_da7a_0000_0000);
    seeder.set_stream(epoch.wrapping_mul(1 << 20).wrapping_add(stream));
    ChaCha8Rng::seed_from_u64(seeder.random::<u64>())
}

/// The visiting order of one epoch, on row references only.
struct Epoch<'a, R> {
    sizes: &'a [usize],
    seed: u64,
    epoch: u64,
    shard_order: Vec<usize>,
    next_shard: usize,
    picks: ChaCha8Rng,
    buffer: Vec<(RowRef, Option<R>)>,
}

impl<'a, R> Epoch<'a, R> {
    fn new(sizes: &'a [usize], seed: u64, epoch: u64) -> Self {
        let mut shard_order: Vec<usize> = (0..sizes.len()).filter(|&s| sizes[s] > 0).collect();
        shard_order.shuffle(&mut rng_for(seed, epoch, 0));
        Epoch {
            sizes,
            seed,
            epoch,
            shard_order,
            next_shard: 0,
            picks: rng_for(seed, epoch, 1),
            buffer: Vec::new(),
        }
    }

    /// The next shard to read and its rows in this epoch's order.
    fn take_shard(&mut self) -> Option<(usize, Vec<usize>)> {
        let shard = *self.shard_order.get(self.next_shard)?;
        self.next_shard += 1;
        let mut rows: Vec<usize> = (0..self.sizes[shard]).collect();
        rows.shuffle(&mut rng_for(self.seed, self.epoch, 2 + shard as u64));
        Some((shard, rows))
    }

    fn needs_shard(&self, shuffle_buffer: usize) -> bool {
        self.buffer.len() <= shuffle_buffer && self.next_shard < self.shard_order.len()
    }

    /// Tops the buffer up with the next shards' row references (no row read).
    fn fill_references(&mut self, shuffle_buffer: usize) {
        while self.needs_shard(shuffle_buffer) {
            if let Some((shard, rows)) = self.take_shard() {
                self.buffer
                    .extend(rows.into_iter().map(|row| (RowRef { shard, row }, None)));
            }
        }
    }

    /// Replays the first `count` emissions of the epoch on references alone.
    fn skip(&mut self, count: u64, shuffle_buffer: usize) {
        for _ in 0..count {
            self.fill_references(shuffle_buffer);
            self.pick();
        }
    }

    /// Removes the next row to emit (the buffer must hold one).
    fn pick(&mut self) -> (RowRef, Option<R>) {
        let index = self.picks.random_range(0..self.buffer.len());
        self.buffer.swap_remove(index)
    }
}

/// The row references of positions `start..start + count`, without reading anything: the order
/// the stream emits (for tests, and to reason about a resume).
pub fn row_order(
    sizes: &[usize],
    seed: u64,
    shuffle_buffer: usize,
    start: u64,
    count: usize,
) -> Vec<RowRef> {
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(count);
    let mut position = start;
    while out.len() < count {
        let (epoch, offset) = (position / total, position % total);
        let mut order = Epoch::<()>::new(sizes, seed, epoch);
        order.skip(offset, shuffle_buffer);
        loop {
            order.fill_references(shuffle_buffer);
            if order.buffer.is_empty() || out.len() == count {
                break;
            }
            out.push(order.pick().0);
            position += 1;
        }
    }
    out
}

struct Emitted<T> {
    /// Rows emitted once this one is consumed.
    position: u64,
    item: Option<T>,
}

/// Rows decoded on a background thread, in the seeded order, from a position on.
pub struct RowStream<T> {
    receiver: Receiver<Result<Emitted<T>, StreamError>>,
    reader: Option<JoinHandle<()>>,
    position: u64,
    /// Rows per epoch: more left-out rows than this in a row means nothing is ever kept.
    total: u64,
}

impl<T: Send + 'static> RowStream<T> {
    /// Starts reading at `start` (rows emitted before, filtered ones included). `load` reads one
    /// shard's raw rows; `decode` turns a raw row into an item, or `None` to leave it out (a
    /// held-out row, say), which still counts as a position.
    pub fn spawn<R: Send + 'static>(
        sizes: Vec<usize>,
        config: StreamConfig,
        start: u64,
        load: impl Fn(usize) -> Result<Vec<R>, String> + Send + 'static,
        decode: impl Fn(&RowRef, R) -> Result<Option<T>, String> + Send + 'static,
    ) -> Result<Self, StreamError> {
        let total: u64 = sizes.iter().map(|&s| s as u64).sum();
        if total == 0 {
            return Err(StreamError::Empty);
        }
        let (sender, receiver) = sync_channel(config.prefetch.max(1));
        let reader = std::thread::Builder::new()
            .name("parti-data".into())
            .spawn(move || {
                if let Err(error) = read(&sizes, &config, start, &load, &decode, &sender) {
                    // The consumer may be gone already; then nobody is left to tell.
                    let _ = sender.send(Err(error));
                }
            })
            .map_err(|e| StreamError::Data(format!("starting the data reader: {e}")))?;
        Ok(RowStream {
            receiver,
            reader: Some(reader),
            position: start,
            total,
        })
    }

    /// The next item that was not left out.
    pub fn next_item(&mut self) -> Result<T, StreamError> {
        for _ in 0..=self.total {
            let emitted = self.receiver.recv().map_err(|_| StreamError::Stopped)??;
            self.position = emitted.position;
            if let Some(item) = emitted.item {
                return Ok(item);
            }
        }
        Err(StreamError::Empty)
    }

    /// `count` items, in order.
    pub fn next_items(&mut self, count: usize) -> Result<Vec<T>, StreamError> {
        (0..count).map(|_| self.next_item()).collect()
    }

    /// Rows emitted so far (consumed ones only, not the prefetched): what a checkpoint stores.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Rows in one pass over the data (an epoch), left-out ones included.
    pub fn rows_per_epoch(&self) -> u64 {
        self.total
    }
}

impl<T> Drop for RowStream<T> {
    fn drop(&mut self) {
        // Unblocks a reader waiting to send, which then sees the closed channel and stops.
        let (_, closed) = sync_channel(0);
        drop(std::mem::replace(&mut self.receiver, closed));
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Turns a raw row into an item, or `None` to leave it out.
type Decode<'a, R, T> = &'a dyn Fn(&RowRef, R) -> Result<Option<T>, String>;

fn read<R, T>(
    sizes: &[usize],
    config: &StreamConfig,
    start: u64,
    load: &dyn Fn(usize) -> Result<Vec<R>, String>,
    decode: Decode<'_, R, T>,
    sender: &SyncSender<Result<Emitted<T>, StreamError>>,
) -> Result<(), StreamError> {
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    let mut position = start;
    loop {
        let (epoch, offset) = (position / total, position % total);
        let mut order = Epoch::<R>::new(sizes, config.seed, epoch);
        order.skip(offset, config.shuffle_buffer);
        // Load the rows the buffer holds at that point, one shard read each.
        let mut wanted: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (index, (row, _)) in order.buffer.iter().enumerate() {
            wanted.entry(row.shard).or_default().push(index);
        }
        for (shard, indices) in wanted {
            let mut rows = load_rows(load, shard)?;
            for index in indices {
                let row = order.buffer[index].0.row;
                order.buffer[index].1 = Some(take_row(&mut rows, shard, row)?);
            }
        }
        loop {
            while order.needs_shard(config.shuffle_buffer) {
                if let Some((shard, order_rows)) = order.take_shard() {
                    let mut rows = load_rows(load, shard)?;
                    for row in order_rows {
                        let raw = take_row(&mut rows, shard, row)?;
                        order.buffer.push((RowRef { shard, row }, Some(raw)));
                    }
                }
            }
            if order.buffer.is_empty() {
                break;
            }
            let (row, raw) = order.pick();
            let raw =
                raw.ok_or_else(|| StreamError::Data(format!("row {row:?} was never read")))?;
            let item = decode(&row, raw).map_err(StreamError::Data)?;
            position += 1;
            if sender.send(Ok(Emitted { position, item })).is_err() {
                return Ok(()); // the consumer is gone
            }
        }
    }
}

/// A shard's rows, each taken out once it enters the buffer.
fn load_rows<R>(
    load: &dyn Fn(usize) -> Result<Vec<R>, String>,
    shard: usize,
) -> Result<Vec<Option<R>>, StreamError> {
    Ok(load(shard)
        .map_err(StreamError::Data)?
        .into_iter()
        .map(Some)
        .collect())
}

/// Rows per shard as a manifest lists them; a shard without a count is an error naming it.
pub fn shard_sizes(
    manifest_uri: &str,
    shards: &[manifests::Artifact],
) -> Result<Vec<usize>, StreamError> {
    shards
        .iter()
        .map(|shard| {
            shard.rows.map(|rows| rows as usize).ok_or_else(|| {
                StreamError::Data(format!(
                    "{manifest_uri}: the manifest gives no row count for {}",
                    shard.uri
                ))
            })
        })
        .collect()
}

fn take_row<R>(rows: &mut [Option<R>], shard: usize, row: usize) -> Result<R, StreamError> {
    rows.get_mut(row).and_then(Option::take).ok_or_else(|| {
        StreamError::Data(format!(
            "shard {shard} has {} rows, fewer than its manifest lists (row {row} missing)",
            rows.len()
        ))
    })
}
