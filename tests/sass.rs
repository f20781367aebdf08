//! What the compiled kernels do, read from their machine code: the SASS of every embedded
//! fatbin, for every architecture built (sm_80 to sm_90: the Jetson Orin's sm_87
//! included), as cuobjdump disassembles it. These are properties that only a GPU would
//! otherwise show, and the CPU emulator cannot see:
//! - under programmatic dependent launch (sm_90) no kernel touches global memory before
//!   its `griddepcontrol.wait` (SASS `ACQBULK`), on any path, after nvcc and ptxas have
//!   scheduled it. tests/kernels_built.rs only reads the source;
//! - no loop loads or stores local memory, where a spilled register is re-read on every
//!   iteration;
//! - each decode GEMV's hot loop has all its weight loads in flight together: by the
//!   latency model of [`latencies_per_iteration`], one memory latency a step. Their
//!   fused RMSNorm loads every row of x at once, and the sampling kernels' passes over
//!   vocabulary rows keep 4 loads in flight;
//! - the attention kernels copy their K/V tiles with several chunks in flight, and
//!   multiply on the tensor cores (`HMMA`) in their key loops.
//!
//! cuobjdump and nvdisasm come from PyPI (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm),
//! and .ci/run installs them beside nvcc. The tests look for them in $MASSV_CUDA_TOOLS,
//! beside $NVCC, then on PATH. Without them each test prints that it skipped; under
//! MASSV_REQUIRE_SASS=1 (CI) it fails instead.

use massv::backend::kernels;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// One SASS instruction, e.g. `/*0c50*/ @P0 LDG.E.NA.128.CONSTANT R4, desc[UR10][R30.64] ;`.
#[derive(Debug)]
struct Insn {
    addr: u32,
    /// The guard predicate (`@P0`, `@!P1`, `@!UP0`), if any.
    guard: Option<String>,
    /// The opcode with its modifiers: `LDG.E.NA.128.CONSTANT`.
    op: String,
    operands: String,
}

impl Insn {
    fn base(&self) -> &str {
        self.op.split('.').next().unwrap_or("")
    }

    fn is(&self, base: &str) -> bool {
        self.base() == base
    }

    fn guarded(&self) -> bool {
        self.guard.as_deref().is_some_and(|g| g != "@PT")
    }

    /// A branch's or call's target: the operands' last hex literal.
    fn target(&self) -> Option<u32> {
        let hex = self.operands.rsplit("0x").next()?;
        let digits: String = hex.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        u32::from_str_radix(&digits, 16).ok()
    }

    /// The general-purpose registers it names, in operand order (`RZ`, uniform `UR` and
    /// predicate registers are not). A 64-bit operand `R4.64` names R4 and R5.
    fn registers(&self) -> Vec<u32> {
        let s = self.operands.as_bytes();
        let mut regs = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let starts = s[i] == b'R' && (i == 0 || !s[i - 1].is_ascii_alphanumeric());
            if !starts {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < s.len() && s[j].is_ascii_digit() {
                j += 1;
            }
            if j > i + 1 {
                let r: u32 = self.operands[i + 1..j].parse().unwrap_or(0);
                regs.push(r);
                if self.operands[j..].starts_with(".64") {
                    regs.push(r + 1);
                }
            }
            i = j;
        }
        regs
    }

    /// Loads, stores and atomics of global (or generic) memory. Prefetches to L2 are
    /// not: they hand nothing back and change nothing.
    fn touches_global_memory(&self) -> bool {
        const GLOBAL: &[&str] = &[
            "LDG", "STG", "LD", "ST", "ATOMG", "ATOM", "RED", "LDGSTS", "UBLKCP", "UBLKRED", "UTMALDG", "UTMASTG",
            "UTMAREDG", "SULD", "SUST", "SUATOM", "SURED", "TLD", "TEX", "TLD4",
        ];
        GLOBAL.contains(&self.base()) || (self.is("CCTL") && !self.op.contains(".PF"))
    }

