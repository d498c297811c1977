//! Compiles the libjpeg-turbo glue (`csrc/jpeg.c`) against the system's libjpeg.

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg.c");
    // Linked after the glue is compiled: the static glue must precede -ljpeg on the link line.
    let library = match pkg_config::Config::new()
        .cargo_metadata(false)
        .probe("libjpeg")
    {
        Ok(library) => library,
        Err(error) => {
            eprintln!(
                "ingest needs libjpeg-turbo's headers and library (what Pillow uses): \
                 `apt-get install libjpeg62-turbo-dev pkg-config` on Debian/Ubuntu, \
                 `brew install jpeg-turbo pkg-config` on macOS.\npkg-config said: {error}"
            );
            std::process::exit(1);
        }
    };
    let mut build = cc::Build::new();
    build.file("csrc/jpeg.c").opt_level(2).warnings(true);
    for include in &library.include_paths {
        build.include(include);
    }
    build.compile("parti_jpeg");
    for path in &library.link_paths {
        println!("cargo:rustc-link-search=native={}", path.display());
    }
    for lib in &library.libs {
        println!("cargo:rustc-link-lib={lib}");
    }
}
