//! WGSL sources (one file per op family, embedded at build time) and the small preprocessor that
//! makes their variants: weight dtype (BF16 / F16 / F32), subgroup operations or not, and the
//! tile/workgroup knobs, and extra switches of a kernel's flavours (the batch-1 GEMV's fused RMSNorm
//! and gate/up pair). The naga test translates every variant this module lists to Metal.
use std::collections::BTreeMap;

pub const COMMON: &str = include_str!("../shaders/common.wgsl");
pub const REDUCE: &str = include_str!("../shaders/reduce.wgsl");

/// The kernel files: (name, source, whether it uses `wg_sum` from reduce.wgsl).
pub const FILES: &[(&str, &str, bool)] = &[
    ("gemv", include_str!("../shaders/gemv.wgsl"), false),
    ("gemm", include_str!("../shaders/gemm.wgsl"), false),
    ("embed", include_str!("../shaders/embed.wgsl"), false),
    ("norm", include_str!("../shaders/norm.wgsl"), true),
    ("elementwise", include_str!("../shaders/elementwise.wgsl"), false),
    ("conv", include_str!("../shaders/conv.wgsl"), false),
    ("mlstm", include_str!("../shaders/mlstm.wgsl"), true),
    ("mlstm_chunk", include_str!("../shaders/mlstm_chunk.wgsl"), false),
    ("slstm", include_str!("../shaders/slstm.wgsl"), false),
    ("mv", include_str!("../shaders/mv.wgsl"), false),
    ("stream", include_str!("../shaders/stream.wgsl"), false),
    ("topk", include_str!("../shaders/topk.wgsl"), false),
];

/// Weight storage of a matrix kernel variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WDType {
    BF16,
    F16,
    F32,
}

impl WDType {
    pub fn define(self) -> &'static str {
        match self {
            WDType::BF16 => "BF16",
            WDType::F16 => "F16",
            WDType::F32 => "F32",
        }
    }
}

/// Tile and workgroup sizes. Results do not depend on them (up to f32 summation order).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Knobs {
    /// GEMV: invocations per workgroup (a power of two) and weight rows per workgroup.
    pub gemv_wg: u32,
    pub gemv_rows: u32,
    /// Prefill GEMM tile (`gemm.wgsl`): input rows × weight rows per workgroup (BM 32 or 64; BN 32,
    /// 64, 128 or 256; BM·BN/32 ≤ 256 invocations).
    pub gemm: (u32, u32),
    /// Invocations per workgroup of the norm/reduction kernels (a power of two) and of pointwise kernels.
    pub reduce_wg: u32,
    pub elem_wg: u32,
    /// mLSTM cell: C columns per workgroup and slices of DK.
    pub cell_cols: u32,
    pub cell_split: u32,
    /// Batch-1 GEMV (`mv.wgsl`): invocations per workgroup (a power of two), weight rows per
    /// workgroup, and 8-value chunks per invocation and loop step (loads in flight: rows × unroll).
    pub mv_wg: u32,
    pub mv_rows: u32,
    pub mv_unroll: u32,
    /// The same for the plain batch-1 GEMV (no norm fused in: out_proj, down, the LM head), which
    /// may prefer another shape than the fused projections.
    pub mv_plain: (u32, u32, u32),
    /// Bytes of the device buffers that weight matrices are placed in, one after another (the
    /// batch-1 GEMV reads several matrices of one pool in one dispatch; a layer's projections that
    /// straddle two pools take two). GPUs: 2 GiB (with 512 MiB, 12 of xLSTM-7B's 32 layers
    /// straddled), capped by the adapter's binding limit and by the bytes the model announced.
    pub pool_bytes: u64,
    /// Fused decode kernels (RMSNorm + projections, RMSNorm + gate/up + activation) for batch 1.
    pub fuse: bool,
    /// Keep wgpu's runtime checks (bounds, loop bounding) in the batch-1 GEMV, which is otherwise
    /// built as a trusted module (its indices are in range by construction).
    pub checked: bool,
    /// Kernel parameters as immediate data (push constants) set per dispatch, instead of a uniform
    /// arena written at each submission (which makes the device finish all earlier work first).
    /// Wanted by default; the backend keeps it only where the adapter has wgpu's IMMEDIATES
    /// (`XLSTM_WGPU_IMMEDIATES=0`: off).
    pub immediates: bool,
    /// The gated decode mLSTM step in one dispatch (each unit's last workgroup commits the state and
    /// writes the head norm) instead of two. On by default except on Metal, where a threadgroup
    /// barrier does not make device memory visible to other threadgroups (`XLSTM_WGPU_CELL_NORM`).
    pub cell_norm: bool,
}

