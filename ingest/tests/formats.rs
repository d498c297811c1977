//! Every input format, built from files the test creates.

mod common;

use std::io::Write;
use std::sync::Arc;

use arrow_array::{BinaryArray, Float64Array, Int32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use common::*;
use image::{DynamicImage, GenericImageView, ImageFormat};
use serde_json::json;

fn pairs(
    dir: &std::path::Path,
    extra: &[&str],
) -> (manifests::Manifest, Vec<manifests::shards::pairs::PairRow>) {
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let mut args = vec![
        "pairs",
        "--out",
        out,
        "--size",
        "32",
        "--min-source-size",
        "8",
        "--output-format",
        "png",
    ];
    args.extend_from_slice(extra);
    let (code, text) = ingest(&args);
    assert_eq!(code, 0, "{text}");
    pairs_rows(out)
}

#[test]
fn folder_layout_with_captions_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    write(&src, "a/001.jpg", jpeg(64, 48, 1));
    write(&src, "a/001.txt", "  a red   circle\n");
    write(&src, "a/001.json", r#"{"url": "http://x"}"#);
    write(&src, "002.png", png(40, 40, 2));
    write(&src, "002.txt", "a blue square");
    write(
        &src,
        "003.webp",
        encode(
            &DynamicImage::ImageRgb8(picture(50, 50, 3)),
            ImageFormat::WebP,
        ),
    );
    write(&src, "003.txt", "a webp");
    write(
        &src,
        "004.bmp",
        encode(
            &DynamicImage::ImageRgb8(picture(30, 30, 4)),
            ImageFormat::Bmp,
        ),
    );
    write(&src, "004.txt", "a bitmap");
    let (manifest, rows) = pairs(dir.path(), &["--input", src.to_str().unwrap()]);
    assert_eq!(sorted_keys(&rows), ["002", "003", "004", "a/001"]);
    let first = rows.iter().find(|r| r.key == "a/001").unwrap();
    assert_eq!(first.caption, "a red circle");
    assert_eq!(first.metadata.as_deref(), Some(r#"{"url": "http://x"}"#));
    assert_eq!(
        (
            first.width,
            first.height,
            first.original_width,
            first.original_height
        ),
        (32, 32, 64, 48)
    );
    assert_eq!(
        first.sha256,
        ingest::process::sha256_hex(&std::fs::read(src.join("a/001.jpg")).unwrap())
    );
    let decoded = image::load_from_memory(&first.image).unwrap();
    assert_eq!(decoded.dimensions(), (32, 32));
    assert_eq!(manifest.metrics["rows"], json!(4));
    assert_eq!(rejected(&manifest), json!({}));
    assert_eq!(manifest.metrics["format"], json!("folder"));
}

#[test]
fn coco_captions_all_and_first() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("train2017");
    write(&images, "000000000009.jpg", jpeg(64, 64, 9));
    write(&images, "000000000025.jpg", jpeg(64, 64, 25));
    let coco = json!({
        "images": [{"id": 25, "file_name": "000000000025.jpg", "height": 64, "width": 64},
                   {"id": 9, "file_name": "000000000009.jpg", "height": 64, "width": 64},
                   {"id": 30, "file_name": "missing.jpg"}],
        "annotations": [{"id": 1, "image_id": 9, "caption": "first of nine"},
                        {"id": 2, "image_id": 9, "caption": "second of nine"},
                        {"id": 3, "image_id": 25, "caption": "giraffe"}]
    });
    write(dir.path(), "captions.json", coco.to_string());
    let json_path = dir.path().join("captions.json");
    let root = images.to_str().unwrap();
    let (manifest, rows) = pairs(
        dir.path(),
        &["--input", json_path.to_str().unwrap(), "--image-root", root],
    );
    assert_eq!(
        sorted_keys(&rows),
        [
            "000000000009-000000001",
            "000000000009-000000002",
            "000000000025-000000003"
        ]
    );
    // Five captions of one image are not duplicates of each other.
    assert_eq!(rejected(&manifest), json!({"no_caption": 1}));
    let (manifest, rows) = pairs(
        dir.path(),
        &[
            "--input",
            json_path.to_str().unwrap(),
            "--image-root",
            root,
            "--coco-captions",
            "first",
            "--force",
        ],
    );
    assert_eq!(sorted_keys(&rows), ["000000000009", "000000000025"]);
    assert_eq!(
        rows.iter()
            .find(|r| r.key == "000000000009")
            .unwrap()
            .caption,
        "first of nine"
    );
    assert_eq!(manifest.metrics["format"], json!("coco"));

    // An export without annotation ids keys each caption by its place, not all alike.
    let without_ids = json!({
        "images": [{"id": 9, "file_name": "000000000009.jpg"}],
        "annotations": [{"image_id": 9, "caption": "first of nine"},
                        {"image_id": 9, "caption": "second of nine"},
                        {"image_id": 31, "caption": "of an image not listed"}]
    });
    write(dir.path(), "no-ids.json", without_ids.to_string());
    let no_ids = dir.path().join("no-ids.json");
    let (manifest, rows) = pairs(
        dir.path(),
        &[
            "--input",
            no_ids.to_str().unwrap(),
            "--image-root",
            root,
            "--force",
        ],
    );
    assert_eq!(
        sorted_keys(&rows),
        ["000000000009-p000000000", "000000000009-p000000001"]
    );
    assert_eq!(rejected(&manifest), json!({"no_image": 1}));
}

#[test]
fn csv_with_header_tsv_without_header_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "img/x.jpg", jpeg(40, 40, 1));
    write(dir.path(), "img/y.png", png(40, 40, 2));
    write(
        dir.path(),
        "list.csv",
        "path,text\nimg/x.jpg,\"a, quoted caption\"\nimg/y.png,plain\n",
    );
    let csv = dir.path().join("list.csv");
    let (_, rows) = pairs(
        dir.path(),
        &[
            "--input",
            csv.to_str().unwrap(),
            "--image-column",
            "path",
            "--caption-column",
            "text",
        ],
    );
    assert_eq!(
        rows.iter().map(|r| r.caption.as_str()).collect::<Vec<_>>(),
        ["a, quoted caption", "plain"]
    );

    // CC3M order: caption first, then the image, no header.
    write(
        dir.path(),
        "cc3m.tsv",
        "a cat\timg/x.jpg\na dog\timg/y.png\n",
    );
    let tsv = dir.path().join("cc3m.tsv");
    let (_, rows) = pairs(
        dir.path(),
        &[
            "--input",
            tsv.to_str().unwrap(),
            "--no-header",
            "--caption-column",
            "0",
            "--image-column",
            "1",
            "--force",
        ],
    );
    assert_eq!(
        rows.iter()
            .map(|r| (r.key.as_str(), r.caption.as_str()))
            .collect::<Vec<_>>(),
        [("000000000", "a cat"), ("000000001", "a dog")]
    );

    write(
        dir.path(),
        "list.jsonl",
        "{\"image\": \"img/x.jpg\", \"caption\": \"from jsonl\"}\nnot json\n{\"image\": \"img/y.png\"}\n",
    );
    let jsonl = dir.path().join("list.jsonl");
    let (manifest, rows) = pairs(dir.path(), &["--input", jsonl.to_str().unwrap(), "--force"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].caption, "from jsonl");
    assert_eq!(
        rejected(&manifest),
        json!({"malformed_row": 1, "no_caption": 1})
    );
}

