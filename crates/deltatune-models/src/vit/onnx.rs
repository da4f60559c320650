//! A DINOv2 backbone read out of an ONNX export (PyTorch's exporter run on transformers'
//! `Dinov2Model`), under Hugging Face `Dinov2Model` key names and PyTorch layouts, so the result
//! saves as a folder transformers loads ([`convert_dinov2_onnx`]).
//!
//! The exporter keeps readable names for most parameters (`<prefix>encoder.layer.N.norm1.weight`,
//! `...attention.attention.query.bias`, `...layer_scale1.lambda1`) but replaces every linear
//! weight by an anonymous, already transposed `onnx::MatMul_<n>` initializer `[in, out]`, and
//! splits the position embeddings into two anonymous constants (the CLS position `[1, 1, H]`
//! and the `G x G` patch grid `[1, G*G, H]`, resized bicubically to the input's grid). They are
//! found by following the graph, never by their numeric suffixes:
//!
//! | Hugging Face key | found as |
//! |---|---|
//! | `encoder.layer.N.attention.attention.{query,key,value}.weight` | the MatMul whose output is added to that projection's named bias; its weight initializer `[in, out]`, transposed |
//! | `encoder.layer.N.attention.output.dense.weight`, `mlp.fc1.weight`, `mlp.fc2.weight` | the same, through their named biases |
//! | `embeddings.position_embeddings` `[1, 1+G*G, H]` | the constant concatenated before the resized grid (CLS position), then the constant the resize reads (the grid) |
//! | `embeddings.mask_token` `[1, H]` | not in an inference graph: zeros (transformers' own initial value; used only with `bool_masked_pos`) |
//! | everything else | the initializer of that name after the prefix (`backbone.` here) |
//!
//! Exports of transformers >= 5 name the attention biases after its modules
//! (`attention.q_proj.bias`, ..., `attention.o_proj.bias`); both spellings are read, and the
//! keys written are always the checkpoint's (`attention.attention.query`, ...,
//! `attention.output.dense`), which every transformers version loads.
//!
//! Each layer is then checked against the graph: query, key and value read the output of the
//! layer's `norm1`, query and key meet in the score product and value in the product after the
//! softmax, the output projection reads the attention, layer scale 1 and the residual add follow,
//! `norm2` reads that sum, `fc1` reads `norm2`, the activation between `fc1` and `fc2` is an
//! exact (erf) GELU, and layer N's input is layer N-1's output. The number of heads comes from
//! the reshape that splits the query into heads, the layer-norm epsilon from the norms, the patch
//! size from the patch convolution and the native image size from the grid. Anything else is an
//! error naming the node or initializer that does not fit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use deltatune_core::onnx::{AttrValue, OnnxModel};
use deltatune_core::{Error, Result};

mod graph;
use graph::{first, Graph};

/// What the graph says about the backbone; [`Dinov2OnnxConfig::to_hf_json`] writes
/// transformers' `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dinov2OnnxConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The MLP's inner width (`mlp_ratio * hidden_size`).
    pub intermediate_size: usize,
    pub patch_size: usize,
    /// The native resolution: the position grid times the patch size (518 for DINOv2).
    pub image_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    /// `gelu` (erf).
    pub hidden_act: String,
    /// The prefix of the backbone's initializer names in the ONNX file (`backbone.`).
    pub prefix: String,
    /// The ONNX value equal to transformers' `last_hidden_state` (after the final layernorm).
    pub last_hidden_state: String,
    /// Whether the file holds `embeddings.mask_token` (else it is zeros).
    pub mask_token_from_file: bool,
}

impl Dinov2OnnxConfig {
    /// transformers' `config.json` for `Dinov2Model`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["Dinov2Model"],
            "model_type": "dinov2",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "mlp_ratio": self.intermediate_size / self.hidden_size,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "layer_norm_eps": self.layer_norm_eps,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "qkv_bias": true,
            "layerscale_value": 1.0,
            "drop_path_rate": 0.0,
            "use_swiglu_ffn": false,
            "apply_layernorm": true,
            "reshape_hidden_states": true,
            "use_mask_token": true,
        })
    }
}

