"""Original Grounding-DINO ``.pth`` weights into ``GroundingDinoForObjectDetection``.

The renames follow the conversion that transformers documents for Grounding-DINO
(``convert_grounding_dino_to_hf.py``): the Swin backbone's fused ``qkv`` and every
``nn.MultiheadAttention``'s ``in_proj`` are split into query, key and value; the original's
``backbone.0.norm{1,2,3}`` become the backbone's stage norms; the rest are renames. Tied copies
(the decoder's box heads under both names) map onto both of transformers' names. With the
converted weights the transformers backend (``grounding_dino``) gives the original's boxes
(``tests/annotate/detectors/test_compat_groundingdino.py`` checks it on a tiny SwinT-OGC
model).

    python -m annotate.detectors.grounding_dino_convert groundingdino_swint_ogc.pth \\
        --model swint_ogc --tokenizer path/to/bert-base-uncased --out models/grounding-dino
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

BACKBONE = "model.backbone.conv_encoder.model"
SWIN = f"{BACKBONE}.swin"
# the two released architectures (values of the transformers conversion script)
PRESETS = {
    "swint_ogc": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swinb_cogcoor": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12
    ),
}

_RULES = [
    (r"backbone\.0\.patch_embed\.proj\.(.+)", rf"{SWIN}.embeddings.patch_embeddings.projection.\1"),
    (r"backbone\.0\.patch_embed\.norm\.(.+)", rf"{SWIN}.embeddings.norm.\1"),
    (
        r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.(.+)",
        rf"{SWIN}.encoder.layers.\1.blocks.\2.layernorm_before.\3",
    ),
    (
        r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.(.+)",
        rf"{SWIN}.encoder.layers.\1.blocks.\2.layernorm_after.\3",
    ),
    (
        r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
        rf"{SWIN}.encoder.layers.\1.blocks.\2.attention.relative_position_bias"
        ".relative_position_bias_table",
    ),
    (
        r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.(.+)",
        rf"{SWIN}.encoder.layers.\1.blocks.\2.attention.o_proj.\3",
    ),
    (
        r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc[12])\.(.+)",
        rf"{SWIN}.encoder.layers.\1.blocks.\2.mlp.\3.\4",
    ),
    (r"backbone\.0\.layers\.(\d+)\.downsample\.(.+)", rf"{SWIN}.encoder.layers.\1.downsample.\2"),
    (r"bert\.(.+)", r"model.text_backbone.\1"),
    (r"feat_map\.(.+)", r"model.text_projection.\1"),
    (r"input_proj\.(.+)", r"model.input_proj_vision.\1"),
    (r"transformer\.level_embed", "model.level_embed"),
    (r"transformer\.tgt_embed\.weight", "model.query_position_embeddings.weight"),
    (r"transformer\.(enc_output|enc_output_norm)\.(.+)", r"model.\1.\2"),
    (r"transformer\.enc_out_bbox_embed\.(.+)", r"model.encoder_output_bbox_embed.\1"),
    (r"transformer\.decoder\.norm\.(.+)", r"model.decoder.layer_norm.\1"),
    (r"transformer\.decoder\.ref_point_head\.(.+)", r"model.decoder.reference_points_head.\1"),
    # encoder: deformable image layers, text enhancer layers, fusion layers
    (
        r"transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)",
        r"model.encoder.layers.\1.deformable_layer.self_attn.\2",
    ),
    (
        r"transformer\.encoder\.layers\.(\d+)\.norm1\.(.+)",
        r"model.encoder.layers.\1.deformable_layer.self_attn_layer_norm.\2",
    ),
    (
        r"transformer\.encoder\.layers\.(\d+)\.norm2\.(.+)",
        r"model.encoder.layers.\1.deformable_layer.final_layer_norm.\2",
    ),
    (
        r"transformer\.encoder\.layers\.(\d+)\.linear([12])\.(.+)",
        r"model.encoder.layers.\1.deformable_layer.fc\2.\3",
    ),
    (
        r"transformer\.encoder\.text_layers\.(\d+)\.self_attn\.out_proj\.(.+)",
        r"model.encoder.layers.\1.text_enhancer_layer.self_attn.out_proj.\2",
    ),
    (
        r"transformer\.encoder\.text_layers\.(\d+)\.linear([12])\.(.+)",
        r"model.encoder.layers.\1.text_enhancer_layer.fc\2.\3",
    ),
    (
        r"transformer\.encoder\.text_layers\.(\d+)\.norm1\.(.+)",
        r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_before.\2",
    ),
    (
        r"transformer\.encoder\.text_layers\.(\d+)\.norm2\.(.+)",
        r"model.encoder.layers.\1.text_enhancer_layer.layer_norm_after.\2",
    ),
    (
        r"transformer\.encoder\.fusion_layers\.(\d+)\.gamma_v",
        r"model.encoder.layers.\1.fusion_layer.vision_param",
    ),
    (
        r"transformer\.encoder\.fusion_layers\.(\d+)\.gamma_l",
        r"model.encoder.layers.\1.fusion_layer.text_param",
    ),
    (
        r"transformer\.encoder\.fusion_layers\.(\d+)\.layer_norm_v\.(.+)",
        r"model.encoder.layers.\1.fusion_layer.layer_norm_vision.\2",
    ),
    (
        r"transformer\.encoder\.fusion_layers\.(\d+)\.layer_norm_l\.(.+)",
        r"model.encoder.layers.\1.fusion_layer.layer_norm_text.\2",
    ),
    (
        r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.(out_)?v_proj\.(.+)",
        r"model.encoder.layers.\1.fusion_layer.attn.\2vision_proj.\3",
    ),
    (
        r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.(out_)?l_proj\.(.+)",
        r"model.encoder.layers.\1.fusion_layer.attn.\2text_proj.\3",
    ),
    (
        r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.values_v_proj\.(.+)",
        r"model.encoder.layers.\1.fusion_layer.attn.values_vision_proj.\2",
    ),
    (
        r"transformer\.encoder\.fusion_layers\.(\d+)\.attn\.values_l_proj\.(.+)",
        r"model.encoder.layers.\1.fusion_layer.attn.values_text_proj.\2",
    ),
    # decoder layers
    (
        r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.(.+)",
        r"model.decoder.layers.\1.encoder_attn.\2",
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.norm1\.(.+)",
        r"model.decoder.layers.\1.encoder_attn_layer_norm.\2",
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.ca_text\.out_proj\.(.+)",
        r"model.decoder.layers.\1.encoder_attn_text.out_proj.\2",
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.catext_norm\.(.+)",
        r"model.decoder.layers.\1.encoder_attn_text_layer_norm.\2",
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)",
        r"model.decoder.layers.\1.self_attn.out_proj.\2",
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.norm2\.(.+)",
        r"model.decoder.layers.\1.self_attn_layer_norm.\2",
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.linear([12])\.(.+)",
        r"model.decoder.layers.\1.fc\2.\3",
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.norm3\.(.+)",
        r"model.decoder.layers.\1.final_layer_norm.\2",
    ),
]
# fused projections, split in three along the output dimension
_SPLITS = [
    (
        r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
        rf"{SWIN}.encoder.layers.\1.blocks.\2.attention.{{}}_proj.\3",
        ("q", "k", "v"),
    ),
    (
        r"transformer\.encoder\.text_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
        r"model.encoder.layers.\1.text_enhancer_layer.self_attn.{}.\2",
        ("query", "key", "value"),
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.ca_text\.in_proj_(weight|bias)",
        r"model.decoder.layers.\1.encoder_attn_text.{}.\2",
        ("query", "key", "value"),
    ),
    (
        r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
        r"model.decoder.layers.\1.self_attn.{}.\2",
        ("query", "key", "value"),
    ),
]
# shared box head: one module under two names in both codebases
_BOX_HEAD = r"(?:transformer\.decoder\.)?bbox_embed\.(\d+)\.(.+)"
_IGNORED = r"bert\.pooler\..+|.*relative_position_index|.*attn_mask|bert\.embeddings\.position_ids"


def convert_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original state dict (``checkpoint["model"]``) -> transformers' keys; unknown keys raise."""
    out, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if re.fullmatch(_IGNORED, key):
            continue
        if match := re.fullmatch(r"backbone\.0\.norm(\d)\.(.+)", key):
            stage, kind = match.groups()
            out[f"{BACKBONE}.hidden_states_norms.stage{int(stage) + 1}.{kind}"] = value
        elif match := re.fullmatch(_BOX_HEAD, key):
            for name in ("bbox_embed", "model.decoder.bbox_embed"):
                out[f"{name}.{match.group(1)}.{match.group(2)}"] = value
        elif split := next((s for s in _SPLITS if re.fullmatch(s[0], key)), None):
            pattern, target, names = split
            base = re.fullmatch(pattern, key).expand(target)
            for name, part in zip(names, value.chunk(3, dim=0), strict=True):
                out[base.format(name)] = part
        elif rule := next((r for r in _RULES if re.fullmatch(r[0], key)), None):
            out[re.fullmatch(rule[0], key).expand(rule[1])] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown keys in the Grounding-DINO weights: {unknown[:5]}")
    return out


