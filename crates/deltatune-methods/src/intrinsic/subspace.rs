//! A learned prompt subspace (Qin et al. 2021, "Exploring Universal Intrinsic Task Subspace via
//! Prompt Tuning"), found here by PCA of several trained soft prompts.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use deltatune_core::{to_safetensors_bytes, write_atomic, Error, Result, Weights};

use crate::prompt::bad;

/// Key of the mean prompt in a subspace artifact.
pub const P0_KEY: &str = "subspace.p0";
/// Key of the basis in a subspace artifact.
pub const BASIS_KEY: &str = "subspace.basis";

/// `prompt = p0 + reshape(d z)`.
#[derive(Debug, Clone)]
pub struct Subspace {
    /// The base (mean) prompt [P, hidden].
    pub p0: Tensor,
    /// The basis [P * hidden, d]: column k is principal direction k times sigma_k / sqrt(n)
    /// (the standard deviation of the prompts along it), so `z ~ N(0, I)` spreads like the data.
    pub d: Tensor,
}

impl Subspace {
    /// A random subspace around a given prompt: `P0` = `origin` [P, hidden] and a dense
    /// Gaussian `D` [P * hidden, d] with entries N(0, rms(origin)^2 / d), the scale of
    /// [`super::decoder`]'s random map (there rms of the word embeddings, which a prompt drawn
    /// at the vocabulary's scale shares). It puts a random and a learned subspace on the same
    /// `P0`, so that they differ only in `D`.
    pub fn random_around(origin: &Tensor, d: usize, seed: u64) -> Result<Self> {
        if origin.rank() != 2 {
            return bad(
                "origin",
                format!(
                    "the origin must be a [P, hidden] prompt, got {:?}",
                    origin.dims()
                ),
            );
        }
        let n = origin.elem_count();
        if d == 0 || d > n {
            return bad(
                "intrinsic_dim",
                format!("d = {d} is outside the allowed range 1..={n} (P * hidden)"),
            );
        }
        let p0 = origin.to_dtype(DType::F32)?;
        let scale = crate::prompt::rms(&p0)? / (d as f64).sqrt();
        let mut rng = deltatune_core::Rng::new(seed).derive("subspace.random");
        Ok(Self {
            d: rng.normal_tensor((n, d), scale)?,
            p0,
        })
    }

    /// The subspace dimension d.
    pub fn dim(&self) -> usize {
        self.d.dims()[1]
    }

    /// `p0 + reshape(D z)`.
    ///
    /// # Shapes
    /// `z`: [d] -> [P, hidden]
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.d.matmul(&z.to_dtype(DType::F32)?.unsqueeze(1)?)?;
        Ok((&self.p0 + x.reshape(self.p0.shape())?)?)
    }

    /// The coordinates of the point of the subspace nearest to `prompt` (least squares; the
    /// basis columns are orthogonal; a zero column gets coordinate 0).
    ///
    /// # Shapes
    /// `prompt`: [P, hidden] -> [d]
    pub fn project(&self, prompt: &Tensor) -> Result<Tensor> {
        let r = (prompt.to_dtype(DType::F32)? - &self.p0)?.flatten_all()?;
        let dots = r.unsqueeze(0)?.matmul(&self.d)?.squeeze(0)?;
        let norms = self.d.sqr()?.sum(0)?;
        let safe = norms.clamp(1e-30, f64::MAX)?;
        let z = (dots / safe)?;
        let nonzero = norms.gt(1e-30)?.to_dtype(DType::F32)?;
        Ok((z * nonzero)?)
    }

    /// Writes the artifact (keys [`P0_KEY`], [`BASIS_KEY`]) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut m = BTreeMap::new();
        m.insert(P0_KEY.to_string(), self.p0.clone());
        m.insert(BASIS_KEY.to_string(), self.d.clone());
        write_atomic(path, &to_safetensors_bytes(&m)?)
    }

    /// Reads an artifact written by [`Subspace::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let w = Weights::load(path, DType::F32)?;
        let find = |k: &str| {
            w.tensors()
                .find(|(n, _)| *n == k)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| Error::MissingTensor {
                    key: k.into(),
                    path: path.to_path_buf(),
                    nearest: deltatune_core::error::nearest_names(k, w.keys(), 3),
                })
        };
        let (p0, d) = (find(P0_KEY)?, find(BASIS_KEY)?);
        if p0.rank() != 2 || d.rank() != 2 || d.dims()[0] != p0.elem_count() {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                msg: format!(
                    "{P0_KEY} must be [P, hidden] and {BASIS_KEY} [P * hidden, d]; got {:?} and \
                     {:?}",
                    p0.dims(),
                    d.dims()
                ),
            });
        }
        Ok(Self { p0, d })
    }
}

