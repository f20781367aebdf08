//! build.rs embeds one fatbin per cuda/*.cu. CI sets MASSV_REQUIRE_KERNELS=1 (with NVCC)
//! so a build that silently fell back to CPU-only fails here. And what a machine without
//! a GPU can check of the launchers: every kernel they name is in its module's fatbin,
//! and they pass each kernel as many arguments as it takes, of the sizes they state.

use massv::backend::kernels;

/// Magic number that opens every fatbin container (little-endian 0xBA55ED50).
const FATBIN_MAGIC: [u8; 4] = [0x50, 0xED, 0x55, 0xBA];

#[test]
fn every_cuda_source_is_embedded_as_a_fatbin() {
    if !kernels::COMPILED {
        assert!(
            std::env::var("MASSV_REQUIRE_KERNELS").as_deref() != Ok("1"),
            "MASSV_REQUIRE_KERNELS=1 but build.rs found no nvcc: the kernels were not compiled"
        );
        println!("skipped: built without nvcc, no kernels embedded");
        return;
    }
    let mut sources: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/cuda"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    sources.sort();
    let mut embedded: Vec<String> = kernels::MODULES.iter().map(|(n, _)| n.to_string()).collect();
    embedded.sort();
    assert_eq!(embedded, sources);
    for (name, image) in kernels::MODULES {
        assert!(image.len() > 1024, "{name}: fatbin of {} bytes", image.len());
        assert_eq!(image[..4], FATBIN_MAGIC, "{name}: not a fatbin");
    }
    for required in ["rmsnorm", "swiglu", "rope"] {
        assert!(embedded.iter().any(|n| n == required), "{required} missing");
    }
    println!("kernels embedded for {}: {embedded:?}", kernels::ARCHS);
}

/// Every attention entry point the launcher can ask for (mode × served head dim) is in the
/// attention fatbin: a name the launcher builds but nvcc never instantiated would only
/// fail at run time on a GPU.
#[test]
fn attention_entry_points_exist_for_every_served_head_dim() {
    if !kernels::COMPILED {
        println!("skipped: built without nvcc, no kernels embedded");
        return;
    }
    let (_, image) = kernels::MODULES
        .iter()
        .find(|(n, _)| *n == "attention")
        .expect("attention module");
    let has = |name: &str| {
        image
            .windows(name.len() + 1)
            .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
    };
    for d in massv::backend::cuda::ATTN_HEAD_DIMS {
        for mode in ["prefill", "decode", "verify", "varlen"] {
            let name = format!("attention_{mode}_d{d}");
            assert!(has(&name), "{name} missing from the attention fatbin");
        }
    }
    assert!(!has("attention_decode_d48"), "the check can fail");
}

/// Whether the fatbin of `module` holds the entry point `name` (its NUL-terminated symbol).
fn module_has(module: &str, name: &str) -> bool {
    let (_, image) = kernels::MODULES
        .iter()
        .find(|(n, _)| *n == module)
        .unwrap_or_else(|| panic!("no module {module}"));
    image
        .windows(name.len() + 1)
        .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
}

/// The kernel names the launchers in runtime/backend/cuda/ pass to `self.launch(module,
/// name, …)`: a string literal, or `OP` (the function's `const OP: &str = "…"`). Names
/// built at run time (attention, gemv, bias ops) are listed by hand below.
fn launched_kernels() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/runtime/backend/cuda");
    let literal = |s: &str| -> Option<String> {
        let s = s.trim().strip_prefix('"')?;
        Some(s[..s.find('"')?].to_string())
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for (at, _) in text.match_indices("self.launch(") {
            let args: Vec<&str> = text[at + "self.launch(".len()..].splitn(3, ',').collect();
            let Some(module) = literal(args[0]) else { continue };
            let name = match args[1].trim() {
                "OP" => {
                    let decl = text[..at].rfind("const OP: &str = ").expect("an OP before its launch");
                    literal(&text[decl + "const OP: &str = ".len()..])
                }
                other => literal(other),
            };
            if let Some(name) = name {
                out.push((module, name));
            }
        }
    }
    out
}