/// Reads the DINOv2 backbone of the ONNX file `path`: its configuration and every
/// `Dinov2Model` tensor by Hugging Face key, f32, PyTorch layouts (linear weights `[out, in]`).
pub fn dinov2_from_onnx(path: &Path) -> Result<(Dinov2OnnxConfig, BTreeMap<String, Tensor>)> {
    dinov2_from_onnx_model(&OnnxModel::open(path)?)
}

/// [`dinov2_from_onnx`] on a model already read.
pub fn dinov2_from_onnx_model(
    m: &OnnxModel,
) -> Result<(Dinov2OnnxConfig, BTreeMap<String, Tensor>)> {
    Graph::new(m).run()
}

/// Converts the ONNX file `onnx` into a Hugging Face folder `dir` (`config.json` and
/// `model.safetensors`, each written atomically; `dir` is created).
pub fn convert_dinov2_onnx(onnx: &Path, dir: &Path) -> Result<Dinov2OnnxConfig> {
    let (cfg, tensors) = dinov2_from_onnx(onnx)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let mut json = serde_json::to_vec_pretty(&cfg.to_hf_json())
        .map_err(|e| Error::Msg(format!("serialising config.json: {e}")))?;
    json.push(b'\n');
    deltatune_core::write_atomic(
        &dir.join("model.safetensors"),
        &deltatune_core::to_safetensors_bytes(&tensors)?,
    )?;
    deltatune_core::write_atomic(&dir.join("config.json"), &json)?;
    Ok(cfg)
}

/// Each linear layer of a block: its role, its Hugging Face checkpoint name and the module name
/// transformers >= 5 uses in memory (and so in its ONNX exports).
const PROJECTIONS: [(&str, &str, &str); 6] = [
    ("query", "attention.attention.query", "attention.q_proj"),
    ("key", "attention.attention.key", "attention.k_proj"),
    ("value", "attention.attention.value", "attention.v_proj"),
    ("output", "attention.output.dense", "attention.o_proj"),
    ("fc1", "mlp.fc1", "mlp.fc1"),
    ("fc2", "mlp.fc2", "mlp.fc2"),
];

