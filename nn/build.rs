//! The `tch` build compiles `csrc/` against libtorch's headers: c10d for training across
//! processes (it ships inside libtorch; see src/distributed.rs), and the recorded-graph backward,
//! the layer norm backward and the AdamW step behind the fused operations (src/fused.rs). The
//! `flex` build compiles nothing. `csrc/nccl.cpp` is not compiled here: it needs CUDA's headers
//! (`make nccl`).

fn main() {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    #[cfg(feature = "tch")]
    compile_against_libtorch();
}

#[cfg(feature = "tch")]
fn compile_against_libtorch() {
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(std::path::PathBuf::from) else {
        eprintln!(
            "the tch build needs LIBTORCH: a libtorch folder with include/ and lib/ \
             (`make BACKEND=tch build` fetches one into ~/.cache/parti/libtorch)"
        );
        std::process::exit(1);
    };
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/c10d.cpp")
        .file("csrc/autograd.cpp")
        .file("csrc/adamw.cpp")
        .file("csrc/layer_norm.cpp")
        .file("csrc/autocast.cpp")
        .file("csrc/profiler.cpp")
        // c10d's Gloo header is compiled only with this, as in PyTorch's own build.
        .define("USE_C10D_GLOO", None)
        // The PyPI torch wheels (and libtorch >= 2.7 everywhere) use the C++11 string ABI.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include("csrc")
        // libtorch's own headers as system headers: their warnings are not ours.
        .flag("-isystem")
        .flag(include.to_string_lossy().as_ref())
        .flag("-isystem")
        .flag(
            include
                .join("torch/csrc/api/include")
                .to_string_lossy()
                .as_ref(),
        )
        .compile("parti_libtorch");
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    // A CUDA libtorch: its CUDA half too. burn-tch refers to it (and allows GPUs only when its
    // build found it), and its kernels register themselves when it loads.
    if libtorch.join("lib/libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=c10");
    // dlopen, for the NCCL library (libc since glibc 2.34, libdl before).
    println!("cargo:rustc-link-lib=dylib=dl");
}