/// [`launched_kernels`] and the names built at run time but attention's (the GEMVs' row
/// counts, the projector's bias ops).
fn every_launched_kernel() -> Vec<(String, String)> {
    let mut named = launched_kernels();
    assert!(named.len() >= 25, "the scan found only {named:?}");
    for b in 1..=massv::backend::cuda::GEMV_MAX_ROWS {
        named.push(("gemv".into(), format!("gemv_bf16_b{b}")));
        named.push(("gemv".into(), format!("gemv_bf16_f32_b{b}")));
        named.push(("gemv".into(), format!("gemv_swiglu_b{b}")));
    }
    for (module, name) in [("projector", "bias_gelu"), ("projector", "bias_add")] {
        named.push((module.into(), name.into()));
    }
    named
}

/// Kernels that spill on Hopper, with the bytes (stores + loads) a thread spilled when
/// the list was made (nvcc 13.0): ptxas held the head-dim-64 attention kernels to 128
/// registers. Their SASS shows each spill outside every loop (tests/sass.rs checks that
/// for every kernel), so a launch pays a few local-memory accesses at most. A larger
/// spill, or one in any other kernel, fails.
const KNOWN_SPILLS: &[(&str, u32)] = &[
    ("attention_decode_d64", 24),
    ("attention_prefill_d64", 24),
    ("attention_verify_d32", 24),
    ("attention_verify_d80", 24),
];

/// ptxas's report for Hopper (build.rs compiles with -Xptxas=-v: kernels::RESOURCES)
/// holds every kernel a launcher names. No kernel spills registers to local memory
/// beyond [`KNOWN_SPILLS`]: a spill costs local-memory traffic on every launch, which
/// otherwise only a GPU benchmark would show. The sampling kernels launched with 1024
/// threads fit in 64 registers a thread (more fails their launch, on a GPU only).
#[test]
fn hopper_kernels_spill_nothing_but_the_known_few() {
    use massv::backend::kernels::Resources;
    if !kernels::COMPILED {
        println!("skipped: built without nvcc, no kernels embedded");
        return;
    }
    if !kernels::ARCHS.split(',').any(|a| a.trim() == "sm_90") {
        println!("skipped: not built for sm_90 (MASSV_CUDA_ARCHS={})", kernels::ARCHS);
        return;
    }
    let hopper: Vec<&Resources> = kernels::RESOURCES.iter().filter(|r| r.arch == "sm_90").collect();
    let bounds = kernel_launch_bounds();
    assert!(bounds.get("argmax").map(String::as_str) == Some("1024"), "{bounds:?}");
    for (module, name) in every_launched_kernel() {
        assert!(
            hopper.iter().any(|r| r.module == module && r.kernel == name),
            "{name} ({module}): no sm_90 report from ptxas"
        );
    }
    for (name, _) in KNOWN_SPILLS {
        assert!(hopper.iter().any(|r| r.kernel == *name), "{name}: no such kernel");
    }
    for r in &hopper {
        let spilled = r.spill_stores + r.spill_loads;
        let allowed = KNOWN_SPILLS.iter().find(|k| k.0 == r.kernel).map_or(0, |k| k.1);
        assert!(
            spilled <= allowed,
            "{} ({}): spills {} bytes and loads {} back ({} registers); {allowed} allowed",
            r.kernel,
            r.module,
            r.spill_stores,
            r.spill_loads,
            r.registers
        );
        if r.module == "sampling" && bounds.get(r.kernel).map(String::as_str) == Some("1024") {
            assert!(r.registers <= 64, "{}: {} registers a thread", r.kernel, r.registers);
        }
    }
    println!("sm_90, ptxas: kernel, registers, spilled bytes (stores + loads), static shared bytes");
    for r in &hopper {
        let spilled = r.spill_stores + r.spill_loads;
        println!("  {:<32} {:>3} {:>3} {:>6}", r.kernel, r.registers, spilled, r.shared);
    }
}

/// Every kernel a launcher asks for is in its module's fatbin: a launcher naming a kernel
/// nvcc never compiled (a typo, a renamed entry point) would otherwise fail only at run
/// time on a GPU.
#[test]
fn every_launcher_names_a_kernel_its_module_has() {
    if !kernels::COMPILED {
        println!("skipped: built without nvcc, no kernels embedded");
        return;
    }
    let named = every_launched_kernel();
    for (module, name) in &named {
        assert!(module_has(module, name), "{name} missing from the {module} fatbin");
    }
    assert!(
        !module_has("sampling", "sample_without_replacemen"),
        "the check can fail"
    );
    println!("{} launcher kernels found in their fatbins", named.len());
}

