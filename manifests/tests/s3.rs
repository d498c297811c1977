//! Storage and stages against a real S3 API server (moto) on loopback.
//! One test per file: it sets the process environment that object_store reads.

mod common;

const SECRET: &str = "parti-SECRET-do-not-print-4711";

#[test]
fn s3_put_get_list_and_stages_without_leaking_credentials() {
    let server = manifests::testing::start_moto().expect("moto S3 server");
    for (key, value) in server.env(SECRET) {
        // SAFETY: this file holds a single test, so no other thread reads the environment now.
        unsafe { std::env::set_var(key, value) };
    }
    server.create_bucket("parti-test").unwrap();

    common::storage_and_stages("s3", "parti-test", SECRET);
}