    /// A 16-byte load that streams past L1 (`ld.global.nc.L1::no_allocate.v4`:
    /// common.cuh's ld_stream, the GEMVs' weights).
    fn streams(&self) -> bool {
        self.is("LDG") && self.op.contains(".NA") && self.op.contains(".128")
    }
}

struct Function {
    module: String,
    /// "sm_90", ...
    arch: String,
    name: String,
    insns: Vec<Insn>,
}

impl Function {
    /// `name (module, arch)`, for messages.
    fn label(&self) -> String {
        format!("{} ({}, {})", self.name, self.module, self.arch)
    }

    /// The architecture's number: 90 for sm_90.
    fn sm(&self) -> u32 {
        self.arch.trim_start_matches("sm_").parse().unwrap_or(0)
    }

    fn index_of(&self, addr: u32) -> Option<usize> {
        self.insns.binary_search_by_key(&addr, |i| i.addr).ok()
    }

    /// Where control may go after instruction `i`. A call continues both into its callee
    /// and after it; a return ends the path (the call's continuation covers it).
    fn successors(&self, i: usize) -> Result<Vec<usize>, String> {
        let insn = &self.insns[i];
        let next: Vec<usize> = (i + 1 < self.insns.len()).then_some(i + 1).into_iter().collect();
        let jump = |insn: &Insn| {
            insn.target().and_then(|t| self.index_of(t)).ok_or_else(|| {
                format!(
                    "{}: {} {} at {:#x}: no target",
                    self.name, insn.op, insn.operands, insn.addr
                )
            })
        };
        Ok(match insn.base() {
            // `BRA P1, 0x...` and `BRA.DIV UR4, 0x...` are conditional too.
            "BRA" => {
                let mut s = vec![jump(insn)?];
                if insn.guarded() || insn.operands.contains(',') {
                    s.extend(next);
                }
                s
            }
            "CALL" => {
                let mut s = vec![jump(insn)?];
                s.extend(next);
                s
            }
            "EXIT" | "RET" => {
                if insn.guarded() {
                    next
                } else {
                    vec![]
                }
            }
            "BRX" | "BRXU" | "JMX" | "JMXU" | "JMP" => {
                return Err(format!(
                    "{}: indirect branch {} at {:#x}: the walk cannot follow it",
                    self.name, insn.op, insn.addr
                ))
            }
            _ => next,
        })
    }

    /// The number a kernel's name ends with after `sep`: the rows of `gemv_bf16_b6`
    /// ("_b"), the head dim of `attention_decode_d128` ("_d").
    fn name_number(&self, sep: &str) -> usize {
        let n = self.name.rsplit(sep).next().and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(n > 0, "{}: no number after {sep:?} in the name", self.label());
        n
    }

    /// The loops that load from global memory, and only with loads `only` accepts.
    fn loops_loading_only(&self, only: impl Fn(&Insn) -> bool) -> Vec<&[Insn]> {
        self.loops()
            .into_iter()
            .filter(|b| b.iter().any(|i| i.is("LDG")) && b.iter().filter(|i| i.is("LDG")).all(&only))
            .collect()
    }

    /// Every loop as the instructions between a backward branch's target and the branch.
    fn loops(&self) -> Vec<&[Insn]> {
        let mut loops = Vec::new();
        for (i, insn) in self.insns.iter().enumerate() {
            if insn.is("BRA") {
                if let Some(t) = insn.target().filter(|&t| t <= insn.addr).and_then(|t| self.index_of(t)) {
                    loops.push(&self.insns[t..=i]);
                }
            }
        }
        loops
    }
}