/// Splits `s` at the commas outside any bracket; stops at the bracket that closes the
/// list (returns the parts and the rest after it).
fn top_level_split(s: &str) -> (Vec<String>, &str) {
    let (mut depth, mut parts, mut cur) = (0i32, Vec::new(), String::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => {
                if !cur.trim().is_empty() {
                    parts.push(cur.trim().to_string());
                }
                return (parts, &s[i + 1..]);
            }
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    (parts, "")
}

/// Every cuda/*.cu file: its name and text.
fn cuda_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/cuda")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cu") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, std::fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

/// The parameter list of every `extern "C" __global__` kernel written out by name in
/// cuda/*.cu (macro-made entry points are skipped).
fn kernel_params() -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    for (_, text) in cuda_sources() {
        for (at, _) in text.match_indices("extern \"C\" __global__ void") {
            let mut rest = &text[at + "extern \"C\" __global__ void".len()..];
            if let Some(r) = rest.trim_start().strip_prefix("__launch_bounds__(") {
                rest = &r[r.find(')').unwrap() + 1..];
            }
            let Some(open) = rest.find('(') else { continue };
            let name = rest[..open].trim();
            if name.contains('#') || name.is_empty() {
                continue;
            }
            let (params, _) = top_level_split(&rest[open + 1..]);
            out.insert(name.to_string(), params);
        }
    }
    out
}

/// The `__launch_bounds__` of every kernel written out by name in cuda/*.cu that has one
/// (its text: a number or a macro).
fn kernel_launch_bounds() -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for (_, text) in cuda_sources() {
        for (at, _) in text.match_indices("extern \"C\" __global__ void") {
            let rest = &text[at + "extern \"C\" __global__ void".len()..];
            let Some(r) = rest.trim_start().strip_prefix("__launch_bounds__(") else {
                continue;
            };
            let close = r.find(')').unwrap();
            let name = r[close + 1..r.find('(').unwrap()].trim();
            out.insert(name.to_string(), r[..close].trim().to_string());
        }
    }
    out
}

