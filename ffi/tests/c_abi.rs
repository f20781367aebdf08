//! The C ABI through its real artefacts: the C example, the C contract test and the C++
//! check are compiled (with the `cc` crate's compiler) against include/massv.h and the
//! built libmassv.so / libmassv.a, run on the fixture models, and compared with what
//! `massv generate --json` answers for the same inputs.
//!
//! The libraries and the `massv` binary are built first by `cargo build` with the profile
//! and target directory of this test binary (a no-op when they are fresh).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

const VL_TARGET: &str = "qwen2_5_vl-tiny-hub";
const IMAGE: &str = "images/nonsquare_150x100.png";
const PROMPT: &str = "Describe the image.";
const TEXT_TARGET: &str = "qwen2-tiny-gqa4-tied";
const TEXT_DRAFTER: &str = "qwen2-tiny-mha-untied";
const MASSV_DRAFTER: &str = "drafter-tiny-massv";

/// Says so on the terminal even though libtest captures `println!` of passing tests.
fn notice(msg: &str) {
    let _ = writeln!(std::io::stderr(), "NOTE: {msg}");
}

fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn repo() -> &'static Path {
    ffi_dir().parent().expect("ffi/ is inside the repository")
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

struct Built {
    /// target/<profile>: libmassv.so, libmassv.a and the massv binary.
    dir: PathBuf,
}

/// Builds libmassv.{so,a} and the `massv` binary with this test's profile, once.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        // This binary is target/<profile>/deps/c_abi-<hash>.
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let target_dir = dir.parent().expect("target directory");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(other) => other.to_string(),
            None => panic!("cannot tell the profile from {}", exe.display()),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(repo())
            .args(["build", "--profile", &profile, "--target-dir", s(target_dir)])
            .args(["-p", "massv-ffi", "-p", "massv", "--lib", "--bins"])
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "cargo build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for f in ["libmassv.so", "libmassv.a", "massv"] {
            assert!(dir.join(f).is_file(), "{} was not built", dir.join(f).display());
        }
        Built { dir }
    })
}

fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().expect("run rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

#[derive(Clone, Copy, PartialEq)]
enum Link {
    Shared,
    Static,
}

/// The C (or C++) compiler the `cc` crate finds (CC / CXX / CFLAGS are honoured).
fn compiler(cpp: bool) -> cc::Tool {
    let host = host_triple();
    cc::Build::new()
        .cargo_metadata(false)
        .cargo_warnings(false)
        .emit_rerun_if_env_changed(false)
        .target(&host)
        .host(&host)
        .opt_level(0)
        .debug(true)
        .cpp(cpp)
        .try_get_compiler()
        .expect("a C/C++ compiler")
}

/// Compiles and links `sources` into `out`, warnings as errors.
fn compile(sources: &[PathBuf], out: &Path, cpp: bool, link: Link) {
    let lib = &built().dir;
    let mut cmd = compiler(cpp).to_command();
    cmd.args(if cpp { ["-std=c++11"] } else { ["-std=c99"] });
    cmd.args(["-Wall", "-Wextra", "-Werror", "-pedantic", "-pthread", "-I"])
        .arg(ffi_dir().join("include"))
        .args(sources)
        .arg("-o")
        .arg(out);
    match link {
        Link::Shared => {
            cmd.arg(format!("-L{}", s(lib)))
                .arg("-lmassv")
                .arg(format!("-Wl,-rpath,{}", s(lib)));
        }
        Link::Static => {
            // The libraries `rustc --print native-static-libs` lists for this staticlib.
            cmd.arg(lib.join("libmassv.a"))
                .args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]);
        }
    }
    let res = cmd.output().expect("run the C compiler");
    assert!(
        res.status.success(),
        "compiling {sources:?} failed: {cmd:?}\n{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One generation's inputs, given the same way to the C example and to the CLI.
#[derive(Default)]
struct Job {
    target: String,
    drafter: Option<String>,
    image: Option<String>,
    prompt: String,
    max_new_tokens: Option<usize>,
    gamma: Option<usize>,
    temperature: Option<f32>,
    seed: Option<u64>,
}

impl Job {
    fn vl() -> Self {
        Job {
            target: s(&fixture(VL_TARGET)).into(),
            image: Some(s(&fixture(IMAGE)).into()),
            prompt: PROMPT.into(),
            ..Default::default()
        }
    }

    fn cli_json(&self) -> Value {
        let mut cmd = Command::new(built().dir.join("massv"));
        cmd.args([
            "generate",
            "--json",
            "--device",
            "cpu",
            "--target",
            &self.target,
            "--prompt",
            &self.prompt,
        ]);
        if let Some(d) = &self.drafter {
            cmd.args(["--draft", d]);
        }
        if let Some(i) = &self.image {
            cmd.args(["--image", i]);
        }
        if let Some(n) = self.max_new_tokens {
            cmd.args(["--max-new-tokens", &n.to_string()]);
        }
        if let Some(g) = self.gamma {
            cmd.args(["--gamma", &g.to_string()]);
        }
        if let Some(t) = self.temperature {
            cmd.args(["--temperature", &t.to_string()]);
        }
        if let Some(seed) = self.seed {
            cmd.args(["--seed", &seed.to_string()]);
        }
        serde_json::from_slice(&run(&mut cmd).stdout).expect("massv generate --json prints JSON")
    }

    fn example(&self, exe: &Path, from_memory: bool) -> Report {
        let mut cmd = Command::new(exe);
        cmd.args(["--device", "cpu"]);
        if from_memory {
            cmd.arg("--image-from-memory");
        }
        if let Some(n) = self.max_new_tokens {
            cmd.args(["--max-new-tokens", &n.to_string()]);
        }
        if let Some(g) = self.gamma {
            cmd.args(["--gamma", &g.to_string()]);
        }
        if let Some(t) = self.temperature {
            cmd.args(["--temperature", &t.to_string()]);
        }
        if let Some(seed) = self.seed {
            cmd.args(["--seed", &seed.to_string()]);
        }
        cmd.arg(&self.target);
        if let Some(d) = &self.drafter {
            cmd.arg(d);
        }
        cmd.arg(self.image.as_deref().unwrap_or("-")).arg(&self.prompt);
        Report::parse(&run(&mut cmd).stdout)
    }
}

/// What the C example printed: the streamed answer, then `key: value` lines.
struct Report {
    streamed: Vec<u8>,
    fields: HashMap<String, String>,
}

impl Report {
    fn parse(stdout: &[u8]) -> Self {
        let text = String::from_utf8_lossy(stdout);
        let at = text.rfind("\ntokens:").expect("the example prints a `tokens:` line");
        let fields = text[at + 1..]
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        Report {
            streamed: stdout[..at].to_vec(),
            fields,
        }
    }

    fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("no `{key}:` line in the report"))
    }

    fn numbers<T: std::str::FromStr>(&self, key: &str) -> Vec<T> {
        self.get(key)
            .split_whitespace()
            .map(|t| t.parse().unwrap_or_else(|_| panic!("{key}: bad number {t:?}")))
            .collect()
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> T {
        let v = self.get(key);
        v.parse().unwrap_or_else(|_| panic!("{key}: bad number {v:?}"))
    }
}