fn img2dataset_parquet(width_as_float: bool) -> Vec<u8> {
    let images: Vec<Option<Vec<u8>>> = vec![Some(jpeg(48, 48, 1)), None, Some(jpeg(48, 48, 3))];
    let width: Arc<dyn arrow_array::Array> = if width_as_float {
        Arc::new(Float64Array::from(vec![48.0, 0.0, 48.0]))
    } else {
        Arc::new(Int32Array::from(vec![48, 0, 48]))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, false),
        Field::new("width", width.data_type().clone(), false),
        Field::new("jpg", DataType::Binary, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![
                "000010000",
                "000010001",
                "000010002",
            ])),
            Arc::new(StringArray::from(vec![
                Some("first"),
                Some("failed"),
                Some("third"),
            ])),
            Arc::new(StringArray::from(vec![
                "success",
                "failed_to_download",
                "success",
            ])),
            width,
            Arc::new(BinaryArray::from_iter(images.iter().map(|i| i.as_deref()))),
        ],
    )
    .unwrap();
    manifests::table::write_parquet(
        "test",
        schema,
        &[batch],
        manifests::table::writer_properties(10, true),
    )
    .unwrap()
    .to_vec()
}

#[test]
fn img2dataset_parquet_with_int32_or_float64_metadata() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "src/00000.parquet", img2dataset_parquet(false));
    write(dir.path(), "src/00001.parquet", img2dataset_parquet(true));
    let src = dir.path().join("src");
    let (manifest, rows) = pairs(dir.path(), &["--input", src.to_str().unwrap()]);
    // The same images appear in both files: the second file's are duplicates.
    assert_eq!(sorted_keys(&rows), ["000010000", "000010002"]);
    assert_eq!(
        rejected(&manifest),
        json!({"download_failed": 2, "duplicate": 2})
    );
    assert_eq!(manifest.metrics["format"], json!("parquet"));
    assert_eq!(manifest.artifacts.len(), 2, "one shard per input container");
}

