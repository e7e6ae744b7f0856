// common.wgsl — prepended to every kernel file (not a kernel itself).
//
// Parameters: every dispatch gets 32 words, P[i / 4][i % 4] (floats as their bit patterns): as
// immediate data (push constants) where the adapter has them (IMMEDIATES), else at binding 0, a
// uniform with a dynamic offset into the backend's parameter arena.
// Weights (bf16, f16 or f32) live in storage buffers as u32 words: two 16-bit values per word
// (element 2i in the low half), or one f32 per word. Rows are padded to a multiple of 8 elements.
// Build-time switches (the backend's preprocessor): `//#if NAME` / `//#else` / `//#endif` on their
// own lines, and double-brace KEY substitutions (workgroup sizes, tiles). SUBGROUP: the adapter has
// subgroup operations (wgpu Features::SUBGROUP; naga takes the built-ins without `enable subgroups;`).

//#if IMMEDIATES
var<immediate> P: array<vec4<u32>, 8>;
//#else
@group(0) @binding(0) var<uniform> P: array<vec4<u32>, 8>;
//#endif

fn pu(i: u32) -> u32 { return P[i / 4u][i % 4u]; }
fn pf(i: u32) -> f32 { return bitcast<f32>(P[i / 4u][i % 4u]); }

// bf16 -> f32 is a 16-bit shift; f16 through unpack2x16float (no SHADER_F16 needed).
fn lo16(w: u32) -> f32 {
//#if F16
    return unpack2x16float(w).x;
//#else
    return bitcast<f32>(w << 16u);
//#endif
}
fn hi16(w: u32) -> f32 {
//#if F16
    return unpack2x16float(w).y;
//#else
    return bitcast<f32>(w & 0xffff0000u);
//#endif
}

fn sigmoid(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }
fn log_sigmoid(x: f32) -> f32 { return min(x, 0.0) - log(1.0 + exp(-abs(x))); }

// Linear workgroup index of a dispatch that may be spread over y (more than 65535 groups).
fn group_index(wg: vec3<u32>, nwg: vec3<u32>) -> u32 { return wg.y * nwg.x + wg.x; }

// Activations of the gated feed-forward (gated_act, mv_pair).
// erfc(x), Numerical Recipes' Chebyshev fit (fractional error < 1.2e-7 in exact arithmetic).
fn erfc_(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let r = t * exp(poly);
    return select(2.0 - r, r, x >= 0.0);
}

fn act(a: u32, x: f32) -> f32 {
    switch a {
        case 0u: { return 0.5 * x * erfc_(-x * 0.70710678118654752); }
        case 1u: { return x / (1.0 + exp(-x)); }
        case 2u: { return max(x, 0.0); }
        case 3u: { let r = max(x, 0.0); return r * r; }
        case 4u: { return sigmoid(x); }
        default: { return 1.0507009873554805 * select(1.6732632423543772 * (exp(x) - 1.0), x, x > 0.0); }
    }
}