/// Every launcher passes its kernel as many arguments as the kernel takes, and where the
/// Rust side names an argument's type (`as i32`, `i32_arg(…)`, `as i64`) the kernel's
/// parameter has that size: a mismatch would read garbage on a GPU, not fail to build.
#[test]
fn launchers_pass_what_their_kernels_take() {
    let params = kernel_params();
    assert!(params.len() >= 25, "parsed only {:?}", params.keys());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/runtime/backend/cuda");
    let literal = |s: &str| {
        s.trim()
            .strip_prefix('"')
            .map(|s| s[..s.find('"').unwrap()].to_string())
    };
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for (at, _) in text.match_indices("self.launch(") {
            let (args, _) = top_level_split(&text[at + "self.launch(".len()..]);
            assert_eq!(args.len(), 4, "self.launch with {args:?}");
            let name = match args[1].as_str() {
                "OP" => {
                    let decl = text[..at].rfind("const OP: &str = ").unwrap();
                    literal(&text[decl + "const OP: &str = ".len()..])
                }
                other => literal(other),
            };
            let Some(kernel) = name.and_then(|n| params.get(&n).map(|p| (n, p))) else {
                continue;
            };
            let (name, want) = kernel;
            let list = args[3].strip_prefix("&[").expect("arguments as &[...]");
            let (got, _) = top_level_split(list);
            assert_eq!(got.len(), want.len(), "{name}: {got:?} for ({})", want.join(", "));
            for (g, w) in got.iter().zip(want) {
                let pointer = w.contains('*');
                let kind = if pointer {
                    "pointer"
                } else if w.starts_with("long long") {
                    "i64"
                } else if w.starts_with("int ") {
                    "i32"
                } else {
                    "other"
                };
                if g.contains("as i32") || g.starts_with("&i32_arg(") {
                    assert_eq!(kind, "i32", "{name}: {g} passed for `{w}`");
                }
                if g.contains("as i64") {
                    assert_eq!(kind, "i64", "{name}: {g} passed for `{w}`");
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} launchers checked");
    println!("{checked} launchers pass their kernels' parameter lists");
}

/// The kernel's `struct AttnParams` (cuda/attention.cu) and its Rust mirror
/// (runtime/backend/cuda/attention.rs) list the same fields in the same order with the
/// same sizes: pointers as u64, int as i32, float as f32.
#[test]
fn attn_params_mirror_the_kernels_struct() {
    let root = env!("CARGO_MANIFEST_DIR");
    let body = |text: &str, open: &str| -> Vec<String> {
        let at = text.find(open).unwrap_or_else(|| panic!("{open} not found"));
        let rest = &text[at + open.len()..];
        rest[..rest.find('}').unwrap()]
            .lines()
            .map(|l| {
                l.split("//")
                    .next()
                    .unwrap()
                    .trim()
                    .trim_end_matches([';', ','])
                    .to_string()
            })
            .filter(|l| !l.is_empty())
            .collect()
    };
    let cu = std::fs::read_to_string(format!("{root}/cuda/attention.cu")).unwrap();
    let rs = std::fs::read_to_string(format!("{root}/runtime/backend/cuda/attention.rs")).unwrap();
    let c_fields: Vec<(String, &str)> = body(&cu, "struct AttnParams {")
        .iter()
        .map(|f| {
            let name = f.rsplit([' ', '*']).next().unwrap().to_string();
            let kind = if f.contains('*') {
                "u64"
            } else if f.starts_with("int ") {
                "i32"
            } else if f.starts_with("float ") {
                "f32"
            } else {
                panic!("unexpected field `{f}`")
            };
            (name, kind)
        })
        .collect();
    let rust_fields: Vec<(String, String)> = body(&rs, "struct AttnParams {")
        .iter()
        .map(|f| {
            let (name, ty) = f.split_once(':').unwrap();
            (name.trim().to_string(), ty.trim().to_string())
        })
        .collect();
    assert_eq!(c_fields.len(), 22, "{c_fields:?}");
    let c: Vec<(String, String)> = c_fields.into_iter().map(|(n, k)| (n, k.to_string())).collect();
    assert_eq!(rust_fields, c);
}

/// Under programmatic dependent launch (`CudaDevice::set_pdl`) a kernel may start while
/// the kernel before it still runs, so nothing may touch memory before `pdl_wait`
/// (cuda/common.cuh). The emulator runs launches in order and only catches a thread that
/// never calls it; this holds the order in the sources: every `extern "C" __global__`
/// body (macro-made ones included) starts with `pdl_wait();`, or is one call of a body
/// function whose statements before its `prefetch_then_wait(` (the GEMVs: weight row
/// arithmetic and L2 prefetches, which read nothing) index, dereference and load nothing.
#[test]
fn every_kernel_waits_for_the_one_before_first() {
    fn first_statement(body: &str) -> &str {
        let body = body.trim_start();
        &body[..body.find(';').unwrap_or(body.len())]
    }
    let mut kernels = 0;
    let mut bad = Vec::new();
    for (file, text) in cuda_sources() {
        // Macro bodies: their line continuations out, so a body reads as plain code.
        let text = text.replace("\\\n", "\n");
        for (at, _) in text.match_indices("extern \"C\" __global__") {
            kernels += 1;
            let line = text[..at].lines().count() + 1;
            let body = &text[at + text[at..].find('{').unwrap() + 1..];
            let first = first_statement(body);
            if first == "pdl_wait()" {
                continue;
            }
            // One call of a body function: `name<...>(...)`; its definition's opening.
            let callee = first.split(['<', '(']).next().unwrap().trim();
            let def = format!("void {callee}(");
            let ok = !callee.is_empty()
                && text.find(&def).is_some_and(|d| {
                    let open = d + text[d..].find('{').unwrap() + 1;
                    let before = text[open..].find("prefetch_then_wait(").map(|p| &text[open..open + p]);
                    before.is_some_and(|pre| {
                        !["[", "->", "__ldg", "ld_stream", "__ldcg", "atomic"]
                            .iter()
                            .any(|t| pre.contains(t))
                            && !pre.contains("= *")
                    })
                });
            if !ok {
                bad.push(format!("{file}:{line}: starts with `{first}`"));
            }
        }
    }
    assert!(kernels >= 30, "found only {kernels} kernels");
    assert!(
        bad.is_empty(),
        "kernels that may touch memory before pdl_wait:\n{}",
        bad.join("\n")
    );
    println!("{kernels} kernel definitions start by waiting for the kernel before");
}
