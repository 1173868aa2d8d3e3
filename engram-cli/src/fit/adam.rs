//! Adam for the dense Engram weights (projections, norms, conv): a few hundred thousand
//! numbers per layer, so plain loops over `Vec<f32>` (the table rows have their own
//! sparse update, [`super::layer::SparseTable::adagrad`]). Written here because the
//! workspace has candle-core only, and the moments must be saved for a resumed fit.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use candle_core::{backprop::GradStore, Tensor, Var};

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// First and second moments of one weight.
#[derive(Clone, Default)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// One Adam step (number `step`, from 1) on every variable of `vars` that has a gradient.
pub fn adam_step(
    vars: &BTreeMap<String, Var>,
    moments: &mut BTreeMap<String, Moments>,
    grads: &GradStore,
    lr: f32,
    step: u64,
) -> Result<()> {
    let bc1 = 1.0 - BETA1.powi(step as i32);
    let bc2 = 1.0 - BETA2.powi(step as i32);
    for (name, var) in vars {
        let Some(g) = grads.get(var) else { continue };
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        let mut x = var.flatten_all()?.to_vec1::<f32>()?;
        let mo = moments.entry(name.clone()).or_default();
        if mo.m.is_empty() {
            mo.m = vec![0.0; x.len()];
            mo.v = vec![0.0; x.len()];
        }
        if mo.m.len() != x.len() {
            return Err(anyhow!("Adam moments of {name}: wrong length"));
        }
        for i in 0..x.len() {
            mo.m[i] = BETA1 * mo.m[i] + (1.0 - BETA1) * g[i];
            mo.v[i] = BETA2 * mo.v[i] + (1.0 - BETA2) * g[i] * g[i];
            x[i] -= lr * (mo.m[i] / bc1) / ((mo.v[i] / bc2).sqrt() + EPS);
        }
        var.set(&Tensor::from_vec(x, var.shape(), var.device())?)?;
    }
    Ok(())
}
