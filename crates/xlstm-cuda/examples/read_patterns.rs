//! How the order of a memory-bound kernel's loads moves the read bandwidth it reaches (the GEMV
//! question: one contiguous stream per warp, or per block, or grid-stride). Prints one JSON line
//! per pattern: GB/s, best of 10, over `MB` megabytes.
//!
//!   cargo run --release -p xlstm-cuda --example read_patterns
use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};

const SRC: &str = r#"
typedef unsigned int u32;
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ float fold(uint4 v) { return __uint_as_float(v.x) + __uint_as_float(v.y) + __uint_as_float(v.z) + __uint_as_float(v.w); }
__device__ void finish(float s, float* out) { if (s == 1.2345f) out[0] = s; }
// grid-stride, 4 loads in flight per thread
extern "C" __global__ void p_grid(const uint4* x, long long n, float* out) {
    float s = 0.f;
    long long st = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += 4 * st) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = i + u * st < n ? ld_stream(x + i + u * st) : make_uint4(0,0,0,0);
#pragma unroll
        for (int u = 0; u < 4; ++u) s += fold(v[u]);
    }
    finish(s, out);
}
// `unit` threads (32: a warp, blockDim: a block) stream one contiguous region each, rounds of 8·unit
// chunks (chunk = base + t + u·unit), two rounds in flight (double-buffered), like gemv.cu.
__device__ void stream(const uint4* x, long long per, int unit, int t, long long region, float* out) {
    const uint4* b = x + region * per;
    float s = 0.f;
    const long long rounds = per / (8 * unit);
    uint4 wa[8], wb[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) wa[u] = ld_stream(b + t + u * unit);
#pragma unroll
    for (int u = 0; u < 8; ++u) wb[u] = ld_stream(b + 8 * unit + t + u * unit);
    for (long long r = 0; r < rounds; r += 2) {
#pragma unroll
        for (int u = 0; u < 8; ++u) s += fold(wa[u]);
        if (r + 2 < rounds) {
#pragma unroll
            for (int u = 0; u < 8; ++u) wa[u] = ld_stream(b + (r + 2) * 8 * unit + t + u * unit);
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) s += fold(wb[u]);
        if (r + 3 < rounds) {
#pragma unroll
            for (int u = 0; u < 8; ++u) wb[u] = ld_stream(b + (r + 3) * 8 * unit + t + u * unit);
        }
    }
    finish(s, out);
}
extern "C" __global__ void p_warp(const uint4* x, long long per, float* out) {
    stream(x, per, 32, threadIdx.x & 31, blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5), out);
}
extern "C" __global__ void p_block(const uint4* x, long long per, float* out) {
    stream(x, per, blockDim.x, threadIdx.x, blockIdx.x, out);
}
"#;

fn main() {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let cc = ctx.compute_capability().unwrap();
    let ptx = xlstm_cuda::kernels::compile("read_patterns", SRC, &format!("compute_{}{}", cc.0, cc.1), false).unwrap();
    let m = ctx.load_module(ptx.into()).unwrap();
    let sms = ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap() as u32;
    let s = ctx.default_stream();
    for mb in [96usize, 384] {
        let chunks = mb * (1 << 20) / 16;
        let x = s.alloc_zeros::<u8>(chunks * 16).unwrap();
        let out = s.alloc_zeros::<f32>(1).unwrap();
        let run = |name: &str, f: &str, grid: u32, block: u32, per: i64| {
            let func = m.load_function(f).unwrap();
            let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
            let mut best = f32::MAX;
            for _ in 0..12 {
                let e0 = s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
                let mut b = s.launch_builder(&func);
                b.arg(&x).arg(&per).arg(&out);
                unsafe { b.launch(cfg) }.unwrap();
                let e1 = s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
                best = best.min(e0.elapsed_ms(&e1).unwrap());
            }
            let bytes = if f == "p_grid" { chunks * 16 } else { per as usize * 16 * if f == "p_warp" { grid as usize * block as usize / 32 } else { grid as usize } };
            println!("{{\"mb\":{mb},\"pattern\":\"{name}\",\"grid\":{grid},\"block\":{block},\"us\":{:.1},\"gb_s\":{:.0}}}", best * 1e3, bytes as f64 / (best as f64 * 1e-3) / 1e9);
        };
        run("grid-stride", "p_grid", sms * 8, 512, chunks as i64);
        for (grid, block) in [(2 * sms, 256u32), (sms, 512), (4 * sms, 128), (sms, 256)] {
            let warps = (grid * block / 32) as usize;
            let per = (chunks / warps / 512 * 512) as i64;
            run("warp-streams", "p_warp", grid, block, per);
        }
        for (grid, block) in [(2 * sms, 256u32), (sms, 512), (4 * sms, 256)] {
            let per = (chunks / grid as usize / (16 * block as usize) * (16 * block as usize)) as i64;
            run("block-streams", "p_block", grid, block, per);
        }
    }
}