/// cuobjdump's `-sass` listing into functions, each under the `arch = sm_XX` of its ELF.
fn parse(module: &str, sass: &str) -> Vec<Function> {
    let mut functions: Vec<Function> = Vec::new();
    let mut arch = String::new();
    for line in sass.lines() {
        if let Some(a) = line.trim().strip_prefix("arch = ") {
            arch = a.trim().to_string();
            continue;
        }
        if let Some(name) = line.split("Function : ").nth(1) {
            functions.push(Function {
                module: module.to_string(),
                arch: arch.clone(),
                name: name.trim().to_string(),
                insns: Vec::new(),
            });
            continue;
        }
        // `/*0c50*/  @P0 OP operands ;  /* 0x... */`; the encoding's second line has a
        // space after its `/*` and no address.
        let Some(rest) = line.trim_start().strip_prefix("/*") else {
            continue;
        };
        let Some((addr, body)) = rest.split_once("*/") else {
            continue;
        };
        let Ok(addr) = u32::from_str_radix(addr, 16) else {
            continue;
        };
        let Some(f) = functions.last_mut() else { continue };
        let body = body.split(';').next().unwrap_or("").trim();
        let (guard, body) = match body.strip_prefix('@') {
            Some(g) => {
                let (g, b) = g.split_once(char::is_whitespace).unwrap_or((g, ""));
                (Some(format!("@{g}")), b.trim_start())
            }
            None => (None, body),
        };
        let (op, operands) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
        if op.is_empty() {
            continue;
        }
        f.insns.push(Insn {
            addr,
            guard,
            op: op.to_string(),
            operands: operands.trim().to_string(),
        });
    }
    functions
}

