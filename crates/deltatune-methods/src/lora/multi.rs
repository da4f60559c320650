//! Several LoRA adapters on one base, chosen per batch row: the base pass is shared and each
//! row adds its own adapter's low-rank term (the serving case: requests for different adapters
//! in one batch). Inference only.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use deltatune_core::{Ctx, Error, HasSites, LinearDelta, Result};

use super::LoraConfig;
use crate::delta::peft_key;

/// One adapter's matrices at one linear site.
#[derive(Debug, Clone)]
struct Branch {
    /// [r, in]
    a: Tensor,
    /// [out, r]
    b: Tensor,
    scale: f64,
}

/// The LoRA branches of several adapters at one linear site; [`Ctx::adapter_rows`] says which
/// adapter each batch row uses (rows of an adapter without a branch here, and rows marked
/// `u32::MAX`, get the base output).
///
/// The adapters' matrices are stacked once (ranks padded with zeros to the largest, the scale
/// folded into B, a last all-zero slot for rows without a branch), so a batch costs the same
/// few operations however many adapters it mixes: each row's A and B are gathered, then two
/// batched products (as Punica's and S-LoRA's gathered kernels do on GPUs).
#[derive(Debug)]
pub struct MultiLora {
    /// [K + 1, r_max, in]
    a: Tensor,
    /// [K + 1, out, r_max], scaled.
    b: Tensor,
    /// Adapters (the zero slot is index K).
    k: usize,
}

impl MultiLora {
    fn new(branches: &[Option<Branch>], out: usize, inp: usize) -> candle_core::Result<Self> {
        let r = branches
            .iter()
            .flatten()
            .map(|b| b.a.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(1);
        let dev = candle_core::Device::Cpu;
        let mut a_parts = Vec::with_capacity(branches.len() + 1);
        let mut b_parts = Vec::with_capacity(branches.len() + 1);
        for br in branches.iter().map(Some).chain([None]) {
            match br.and_then(|b| b.as_ref()) {
                Some(br) => {
                    let ri = br.a.dim(0)?;
                    let (a, b) = if ri < r {
                        (
                            Tensor::cat(
                                &[&br.a, &Tensor::zeros((r - ri, inp), DType::F32, &dev)?],
                                0,
                            )?,
                            Tensor::cat(
                                &[&br.b, &Tensor::zeros((out, r - ri), DType::F32, &dev)?],
                                1,
                            )?,
                        )
                    } else {
                        (br.a.clone(), br.b.clone())
                    };
                    a_parts.push(a.unsqueeze(0)?);
                    b_parts.push((b * br.scale)?.unsqueeze(0)?);
                }
                None => {
                    a_parts.push(Tensor::zeros((1, r, inp), DType::F32, &dev)?);
                    b_parts.push(Tensor::zeros((1, out, r), DType::F32, &dev)?);
                }
            }
        }
        Ok(Self {
            a: Tensor::cat(&a_parts, 0)?.contiguous()?,
            b: Tensor::cat(&b_parts, 0)?.contiguous()?,
            k: branches.len(),
        })
    }
}

/// The adapter of each of the batch's `b` rows, as a multi-adapter layer needs them: an error
/// when the pass gave none ([`Ctx::with_adapter_rows`]) or not one per row.
fn rows_for(ctx: &Ctx, b: usize) -> candle_core::Result<&[u32]> {
    let Some(rows) = ctx.adapter_rows.as_deref() else {
        candle_core::bail!(
            "a multi-adapter layer needs the adapter of each row (Ctx::with_adapter_rows)"
        );
    };
    if rows.len() != b {
        candle_core::bail!("{} adapter rows for a batch of {b}", rows.len());
    }
    Ok(rows)
}

impl LinearDelta for MultiLora {
    fn forward(&self, x: &Tensor, base: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let rows = rows_for(ctx, b)?;
        if rows.iter().all(|&r| r as usize >= self.k) {
            return Ok(base);
        }
        let slots: Vec<u32> = rows
            .iter()
            .map(|&r| {
                if (r as usize) < self.k {
                    r
                } else {
                    self.k as u32
                }
            })
            .collect();
        let idx = Tensor::from_vec(slots, (b,), x.device())?;
        let a = self.a.index_select(&idx, 0)?; // [B, r, in]
        let bm = self.b.index_select(&idx, 0)?; // [B, out, r]
        let dims = x.dims().to_vec();
        let inp = dims[dims.len() - 1];
        let t = x.elem_count() / (b * inp);
        let xs = x.reshape((b, t, inp))?;
        let h = xs.matmul(&a.transpose(1, 2)?)?; // [B, t, r]
        let z = h.matmul(&bm.transpose(1, 2)?)?; // [B, t, out]
        let mut od = dims;
        *od.last_mut().unwrap() = self.b.dim(1)?;
        let z = z.reshape(od)?.to_dtype(base.dtype())?;
        base + z
    }

    fn merge_into(
        &self,
        _w: &Tensor,
        _b: Option<&Tensor>,
    ) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(None)
    }
}

/// The trained heads (`modules_to_save`) of several adapters at one linear site, chosen per
/// batch row like [`MultiLora`]: a row of an adapter with a head here gets that head's output
/// instead of the base layer's.
#[derive(Debug)]
pub struct MultiHead {
    /// `(weight [out, in], bias [out])` per adapter.
    heads: Vec<Option<(Tensor, Option<Tensor>)>>,
}

