//! Storage and stages against a real Azure Blob Storage API server (Azurite) on loopback.
//! One test per file: it sets the process environment that object_store reads.

mod common;

const SECRET: &str = "parti-azure-SECRET-do-not-print-5813";

#[test]
fn azure_put_get_list_and_stages_without_leaking_credentials() {
    let server = manifests::testing::start_azurite(SECRET).expect("Azurite server");
    for (key, value) in server.env() {
        // SAFETY: this file holds a single test, so no other thread reads the environment now.
        unsafe { std::env::set_var(key, value) };
    }
    server.create_container("parti-test").unwrap();

    common::storage_and_stages("az", "parti-test", server.key());
}