#[test]
fn webdataset_tars() {
    let dir = tempfile::tempdir().unwrap();
    let member = |name: &str, data: &[u8]| (name.to_string(), data.to_vec());
    let tar_bytes = tar_of(&[
        member("000010005.jpg", &jpeg(40, 40, 5)),
        member("000010005.txt", b"from a tar"),
        member("000010005.json", br#"{"similarity": 0.3}"#),
        member("000010006.jpg", &jpeg(40, 40, 6)),
        member("000010007.txt", b"caption without image"),
    ]);
    write(dir.path(), "src/00000.tar", &tar_bytes);
    // A truncated copy: whatever came before the cut is kept, the cut is counted.
    write(
        dir.path(),
        "src/00001.tar",
        &tar_bytes[..tar_bytes.len() / 3],
    );
    let src = dir.path().join("src");
    let (manifest, rows) = pairs(dir.path(), &["--input", src.to_str().unwrap()]);
    let row = rows.iter().find(|r| r.key == "000010005").unwrap();
    assert_eq!(row.caption, "from a tar");
    assert_eq!(row.metadata.as_deref(), Some(r#"{"similarity": 0.3}"#));
    let rejected = rejected(&manifest);
    assert_eq!(rejected["no_caption"], json!(1));
    assert_eq!(rejected["no_image"], json!(1));
    assert_eq!(rejected["truncated_archive"], json!(1));
    assert_eq!(manifest.metrics["format"], json!("webdataset"));

    // A sample's files apart from each other (`tar -cf x.tar *.jpg *.txt`) would be counted
    // as samples without caption and without image: the tar is refused, naming it and the key.
    let scattered = dir.path().join("scattered");
    write(
        &scattered,
        "00000.tar",
        tar_of(&[
            member("a.jpg", &jpeg(40, 40, 7)),
            member("a.mp4", b"a member no sample uses"),
            member("b.jpg", &jpeg(40, 40, 8)),
            member("a.txt", b"apart from its picture"),
        ]),
    );
    let out = dir.path().join("scattered-out");
    let (code, text) = ingest(&[
        "pairs",
        "--input",
        scattered.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("00000.tar: the files of sample 'a' are not next to each other"),
        "{text}"
    );
}

/// A JPEG with an EXIF APP1 segment saying "rotate 90 degrees clockwise" (orientation 6).
fn jpeg_with_orientation_6(width: u32, height: u32) -> Vec<u8> {
    let plain = jpeg(width, height, 7);
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&[0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&plain[2..]);
    out
}

#[test]
fn colour_types_and_exif_orientation_are_normalised() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let rgb16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(40, 40, |x, _| {
        image::Rgb([x as u16 * 1000, 0, 65535])
    });
    write(
        &src,
        "rgb16.png",
        encode(&DynamicImage::ImageRgb16(rgb16), ImageFormat::Png),
    );
    let gray = image::GrayImage::from_fn(40, 40, |x, _| image::Luma([x as u8 * 6]));
    write(
        &src,
        "gray.png",
        encode(&DynamicImage::ImageLuma8(gray), ImageFormat::Png),
    );
    write(
        &src,
        "gray.jpg",
        encode(
            &DynamicImage::ImageLuma8(image::GrayImage::from_pixel(40, 40, image::Luma([90]))),
            ImageFormat::Jpeg,
        ),
    );
    write(&src, "rotated.jpg", jpeg_with_orientation_6(60, 40));
    // An 8-colour palette PNG, written by hand with the png crate's indexed mode.
    let mut palette_png = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut palette_png, 40, 40);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(vec![255, 0, 0, 0, 255, 0]);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&vec![1u8; 1600]).unwrap();
    }
    write(&src, "palette.png", palette_png);
    for key in ["rgb16", "gray", "rotated", "palette"] {
        write(&src, &format!("{key}.txt"), key);
    }
    std::fs::File::create(src.join("gray.txt"))
        .unwrap()
        .write_all(b"gray")
        .unwrap();
    let (manifest, rows) = pairs(
        dir.path(),
        &[
            "--input",
            src.to_str().unwrap(),
            "--resize-mode",
            "keep-ratio",
        ],
    );
    // gray.png and gray.jpg share a key: one sample, the other image is counted, not lost.
    assert_eq!(
        rejected(&manifest),
        json!({"duplicate_key": 1}),
        "{:?}",
        manifest.metrics
    );
    let rotated = rows.iter().find(|r| r.key == "rotated").unwrap();
    assert_eq!(
        (rotated.original_width, rotated.original_height),
        (40, 60),
        "EXIF rotation applied"
    );
    assert_eq!(
        (rotated.width, rotated.height),
        (32, 48),
        "keep_ratio: shorter side = size"
    );
    let palette = rows.iter().find(|r| r.key == "palette").unwrap();
    let pixel = image::load_from_memory(&palette.image)
        .unwrap()
        .to_rgb8()
        .get_pixel(5, 5)
        .0;
    assert_eq!(pixel, [0, 255, 0]);
    assert_eq!(sorted_keys(&rows), ["gray", "palette", "rgb16", "rotated"]);
}

