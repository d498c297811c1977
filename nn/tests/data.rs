//! The streaming loader: every epoch a permutation, shuffled across shards, resumable at any
//! position with the same continuation, memory bounded, errors that name the shard.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nn::data::{RowRef, RowStream, StreamConfig, StreamError, row_order};

const SIZES: [usize; 5] = [7, 0, 12, 5, 9];

fn config(shuffle_buffer: usize) -> StreamConfig {
    StreamConfig {
        seed: 42,
        shuffle_buffer,
        prefetch: 3,
    }
}

/// Items are the row references themselves, so a stream can be compared with `row_order`.
fn stream(shuffle_buffer: usize, start: u64) -> RowStream<RowRef> {
    RowStream::spawn(
        SIZES.to_vec(),
        config(shuffle_buffer),
        start,
        |shard| Ok((0..SIZES[shard]).collect::<Vec<usize>>()),
        |at, row| {
            assert_eq!(
                at.row, row,
                "the raw row handed to decode is the one referenced"
            );
            Ok(Some(*at))
        },
    )
    .unwrap()
}

#[test]
fn every_epoch_visits_every_row_once_in_a_new_order() {
    let total: usize = SIZES.iter().sum();
    let order = row_order(&SIZES, 42, 8, 0, 3 * total);
    let all: BTreeSet<RowRef> = SIZES
        .iter()
        .enumerate()
        .flat_map(|(shard, &n)| (0..n).map(move |row| RowRef { shard, row }))
        .collect();
    let epochs: Vec<&[RowRef]> = order.chunks(total).collect();
    for epoch in &epochs {
        assert_eq!(epoch.iter().copied().collect::<BTreeSet<_>>(), all);
    }
    assert_ne!(epochs[0], epochs[1]);
    assert_ne!(epochs[1], epochs[2]);
    // Another seed, another order.
    assert_ne!(row_order(&SIZES, 43, 8, 0, total), epochs[0]);
}

#[test]
fn the_buffer_mixes_shards() {
    let total: usize = SIZES.iter().sum();
    let shards_in_first = |buffer: usize| {
        row_order(&SIZES, 42, buffer, 0, 5)
            .iter()
            .map(|r| r.shard)
            .collect::<BTreeSet<_>>()
            .len()
    };
    // Without a buffer the first five rows all come from the first shard read (every shard
    // holds at least five); with a buffer larger than the data, they draw from several.
    assert_eq!(shards_in_first(0), 1);
    assert!(shards_in_first(total) >= 3, "{}", shards_in_first(total));
    // Rows inside a shard are shuffled too.
    let first_shard: Vec<usize> = row_order(&SIZES, 42, 0, 0, 5)
        .iter()
        .map(|r| r.row)
        .collect();
    assert_ne!(first_shard, (0..5).collect::<Vec<_>>());
}

#[test]
fn the_stream_follows_the_order_and_resumes_anywhere_with_the_same_continuation() {
    let total = SIZES.iter().sum::<usize>() as u64;
    let uninterrupted = row_order(&SIZES, 42, 8, 0, 2 * total as usize + 5);
    let mut from_start = stream(8, 0);
    assert_eq!(
        from_start.next_items(uninterrupted.len()).unwrap(),
        uninterrupted
    );
    assert_eq!(from_start.position(), uninterrupted.len() as u64);
    for start in [1, 7, 8, 19, total - 1, total, total + 13] {
        let mut resumed = stream(8, start);
        let rest = resumed.next_items(20).unwrap();
        assert_eq!(
            rest,
            uninterrupted[start as usize..start as usize + 20],
            "resumed at {start}"
        );
        assert_eq!(resumed.position(), start + 20);
    }
}

#[test]
fn left_out_rows_are_skipped_but_counted() {
    let keep_even = |at: &RowRef, _row: usize| Ok(at.row.is_multiple_of(2).then_some(*at));
    let mut stream = RowStream::spawn(
        SIZES.to_vec(),
        config(4),
        0,
        |shard| Ok((0..SIZES[shard]).collect::<Vec<usize>>()),
        keep_even,
    )
    .unwrap();
    let kept = stream.next_items(10).unwrap();
    assert!(kept.iter().all(|r| r.row.is_multiple_of(2)));
    let order = row_order(&SIZES, 42, 4, 0, 40);
    let expected: Vec<RowRef> = order
        .iter()
        .copied()
        .filter(|r| r.row.is_multiple_of(2))
        .take(10)
        .collect();
    assert_eq!(kept, expected);
    // The position counts every row emitted, so a resume there continues exactly.
    let position = stream.position();
    let next = stream.next_item().unwrap();
    let mut resumed = RowStream::spawn(
        SIZES.to_vec(),
        config(4),
        position,
        |shard| Ok((0..SIZES[shard]).collect::<Vec<usize>>()),
        keep_even,
    )
    .unwrap();
    assert_eq!(resumed.next_item().unwrap(), next);
}