/// Input rows the GEMV kernel takes at once (more rows go through the GEMM).
pub const GEMV_MAX_ROWS: usize = 4;

impl Knobs {
    /// Defaults per adapter type: CPU adapters (lavapipe) get small workgroups, GPUs wider ones.
    pub fn for_adapter(cpu: bool) -> Self {
        if cpu {
            Knobs {
                gemv_wg: 32, gemv_rows: 4, gemm: (32, 64), reduce_wg: 64, elem_wg: 64, cell_cols: 32, cell_split: 2,
                mv_wg: 32, mv_rows: 2, mv_unroll: 2, mv_plain: (32, 2, 2), pool_bytes: 32 << 20, fuse: true, checked: false, immediates: true, cell_norm: true,
            }
        } else {
            Knobs {
                gemv_wg: 128, gemv_rows: 4, gemm: (64, 128), reduce_wg: 256, elem_wg: 256, cell_cols: 16, cell_split: 16,
                mv_wg: 128, mv_rows: 4, mv_unroll: 2, mv_plain: (128, 4, 2), pool_bytes: 2048 << 20, fuse: true, checked: false, immediates: true, cell_norm: true,
            }
        }
    }

    /// `XLSTM_WGPU_GEMV=WGxROWS`, `XLSTM_WGPU_GEMM=BMxBN`, `XLSTM_WGPU_MV=WGxROWSxUNROLL`
    /// (the fused batch-1 GEMVs; also the plain one unless `XLSTM_WGPU_MV_PLAIN=WGxROWSxUNROLL` is set),
    /// `XLSTM_WGPU_CELL=COLSxSPLIT`, `XLSTM_WGPU_POOL_MB`, `XLSTM_WGPU_FUSE=0`, `XLSTM_WGPU_IMMEDIATES=0` and
    /// `XLSTM_WGPU_CHECKED=1` override the defaults.
    pub fn with_env(mut self) -> Self {
        let nums = |v: String| v.split('x').map(|s| s.trim().parse::<u32>().ok()).collect::<Option<Vec<u32>>>();
        let mv_ok = |v: &Vec<u32>| v.len() == 3 && v[0].is_power_of_two() && (1..=16).contains(&v[1]) && (1..=8).contains(&v[2]);
        if let Some(v) = std::env::var("XLSTM_WGPU_MV").ok().and_then(nums).filter(mv_ok) {
            (self.mv_wg, self.mv_rows, self.mv_unroll) = (v[0], v[1], v[2]);
            self.mv_plain = (v[0], v[1], v[2]);
        }
        if let Some(v) = std::env::var("XLSTM_WGPU_MV_PLAIN").ok().and_then(nums).filter(mv_ok) {
            self.mv_plain = (v[0], v[1], v[2]);
        }
        if let Some(v) = std::env::var("XLSTM_WGPU_CELL").ok().and_then(nums) {
            if v.len() == 2 && v[0] > 0 && v[1] > 0 && v[0] * v[1] <= 1024 {
                (self.cell_cols, self.cell_split) = (v[0], v[1]);
            }
        }
        if let Some(mb) = std::env::var("XLSTM_WGPU_POOL_MB").ok().and_then(|v| v.parse::<u64>().ok()) {
            self.pool_bytes = mb.max(1) << 20;
        }
        if let Ok(v) = std::env::var("XLSTM_WGPU_FUSE") {
            self.fuse = v != "0";
        }
        if let Ok(v) = std::env::var("XLSTM_WGPU_IMMEDIATES") {
            self.immediates = v != "0";
        }
        if let Some(v) = std::env::var("XLSTM_WGPU_GEMM").ok().and_then(nums) {
            if v.len() == 2 && Self::gemm_ok(v[0], v[1]) {
                self.gemm = (v[0], v[1]);
            }
        }
        if let Ok(v) = std::env::var("XLSTM_WGPU_CELL_NORM") {
            self.cell_norm = v != "0";
        }
        if let Ok(v) = std::env::var("XLSTM_WGPU_CHECKED") {
            self.checked = v == "1";
        }
        if let Some(v) = std::env::var("XLSTM_WGPU_GEMV").ok().and_then(nums) {
            if v.len() == 2 && v[0].is_power_of_two() && v[1] > 0 {
                (self.gemv_wg, self.gemv_rows) = (v[0], v[1]);
            }
        }
        self
    }