#[test]
fn text_corpora_c4_gz_jsonl_and_plain() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for i in 0..5 {
        writeln!(gz, "{}", json!({"text": format!("document number {i} is long enough"), "timestamp": "2019-04-25T12:57:54Z", "url": format!("https://x/{i}")})).unwrap();
    }
    writeln!(
        gz,
        "{}",
        json!({"text": "document number 0 is long enough"})
    )
    .unwrap();
    writeln!(gz, "{{broken json").unwrap();
    writeln!(gz, "{}", json!({"text": "short"})).unwrap();
    let gz = gz.finish().unwrap();
    write(&src, "c4-train.00000-of-01024.json.gz", &gz);
    // A truncated download of the same file: the readable prefix counts, the cut is one rejection.
    write(
        &src,
        "c4-train.00001-of-01024.json.gz",
        &gz[..gz.len() * 2 / 3],
    );
    write(
        &src,
        "extra.jsonl",
        "{\"body\": \"ignored field name here\"}\n",
    );
    write(
        &src,
        "notes.txt",
        "first paragraph of plain text\nstill first\n\nsecond paragraph is here\n",
    );
    let out = dir.path().join("out");
    let (code, text) = ingest(&[
        "text",
        "--input",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = text_rows(out.to_str().unwrap());
    let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    assert!(texts.contains(&"document number 4 is long enough"));
    assert!(texts.contains(&"first paragraph of plain text\nstill first\n"));
    assert!(texts.contains(&"second paragraph is here\n"));
    let c4 = rows
        .iter()
        .find(|r| r.text.starts_with("document number 1"))
        .unwrap();
    assert_eq!(c4.url.as_deref(), Some("https://x/1"));
    assert_eq!(c4.timestamp.as_deref(), Some("2019-04-25T12:57:54Z"));
    assert_eq!(rows.len(), 7);
    let rejected = rejected(&manifest);
    assert_eq!(rejected["malformed_line"], json!(1));
    assert_eq!(rejected["too_short"], json!(1));
    assert_eq!(rejected["no_text"], json!(1));
    assert_eq!(rejected["truncated_file"], json!(1));
    assert!(rejected["duplicate"].as_u64().unwrap() >= 1);
}

/// C4's shards share the name before their first dot (`c4-train.00000-of-01024.json.gz`,
/// `c4-train.00001-of-01024.json.gz`): their rows are keyed by the whole name without the
/// extension, so no two documents share a key. A file whose short name is its own keeps it.
#[test]
fn text_keys_are_unique_across_files_that_share_a_short_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for shard in 0..2 {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for i in 0..3 {
            let text = format!("shard {shard} holds document {i}");
            writeln!(gz, "{}", json!({ "text": text })).unwrap();
        }
        let name = format!("c4-train.{shard:05}-of-01024.json.gz");
        write(&src, &name, gz.finish().unwrap());
    }
    write(
        &src,
        "notes.jsonl",
        "{\"text\": \"a note that is long enough\"}\n",
    );
    let out = dir.path().join("out");
    let (code, text) = ingest(&[
        "text",
        "--input",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let (_, rows) = text_rows(out.to_str().unwrap());
    let mut keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "c4-train.00000-of-01024-000000001",
            "c4-train.00000-of-01024-000000002",
            "c4-train.00000-of-01024-000000003",
            "c4-train.00001-of-01024-000000001",
            "c4-train.00001-of-01024-000000002",
            "c4-train.00001-of-01024-000000003",
            "notes-000000001",
        ]
    );
}