impl LinearDelta for MultiHead {
    fn forward(&self, x: &Tensor, base: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let rows = rows_for(ctx, b)?;
        let mut out = base;
        for (k, head) in self.heads.iter().enumerate() {
            let Some((w, bias)) = head else { continue };
            let idx: Vec<u32> = (0..b as u32)
                .filter(|&i| rows[i as usize] == k as u32)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let n = idx.len();
            let idx = Tensor::from_vec(idx, (n,), x.device())?;
            let xs = x.index_select(&idx, 0)?;
            let mut y = xs.broadcast_matmul(&w.t()?)?;
            if let Some(bias) = bias {
                y = y.broadcast_add(bias)?;
            }
            let old = out.index_select(&idx, 0)?;
            out = out.index_add(&idx, &(y - old)?, 0)?;
        }
        Ok(out)
    }

    fn merge_into(
        &self,
        _w: &Tensor,
        _b: Option<&Tensor>,
    ) -> candle_core::Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(None)
    }
}

/// A saved tensor of module `path` (`leaf` `weight` or `bias`) under PEFT's keys (also the
/// `base_model.<path>` form PEFT uses for prompt-learning methods).
fn saved<'a>(tensors: &'a BTreeMap<String, Tensor>, path: &str, leaf: &str) -> Option<&'a Tensor> {
    tensors
        .get(&peft_key(path, leaf))
        .or_else(|| tensors.get(&format!("base_model.{path}.{leaf}")))
}

/// Attaches several LoRA adapters (config and tensors under PEFT's keys) to `model`, selected
/// per row by [`Ctx::adapter_rows`] (row value `i` = `adapters[i]`): the LoRA branches found
/// under PEFT's keys, and trained linear heads (`modules_to_save`, e.g. `classifier`), which
/// replace the layer's output for their rows. Returns how many sites got LoRA branches.
pub fn attach_multi(
    model: &mut dyn HasSites,
    adapters: &[(LoraConfig, BTreeMap<String, Tensor>)],
) -> Result<usize> {
    let mut per_site: BTreeMap<String, Vec<Option<Branch>>> = BTreeMap::new();
    type Head = Option<(Tensor, Option<Tensor>)>;
    let mut heads: BTreeMap<String, Vec<Head>> = BTreeMap::new();
    let paths: Vec<String> = model.linears().iter().map(|l| l.path.clone()).collect();
    for (k, (cfg, tensors)) in adapters.iter().enumerate() {
        cfg.validate()?;
        let mut found = 0;
        let mut explained = 0;
        for path in &paths {
            let (ka, kb) = (
                peft_key(path, "lora_A.weight"),
                peft_key(path, "lora_B.weight"),
            );
            if let Some(w) = saved(tensors, path, "weight") {
                let bias = saved(tensors, path, "bias").cloned();
                explained += 1 + usize::from(bias.is_some());
                let v = heads
                    .entry(path.clone())
                    .or_insert_with(|| vec![None; adapters.len()]);
                v[k] = Some((w.to_dtype(DType::F32)?, bias));
                found += 1;
                continue;
            }
            let (Some(a), Some(b)) = (tensors.get(&ka), tensors.get(&kb)) else {
                continue;
            };
            explained += 2;
            let br = Branch {
                a: a.to_dtype(DType::F32)?,
                b: b.to_dtype(DType::F32)?,
                scale: cfg.scale_for(path)?,
            };
            let v = per_site
                .entry(path.clone())
                .or_insert_with(|| vec![None; adapters.len()]);
            v[k] = Some(br);
            found += 1;
        }
        if explained != tensors.len() {
            let known: Vec<&String> = tensors
                .keys()
                .filter(|key| {
                    !paths.iter().any(|p| {
                        [
                            peft_key(p, "lora_A.weight"),
                            peft_key(p, "lora_B.weight"),
                            peft_key(p, "weight"),
                            peft_key(p, "bias"),
                            format!("base_model.{p}.weight"),
                            format!("base_model.{p}.bias"),
                        ]
                        .contains(key)
                    })
                })
                .take(3)
                .collect();
            return Err(Error::Msg(format!(
                "adapter {k} has tensors no linear layer of the model explains: {known:?} \
                 (only LoRA and trained linear heads can share a batch)"
            )));
        }
        if found == 0 {
            return Err(Error::Msg(format!(
                "adapter {k} has no LoRA tensor or head for any linear layer of the model \
                 (another base?)"
            )));
        }
    }
    let n = per_site.len();
    for lin in model.linears_mut() {
        if let Some(branches) = per_site.remove(&lin.path) {
            let (o, i) = (lin.out_features(), lin.in_features());
            for br in branches.iter().flatten() {
                if br.a.dims() != [br.a.dim(0)?, i] || br.b.dims() != [o, br.a.dim(0)?] {
                    return Err(Error::Msg(format!(
                        "`{}`: LoRA A {:?} / B {:?} do not fit the layer [{o}, {i}]",
                        lin.path,
                        br.a.dims(),
                        br.b.dims()
                    )));
                }
            }
            lin.deltas.push(Arc::new(MultiLora::new(&branches, o, i)?));
        }
        if let Some(hs) = heads.remove(&lin.path) {
            let (o, i) = (lin.out_features(), lin.in_features());
            for (w, b) in hs.iter().flatten() {
                if w.dims() != [o, i] || b.as_ref().is_some_and(|b| b.dims() != [o]) {
                    return Err(Error::Msg(format!(
                        "`{}`: a saved head of shape {:?} does not fit the layer [{o}, {i}] \
                         (adapters with another number of labels need their own batch)",
                        lin.path,
                        w.dims()
                    )));
                }
            }
            lin.deltas.push(Arc::new(MultiHead { heads: hs }));
        }
    }
    Ok(n)
}