    /// A GEMM tile `gemm.wgsl` can take.
    pub fn gemm_ok(bm: u32, bn: u32) -> bool {
        matches!(bm, 32 | 64) && matches!(bn, 32 | 64 | 128 | 256) && bm * bn / 32 <= 256
    }

    /// Workgroup memory of the GEMM tile: x and W staged in f32 for a k step of 32.
    pub fn gemm_workgroup_bytes(&self) -> u32 {
        (self.gemm.0 + self.gemm.1) * 32 * 4
    }

    /// The batch-1 GEMV shape (WG, rows, unroll) of a flavour (`plain`: no norm fused in).
    pub fn mv_shape(&self, plain: bool) -> (u32, u32, u32) {
        if plain {
            self.mv_plain
        } else {
            (self.mv_wg, self.mv_rows, self.mv_unroll)
        }
    }

    fn subst(&self, file: &str, plain: bool) -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        let (mv_wg, mv_rows, mv_unroll) = self.mv_shape(plain);
        let wg = match file {
            "gemv" => self.gemv_wg,
            "mv" => mv_wg,
            "norm" | "mlstm" => self.reduce_wg,
            "slstm" => 64,
            _ => self.elem_wg,
        };
        m.insert("WG", wg.to_string());
        m.insert("R", if file == "mv" { mv_rows } else { self.gemv_rows }.to_string());
        m.insert("U", mv_unroll.to_string());
        m.insert("B", GEMV_MAX_ROWS.to_string());
        m.insert("GBM", self.gemm.0.to_string());
        m.insert("GBN", self.gemm.1.to_string());
        m.insert("GXH", (256 / self.gemm.1).to_string());
        m.insert("GWH", (64 / self.gemm.0).to_string());
        m.insert("COLS", self.cell_cols.to_string());
        m.insert("SPLIT", self.cell_split.to_string());
        m
    }
}

/// Which variant of a kernel file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    pub file: &'static str,
    pub dtype: WDType,
    pub subgroup: bool,
    /// Extra switches (`//#if NAME`) of a kernel's flavour, e.g. `NORM`, `PAIR` for `mv`.
    pub extra: &'static [&'static str],
}

/// The flavours of the batch-1 GEMV: plain, RMSNorm fused, RMSNorm + gate/up pair fused.
pub const MV_FLAVOURS: &[&[&str]] = &[&[], &["NORM"], &["NORM", "PAIR"]];
/// The flavours of mlstm.wgsl: two-dispatch decode step, and one dispatch with the head norm
/// done by each unit's last workgroup.
pub const MLSTM_FLAVOURS: &[&[&str]] = &[&[], &["NORMED"]];

/// The full WGSL of one variant: common.wgsl (+ reduce.wgsl) + the file, preprocessed.
pub fn source(v: &Variant, knobs: &Knobs) -> String {
    let (_, body, reduce) = FILES.iter().find(|f| f.0 == v.file).unwrap_or_else(|| panic!("no shader file `{}`", v.file));
    let mut text = String::from(COMMON);
    if *reduce {
        text.push_str(REDUCE);
    }
    text.push_str(body);
    let mut defs = vec![v.dtype.define()];
    defs.extend_from_slice(v.extra);
    if v.subgroup {
        defs.push("SUBGROUP");
    }
    if knobs.immediates {
        defs.push("IMMEDIATES");
    }
    let mut subst = knobs.subst(v.file, v.extra.is_empty());
    let (params, args, fnp) = if v.subgroup {
        (", @builtin(subgroup_size) sgs: u32, @builtin(subgroup_invocation_id) sgl: u32", ", sgs, sgl", ", sgs: u32, sgl: u32")
    } else {
        ("", "", "")
    };
    subst.insert("SG_PARAMS", params.into());
    subst.insert("SG_ARGS", args.into());
    subst.insert("SG_FN", fnp.into());
    preprocess(&text, &defs, &subst)
}

