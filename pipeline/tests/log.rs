//! The embedded log on a real glommio executor and a real (temporary) directory.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flare_codec::frame::Target;
use flare_pipeline::api::Message;
use flare_pipeline::log::{EmbeddedLog, Log, Recovered};
use flare_pipeline::record::{End, Record};
use glommio::{LocalExecutorBuilder, Placement};

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(2 << 20)
        .make()
        .expect("glommio executor starts with the default RLIMIT_MEMLOCK")
        .run(f)
}

fn message(i: u64, body_len: usize) -> Record {
    Record::Message {
        msg: Arc::new(Message {
            msg_id: 1000 + i,
            ts: 1_800_000_000_000 + i,
            from: format!("user{}", i % 7).into(),
            from_device: "phone".into(),
            to: if i % 3 == 0 {
                Target::Group("g".into())
            } else {
                Target::User(format!("user{}", i % 5))
            },
            body: "x".repeat(body_len),
        }),
        dedup_id: (i % 2 == 0).then(|| format!("c-{i}")),
    }
}

fn records(range: std::ops::Range<u64>) -> Vec<Record> {
    range
        .map(|i| match i % 4 {
            3 => Record::Cursor {
                user: "bob".into(),
                device: "phone".into(),
                seq: i,
            },
            // Bodies of several sizes, some larger than a block.
            _ => message(i, (i as usize * 37) % 6000),
        })
        .collect()
}

async fn append(path: &Path, batches: &[&[Record]]) -> u64 {
    let mut log = EmbeddedLog::open(path).await.unwrap();
    let mut before = Vec::new();
    log.replay(&mut |r| before.push(r)).await.unwrap();
    for batch in batches {
        log.stage(batch);
        let (l, r) = log.flush().await;
        r.unwrap();
        log = l;
    }
    let bytes = log.durable_bytes();
    log.close().await.unwrap();
    bytes
}

async fn read_all(path: &Path) -> (Vec<Record>, Recovered) {
    let mut log = EmbeddedLog::open(path).await.unwrap();
    let mut got = Vec::new();
    let rec = log.replay(&mut |r| got.push(r)).await.unwrap();
    log.close().await.unwrap();
    (got, rec)
}

#[test]
fn records_round_trip_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let all = records(0..60);
    run(async {
        let (empty, rec) = read_all(&path).await;
        assert!(empty.is_empty());
        assert_eq!(
            rec,
            Recovered {
                records: 0,
                bytes: 0,
                torn_tail: None
            }
        );
        let bytes = append(&path, &[&all[..10], &all[10..11], &all[11..30]]).await;
        let (got, rec) = read_all(&path).await;
        assert_eq!(got, all[..30]);
        assert_eq!(rec.bytes, bytes);
        assert_eq!(rec.torn_tail, None);
        // Append after recovery, into the partially filled last block.
        let bytes = append(&path, &[&all[30..31], &all[31..60]]).await;
        let (got, rec) = read_all(&path).await;
        assert_eq!(got, all);
        assert_eq!(rec.bytes, bytes);
        let expect: usize = all.iter().map(Record::frame_len).sum();
        assert_eq!(bytes, expect as u64);
    });
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(size % 4096, 0, "the file is written in whole blocks");
}

#[test]
fn a_record_cut_in_the_middle_is_dropped_and_appending_continues_after_the_valid_prefix() {
    let all = records(0..40);
    let offsets: Vec<u64> = all
        .iter()
        .scan(0u64, |end, r| {
            *end += r.frame_len() as u64;
            Some(*end)
        })
        .collect();
    // Cut inside record 25's header, inside its payload, and exactly at its start.
    for cut in [offsets[24] + 3, offsets[24] + 40, offsets[24]] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        run(append(&path, &[&all[..20], &all[20..40]]));
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        run(async {
            let (got, rec) = read_all(&path).await;
            assert_eq!(got, all[..25], "cut at {cut}");
            assert_eq!(rec.bytes, offsets[24]);
            let expect_tail = if cut == offsets[24] {
                None
            } else {
                Some(End::Truncated)
            };
            assert_eq!(rec.torn_tail, expect_tail, "cut at {cut}");
            let extra = records(100..103);
            append(&path, &[&extra]).await;
            let (got, rec) = read_all(&path).await;
            assert_eq!(got[..25], all[..25]);
            assert_eq!(got[25..], extra[..]);
            assert_eq!(rec.torn_tail, None);
        });
    }
}

#[test]
fn garbage_after_the_valid_records_is_ignored_and_overwritten() {
    let all = records(0..30);
    for garbage in [
        vec![0xAB_u8; 10_000],
        vec![7, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let valid = run(append(&path, &[&all]));
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(valid)).unwrap();
        f.write_all(&garbage).unwrap();
        f.sync_all().unwrap();
        drop(f);
        run(async {
            let (got, rec) = read_all(&path).await;
            assert_eq!(got, all);
            assert_eq!(rec.bytes, valid);
            assert!(
                matches!(rec.torn_tail, Some(End::BadLength | End::BadCrc)),
                "{:?}",
                rec.torn_tail
            );
            let extra = records(200..205);
            append(&path, &[&extra[..2], &extra[2..]]).await;
            let (got, rec) = read_all(&path).await;
            assert_eq!(got.len(), all.len() + extra.len());
            assert_eq!(got[all.len()..], extra[..]);
            assert_eq!(rec.torn_tail, None, "the garbage is gone");
        });
    }
}

#[test]
fn many_small_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let all: Vec<Record> = (0..600).map(|i| message(i, 100)).collect();
    let (flushes, elapsed) = run(async {
        let mut log = EmbeddedLog::open(&path).await.unwrap();
        log.replay(&mut |_| panic!("a new log is empty"))
            .await
            .unwrap();
        let mut flushes = 0u32;
        let start = Instant::now();
        let mut i = 0;
        while i < all.len() {
            let n = 1 + flushes as usize % 3;
            let end = (i + n).min(all.len());
            log.stage(&all[i..end]);
            let (l, r) = log.flush().await;
            r.unwrap();
            log = l;
            flushes += 1;
            i = end;
        }
        let elapsed = start.elapsed();
        log.close().await.unwrap();
        (flushes, elapsed)
    });
    let per_flush = elapsed / flushes;
    println!("{flushes} flushes (write + fdatasync) of 1-3 records: {per_flush:?} each");
    assert!(per_flush < Duration::from_secs(1));
    let (got, rec) = run(read_all(&path));
    assert_eq!(got, all);
    assert_eq!(rec.torn_tail, None);
}
