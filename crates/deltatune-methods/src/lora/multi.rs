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
/// Each row gets exactly the numbers a model with its adapter alone gives it
/// ([`super::LoraLinear`] in a pass without gradients): the rows of each adapter in the batch
/// go through the same two row-by-row ops ([`deltatune_core::ops::lora_down`] and
/// [`deltatune_core::ops::lora_up_add`], scale applied the same way), and the results are put
/// back in place by copying rows. An earlier form stacked every adapter's matrices (ranks
/// padded, the scale folded into B) for two gathered batched products: fewer ops per batch,
/// but its rounding differed from the adapter alone and changed with the batch, so a greedy
/// answer from the server could differ from `generate`'s and from itself under other load.
#[derive(Debug)]
pub struct MultiLora {
    /// Per adapter: its branch here, if any.
    branches: Vec<Option<Branch>>,
}

/// `rows[i]`: the index of batch row `i`'s part in the rows of `groups`, for [`put_rows`].
type Groups = Vec<(usize, Vec<u32>)>;

/// The rows of each value of `rows` below `k` (adapters in first-row order), or `None` when
/// every row is outside `0..k`.
fn groups(rows: &[u32], k: usize) -> Option<Groups> {
    let mut out: Groups = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        if (r as usize) >= k {
            continue;
        }
        match out.iter_mut().find(|(a, _)| *a == r as usize) {
            Some((_, v)) => v.push(i as u32),
            None => out.push((r as usize, vec![i as u32])),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `base` with the rows listed in `parts` replaced by the rows of each part's tensor (copied,
/// so every row keeps its exact bits).
fn put_rows(base: Tensor, parts: Vec<(Vec<u32>, Tensor)>) -> candle_core::Result<Tensor> {
    let b = base.dim(0)?;
    let mut pick: Vec<u32> = (0..b as u32).collect();
    let mut all = vec![base];
    let mut at = b as u32;
    for (idx, t) in parts {
        for (j, &i) in idx.iter().enumerate() {
            pick[i as usize] = at + j as u32;
        }
        at += idx.len() as u32;
        all.push(t);
    }
    let dev = all[0].device().clone();
    let n = pick.len();
    Tensor::cat(&all, 0)?.index_select(&Tensor::from_vec(pick, (n,), &dev)?, 0)
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
        let with_branch: Vec<u32> = rows
            .iter()
            .map(|&r| match self.branches.get(r as usize) {
                Some(Some(_)) => r,
                _ => u32::MAX,
            })
            .collect();
        let Some(groups) = groups(&with_branch, self.branches.len()) else {
            return Ok(base);
        };
        let term = |k: usize, x: &Tensor, base: &Tensor| -> candle_core::Result<Tensor> {
            let br = self.branches[k]
                .as_ref()
                .expect("grouped rows have a branch");
            super::layer::lora_term(x, base, &br.a, &br.b, br.scale, ctx, |x| {
                deltatune_core::ops::lora_down(x, &br.a)
            })
        };
        // The whole batch on one adapter: no gathering.
        if groups.len() == 1 && groups[0].1.len() == b {
            return term(groups[0].0, x, &base);
        }
        let mut parts = Vec::with_capacity(groups.len());
        for (k, idx) in groups {
            let n = idx.len();
            let t = Tensor::from_vec(idx.clone(), (n,), x.device())?;
            let y = term(k, &x.index_select(&t, 0)?, &base.index_select(&t, 0)?)?;
            parts.push((idx, y));
        }
        put_rows(base, parts)
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
        let mut parts = Vec::new();
        for (k, head) in self.heads.iter().enumerate() {
            let Some((w, bias)) = head else { continue };
            let idx: Vec<u32> = (0..b as u32)
                .filter(|&i| rows[i as usize] == k as u32)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let n = idx.len();
            let t = Tensor::from_vec(idx.clone(), (n,), x.device())?;
            // The product the adapter's own model makes with the trained head.
            let y = deltatune_core::ops::frozen_linear(&x.index_select(&t, 0)?, w, bias.as_ref())?;
            parts.push((idx, y.to_dtype(base.dtype())?));
        }
        if parts.is_empty() {
            return Ok(base);
        }
        put_rows(base, parts)
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
            lin.deltas.push(Arc::new(MultiLora { branches }));
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