impl Graph<'_> {
    fn run(&self) -> Result<(Dinov2OnnxConfig, BTreeMap<String, Tensor>)> {
        // The prefix: whatever precedes `embeddings.cls_token`.
        let cls: Vec<&str> = self
            .m
            .initializer_names()
            .filter(|n| n.ends_with("embeddings.cls_token"))
            .collect();
        let cls_name = match cls.as_slice() {
            [one] => one.to_string(),
            [] => {
                let some: Vec<&str> = self.m.initializer_names().take(8).collect();
                return Err(self.err(format!(
                    "no initializer named `<prefix>embeddings.cls_token` (the export of a \
                     transformers Dinov2Model keeps that name); the first initializers are {some:?}"
                )));
            }
            many => return Err(self.err(format!("several CLS tokens: {many:?}"))),
        };
        let p = cls_name[..cls_name.len() - "embeddings.cls_token".len()].to_string();
        let cls_dims = self.init_dims(&cls_name, "the CLS token")?;
        let [1, 1, hidden] = cls_dims.as_slice() else {
            return Err(self.err(format!(
                "the CLS token `{cls_name}` is {cls_dims:?}, expected [1, 1, hidden]"
            )));
        };
        let hidden = *hidden;
        let mut map: BTreeMap<String, String> = BTreeMap::new(); // HF key -> initializer (named)
        let mut transposed: BTreeMap<String, String> = BTreeMap::new(); // HF key -> [in, out]
        map.insert("embeddings.cls_token".into(), cls_name.clone());

        // Patch embedding.
        let proj_w = format!("{p}embeddings.patch_embeddings.projection.weight");
        let proj_dims = self.init_dims(&proj_w, "the patch embedding")?;
        let [h, channels, ph, pw] = proj_dims.as_slice() else {
            return Err(self.err(format!(
                "`{proj_w}` is {proj_dims:?}, expected [hidden, channels, patch, patch]"
            )));
        };
        if *h != hidden || ph != pw {
            return Err(self.err(format!(
                "`{proj_w}` is {proj_dims:?}, expected [{hidden}, channels, patch, patch]"
            )));
        }
        let (channels, patch) = (*channels, *ph);
        let conv = self.only_consumer(&proj_w, "Conv", "the patch embedding")?;
        for attr in ["strides", "kernel_shape"] {
            if let Some(AttrValue::Ints(v)) = self.node(conv).attribute(attr) {
                if v.iter().any(|&s| s != patch as i64) {
                    return Err(self.err(format!(
                        "the patch convolution {} has {attr} {v:?}, expected [{patch}, {patch}]",
                        self.show(conv)
                    )));
                }
            }
        }
        let proj_b = format!("{p}embeddings.patch_embeddings.projection.bias");
        self.init_with(&proj_b, &[hidden], "the patch embedding bias")?;
        map.insert(
            "embeddings.patch_embeddings.projection.weight".into(),
            proj_w,
        );
        map.insert("embeddings.patch_embeddings.projection.bias".into(), proj_b);

        // Layers, following the residual stream.
        let layer = |i: usize, s: &str| format!("{p}encoder.layer.{i}.{s}");
        let mut n_layers = 0;
        while self
            .m
            .initializer(&layer(n_layers, "norm1.weight"))
            .is_some()
        {
            n_layers += 1;
        }
        if n_layers == 0 {
            return Err(self.err(format!(
                "no `{}`: no encoder layers",
                layer(0, "norm1.weight")
            )));
        }
        let mut x: Option<String> = None; // the residual stream entering the layer
        let mut first_input = String::new();
        let (mut eps, mut heads, mut inner) = (None::<f64>, None::<usize>, None::<usize>);
        let mut act = String::new();
        for i in 0..n_layers {
            let what = format!("layer {i}");
            let what = what.as_str();
            let key = |s: &str| format!("encoder.layer.{i}.{s}");
            let ln1 = self.layer_norm(&layer(i, "norm1.weight"), &layer(i, "norm1.bias"), what)?;
            match &x {
                Some(x) if *x != ln1.input => {
                    return Err(self.err(format!(
                        "{what}: norm1 reads `{}`, not the previous layer's output `{x}`",
                        ln1.input
                    )))
                }
                Some(_) => {}
                None => first_input = ln1.input.clone(),
            }
            let x_in = ln1.input.clone();
            let mut norms = vec![ln1.eps];
            let mut lins = BTreeMap::new();
            for (role, proj, module) in PROJECTIONS {
                // transformers >= 5 exports its module names (`attention.q_proj`); the file
                // format, and older exports, use the checkpoint names.
                let found = [proj, module]
                    .into_iter()
                    .find(|n| {
                        self.m
                            .initializer(&layer(i, &format!("{n}.bias")))
                            .is_some()
                    })
                    .unwrap_or(proj);
                let bias = layer(i, &format!("{found}.bias"));
                let lin = self.linear(&bias, &format!("{what} {proj}"))?;
                map.insert(key(&format!("{proj}.bias")), bias);
                transposed.insert(key(&format!("{proj}.weight")), lin.weight.clone());
                lins.insert(role, lin);
            }
            let (q, k, v, o) = (
                &lins["query"],
                &lins["key"],
                &lins["value"],
                &lins["output"],
            );
            for l in [q, k, v] {
                if l.input != ln1.output {
                    return Err(self.err(format!(
                        "{what}: {} reads `{}`, not norm1's output `{}`",
                        self.show(l.node),
                        l.input,
                        ln1.output
                    )));
                }
                if l.dims != [hidden, hidden] {
                    return Err(self.err(format!(
                        "{what}: `{}` is {:?}, expected [{hidden}, {hidden}]",
                        l.weight, l.dims
                    )));
                }
            }
            // Query and key meet in the scores, value after the softmax, then the output.
            let (scores, qs, q_path) = self.forward_to_matmul(&q.output, what)?;
            let (scores_k, ks, _) = self.forward_to_matmul(&k.output, what)?;
            let (mixed, vs, _) = self.forward_to_matmul(&v.output, what)?;
            if scores != scores_k || qs != 0 || ks != 1 || vs != 1 || mixed == scores {
                return Err(self.err(format!(
                    "{what}: query and key should be the first and second operand of one product \
                     and value the second of another; found query -> {} input {qs}, key -> {} \
                     input {ks}, value -> {} input {vs}",
                    self.show(scores),
                    self.show(scores_k),
                    self.show(mixed)
                )));
            }
            let probs = first(&self.node(mixed).inputs);
            let through = self.ops_between(first(&self.node(scores).outputs), probs, what)?;
            if !through.iter().any(|op| op == "Softmax") {
                return Err(self.err(format!(
                    "{what}: no Softmax between the scores {} and {}",
                    self.show(scores),
                    self.show(mixed)
                )));
            }
            let (dense, ds, _) = self.forward_to_matmul(first(&self.node(mixed).outputs), what)?;
            if dense != o.node || ds != 0 || o.dims != [hidden, hidden] {
                return Err(self.err(format!(
                    "{what}: the attention output should feed the output projection {}; it \
                     feeds {}",
                    self.show(o.node),
                    self.show(dense)
                )));
            }
            // Heads: the reshape that splits the query into [.., heads, head_dim].
            let split = q_path
                .iter()
                .find(|&&n| self.node(n).op_type == "Reshape")
                .and_then(|&n| self.node(n).inputs.get(1))
                .map(|s| self.shape_values(s))
                .unwrap_or_default();
            let nh = match split.as_slice() {
                [.., Some(nh), Some(hd)] if *nh > 0 && *hd > 0 && (nh * hd) as usize == hidden => {
                    *nh as usize
                }
                // transformers >= 5: `view(.., -1, head_dim)`.
                [.., Some(-1), Some(hd)] if *hd > 0 && hidden % *hd as usize == 0 => {
                    hidden / *hd as usize
                }
                _ => {
                    return Err(self.err(format!(
                        "{what}: cannot tell the number of heads: the reshape after the query \
                         projection has target {split:?}, expected [.., heads, head_dim] with \
                         heads * head_dim = {hidden}"
                    )))
                }
            };
            // Layer scale 1 and the residual.
            let r1 = self.scaled_residual(
                &layer(i, "layer_scale1.lambda1"),
                &o.output,
                &x_in,
                hidden,
                what,
            )?;
            map.insert(
                key("layer_scale1.lambda1"),
                layer(i, "layer_scale1.lambda1"),
            );
            let ln2 = self.layer_norm(&layer(i, "norm2.weight"), &layer(i, "norm2.bias"), what)?;
            if ln2.input != r1 {
                return Err(self.err(format!(
                    "{what}: norm2 reads `{}`, not the attention residual `{r1}`",
                    ln2.input
                )));
            }
            norms.push(ln2.eps);
            let (fc1, fc2) = (&lins["fc1"], &lins["fc2"]);
            if fc1.input != ln2.output || fc1.dims[0] != hidden || fc2.dims != [fc1.dims[1], hidden]
            {
                return Err(self.err(format!(
                    "{what}: fc1 `{}` {:?} should read norm2's output `{}` and fc2 `{}` {:?} its \
                     activation",
                    fc1.weight, fc1.dims, ln2.output, fc2.weight, fc2.dims
                )));
            }
            let ops = self.ops_between(&fc1.output, &fc2.input, what)?;
            let exact_gelu = |o: &String| o == "Erf";
            let gelu_node = self.gelu_node(&fc1.output, &fc2.input);
            let this_act = if ops.iter().any(exact_gelu) || gelu_node {
                "gelu"
            } else {
                return Err(self.err(format!(
                    "{what}: the activation between fc1 and fc2 is made of {ops:?}; only the exact \
                     (erf) GELU of DINOv2 is known"
                )));
            };
            let x_out = self.scaled_residual(
                &layer(i, "layer_scale2.lambda1"),
                &fc2.output,
                &r1,
                hidden,
                what,
            )?;
            map.insert(
                key("layer_scale2.lambda1"),
                layer(i, "layer_scale2.lambda1"),
            );
            for s in ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"] {
                self.init_with(&layer(i, s), &[hidden], what)?;
                map.insert(key(s), layer(i, s));
            }
            // Every layer must agree.
            for (name, old, new) in [
                ("heads", heads.map(|h| h as f64), nh as f64),
                ("MLP width", inner.map(|w| w as f64), fc1.dims[1] as f64),
            ] {
                if old.is_some_and(|o| o != new) {
                    return Err(self.err(format!(
                        "{what}: {name} {new} differs from earlier layers ({})",
                        old.unwrap_or_default()
                    )));
                }
            }
            for e in norms {
                if eps.is_some_and(|old| (old - e).abs() > 1e-3 * old.abs()) {
                    return Err(self.err(format!(
                        "{what}: layer norm epsilon {e} differs from earlier norms ({eps:?})"
                    )));
                }
                eps.get_or_insert(e);
            }
            if !act.is_empty() && act != this_act {
                return Err(self.err(format!("{what}: activation {this_act} differs from {act}")));
            }
            act = this_act.to_string();
            heads = Some(nh);
            inner = Some(fc1.dims[1]);
            x = Some(x_out);
        }
        let x = x.expect("at least one layer");
        let extra: Vec<String> = self
            .m
            .initializer_names()
            .filter(|n| n.starts_with(&format!("{p}encoder.layer.{n_layers}.")))
            .map(str::to_string)
            .collect();
        if !extra.is_empty() {
            return Err(self.err(format!("layer {n_layers} has no norm1 but has {extra:?}")));
        }

        // Final layer norm.
        let (lnw, lnb) = (format!("{p}layernorm.weight"), format!("{p}layernorm.bias"));
        let lnf = self.layer_norm(&lnw, &lnb, "the final layernorm")?;
        if lnf.input != x {
            return Err(self.err(format!(
                "the final layernorm reads `{}`, not the last layer's output `{x}`",
                lnf.input
            )));
        }
        let eps = eps.expect("at least one norm");
        if (lnf.eps - eps).abs() > 1e-3 * eps.abs() {
            return Err(self.err(format!(
                "the final layernorm's epsilon {} differs from the layers' {eps}",
                lnf.eps
            )));
        }
        self.init_with(&lnw, &[hidden], "the final layernorm")?;
        self.init_with(&lnb, &[hidden], "the final layernorm")?;
        map.insert("layernorm.weight".into(), lnw);
        map.insert("layernorm.bias".into(), lnb);

        // Position embeddings: the side of the embedding sum that does not hold the tokens.
        let pos = self.position_embeddings(&first_input, &cls_name, hidden)?;
        let grid = pos.grid;

        let mask_name = format!("{p}embeddings.mask_token");
        let has_mask = self.m.initializer(&mask_name).is_some();
        if has_mask {
            self.init_with(&mask_name, &[1, hidden], "the mask token")?;
            map.insert("embeddings.mask_token".into(), mask_name);
        }

        // Every backbone initializer must have found its place.
        let mut used = BTreeSet::new();
        for name in map
            .values()
            .chain(transposed.values())
            .chain(pos.used.iter())
        {
            used.insert(name.clone());
        }
        let unused: Vec<&str> = self
            .m
            .initializer_names()
            .filter(|n| n.starts_with(&p) && !used.contains(*n))
            .collect();
        if !unused.is_empty() {
            return Err(self.err(format!(
                "backbone initializers with no place in Dinov2Model: {unused:?} (register tokens \
                 or SwiGLU MLPs are not supported)"
            )));
        }

        let intermediate = inner.expect("at least one layer");
        if intermediate % hidden != 0 {
            return Err(self.err(format!(
                "the MLP width {intermediate} is not a whole multiple of the width {hidden} \
                 (transformers' Dinov2Config has an integer-valued mlp_ratio here)"
            )));
        }
        // The epsilon as written in the config: the shortest decimal of the f32 constant.
        let eps = format!("{}", eps as f32).parse::<f64>().unwrap_or(eps);
        let cfg = Dinov2OnnxConfig {
            hidden_size: hidden,
            num_hidden_layers: n_layers,
            num_attention_heads: heads.expect("at least one layer"),
            intermediate_size: intermediate,
            patch_size: patch,
            image_size: grid * patch,
            num_channels: channels,
            layer_norm_eps: eps,
            hidden_act: act,
            prefix: p,
            last_hidden_state: lnf.output,
            mask_token_from_file: has_mask,
        };

        let mut tensors = BTreeMap::new();
        for (key, name) in &map {
            tensors.insert(key.clone(), self.m.tensor(name)?);
        }
        for (key, name) in &transposed {
            tensors.insert(key.clone(), self.m.tensor(name)?.t()?.contiguous()?);
        }
        tensors.insert("embeddings.position_embeddings".into(), pos.tensor);
        if !has_mask {
            tensors.insert(
                "embeddings.mask_token".into(),
                Tensor::zeros((1, hidden), DType::F32, &Device::Cpu)?,
            );
        }
        Ok((cfg, tensors))
    }

    /// `embeddings.position_embeddings` `[1, 1 + G*G, hidden]` from the embedding sum that
    /// writes `x0` (layer 0's input).
    fn position_embeddings(&self, x0: &str, cls: &str, hidden: usize) -> Result<PosEmb> {
        let what = "the position embeddings";
        let add = self.expect_producer(x0, "Add", what)?;
        let [a, b] = self.two_inputs(add, what)?;
        let pos = match (self.derives_from(a, cls, 8), self.derives_from(b, cls, 8)) {
            (true, false) => b,
            (false, true) => a,
            _ => {
                return Err(self.err(format!(
                    "{what}: exactly one input of {} should hold the CLS token `{cls}`",
                    self.show(add)
                )))
            }
        };
        let square = |n: usize| {
            let g = (n as f64).sqrt().round() as usize;
            (g * g == n).then_some(g)
        };
        // Not resized (exported at the native size): one constant [1, 1+G*G, hidden].
        if let Some(t) = self.m.constant(pos) {
            let dims = t.shape();
            if let [1, n, h] = dims.as_slice() {
                if let (Some(g), true) = (n.checked_sub(1).and_then(square), *h == hidden) {
                    let values = self.m.weight_values(t)?;
                    return Ok(PosEmb {
                        tensor: Tensor::from_vec(values, (1, *n, hidden), &Device::Cpu)?,
                        grid: g,
                        used: vec![t.name.clone()],
                    });
                }
            }
            return Err(self.err(format!(
                "{what}: `{pos}` is {dims:?}, expected [1, 1 + G*G, {hidden}]"
            )));
        }
        // Resized: Concat(CLS position [1, 1, hidden], resize(grid [1, G*G, hidden])).
        let cat = self.expect_producer(pos, "Concat", what)?;
        let [cls_pos, patches] = self.two_inputs(cat, what)?;
        let cls_t = self
            .m
            .constant(cls_pos)
            .filter(|t| t.shape() == [1, 1, hidden])
            .ok_or_else(|| {
                self.err(format!(
                "{what}: the first input `{cls_pos}` of {} should be a constant [1, 1, {hidden}] \
                 (the CLS position)",
                self.show(cat)
            ))
            })?;
        let mut cur = patches.to_string();
        for _ in 0..16 {
            if let Some(t) = self.m.constant(&cur) {
                let dims = t.shape();
                let n = dims.iter().product::<usize>() / hidden.max(1);
                let (Some(g), Some(&h)) = (square(n), dims.last()) else {
                    return Err(self.err(format!(
                        "{what}: the grid `{cur}` is {dims:?}, not G*G x {hidden}"
                    )));
                };
                if h != hidden || n * hidden != dims.iter().product::<usize>() {
                    return Err(self.err(format!(
                        "{what}: the grid `{cur}` is {dims:?}, not G*G x {hidden}"
                    )));
                }
                let mut values = self.m.weight_values(cls_t)?;
                values.extend(self.m.weight_values(t)?);
                return Ok(PosEmb {
                    tensor: Tensor::from_vec(values, (1, 1 + n, hidden), &Device::Cpu)?,
                    grid: g,
                    used: vec![cls_t.name.clone(), t.name.clone()],
                });
            }
            let Some(i) = self.producer_of(&cur) else {
                break;
            };
            let n = self.node(i);
            if n.op_type == "Resize" {
                match n.attribute("mode") {
                    Some(AttrValue::String(m)) if m == b"cubic" => {}
                    m => {
                        return Err(self.err(format!(
                            "{what}: {} resizes the grid with mode {m:?}; transformers' Dinov2 \
                             resizes bicubically, so the converted model would differ",
                            self.show(i)
                        )))
                    }
                }
            }
            cur = n.inputs.first().cloned().unwrap_or_default();
        }
        Err(self.err(format!(
            "{what}: no constant grid found within 16 nodes before `{patches}`"
        )))
    }
}

/// The position embeddings, the grid side `G` and the initializers read.
struct PosEmb {
    tensor: Tensor,
    grid: usize,
    used: Vec<String>,
}
