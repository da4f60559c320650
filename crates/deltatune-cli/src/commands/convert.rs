//! `deltatune convert --onnx FILE -o DIR`: a DINOv2 backbone exported to ONNX, written as a
//! Hugging Face `Dinov2Model` folder (config.json, model.safetensors) that transformers loads.

use std::path::Path;

use anyhow::{Context, Result};
use deltatune_train::artifact::{check_output_folder, OutputRules, Staging};

pub fn convert(onnx: &Path, output: &Path, overwrite: bool) -> Result<()> {
    // Checked before reading (nothing is created until the conversion succeeded).
    let rules = OutputRules::new("--output", overwrite).input("--onnx", onnx);
    check_output_folder(output, &rules)?;
    let (cfg, tensors) = deltatune_models::vit::dinov2_from_onnx(onnx)
        .with_context(|| format!("converting {}", onnx.display()))?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let staging = Staging::create(output, &rules)?;
    staging.write_json("config.json", &cfg.to_hf_json())?;
    staging.write(
        "model.safetensors",
        &deltatune_core::to_safetensors_bytes(&tensors)?,
    )?;
    let dir = staging.commit()?;
    println!(
        "wrote {}: Dinov2Model, {} layers, width {}, {} heads, MLP {}, patch {}, image {} \
         ({} tensors, {:.1}M parameters; embeddings.mask_token {})",
        dir.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        cfg.patch_size,
        cfg.image_size,
        tensors.len(),
        params as f64 / 1e6,
        if cfg.mask_token_from_file {
            "from the file"
        } else {
            "zeros (not in the ONNX graph)"
        }
    );
    Ok(())
}