#[test]
fn text_from_the_captions_of_a_pairs_stage_leaves_held_out_rows_out() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let captions = 40;
    for i in 0..captions {
        write(&src, &format!("{i:03}.png"), png(40, 40, i as u8));
        // One caption twice (a duplicate) and one too short.
        let caption = match i {
            1 => "caption number zero of the set".to_string(),
            2 => "tiny".to_string(),
            _ => format!("caption number {i} of the set"),
        };
        write(&src, &format!("{i:03}.txt"), caption);
    }
    let (pairs_manifest, pairs) = pairs(dir.path(), &["--input", src.to_str().unwrap()]);
    assert_eq!(pairs.len(), captions);
    let pairs_out = dir.path().join("out");
    let out = dir.path().join("text");
    let (code, text) = ingest(&[
        "text",
        "--input",
        pairs_out.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = text_rows(out.to_str().unwrap());
    let held_out: Vec<&str> = pairs
        .iter()
        .filter(|p| manifests::shards::is_held_out(&p.sha256))
        .map(|p| p.caption.as_str())
        .collect();
    let expected: Vec<&str> = pairs
        .iter()
        .filter(|p| !manifests::shards::is_held_out(&p.sha256))
        .map(|p| p.caption.as_str())
        .filter(|c| *c != "tiny")
        .collect();
    assert!(!held_out.is_empty(), "the test needs a held-out row");
    let mut expected_distinct = expected.clone();
    expected_distinct.sort_unstable();
    expected_distinct.dedup();
    let mut texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    texts.sort_unstable();
    assert_eq!(texts, expected_distinct);
    assert!(
        held_out
            .iter()
            .all(|c| !texts.contains(c) || expected.contains(c))
    );
    let rejected = rejected(&manifest);
    assert_eq!(
        rejected["held_out"].as_u64().unwrap_or(0),
        held_out.len() as u64
    );
    // Every pairs row is a text row or a rejection.
    let refused: u64 = rejected
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(rows.len() as u64 + refused, captions as u64);
    // The pairs stage is the text stage's recorded upstream.
    assert!(
        manifest
            .inputs
            .iter()
            .any(|input| input.stage.as_deref() == Some(pairs_manifest.stage.as_str())),
        "{:?}",
        manifest.inputs
    );
}

#[test]
fn cmyk_jpeg_is_converted_to_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // Pure red in CMYK: no cyan, full magenta and yellow, no black.
    let cmyk: Vec<u8> = (0..48 * 48).flat_map(|_| [0u8, 255, 255, 0]).collect();
    let mut jpeg = Vec::new();
    jpeg_encoder::Encoder::new(&mut jpeg, 95)
        .encode(&cmyk, 48, 48, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    write(&src, "cmyk.jpg", &jpeg);
    write(&src, "cmyk.txt", "a red square in cmyk");
    let (manifest, rows) = pairs(dir.path(), &["--input", src.to_str().unwrap()]);
    assert_eq!(rejected(&manifest), json!({}));
    let pixel = image::load_from_memory(&rows[0].image)
        .unwrap()
        .to_rgb8()
        .get_pixel(16, 16)
        .0;
    assert!(
        pixel[0] > 200 && pixel[1] < 60 && pixel[2] < 60,
        "CMYK red came out as {pixel:?}"
    );
}

/// Files as people's tools write them: a tar made with `tar -cf x.tar .` (a `./` folder entry,
/// `./`-prefixed members) and named in capitals, a JSONL file and a caption file saved with a
/// byte-order mark, captions of images a COCO file does not list, and img2dataset parquet
/// whose caption is in another column (`--caption-column`). Nothing is lost or made up.
#[test]
fn files_as_other_tools_write_them_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("tar");
    let member = |name: &str, data: &[u8]| (name.to_string(), data.to_vec());
    let archive = tar_of(&[
        member("./", b""),
        member("./000.png", &png(40, 40, 1)),
        member("./000.txt", b"in a tar of a folder"),
    ]);
    write(&src, "SHARD-000.TAR", archive);
    let (manifest, rows) = pairs(dir.path(), &["--input", src.to_str().unwrap()]);
    assert_eq!(sorted_keys(&rows), ["000"]);
    assert_eq!(rows[0].caption, "in a tar of a folder");
    assert_eq!(rejected(&manifest), json!({}));

    let src = dir.path().join("bom");
    write(&src, "a.png", png(40, 40, 2));
    write(&src, "b.png", png(40, 40, 3));
    write(
        &src,
        "list.jsonl",
        "\u{FEFF}{\"image\": \"a.png\", \"caption\": \"first row\"}\n{\"image\": \"b.png\", \"caption\": \"second row\"}\n",
    );
    let list = src.join("list.jsonl");
    let (manifest, rows) = pairs(dir.path(), &["--input", list.to_str().unwrap()]);
    assert_eq!(rows.len(), 2, "{:?}", rejected(&manifest));
    let folder = dir.path().join("bom-folder");
    write(&folder, "c.png", png(40, 40, 4));
    write(&folder, "c.txt", "\u{FEFF}saved by Notepad");
    let (_, rows) = pairs(dir.path(), &["--input", folder.to_str().unwrap()]);
    assert_eq!(rows[0].caption, "saved by Notepad");
    write(
        &src,
        "corpus.jsonl",
        "\u{FEFF}{\"text\": \"the first document of a file with a byte-order mark\"}\n",
    );
    let text_out = dir.path().join("text");
    let (code, text) = ingest(&[
        "text",
        "--input",
        src.join("corpus.jsonl").to_str().unwrap(),
        "--out",
        text_out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let (manifest, rows) = text_rows(text_out.to_str().unwrap());
    assert_eq!(rows.len(), 1, "{:?}", manifest.metrics);

    let src = dir.path().join("coco");
    write(&src, "1.png", png(40, 40, 5));
    let coco = json!({
        "images": [{"id": 1, "file_name": "1.png"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "listed"},
            {"id": 11, "image_id": 2, "caption": "of an image the file does not list"},
        ],
    });
    write(&src, "captions.json", coco.to_string());
    let captions = src.join("captions.json");
    let (manifest, rows) = pairs(
        dir.path(),
        &["--input", captions.to_str().unwrap(), "--format", "coco"],
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rejected(&manifest), json!({"no_image": 1}));

    let src = dir.path().join("parquet");
    let samples: Vec<(String, Vec<u8>)> = (0..3u8)
        .map(|i| (format!("k{i}"), png(40, 40, 10 + i)))
        .collect();
    write(
        &src,
        "part.parquet",
        common::img2dataset_parquet(&samples, 2),
    );
    let (_, rows) = pairs(
        dir.path(),
        &["--input", src.to_str().unwrap(), "--caption-column", "key"],
    );
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|row| row.caption == row.key), "{rows:?}");
}

