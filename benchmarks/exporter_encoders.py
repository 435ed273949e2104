"""The encoder and vision files of ``exporters.py`` (issue 21): tiny random-weight Hugging Face
models, each exported by optimum for its natural task.

``name: (config class, config, model class, optimum task)``; text models take the 512-token
vocabulary of the BERT there, vision models 32 x 32 images (an image processor of that size is
saved beside them, as optimum reads one). Sizes: width 64, 4 heads, FFN 256, 2 layers for text
(ALBERT's one layer shared by both, with 32-wide embeddings; MobileBERT's 32-wide bottleneck);
DeiT 48 wide with 4 heads; Swin and ConvNeXt two stages; MobileViT three transformer stages.
"""
from __future__ import annotations

from pathlib import Path

TEXT = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": 128}
ENCODERS = {
    "distilbert-optimum": ("DistilBertConfig", {
        "vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 256,
        "max_position_embeddings": 128}, "DistilBertModel", "feature-extraction"),
    "roberta-optimum": ("RobertaConfig", TEXT, "RobertaModel", "feature-extraction"),
    "albert-optimum": ("AlbertConfig", {**TEXT, "embedding_size": 32}, "AlbertModel",
                       "feature-extraction"),
    "deberta-v2-optimum": ("DebertaV2Config", {
        **TEXT, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
        "position_buckets": 32}, "DebertaV2Model", "feature-extraction"),
    "electra-optimum": ("ElectraConfig", {**TEXT, "embedding_size": 32}, "ElectraModel",
                        "feature-extraction"),
    "mobilebert-optimum": ("MobileBertConfig", {
        **TEXT, "intermediate_size": 64, "intra_bottleneck_size": 32, "embedding_size": 32,
        "true_hidden_size": 32, "num_feedforward_networks": 2}, "MobileBertModel",
        "feature-extraction"),
    "swin-optimum": ("SwinConfig", {
        "image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [2, 2],
        "num_heads": [2, 4], "window_size": 4, "num_labels": 10},
        "SwinForImageClassification", "image-classification"),
    "convnext-optimum": ("ConvNextConfig", {
        "image_size": 32, "hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2,
        "num_labels": 10}, "ConvNextForImageClassification", "image-classification"),
    "deit-optimum": ("DeiTConfig", {
        "image_size": 32, "patch_size": 8, "hidden_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 96, "num_labels": 10},
        "DeiTForImageClassification", "image-classification"),
    "mobilevit-optimum": ("MobileViTConfig", {
        "image_size": 32, "hidden_sizes": [32, 48, 64],
        "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], "num_labels": 10},
        "MobileViTForImageClassification", "image-classification"),
}


def build_encoder(name: str, folder: Path) -> None:
    """``save_pretrained`` of ``ENCODERS[name]`` into ``folder`` (seeded by the caller)."""
    import transformers

    config_class, config, model_class, task = ENCODERS[name]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    model.eval().save_pretrained(folder)
    if task == "image-classification":
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
