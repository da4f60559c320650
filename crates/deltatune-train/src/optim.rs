//! AdamW with per-tensor weight decay, a linear warm-up/decay schedule and global-norm clipping.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// AdamW (Loshchilov and Hutter 2019) as `torch.optim.AdamW` computes it.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(Var, bool)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Per-parameter multipliers of the learning rate (1 unless set).
    lr_scales: Vec<f64>,
    step: usize,
}

impl AdamW {
    /// `params`: each variable with whether weight decay applies to it.
    pub fn new(params: Vec<(Var, bool)>, weight_decay: f64) -> Result<Self> {
        let m = params
            .iter()
            .map(|(p, _)| p.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        let lr_scales = vec![1.0; params.len()];
        Ok(Self {
            lr_scales,
            params,
            m,
            v,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
        })
    }

    /// Gives each parameter its own multiplier of the learning rate passed to [`AdamW::step`].
    pub fn set_lr_scales(&mut self, scales: Vec<f64>) {
        assert_eq!(scales.len(), self.params.len(), "one scale per parameter");
        self.lr_scales = scales;
    }

    /// The optimiser's state: steps taken and the first and second moments, one per parameter.
    pub fn state(&self) -> (usize, &[Tensor], &[Tensor]) {
        (self.step, &self.m, &self.v)
    }

    /// Restores a state from [`AdamW::state`] (a resumed run continues exactly).
    pub fn set_state(&mut self, step: usize, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        for (i, (a, b)) in m.iter().zip(&v).enumerate() {
            let want = self.params[i].0.dims();
            if a.dims() != want || b.dims() != want {
                candle_core::bail!(
                    "optimiser state {i}: moments {:?}/{:?}, parameter {want:?}",
                    a.dims(),
                    b.dims()
                );
            }
        }
        if m.len() != self.params.len() || v.len() != self.params.len() {
            candle_core::bail!(
                "optimiser state has {} moments for {} parameters",
                m.len(),
                self.params.len()
            );
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// One update with learning rate `lr` from the gradients in `grads` (summed over
    /// accumulation steps and multiplied by `grad_scale`).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (i, (p, decay)) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let lr = lr * self.lr_scales[i];
            let g = (g * grad_scale)?;
            let m = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let mut theta = p.as_tensor().detach();
            if *decay && self.weight_decay > 0.0 {
                theta = (theta * (1.0 - lr * self.weight_decay))?;
            }
            p.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then linear decay to 0 at `total`
/// (`transformers.get_linear_schedule_with_warmup`).
pub fn linear_schedule(step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
    if step < warmup {
        peak * step as f64 / warmup.max(1) as f64
    } else {
        peak * (total.saturating_sub(step) as f64 / total.saturating_sub(warmup).max(1) as f64)
            .max(0.0)
    }
}

/// The gradients of `vars`, in order (`None` where a variable got none).
pub fn collect_grads(grads: &GradStore, vars: &[Var]) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).cloned())
        .collect()
}

/// The global L2 norm of the gradients.
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads.iter().flatten() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_matches_transformers() {
        // warm-up 3 of 10 steps, peak 1.0
        let lrs: Vec<f64> = (0..11).map(|s| linear_schedule(s, 3, 10, 1.0)).collect();
        let expected = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            6.0 / 7.0,
            5.0 / 7.0,
            4.0 / 7.0,
            3.0 / 7.0,
            2.0 / 7.0,
            1.0 / 7.0,
            0.0,
        ];
        for (a, b) in lrs.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{lrs:?}");
        }
    }

    #[test]
    fn adamw_matches_torch_on_first_steps() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01), p = [1, -2], grads [0.5, 0.25] then [-1, 2]:
        // step 1: p = p*(1-0.001) - 0.1*sign(g) = [0.899, -2.098]
        let p = Var::from_slice(&[1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![(p.clone(), true)], 0.01).unwrap();
        let g = Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
        opt.step(&[Some(g)], 0.1, 1.0).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (got[0] - 0.899).abs() < 1e-5 && (got[1] + 2.098).abs() < 1e-5,
            "{got:?}"
        );
        // step 2 by hand: m = 0.9 m + 0.1 g, v = 0.999 v + 0.001 g^2, bias-corrected.
        let g2 = [-1.0f64, 2.0];
        let g1 = [0.5f64, 0.25];
        let mut expect = [0.899f64, -2.098];
        for i in 0..2 {
            let m = 0.9 * 0.1 * g1[i] + 0.1 * g2[i];
            let v = 0.999 * 0.001 * g1[i] * g1[i] + 0.001 * g2[i] * g2[i];
            let mh = m / (1.0 - 0.9f64.powi(2));
            let vh = v / (1.0 - 0.999f64.powi(2));
            expect[i] = expect[i] * (1.0 - 0.001) - 0.1 * mh / (vh.sqrt() + 1e-8);
        }
        let g = Tensor::new(&[-1.0f32, 2.0], &Device::Cpu).unwrap();
        opt.step(&[Some(g)], 0.1, 1.0).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 1e-5,
                "{got:?} vs {expect:?}"
            );
        }
    }
}