/// The folder that holds cuobjdump and nvdisasm, if any.
fn tool_dir() -> Option<PathBuf> {
    let both = |d: &Path| d.join("cuobjdump").is_file() && d.join("nvdisasm").is_file();
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("MASSV_CUDA_TOOLS") {
        dirs.push(d.into());
    }
    if let Some(nvcc) = std::env::var_os("NVCC") {
        if let Some(d) = Path::new(&nvcc).parent() {
            dirs.push(d.to_path_buf());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().find(|d| both(d))
}

/// Every kernel's SASS for every architecture built, or why there is none to read (no
/// kernels built, no tools). With the tools there, a failure to disassemble is a panic,
/// not a skip.
fn disassembly() -> &'static Result<Vec<Function>, String> {
    static SASS: OnceLock<Result<Vec<Function>, String>> = OnceLock::new();
    SASS.get_or_init(|| {
        if !kernels::COMPILED {
            return Err("built without nvcc, no kernels embedded".into());
        }
        let Some(dir) = tool_dir() else {
            return Err(
                "no cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm; \
                        set MASSV_CUDA_TOOLS to their folder)"
                    .into(),
            );
        };
        let tmp = std::env::temp_dir().join(format!("massv-sass-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
        let path = std::env::join_paths(
            std::iter::once(dir.clone()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )
        .unwrap_or_else(|e| panic!("PATH for cuobjdump: {e}"));
        let mut functions = Vec::new();
        for (module, image) in kernels::MODULES {
            let file = tmp.join(format!("{module}.fatbin"));
            std::fs::write(&file, image).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let out = Command::new(dir.join("cuobjdump"))
                .arg("-sass")
                .arg(&file)
                .env("PATH", &path)
                .output()
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join("cuobjdump").display()));
            assert!(
                out.status.success(),
                "cuobjdump -sass {module}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            functions.extend(parse(module, &String::from_utf8_lossy(&out.stdout)));
        }
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(functions)
    })
}

/// The disassembly, or None after printing why the test skipped (a failure under
/// MASSV_REQUIRE_SASS=1).
fn sass_or_skip() -> Option<&'static [Function]> {
    match disassembly() {
        Ok(f) => Some(f),
        Err(why) if std::env::var("MASSV_REQUIRE_SASS").is_ok_and(|v| v == "1") => {
            panic!("MASSV_REQUIRE_SASS=1 but no SASS to read: {why}")
        }
        Err(why) => {
            println!("skipped: {why}");
            None
        }
    }
}

/// The SASS architectures built: MASSV_CUDA_ARCHS' `sm_XX` entries (`compute_XX` is PTX).
fn sass_archs() -> Vec<&'static str> {
    kernels::ARCHS
        .split(',')
        .map(str::trim)
        .filter(|a| a.starts_with("sm_"))
        .collect()
}

#[test]
fn the_disassembly_holds_every_kernel() {
    let Some(sass) = sass_or_skip() else { return };
    let disassembled: HashSet<(&str, &str, &str)> = sass
        .iter()
        .map(|f| (f.module.as_str(), f.name.as_str(), f.arch.as_str()))
        .collect();
    let built: HashSet<(&str, &str, &str)> = kernels::RESOURCES
        .iter()
        .map(|r| (r.module, r.kernel, r.arch))
        .collect();
    assert_eq!(disassembled, built, "cuobjdump's functions against ptxas's report");
    for arch in sass_archs() {
        assert!(sass.iter().any(|f| f.arch == arch), "no {arch} code disassembled");
    }
    for f in sass {
        assert!(
            f.insns.len() > 4,
            "{}: {} instructions parsed",
            f.label(),
            f.insns.len()
        );
    }
}

/// Under programmatic dependent launch (Hopper) a kernel may start while the one before
/// it still runs; `pdl_wait` (common.cuh) waits for it, and before it a kernel may only
/// prefetch weights. Walked over every path from the entry of every sm_90 kernel,
/// nothing reaches a global load, store or atomic without passing `ACQBULK`, and every
/// kernel has one.
#[test]
fn no_kernel_touches_global_memory_before_its_wait() {
    let Some(sass) = sass_or_skip() else { return };
    let hopper: Vec<&Function> = sass.iter().filter(|f| f.sm() >= 90).collect();
    if hopper.is_empty() {
        println!(
            "skipped: no sm_90 code (MASSV_CUDA_ARCHS={}): PDL is Hopper's",
            kernels::ARCHS
        );
        return;
    }
    let mut failures = Vec::new();
    for f in &hopper {
        if !f.insns.iter().any(|i| i.is("ACQBULK")) {
            failures.push(format!("{}: no griddepcontrol.wait (ACQBULK)", f.label()));
            continue;
        }
        let mut seen = vec![false; f.insns.len()];
        let mut stack = vec![0usize];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            let insn = &f.insns[i];
            if insn.is("ACQBULK") {
                continue;
            }
            if insn.touches_global_memory() {
                failures.push(format!(
                    "{}: {} {} at {:#x} can run before griddepcontrol.wait",
                    f.label(),
                    insn.op,
                    insn.operands,
                    insn.addr
                ));
            }
            match f.successors(i) {
                Ok(s) => stack.extend(s),
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "{} sm_90 kernels: no global memory access before griddepcontrol.wait",
        hopper.len()
    );
}

/// Loops that may touch local memory, with how many such instructions they hold: the
/// RoPE kernels' double-precision `sincos` (common.cuh's rope_sincos) reduces a large
/// argument by a loop over the bits of 2/π whose partial products go to a local array.
/// Only large angles take that path. (The QKV GEMVs that rotate, gemv_rope_kv_append_b*,
/// call it once a thread after their K loop.)
const LOCAL_MEMORY_LOOPS: &[(&str, usize)] = &[
    ("rope", 1),
    ("mrope", 1),
    ("rope_vision", 1),
    ("rope_kv_append", 1),
    ("gemv_rope_kv_append_b1", 1),
    ("gemv_rope_kv_append_b2", 1),
    ("gemv_rope_kv_append_b3", 1),
    ("gemv_rope_kv_append_b4", 1),
    ("gemv_rope_kv_append_b5", 1),
    ("gemv_rope_kv_append_b6", 1),
    ("gemv_rope_kv_append_b7", 1),
    ("gemv_rope_kv_append_b8", 1),
];

/// A spilled register inside a loop is stored and loaded back every iteration; ptxas's
/// spill counts (tests/kernels_built.rs) cannot say where a spill is. Outside loops a
/// few bytes cost nothing measurable. Every architecture built.
#[test]
fn no_loop_touches_local_memory() {
    let Some(sass) = sass_or_skip() else { return };
    let mut failures = Vec::new();
    for f in sass {
        let allowed = LOCAL_MEMORY_LOOPS.iter().find(|k| k.0 == f.name).map_or(0, |k| k.1);
        for body in f.loops() {
            let local: Vec<&Insn> = body.iter().filter(|i| i.is("LDL") || i.is("STL")).collect();
            if local.len() > allowed {
                let at: Vec<String> = local.iter().map(|i| format!("{} at {:#x}", i.op, i.addr)).collect();
                failures.push(format!(
                    "{}: loop {:#x}..{:#x} has {} local-memory accesses ({allowed} allowed): {}",
                    f.label(),
                    body[0].addr,
                    body[body.len() - 1].addr,
                    local.len(),
                    at.join(", ")
                ));
            }
        }
    }
    for (name, _) in LOCAL_MEMORY_LOOPS {
        assert!(sass.iter().any(|f| f.name == *name), "{name}: no such kernel");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A memory-bound loop's cost in memory latencies. Time advances only when the warp
/// waits for a load that goes to memory (`slow`: the GEMVs' weights from HBM, argmax's
/// logits from L2): an instruction naming a register such a load has yet to fill waits
/// for it, and pays a new latency if that load was issued since the last wait (a load
/// issued before it has arrived by then). Other loads (x through L1, a few KB every warp
/// re-reads) count as free. Run over the body three times, the last pass is the steady
/// state: (latencies an iteration, slow loads an iteration).
fn latencies_per_iteration(body: &[Insn], slow: impl Fn(&Insn) -> bool) -> (usize, usize) {
    let mut pending = std::collections::HashMap::<u32, usize>::new(); // register -> epoch of its load
    let mut epoch = 0;
    let mut per_pass = (0, 0);
    for _ in 0..3 {
        let start = epoch;
        let mut loads = 0;
        for insn in body {
            let regs = insn.registers();
            for r in &regs {
                if let Some(e) = pending.remove(r) {
                    if e == epoch {
                        epoch += 1;
                    }
                }
            }
            if slow(insn) {
                loads += 1;
                if let Some(&dst) = regs.first() {
                    let width = if insn.op.contains(".128") {
                        4
                    } else if insn.op.contains(".64") {
                        2
                    } else {
                        1
                    };
                    for r in dst..dst + width {
                        pending.insert(r, epoch);
                    }
                }
            }
        }
        per_pass = (epoch - start, loads);
    }
    per_pass
}

/// cuda/gemv.cu: GEMV_UNROLL * GEMV_ROWS 16-byte weight loads a step of a warp.
const GEMV_LOADS_PER_STEP: usize = 8;

/// The decode GEMVs stream the weights, and HBM is only kept busy with enough loads in
/// flight: each warp's hot loop (the loop with the most streamed loads) issues all
/// GEMV_LOADS_PER_STEP of them within one latency, on every architecture built. Written
/// plainly (load a step, then multiply it), ptxas issued half of them after the first
/// half had arrived.
#[test]
fn gemv_loops_pay_one_memory_latency_a_step() {
    let Some(sass) = sass_or_skip() else { return };
    let gemvs: Vec<&Function> = sass.iter().filter(|f| f.module == "gemv").collect();
    assert!(gemvs.len() >= 32 * sass_archs().len(), "{} gemv kernels", gemvs.len());
    let mut failures = Vec::new();
    for f in gemvs {
        let Some(body) = f
            .loops()
            .into_iter()
            .max_by_key(|b| b.iter().filter(|i| i.streams()).count())
        else {
            failures.push(format!("{}: no loop", f.label()));
            continue;
        };
        let (latencies, loads) = latencies_per_iteration(body, Insn::streams);
        if loads != GEMV_LOADS_PER_STEP || latencies != 1 {
            failures.push(format!(
                "{}: hot loop {:#x}..{:#x}: {latencies} memory latencies for {loads} streamed loads an iteration \
                 (want 1 for {GEMV_LOADS_PER_STEP})",
                f.label(),
                body[0].addr,
                body[body.len() - 1].addr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The fused RMSNorm of the QKV and gate/up GEMVs first sums every row's squares of x
/// (rms_row_scales in cuda/gemv.cu). Row after row, a block waited for one or two L2
/// latencies per row before its weight stream began: 6 to 12 for a verify block. It is
/// one loop now that loads two steps of every row (x only, no weights) before it uses
/// any: one latency for at least 2·B loads, B the kernel's rows (its `_bB` suffix).
#[test]
fn gemv_rms_prologue_loads_every_row_at_once() {
    let Some(sass) = sass_or_skip() else { return };
    let mut failures = Vec::new();
    for f in sass.iter().filter(|f| f.module == "gemv") {
        let rows = f.name_number("_b");
        let x_only = |i: &Insn| i.is("LDG") && i.op.contains(".128") && !i.op.contains(".NA");
        let costs: Vec<(usize, usize)> = f
            .loops_loading_only(x_only)
            .iter()
            .map(|b| latencies_per_iteration(b, x_only))
            .collect();
        if costs.len() != 1 || costs[0].0 != 1 || costs[0].1 < 2 * rows {
            failures.push(format!(
                "{}: x-only loops (latencies, loads an iteration) {costs:?}; want one loop, 1 latency for {} loads",
                f.label(),
                2 * rows
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// cuda/sampling.cu's ROW_LOADS: the loads a thread has in flight over a row (4-byte
/// ones through for_row, argmax's 16-byte ones through block_argmax).
const ROW_LOADS: usize = 4;

/// The split probabilities kernels' loads in flight: probabilities_max's and _exp's
/// SPLIT_LOADS a thread, probabilities_normalize's a tile's SAMPLE_CHUNK a lane.
const SPLIT_LOADS: usize = 16;
const SAMPLE_CHUNK: usize = 32;

/// probabilities_normalize has no row loop: a warp normalises one tile, each lane
/// loading its SAMPLE_CHUNK entries before it divides any. Up to the split's arrival
/// (its first barrier or fence; the last block's draw follows), those loads of the row
/// (not the read-only loads of the sums) cost one latency.
#[test]
fn split_normalize_loads_its_tile_at_once() {
    let Some(sass) = sass_or_skip() else { return };
    let mut failures = Vec::new();
    for f in sass
        .iter()
        .filter(|f| f.module == "sampling" && f.name == "probabilities_normalize")
    {
        let end = f
            .insns
            .iter()
            .position(|i| i.is("BAR") || i.is("MEMBAR"))
            .unwrap_or(f.insns.len());
        let row = |i: &Insn| i.is("LDG") && !i.op.contains("CONSTANT");
        let (latencies, loads) = latencies_per_iteration(&f.insns[..end], row);
        if latencies != 1 || loads != SAMPLE_CHUNK {
            failures.push(format!(
                "{}: {latencies} memory latencies for {loads} loads of the row before the arrival \
                 (want 1 for {SAMPLE_CHUNK})",
                f.label()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The kernels that read whole vocabulary rows (600 KB for Qwen2's) with one block each:
/// at one float a load a pass waited for a memory latency per float it read, about 150
/// latencies a pass in a row. Every innermost loop of theirs that loads from global
/// memory issues ROW_LOADS loads within one latency: the row passes, and probabilities'
/// keep pass over tiles. A loop that holds such a loop (top_k's picks, probabilities'
/// radix digits: rounds of passes) is checked through it. The split probabilities
/// kernels (a row over many blocks) keep more in flight: SPLIT_LOADS a thread, a tile's
/// SAMPLE_CHUNK a lane.
#[test]
fn row_passes_keep_their_loads_in_flight() {
    let Some(sass) = sass_or_skip() else { return };
    let mut failures = Vec::new();
    for arch in sass_archs() {
        for (name, want) in [
            ("argmax", ROW_LOADS),
            ("probabilities", ROW_LOADS),
            ("top_k", ROW_LOADS),
            ("top_k_probs", ROW_LOADS),
            ("draw_counts", ROW_LOADS),
            ("probabilities_max", SPLIT_LOADS),
            ("probabilities_exp", SPLIT_LOADS),
            ("probabilities_cut_digit", SPLIT_LOADS),
            ("probabilities_cut_top_k", SPLIT_LOADS),
            ("probabilities_cut_keep", SPLIT_LOADS),
            ("top_k_select", SPLIT_LOADS),
        ] {
            let Some(f) = sass
                .iter()
                .find(|f| f.module == "sampling" && f.name == name && f.arch == arch)
            else {
                panic!("no {name} kernel for {arch} in the disassembly")
            };
            let loads = |b: &[Insn]| b.iter().any(|i| i.is("LDG"));
            let loops: Vec<&[Insn]> = f.loops().into_iter().filter(|b| loads(b)).collect();
            // A loop holding another such loop: its range covers the other's.
            let holds = |outer: &[Insn], inner: &[Insn]| {
                outer.len() > inner.len()
                    && outer[0].addr <= inner[0].addr
                    && inner[inner.len() - 1].addr <= outer[outer.len() - 1].addr
            };
            let mut passes = 0;
            for &body in &loops {
                if loops.iter().any(|&inner| holds(body, inner)) {
                    continue;
                }
                passes += 1;
                let (latencies, loads) = latencies_per_iteration(body, |i| i.is("LDG"));
                if latencies != 1 || loads < want {
                    failures.push(format!(
                        "{}: row loop {:#x}..{:#x}: {latencies} memory latencies for {loads} loads an iteration \
                         (want 1 for {want})",
                        f.label(),
                        body[0].addr,
                        body[body.len() - 1].addr
                    ));
                }
            }
            if passes == 0 {
                failures.push(format!("{}: no row loop found", f.label()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The attention kernels copy each tile of 64 keys of K and V to shared memory before
/// multiplying it. One 16-byte chunk at a time, a tile cost 8 memory latencies (4 warps,
/// head dim 128); a thread now loads up to 4 chunks of K and 4 of V before it stores
/// any (fewer for small head dims: 64 · (D / 8) / 128 of each, at least 1). Every
/// innermost loop of theirs that loads only 16-byte chunks (the tile copy) pays one
/// latency for them.
#[test]
fn attention_tiles_load_their_chunks_at_once() {
    let Some(sass) = sass_or_skip() else { return };
    let mut failures = Vec::new();
    for f in sass.iter().filter(|f| f.module == "attention") {
        let want = 2 * (64 * (f.name_number("_d") / 8) / 128).clamp(1, 4);
        let chunk = |i: &Insn| i.is("LDG") && i.op.contains(".128");
        let costs: Vec<(usize, usize)> = f
            .loops_loading_only(chunk)
            .iter()
            .map(|b| latencies_per_iteration(b, chunk))
            .collect();
        if costs.is_empty() || costs.iter().any(|&(lat, loads)| lat != 1 || loads < want) {
            failures.push(format!(
                "{}: tile loops (latencies, 16-byte loads an iteration) {costs:?}; want 1 latency for {want}",
                f.label()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The attention kernels' key loops multiply with mma.sync m16n8k16 on bf16 (SASS
/// `HMMA.16816.F32.BF16`), not with scalar FMAs. Every architecture built.
#[test]
fn attention_multiplies_on_tensor_cores() {
    let Some(sass) = sass_or_skip() else { return };
    let attention: Vec<&Function> = sass.iter().filter(|f| f.name.starts_with("attention_")).collect();
    assert!(
        attention.len() >= 20 * sass_archs().len(),
        "{} attention kernels",
        attention.len()
    );
    for f in attention {
        assert!(
            f.loops()
                .iter()
                .any(|b| b.iter().any(|i| i.op.starts_with("HMMA.16816.F32.BF16"))),
            "{}: no HMMA.16816.F32.BF16 in a loop",
            f.label()
        );
    }
}