/// `//#if NAME`, `//#else`, `//#endif` (nestable) keep or drop lines; `//#unroll V COUNT` …
/// `//#endunroll` (nestable) repeats the lines between COUNT times (a number or a knob's KEY) with
/// `$V` replaced by 0, 1, …; `{{KEY}}` is replaced.
pub fn preprocess(text: &str, defs: &[&str], subst: &BTreeMap<&'static str, String>) -> String {
    let mut kept: Vec<&str> = Vec::new();
    // stack of (this branch active, parent active)
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |s: &Vec<(bool, bool)>| s.last().is_none_or(|&(a, p)| a && p);
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("//#if ") {
            let parent = active(&stack);
            stack.push((defs.contains(&name.trim()), parent));
            continue;
        }
        if t == "//#else" {
            if let Some(top) = stack.last_mut() {
                top.0 = !top.0;
            }
            continue;
        }
        if t == "//#endif" {
            stack.pop();
            continue;
        }
        if active(&stack) {
            kept.push(line);
        }
    }
    let mut out = String::with_capacity(text.len());
    unroll(&kept, subst, &mut out);
    for (k, v) in subst {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

fn unroll(lines: &[&str], subst: &BTreeMap<&'static str, String>, out: &mut String) {
    let mut i = 0;
    while i < lines.len() {
        let Some(spec) = lines[i].trim().strip_prefix("//#unroll ") else {
            out.push_str(lines[i]);
            out.push('\n');
            i += 1;
            continue;
        };
        let mut words = spec.split_whitespace();
        let var = format!("${}", words.next().unwrap_or_else(|| panic!("//#unroll without a variable")));
        let count_word = words.next().unwrap_or_else(|| panic!("//#unroll {var} without a count"));
        let count: usize = count_word.parse().ok().or_else(|| subst.get(count_word).and_then(|v| v.parse().ok())).unwrap_or_else(|| panic!("//#unroll count `{count_word}` is neither a number nor a knob"));
        let mut depth = 1;
        let mut end = i + 1;
        while end < lines.len() {
            let t = lines[end].trim();
            if t.starts_with("//#unroll ") {
                depth += 1;
            } else if t == "//#endunroll" {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            end += 1;
        }
        assert!(end < lines.len(), "//#unroll {var} without //#endunroll");
        for n in 0..count {
            let body: Vec<String> = lines[i + 1..end].iter().map(|l| l.replace(&var, &n.to_string())).collect();
            let refs: Vec<&str> = body.iter().map(|s| s.as_str()).collect();
            unroll(&refs, subst, out);
        }
        i = end + 1;
    }
}

/// Every variant the backend can build (for the naga/MSL test): all files × subgroup on/off, and
/// the three weight dtypes for the files that read weights.
pub fn all_variants() -> Vec<Variant> {
    let mut v = Vec::new();
    for (file, _, _) in FILES {
        let dtypes: &[WDType] = match *file {
            "gemv" | "gemm" | "embed" => &[WDType::BF16, WDType::F16, WDType::F32],
            // f32 weights are a per-slot switch of the 16-bit variants
            "mv" => &[WDType::BF16, WDType::F16],
            _ => &[WDType::F32],
        };
        let flavours: &[&'static [&'static str]] = match *file {
            "mv" => MV_FLAVOURS,
            "mlstm" => MLSTM_FLAVOURS,
            _ => &[&[]],
        };
        for &dtype in dtypes {
            for &extra in flavours {
                for subgroup in [false, true] {
                    v.push(Variant { file, dtype, subgroup, extra });
                }
            }
        }
    }
    v
}
