//! Reading sources from and writing shards to a real Azure Blob Storage API server (Azurite)
//! on loopback.

mod common;

const SECRET: &str = "ingest-azure-SECRET-never-logged-2207";

#[test]
fn pairs_and_text_from_and_to_an_azure_container() {
    let server = manifests::testing::start_azurite(SECRET).expect("Azurite server");
    let env = server.env();
    for (key, value) in &env {
        // SAFETY: this file holds a single test; no other thread reads the environment.
        unsafe { std::env::set_var(key, value) };
    }
    server.create_container("data").unwrap();
    common::buckets::pairs_and_text_through("az://data", &env, server.key());
}