/// Inputs that used to lose rows without a word, or publish a stage of none, are errors that
/// name the file (and the line): a CSV quote never closed, a folder with nothing of the format
/// in it, a single text corpus whose name says no format, and a parquet container without the
/// caption column.
#[test]
fn inputs_that_would_lose_everything_silently_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for i in 0..3u8 {
        write(&src, &format!("{i}.png"), png(40, 40, i));
    }
    write(
        &src,
        "list.csv",
        "image,caption\n0.png,plain\n1.png,\"6 ft tall\n2.png,swallowed\n",
    );
    write(
        &src,
        "fine.csv",
        "image,caption\n0.png,\"a quoted caption, with \"\"quotes\"\"\nover two lines\"\n1.png,5\" tall\n",
    );
    let out = dir.path().join("out");
    let refused = |args: &[&str], expected: &str| {
        let (code, text) = ingest(args);
        assert_ne!(code, 0, "{args:?} was accepted: {text}");
        assert!(text.contains(expected), "{text}");
        assert!(!out.join("manifest.json").exists());
    };
    let list = src.join("list.csv");
    refused(
        &[
            "pairs",
            "--input",
            list.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        "list.csv, line 3: a quoted field is never closed",
    );
    // Quotes closed, doubled, or inside a field (where they are part of it) are fine.
    let fine = src.join("fine.csv");
    let (manifest, rows) = pairs(dir.path(), &["--input", fine.to_str().unwrap()]);
    assert_eq!(rows.len(), 2, "{:?}", rejected(&manifest));
    let mut captions: Vec<&str> = rows.iter().map(|row| row.caption.as_str()).collect();
    captions.sort_unstable();
    assert_eq!(
        captions,
        [
            "5\" tall",
            "a quoted caption, with \"quotes\" over two lines"
        ]
    );
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();

    let gz = dir.path().join("gz");
    write(&gz, "000.tar.gz", b"not read");
    refused(
        &[
            "pairs",
            "--input",
            gz.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        "no samples there to read as folder",
    );
    refused(
        &[
            "pairs",
            "--input",
            gz.to_str().unwrap(),
            "--format",
            "webdataset",
            "--out",
            out.to_str().unwrap(),
        ],
        "no samples there to read as webdataset",
    );
    write(
        &src,
        "corpus.text",
        "a plain text corpus under a name of its own\n",
    );
    let corpus = src.join("corpus.text");
    refused(
        &[
            "text",
            "--input",
            corpus.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        "corpus.text: not a text corpus by its name",
    );
    // An img2dataset container read without its caption column would reject every row.
    let container = dir.path().join("container");
    let samples = [("k0".to_string(), png(40, 40, 1))];
    write(
        &container,
        "part.parquet",
        common::img2dataset_parquet(&samples, 1),
    );
    refused(
        &[
            "pairs",
            "--input",
            container.to_str().unwrap(),
            "--caption-column",
            "TEXT",
            "--out",
            out.to_str().unwrap(),
        ],
        "part.parquet: no caption column 'TEXT' (its columns: key, caption, png; \
         --caption-column names another)",
    );
}
