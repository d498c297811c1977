//! Test support: real bucket servers on loopback, started and stopped by the tests: S3 (moto)
//! and Azure Blob Storage (Azurite, Microsoft's emulator); and the fixtures of stage tests.
//!
//! `make test` and `.ci/run` install both into `.venv/`; `PARTI_MOTO_SERVER` and
//! `PARTI_AZURITE` may point at other `moto_server` and `azurite-blob` executables.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct MotoServer {
    _process: ServerProcess,
    pub port: u16,
}

/// A server the tests started, killed when dropped, its output kept in `log` (removed then).
struct ServerProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl MotoServer {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for a process (or this test process) that talks to this server.
    pub fn env(&self, secret: &str) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_ACCESS_KEY_ID", "parti-test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Creates a bucket (moto accepts an unsigned `PUT /bucket`).
    pub fn create_bucket(&self, bucket: &str) -> std::io::Result<()> {
        let response = http(
            self.port,
            &format!(
                "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        )?;
        answered(&response, "200", "bucket creation")
    }
}

/// Ok when an HTTP `response` has status `code`; else an error quoting its status line.
fn answered(response: &str, code: &str, what: &str) -> std::io::Result<()> {
    let status = response.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) == Some(code) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{what} answered: {status}")))
    }
}

fn http(port: u16, request: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// A test server's executable: `variable` when set, else where `make venv` installs it
/// (`installed`, below the workspace), else `name` on the PATH. The error says how to install it.
fn server_executable(variable: &str, installed: &str, name: &str) -> std::io::Result<PathBuf> {
    if let Ok(path) = std::env::var(variable) {
        return Ok(PathBuf::from(path));
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(installed);
    if installed.exists() {
        return Ok(installed);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.exists())
        })
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "{name} not found: run `make venv` (or set {variable})"
            ))
        })
}

/// Starts moto on a free loopback port and waits until it answers. Fails (rather than skipping)
/// when moto is not installed: run `make test`, which installs it.
pub fn start_moto() -> std::io::Result<MotoServer> {
    let executable =
        server_executable("PARTI_MOTO_SERVER", ".venv/bin/moto_server", "moto_server")?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut command = Command::new(&executable);
    command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    Ok(MotoServer {
        _process: serve(command, port)?,
        port,
    })
}

/// The account Azurite serves to the tests: not its well-known development account, so a test
/// can tell its own key from the one object_store knows.
const AZURITE_ACCOUNT: &str = "partitest";

/// A real Azure Blob Storage API (Azurite) on loopback, serving one account whose key is the
/// test's secret (base64 of it, as Azure keys are).
pub struct AzuriteServer {
    _process: ServerProcess,
    pub port: u16,
    key: String,
}