/// A raw row that counts how many exist at once.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn memory_stays_bounded_by_buffer_shard_and_prefetch() {
    let alive = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let sizes = vec![50; 40]; // 2000 rows
    let (alive_in, peak_in) = (alive.clone(), peak.clone());
    let mut stream = RowStream::spawn(
        sizes,
        StreamConfig {
            seed: 1,
            shuffle_buffer: 64,
            prefetch: 4,
        },
        0,
        move |_shard| {
            let now = alive_in.fetch_add(50, Ordering::SeqCst) + 50;
            peak_in.fetch_max(now, Ordering::SeqCst);
            Ok((0..50)
                .map(|_| Counted(alive_in.clone()))
                .collect::<Vec<_>>())
        },
        |at, raw: Counted| {
            drop(raw);
            Ok(Some(*at))
        },
    )
    .unwrap();
    let rows = stream.next_items(2000).unwrap();
    assert_eq!(rows.len(), 2000);
    // Raw rows alive at once: at most the buffer plus one shard read (items already decoded
    // hold no raw row).
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= 64 + 1 + 50, "{peak} raw rows alive at once");
}

#[test]
fn a_failing_shard_is_an_error_that_names_it_and_an_empty_set_is_refused() {
    let mut stream = RowStream::spawn(
        SIZES.to_vec(),
        config(0),
        0,
        |shard| {
            if shard == 3 {
                Err(format!("shard {shard}: digest mismatch"))
            } else {
                Ok((0..SIZES[shard]).collect::<Vec<usize>>())
            }
        },
        |at, _| Ok(Some(*at)),
    )
    .unwrap();
    let error = (0..100)
        .map(|_| stream.next_item())
        .find_map(Result::err)
        .expect("the broken shard is reached within an epoch");
    assert!(
        error.to_string().contains("shard 3: digest mismatch"),
        "{error}"
    );

    let empty = RowStream::<usize>::spawn(
        vec![0, 0],
        config(4),
        0,
        |_| Ok(Vec::<usize>::new()),
        |_, row| Ok(Some(row)),
    );
    assert!(matches!(empty, Err(StreamError::Empty)));
}

#[test]
fn a_shard_shorter_than_its_manifest_says_is_an_error() {
    let mut stream = RowStream::spawn(
        vec![4, 4],
        config(0),
        0,
        |shard| Ok((0..if shard == 1 { 2 } else { 4 }).collect::<Vec<usize>>()),
        |_, row| Ok(Some(row)),
    )
    .unwrap();
    let error = (0..10)
        .map(|_| stream.next_item())
        .find_map(Result::err)
        .unwrap();
    assert!(error.to_string().contains("shard 1 has 2 rows"), "{error}");
}

#[test]
fn about_one_row_in_twenty_is_held_out_by_its_digest_alone() {
    use nn::data::is_held_out;
    assert!(is_held_out("0c00ff") && is_held_out("blake3:0cff"));
    assert!(!is_held_out("0d00") && !is_held_out("sha256:ff00"));
    assert!(!is_held_out("") && !is_held_out("zz") && !is_held_out("é"));
    let held = (0..20_000u32)
        .filter(|i| is_held_out(&manifests::digest_bytes(&i.to_le_bytes())))
        .count();
    // 13 of 256 first bytes: 5.1%.
    assert!((900..1150).contains(&held), "{held}");
}

#[test]
fn held_out_sample_keeps_the_first_held_out_rows_or_says_it_fell_back_on_training_rows() {
    use nn::data::HeldOutSample;
    let mut sample = HeldOutSample::new(2);
    let rows = [
        (false, 'a'),
        (true, 'b'),
        (false, 'c'),
        (false, 'd'),
        (true, 'e'),
    ];
    let mut scanned = 0;
    for (held_out, row) in rows {
        scanned += 1;
        sample.offer(held_out, row);
        if sample.is_full() {
            break;
        }
    }
    assert_eq!(scanned, 5);
    assert!(!sample.wants(true) && !sample.wants(false));
    assert_eq!(sample.finish(), (vec!['b', 'e'], false));

    let mut nothing_held_out = HeldOutSample::new(2);
    for row in ['a', 'b', 'c'] {
        assert!(!nothing_held_out.is_full());
        nothing_held_out.offer(false, row);
    }
    assert!(nothing_held_out.wants(true) && !nothing_held_out.wants(false));
    assert_eq!(nothing_held_out.finish(), (vec!['a', 'b'], true));
}
