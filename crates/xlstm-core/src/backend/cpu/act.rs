//! Pointwise activations on the CPU. `erf` is computed in f64 with the Chebyshev fit of Numerical
//! Recipes (`erfcc`, fractional error < 1.2e-7 everywhere), which keeps exact GELU at f32 accuracy.
use crate::backend::Activation;

/// erfc(x) for any x (negative x through erfc(−z) = 2 − erfc(z)), fractional error < 1.2e-7.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

pub fn erf(x: f64) -> f64 {
    1.0 - erfc(x)
}

/// Exact GELU `0.5·x·(1 + erf(x/√2)) = 0.5·x·erfc(−x/√2)`.
#[inline]
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
}

#[inline]
pub fn apply(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => gelu(x),
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::Relu => x.max(0.0),
        Activation::ReluSquared => {
            let r = x.max(0.0);
            r * r
        }
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Activation::Selu => {
            const ALPHA: f32 = 1.673_263_2;
            const SCALE: f32 = 1.050_701;
            SCALE * if x > 0.0 { x } else { ALPHA * (x.exp() - 1.0) }
        }
    }
}