/// Eigen-decomposition of a symmetric n x n matrix (row-major) by cyclic Jacobi rotations:
/// eigenvalues and eigenvectors (column k of the row-major `v` belongs to value k).
fn symmetric_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum::<f64>().max(1e-300);
    for _sweep in 0..100 {
        let mut off = 0.0;
        for p in 0..n {
            for q in p + 1..n {
                off += a[p * n + q] * a[p * n + q];
            }
        }
        if off <= 1e-28 * total {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// PCA of `prompts` (n trained soft prompts, each [P, hidden], flattened).
///
/// Without `origin`: the mean becomes `p0` and the top-`d` principal directions of the centred
/// prompts, each scaled by sigma_k / sqrt(n), the basis; 1 <= d <= n - 1 (a centred set of n
/// points spans at most n - 1 directions).
///
/// With `origin` (the prompt every source started from, when they share one): `p0` is the origin
/// and the basis the top-`d` directions of the displacements `prompt_i - origin`, not centred,
/// each scaled by sigma_k / sqrt(n); 1 <= d <= n. Centring would subtract the direction that all
/// sources moved in together, which is the one the task taught them; kept, `z` can go along it
/// and past where the sources stopped.
///
/// Needs n >= 2 prompts of one shape (and the origin of that shape). Computed through the n x n
/// Gram matrix in f64, so the cost is O(n^2 P hidden).
pub fn fit_subspace(prompts: &[Tensor], d: usize, origin: Option<&Tensor>) -> Result<Subspace> {
    let n = prompts.len();
    if n < 2 {
        return bad(
            "prompts",
            format!("a subspace needs at least 2 trained prompts, got {n}"),
        );
    }
    let max_d = if origin.is_some() { n } else { n - 1 };
    if d == 0 || d > max_d {
        return bad(
            "intrinsic_dim",
            format!(
                "d = {d} principal directions cannot be fitted from n = {n} prompts{}; allowed \
                 range 1..={max_d}",
                if origin.is_some() {
                    " around an origin"
                } else {
                    " (a centred set of n prompts spans n - 1 directions)"
                }
            ),
        );
    }
    let shape = prompts[0].dims().to_vec();
    if shape.len() != 2 {
        return bad(
            "prompts",
            format!("each prompt must be [P, hidden], got {shape:?}"),
        );
    }
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(n);
    for (i, p) in prompts.iter().enumerate() {
        if p.dims() != shape.as_slice() {
            return bad(
                "prompts",
                format!(
                    "prompt {i} is {:?} but prompt 0 is {shape:?}; all prompts must have one \
                     shape",
                    p.dims()
                ),
            );
        }
        let v: Vec<f32> = p.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        rows.push(v.into_iter().map(f64::from).collect());
    }
    let big_n = rows[0].len();
    let mut mean = vec![0.0; big_n];
    match origin {
        Some(o) => {
            if o.dims() != shape.as_slice() {
                return bad(
                    "origin",
                    format!(
                        "the origin is {:?} but the prompts are {shape:?}; it must be the prompt \
                         the sources started from",
                        o.dims()
                    ),
                );
            }
            let v: Vec<f32> = o.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            mean = v.into_iter().map(f64::from).collect();
        }
        None => {
            for r in &rows {
                for (m, x) in mean.iter_mut().zip(r) {
                    *m += x / n as f64;
                }
            }
        }
    }
    for r in &mut rows {
        for (x, m) in r.iter_mut().zip(&mean) {
            *x -= m;
        }
    }
    let mut gram = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            let g: f64 = rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum();
            gram[i * n + j] = g;
            gram[j * n + i] = g;
        }
    }
    let (vals, vecs) = symmetric_eigen(gram, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
    // Column k: Xc^T u_k / sqrt(n) = sigma_k v_k / sqrt(n).
    let mut basis = vec![0f32; big_n * d];
    for (k, &col) in order.iter().take(d).enumerate() {
        let mut u: Vec<f64> = (0..n).map(|i| vecs[i * n + col]).collect();
        // A deterministic sign: the largest component positive.
        let big = u
            .iter()
            .copied()
            .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        if big < 0.0 {
            u.iter_mut().for_each(|x| *x = -*x);
        }
        for j in 0..big_n {
            let s: f64 = (0..n).map(|i| rows[i][j] * u[i]).sum();
            basis[j * d + k] = (s / (n as f64).sqrt()) as f32;
        }
    }
    let dev = deltatune_core::device::current();
    Ok(Subspace {
        p0: Tensor::from_vec(
            mean.into_iter().map(|x| x as f32).collect::<Vec<_>>(),
            (shape[0], shape[1]),
            &dev,
        )?,
        d: Tensor::from_vec(basis, (big_n, d), &dev)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_diagonalises() {
        let a = vec![4.0, 1.0, 2.0, 1.0, 3.0, 0.5, 2.0, 0.5, 1.0];
        let (vals, v) = symmetric_eigen(a.clone(), 3);
        for k in 0..3 {
            for i in 0..3 {
                let av: f64 = (0..3).map(|j| a[i * 3 + j] * v[j * 3 + k]).sum();
                assert!((av - vals[k] * v[i * 3 + k]).abs() < 1e-9);
            }
        }
    }
}