def convert_checkpoint(checkpoint: Path, preset: str, tokenizer: Path, out: Path) -> Path:
    """Writes a ``GroundingDinoForObjectDetection`` directory with its processor to ``out``."""
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    image_size = 224 if preset == "swint_ogc" else 384
    backbone = SwinConfig(**PRESETS[preset], image_size=image_size, out_indices=[2, 3, 4])
    config = GroundingDinoConfig(backbone_config=backbone, text_config=BertConfig())
    model = GroundingDinoForObjectDetection(config)
    missing, _ = model.load_state_dict(
        convert_original_state(state.get("model", state)), strict=False
    )
    untied = [k for k in missing if not re.search(r"bbox_embed\.\d+\.|swin\.layernorm\.", k)]
    if untied:
        raise ValueError(f"{checkpoint} lacks {len(untied)} weights, e.g. {untied[:3]}")
    model.save_pretrained(out)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(),
        tokenizer=BertTokenizerFast.from_pretrained(tokenizer),
    )
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="the original .pth")
    parser.add_argument("--model", choices=sorted(PRESETS), default="swint_ogc")
    parser.add_argument("--tokenizer", type=Path, required=True, help="bert-base-uncased dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"wrote {convert_checkpoint(args.checkpoint, args.model, args.tokenizer, args.out)}")


if __name__ == "__main__":
    main()
