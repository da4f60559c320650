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
#[derive(Debug)]
pub struct MultiLora {
    branches: Vec<Option<Branch>>,
}

impl LinearDelta for MultiLora {
    fn forward(&self, x: &Tensor, base: Tensor, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let Some(rows) = ctx.adapter_rows.as_ref() else {
            candle_core::bail!(
                "a multi-adapter layer needs the adapter of each row (Ctx::with_adapter_rows)"
            );
        };
        let b = x.dim(0)?;
        if rows.len() != b {
            candle_core::bail!("{} adapter rows for a batch of {b}", rows.len());
        }
        let mut out = base;
        for (k, branch) in self.branches.iter().enumerate() {
            let Some(br) = branch else { continue };
            let idx: Vec<u32> = (0..b as u32)
                .filter(|&i| rows[i as usize] == k as u32)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let n = idx.len();
            let idx = Tensor::from_vec(idx, (n,), x.device())?;
            let xs = x.index_select(&idx, 0)?;
            let dims = xs.dims().to_vec();
            let inp = dims[dims.len() - 1];
            let flat = xs.reshape((xs.elem_count() / inp, inp))?;
            let z = (flat.matmul(&br.a.t()?)?.matmul(&br.b.t()?)? * br.scale)?;
            let mut od = dims;
            *od.last_mut().unwrap() = br.b.dim(0)?;
            out = out.index_add(&idx, &z.reshape(od)?.to_dtype(out.dtype())?, 0)?;
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

/// Attaches several LoRA adapters (config and tensors under PEFT's keys) to `model`, selected
/// per row by [`Ctx::adapter_rows`] (row value `i` = `adapters[i]`). Each adapter's targets are
/// resolved as a single attach would resolve them; its `modules_to_save` are not supported
/// (heads differ per adapter). Returns how many sites got a branch.
pub fn attach_multi(
    model: &mut dyn HasSites,
    adapters: &[(LoraConfig, BTreeMap<String, Tensor>)],
) -> Result<usize> {
    let mut per_site: BTreeMap<String, Vec<Option<Branch>>> = BTreeMap::new();
    let paths: Vec<String> = model.linears().iter().map(|l| l.path.clone()).collect();
    for (k, (cfg, tensors)) in adapters.iter().enumerate() {
        cfg.validate()?;
        if tensors
            .keys()
            .any(|key| !key.contains(".lora_A.") && !key.contains(".lora_B."))
        {
            return Err(Error::Msg(format!(
                "adapter {k} carries trained modules besides LoRA (a head?): one base pass \
                 cannot serve per-adapter heads; serve it alone"
            )));
        }
        let mut found = 0;
        for path in &paths {
            let (ka, kb) = (
                peft_key(path, "lora_A.weight"),
                peft_key(path, "lora_B.weight"),
            );
            let (Some(a), Some(b)) = (tensors.get(&ka), tensors.get(&kb)) else {
                continue;
            };
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
        if found == 0 {
            return Err(Error::Msg(format!(
                "adapter {k} has no LoRA tensor for any linear layer of the model (another base?)"
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
            lin.deltas.push(Arc::new(MultiLora { branches }));
        }
    }
    Ok(n)
}
