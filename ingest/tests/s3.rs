//! Reading sources from and writing shards to a real S3 API server (moto) on loopback.

mod common;

const SECRET: &str = "ingest-SECRET-never-logged-9931";

#[test]
fn pairs_and_text_from_and_to_a_bucket() {
    let server = manifests::testing::start_moto().expect("moto S3 server");
    let env = server.env(SECRET);
    for (key, value) in &env {
        // SAFETY: this file holds a single test; no other thread reads the environment.
        unsafe { std::env::set_var(key, value) };
    }
    server.create_bucket("data").unwrap();
    common::buckets::pairs_and_text_through("s3://data", &env, SECRET);
}