impl AzuriteServer {
    /// The account key as the environment gives it to object_store: what must never leak.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Environment for a process (or this test process) that talks to this server through
    /// object_store's Azure builder.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_USE_EMULATOR", "true".to_string()),
            (
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT.to_string()),
            ("AZURE_STORAGE_ACCOUNT_KEY", self.key.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Creates a container: a request signed with the account key (Azure's Shared Key scheme),
    /// since Azurite, like Azure, refuses anonymous writes and object_store creates none.
    pub fn create_container(&self, container: &str) -> std::io::Result<()> {
        use base64::Engine as _;
        use hmac::Mac as _;
        let date = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
            ))
            .map_err(std::io::Error::other)?;
        let version = "2021-08-06";
        // Verb, eleven empty standard headers, the x-ms- headers, then the resource (the
        // account twice: once as Azure names it, once from the emulator's path-style URL).
        let to_sign = format!(
            "PUT\n{}x-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container",
            "\n".repeat(11)
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(&self.key)
            .map_err(std::io::Error::other)?;
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).map_err(std::io::Error::other)?;
        mac.update(to_sign.as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let response = http(
            self.port,
            &format!(
                "PUT /{AZURITE_ACCOUNT}/{container}?restype=container HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 x-ms-date: {date}\r\nx-ms-version: {version}\r\n\
                 Authorization: SharedKey {AZURITE_ACCOUNT}:{signature}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        )?;
        answered(&response, "201", "container creation")
    }
}

/// Starts Azurite's blob service on a free loopback port, in memory, with one account whose key
/// is base64 of `secret`, and waits until it answers. Fails (rather than skipping) when Azurite
/// is not installed: run `make test`, which installs it.
pub fn start_azurite(secret: &str) -> std::io::Result<AzuriteServer> {
    use base64::Engine as _;
    let executable = server_executable(
        "PARTI_AZURITE",
        ".venv/azurite/node_modules/.bin/azurite-blob",
        "azurite-blob",
    )?;
    let key = base64::engine::general_purpose::STANDARD.encode(secret);
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut command = Command::new(&executable);
    command
        .args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--inMemoryPersistence",
            "--disableTelemetry",
            // object_store may speak a newer API version than this Azurite knows; the calls
            // it makes are old ones.
            "--skipApiVersionCheck",
            "--silent",
        ])
        .env("AZURITE_ACCOUNTS", format!("{AZURITE_ACCOUNT}:{key}"));
    Ok(AzuriteServer {
        _process: serve(command, port)?,
        port,
        key,
    })
}

/// Starts a server that is to listen on loopback `port`, and waits until it answers an HTTP
/// request. A server that exits first, or never answers, is an error that quotes the end of
/// what it printed (a runtime missing or too old, say).
fn serve(mut command: Command, port: u16) -> std::io::Result<ServerProcess> {
    let program = command.get_program().to_string_lossy().into_owned();
    let log = std::env::temp_dir().join(format!(
        "parti-test-server-{}-{port}.log",
        std::process::id()
    ));
    let output = std::fs::File::create(&log)?;
    let child = command
        .stdout(output.try_clone()?)
        .stderr(output)
        .spawn()
        .map_err(|e| std::io::Error::other(format!("starting {program}: {e}")))?;
    // Killed when dropped, on every error below.
    let mut process = ServerProcess { child, log };
    let failed = |process: &ServerProcess, what: String| {
        let printed = std::fs::read_to_string(&process.log).unwrap_or_default();
        let start = printed.len().saturating_sub(2000);
        let tail = printed.get(start..).unwrap_or(&printed);
        std::io::Error::other(format!("{program} {what}; it printed:\n{tail}"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = process.child.try_wait()? {
            return Err(failed(&process, format!("exited ({status})")));
        }
        let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if http(port, request).is_ok_and(|response| response.starts_with("HTTP/")) {
            return Ok(process);
        }
        if Instant::now() > deadline {
            return Err(failed(&process, "did not answer within 30 s".into()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs pipeline stages for a test fixture: each step is one command line (`ingest pairs
/// --input D/synth/pairs ...`) whose first word names a stage binary in `bin_dir` (a test's own
/// binary folder: `cargo test --workspace` builds every stage there) and where `D/` stands for
/// `dir`. Panics with the failing command and its output.
pub fn run_stages(bin_dir: &std::path::Path, dir: &std::path::Path, steps: &[impl AsRef<str>]) {
    run_stages_at(bin_dir, &dir.display().to_string(), steps);
}

/// [`run_stages`] with `D/` standing for `root`, a folder or a bucket URI (`s3://run`), the
/// stages inheriting this process's environment. Returns what each step printed (stdout, then
/// stderr).
pub fn run_stages_at(
    bin_dir: &std::path::Path,
    root: &str,
    steps: &[impl AsRef<str>],
) -> Vec<String> {
    let mut texts = Vec::new();
    for step in steps {
        let step = step.as_ref();
        if step.trim().is_empty() {
            continue;
        }
        let output = stage_command(bin_dir, root, step)
            .output()
            .unwrap_or_else(|e| panic!("{step}: {e}"));
        let text = printed(&output);
        assert!(output.status.success(), "{step}: {text}");
        texts.push(text);
    }
    texts
}

/// The command of one [`run_stages_at`] step, not yet started, for a test to add to it (a flag,
/// launcher variables).
pub fn stage_command(bin_dir: &std::path::Path, root: &str, step: &str) -> Command {
    let root = root.trim_end_matches('/');
    let mut words = step.split_whitespace();
    let binary = bin_dir.join(words.next().unwrap_or_default());
    assert!(
        binary.exists(),
        "{} missing: run `cargo test --release --workspace`",
        binary.display()
    );
    let mut command = Command::new(binary);
    command.args(words.map(|word| match word.strip_prefix("D/") {
        Some(path) => format!("{root}/{path}"),
        None => word.to_string(),
    }));
    command
}

/// What a finished process printed: its stdout, then its stderr.
pub fn printed(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// An empty folder `name` below `base` (a test's `CARGO_TARGET_TMPDIR`) for the stages a test
/// binary shares between its tests, emptied if a run before left it. A fixed place rather than a
/// temporary folder: a fixture held in a static is never dropped, so a temporary folder would be
/// left in the system's temp folder by every run of the suite. Give each test binary its own
/// `name` (see [`fixture_name`]).
pub fn fixture_dir(base: &str, name: &str) -> PathBuf {
    let dir = std::path::Path::new(base).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `PACKAGE-TEST-what`: a fixture's folder name that no other test binary uses.
#[macro_export]
macro_rules! fixture_name {
    ($what:literal) => {
        concat!(
            env!("CARGO_PKG_NAME"),
            "-",
            env!("CARGO_CRATE_NAME"),
            "-",
            $what
        )
    };
}

/// The folder of the stage binaries beside a test's `CARGO_BIN_EXE_*` path.
pub fn bin_dir(test_binary: &str) -> std::path::PathBuf {
    std::path::Path::new(test_binary)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// The command lines (for [`run_stages`]) of a few-step pipeline over `images` synthetic
/// pictures and `documents` text documents, up to the token shards: `D/pairs`, `D/text`,
/// `D/tokenizer`, a 3-step `D/vqgan` and `D/tokens`. Fixtures take a prefix, or add their
/// training stages after it.
pub fn few_step_pipeline(images: usize, documents: usize) -> Vec<String> {
    vec![
        format!("ingest synth --out D/synth --images {images} --documents {documents}"),
        "ingest pairs --preset tiny --input D/synth/pairs --out D/pairs".into(),
        "ingest text --input D/synth/text --out D/text".into(),
        "train tokenizer --text D/text --captions D/pairs --out D/tokenizer".into(),
        "vqgan train --pairs D/pairs --out D/vqgan --steps 3 --batch-size 4".into(),
        "vqgan encode --vqgan D/vqgan --pairs D/pairs --out D/tokens".into(),
    ]
}

/// The bytes (digest-checked) of the artifact `name` of the manifest in `stage_dir`.
pub fn artifact_bytes(stage_dir: &std::path::Path, name: &str) -> Vec<u8> {
    artifact_bytes_at(&stage_dir.display().to_string(), name)
}

/// [`artifact_bytes`] of a stage at a folder or bucket URI.
pub fn artifact_bytes_at(stage: &str, name: &str) -> Vec<u8> {
    let (upstream, _) = crate::Upstream::read(stage).unwrap_or_else(|e| panic!("{stage}: {e}"));
    let artifact = upstream
        .manifest
        .artifacts
        .iter()
        .find(|a| a.uri == name)
        .unwrap_or_else(|| panic!("{stage}: no artifact {name}"));
    upstream
        .read_artifact(artifact)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .to_vec()
}

/// A copy of the stage in folder `from` at `to` whose model config (its `config` artifact) is
/// changed by `edit`, the manifest's record of that artifact (size, digest) rewritten to match:
/// a consistent stage that says something else of its model. Returns the new config's text.
pub fn copy_stage_with_config(
    from: &std::path::Path,
    to: &std::path::Path,
    mut edit: impl FnMut(&mut serde_json::Value),
) -> String {
    let manifest_at = |folder: &std::path::Path| {
        crate::Location::parse(&folder.join(crate::MANIFEST_FILE).display().to_string()).unwrap()
    };
    let (mut manifest, _) = crate::Manifest::read(&manifest_at(from)).unwrap();
    std::fs::create_dir_all(to).unwrap();
    let mut config_text = String::new();
    for artifact in &mut manifest.artifacts {
        let (source, target) = (from.join(&artifact.uri), to.join(&artifact.uri));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if artifact.kind != "config" {
            std::fs::copy(&source, &target).unwrap();
            continue;
        }
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&source).unwrap()).unwrap();
        edit(&mut config);
        config_text = config.to_string();
        std::fs::write(&target, &config_text).unwrap();
        artifact.bytes = config_text.len() as u64;
        artifact.digest = crate::digest_bytes(config_text.as_bytes());
    }
    manifest.write(&manifest_at(to)).unwrap();
    config_text
}

/// Runs `binary` with `args`: its exit code (-1 when killed) and its stdout then stderr.
pub fn output_of(binary: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> (i32, String) {
    let binary = binary.as_ref();
    let output = Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.to_string_lossy()));
    (output.status.code().unwrap_or(-1), printed(&output))
}

/// A loopback port nobody listens on now (a test's rendezvous store binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// `program` with piped output and without any launcher's variables, so the environment a test
/// runs in (a CI job under Slurm, say) cannot make it a rank of some job.
pub fn lone_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    for variable in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "JOB_COMPLETION_INDEX",
    ] {
        command.env_remove(variable);
    }
    command
}

/// Polls until the training run in `out` has saved a checkpoint (its index in the work
/// folder); panics if one of `children` ends first, or after 300 s.
pub fn wait_for_checkpoint(out: &std::path::Path, children: &mut [Child]) {
    let started = Instant::now();
    while !files_below(out)
        .iter()
        .any(|path| path.ends_with("checkpoint.json"))
    {
        for child in children.iter_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("a process ended ({status}) before the first checkpoint");
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint in 300 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file below `dir`, recursively (none when it does not exist).
pub fn files_below(dir: &std::path::Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                files_below(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

/// Starts `command` (a training stage writing to `out`), waits for its first checkpoint and
/// kills it with SIGKILL: no cleanup, as the OOM killer or a preempted node would. Panics if
/// the run published its manifest before the kill landed.
pub fn kill_after_checkpoint(mut command: Command, out: &std::path::Path) {
    let mut child = command.spawn().unwrap();
    wait_for_checkpoint(out, std::slice::from_mut(&mut child));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.join("manifest.json").exists(),
        "the run finished before it was killed"
    );
}

/// Runs `f` with this thread's log events (info and above) also written to a string: what a
/// stage called as a library said while it ran, e.g. that it resumed from a checkpoint.
pub fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut buffer = self.0.lock().unwrap_or_else(|e| e.into_inner());
            buffer.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let shared = Shared::default();
    let writer = shared.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, f);
    let logs = shared.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    (result, String::from_utf8_lossy(&logs).into_owned())
}

/// Runs a training stage (as a library) that must resume from its checkpoint of `step`, not
/// start over (which would end the same, so equal results alone do not show a resume), and
/// finish; returns what it returned.
#[track_caller]
pub fn assert_resumes_from<T, E: std::fmt::Debug>(
    step: usize,
    stage: impl FnOnce() -> Result<T, E>,
) -> T {
    let (result, logs) = with_logs(stage);
    assert!(
        logs.contains(&format!("resuming from the checkpoint of step {step}")),
        "{logs}"
    );
    match result {
        Ok(value) => value,
        Err(e) => panic!("{e:?}\n{logs}"),
    }
}

/// Every process succeeded and resumed from a checkpoint rather than starting over.
pub fn assert_resumed(outputs: &[(bool, String)]) {
    assert_succeeded(outputs);
    for (_, text) in outputs {
        assert!(
            text.contains("resuming from the checkpoint of step"),
            "{text}"
        );
    }
}

/// The ranks of a training job of `world_size` processes on loopback, started as torchrun
/// starts them (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), each from
/// `command()`, with Gloo on the loopback interface.
pub fn launch_ranks(world_size: usize, command: impl Fn() -> Command) -> Vec<Child> {
    launch_ranks_with(world_size, |_| command())
}

/// [`launch_ranks`] with each rank's command from `command(rank)`.
pub fn launch_ranks_with(world_size: usize, command: impl Fn(usize) -> Command) -> Vec<Child> {
    let port = free_port();
    (0..world_size)
        .map(|rank| {
            command(rank)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world_size.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("GLOO_SOCKET_IFNAME", "lo")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting rank {rank}: {e}"))
        })
        .collect()
}

/// Waits for each process: whether it succeeded, and its stdout then stderr.
pub fn finish(children: Vec<Child>) -> Vec<(bool, String)> {
    children
        .into_iter()
        .map(|child| {
            let output = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("waiting for a process: {e}"));
            (output.status.success(), printed(&output))
        })
        .collect()
}

/// Panics with the output of the first process that failed.
pub fn assert_succeeded(outputs: &[(bool, String)]) {
    for (rank, (succeeded, text)) in outputs.iter().enumerate() {
        assert!(succeeded, "process {rank}: {text}");
    }
}

/// What two training runs into `a` and `b` must share to count as the same: every artifact
/// byte for byte, and every metric but the world size and what the wall time decides. Panics naming the
/// first difference.
pub fn assert_same_training(a: &std::path::Path, b: &std::path::Path) {
    assert_same_training_at(&a.display().to_string(), &b.display().to_string());
}

/// [`assert_same_training`] of two runs at folders or bucket URIs.
pub fn assert_same_training_at(a: &str, b: &str) {
    let read = |dir: &str| {
        crate::Upstream::read(dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .0
            .manifest
    };
    let (first, second) = (read(a), read(b));
    let mut metrics = [first.metrics.clone(), second.metrics.clone()];
    for map in &mut metrics {
        map.remove("seconds");
        map.remove("world_size");
        map.remove("train_tokens_per_second");
    }
    assert_eq!(metrics[0], metrics[1], "metrics of {a} and {b}");
    let names = |manifest: &crate::Manifest| -> Vec<String> {
        manifest.artifacts.iter().map(|a| a.uri.clone()).collect()
    };
    assert_eq!(names(&first), names(&second));
    for artifact in &first.artifacts {
        let (x, y) = (
            artifact_bytes_at(a, &artifact.uri),
            artifact_bytes_at(b, &artifact.uri),
        );
        if x == y {
            continue;
        }
        let first_difference = match (std::str::from_utf8(&x), std::str::from_utf8(&y)) {
            (Ok(x), Ok(y)) => x
                .lines()
                .zip(y.lines())
                .find(|(x, y)| x != y)
                .map(|(x, y)| format!(":\n{x}\n{y}"))
                .unwrap_or_default(),
            _ => String::new(),
        };
        panic!(
            "{} differs between {a} and {b}{first_difference}",
            artifact.uri
        );
    }
}