/// The C example and the CLI agree on tokens, text and metrics.
fn assert_same(report: &Report, cli: &Value, what: &str) {
    let tokens: Vec<u32> = cli["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().expect("token id") as u32)
        .collect();
    assert!(!tokens.is_empty(), "{what}: the CLI generated nothing");
    assert_eq!(report.numbers::<u32>("tokens"), tokens, "{what}: token ids");
    let text = cli["text"].as_str().expect("text");
    assert_eq!(report.number::<usize>("text_len"), text.len(), "{what}: text length");
    // Pieces are released once they decode to whole characters: only a trailing
    // incomplete character (shown as U+FFFD in the final text) may be missing.
    if !text.ends_with('\u{FFFD}') {
        assert_eq!(
            String::from_utf8_lossy(&report.streamed),
            text,
            "{what}: streamed pieces = the answer"
        );
    }
    let m = &cli["metrics"];
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5;
    assert!(
        close(report.number("mal"), m["mal"].as_f64().unwrap()),
        "{what}: mal {} vs {}",
        report.get("mal"),
        m["mal"]
    );
    let rates: Vec<f64> = report.numbers("accept_rate_by_pos");
    let want: Vec<f64> = m["accept_rate_by_pos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(rates.len(), want.len(), "{what}: acceptance positions");
    assert!(
        rates.iter().zip(&want).all(|(&a, &b)| close(a, b)),
        "{what}: acceptance by position {rates:?} vs {want:?}"
    );
    for key in ["target_passes", "generated_tokens", "gamma"] {
        assert_eq!(report.number::<u64>(key), m[key].as_u64().unwrap(), "{what}: {key}");
    }
    let reason = report.get("finish_reason");
    assert!(
        reason == "stop_token" || reason == "max_tokens",
        "{what}: finish_reason {reason}"
    );
    assert!(report.number::<f64>("tokens_per_s") >= 0.0);
    assert!(report.get("timings_ms").contains("total"), "{what}: timings");
}

fn example(link: Link) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = tmp.path().join("generate");
    compile(&[ffi_dir().join("examples/generate.c")], &exe, false, link);
    (tmp, exe)
}

#[test]
fn example_streams_the_same_answer_as_the_cli() {
    let (_tmp, exe) = example(Link::Shared);
    let job = Job::vl();
    let cli = job.cli_json();
    assert_same(&job.example(&exe, false), &cli, "image from a file");
    assert_same(&job.example(&exe, true), &cli, "image from memory");
    // Sampling is seeded: the same seed gives the CLI's tokens.
    let job = Job {
        temperature: Some(0.8),
        seed: Some(7),
        max_new_tokens: Some(24),
        ..Job::vl()
    };
    assert_same(&job.example(&exe, false), &job.cli_json(), "T = 0.8, seed 7");
}

#[test]
fn example_links_statically() {
    let (_tmp, exe) = example(Link::Static);
    let job = Job {
        max_new_tokens: Some(32),
        ..Job::vl()
    };
    assert_same(&job.example(&exe, false), &job.cli_json(), "static library");
}

#[test]
fn example_with_text_drafters_matches_the_cli() {
    let (_tmp, exe) = example(Link::Shared);
    for (drafter, gamma) in [(TEXT_DRAFTER, 3), (TEXT_TARGET, 4)] {
        let job = Job {
            target: s(&fixture(TEXT_TARGET)).into(),
            drafter: Some(s(&fixture(drafter)).into()),
            prompt: "Tell me a story about a cat.".into(),
            gamma: Some(gamma),
            max_new_tokens: Some(20),
            ..Default::default()
        };
        let report = job.example(&exe, false);
        assert_same(&report, &job.cli_json(), drafter);
        assert_eq!(report.number::<usize>("gamma"), gamma);
        if drafter == TEXT_TARGET {
            // The target drafting for itself: every draft is accepted.
            assert!(report.number::<f64>("mal") > 1.0);
            assert!(report.numbers::<f64>("accept_rate_by_pos").iter().all(|&r| r == 1.0));
        }
    }
}

#[test]
fn example_with_the_massv_drafter_matches_the_cli() {
    let drafter = fixture(MASSV_DRAFTER);
    if !drafter.is_dir() {
        notice(&format!(
            "SKIPPED example_with_the_massv_drafter_matches_the_cli: {} does not exist yet",
            drafter.display()
        ));
        return;
    }
    let (_tmp, exe) = example(Link::Shared);
    let job = Job {
        drafter: Some(s(&drafter).into()),
        gamma: Some(3),
        max_new_tokens: Some(32),
        ..Job::vl()
    };
    let report = job.example(&exe, false);
    assert_same(&report, &job.cli_json(), "MASSV drafter");
    assert_eq!(report.number::<usize>("gamma"), 3);
    assert!(report.get("timings_ms").contains("prefill_draft"));
}

#[test]
fn c_contract() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = tmp.path().join("api_test");
    compile(&[ffi_dir().join("tests/c/api_test.c")], &exe, false, Link::Shared);
    let cuda = if massv::backend::cuda::probe().is_ok() {
        "1"
    } else {
        "0"
    };
    let out = run(Command::new(&exe)
        .env("MASSV_TEST_CUDA", cuda)
        .arg(fixture(VL_TARGET))
        .arg(fixture(IMAGE))
        .arg(fixture(TEXT_TARGET)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("checks passed"), "{stdout}");
    assert!(!stdout.contains("not ok"), "{stdout}");
}

#[test]
fn header_is_clean_cpp() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = tmp.path().join("cpp_check");
    compile(&[ffi_dir().join("examples/cpp_check.cpp")], &exe, true, Link::Shared);
    let out = run(Command::new(&exe).arg(fixture(VL_TARGET)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("massv {}\n", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(stdout.contains("generated 4 tokens"), "{stdout}");
}

/// Function names declared in massv.h.
fn declared_functions() -> Vec<String> {
    let header = std::fs::read_to_string(ffi_dir().join("include/massv.h")).expect("read massv.h");
    let mut names: Vec<String> = Vec::new();
    for line in header.lines().filter(|l| !l.trim_start().starts_with('*')) {
        let Some(open) = line.find('(') else { continue };
        let head = &line[..open];
        if head.contains("typedef") || head.trim_start().starts_with("/*") || head.trim_start().starts_with("//") {
            continue;
        }
        if let Some(name) = head.split(|c: char| !(c.is_alphanumeric() || c == '_')).next_back() {
            if name.starts_with("massv_") {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    names
}

#[test]
fn header_declares_exactly_the_exported_functions() {
    let declared = declared_functions();
    assert!(declared.len() >= 20, "parsed only {declared:?}");
    let lib = built().dir.join("libmassv.so");
    let out = match Command::new("nm").args(["-D", "--defined-only"]).arg(&lib).output() {
        Ok(o) if o.status.success() => o,
        other => {
            notice(&format!(
                "SKIPPED header_declares_exactly_the_exported_functions: `nm -D` unavailable ({other:?})"
            ));
            return;
        }
    };
    let mut exported: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|n| n.starts_with("massv_"))
        .map(str::to_string)
        .collect();
    exported.sort();
    assert_eq!(declared, exported, "massv.h vs the symbols of libmassv.so");
}

#[test]
fn install_and_pkg_config() {
    if Command::new("pkg-config").arg("--version").output().is_err() {
        notice("SKIPPED install_and_pkg_config: pkg-config is not installed");
        return;
    }
    let lib = &built().dir;
    let tmp = tempfile::tempdir().expect("temp dir");
    let prefix = tmp.path().join("prefix");
    let mut install = Command::new(ffi_dir().join("install.sh"));
    install.env("MASSV_INSTALL_STATIC", "0").arg(&prefix).arg(lib);
    run(&mut install);
    let pc = std::fs::read_to_string(prefix.join("lib/pkgconfig/massv.pc")).expect("massv.pc");
    assert!(pc.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))), "{pc}");
    let flags = run(Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .args(["--cflags", "--libs", "massv"]));
    let flags = String::from_utf8_lossy(&flags.stdout).trim().to_string();
    assert!(flags.contains(&format!("-I{}", s(&prefix.join("include")))), "{flags}");
    assert!(flags.contains("-lmassv"), "{flags}");
    // The README's line: cc app.c $(pkg-config --cflags --libs massv) -Wl,-rpath,<libdir>
    let exe = tmp.path().join("generate");
    let res = Command::new(compiler(false).path())
        .args(["-std=c99", "-Wall", "-Werror"])
        .arg(ffi_dir().join("examples/generate.c"))
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", s(&prefix.join("lib"))))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let job = Job {
        max_new_tokens: Some(8),
        ..Job::vl()
    };
    assert_same(&job.example(&exe, false), &job.cli_json(), "installed library");
}
