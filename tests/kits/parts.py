"""Small model parts in the layouts their real producers publish, built at test time.

* timm hub folders as Prov-GigaPath, UNI and Virchow publish them (``config.json`` with ``architecture``,
  ``model_args``, ``pretrained_cfg``; ``pytorch_model.bin`` or ``model.safetensors``), tiny widths, and of
  any other timm architecture;
* Prov-GigaPath's ``slide_encoder.pth`` (``{"model": state_dict}`` of the LongNet slide encoder);
* a merged LLaVA-1.5 folder (``LlavaLlamaForCausalLM`` config, sharded safetensors + index);
* the Hugging Face hub cache (``models--ORG--NAME/{blobs,refs,snapshots}``) as ``huggingface_hub`` writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

LFS_SUFFIXES = (".bin", ".safetensors", ".pth", ".pt", ".model")
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _pretrained_cfg(interpolation: str, crop_pct: float, tag: str = "", **extra) -> dict:
    return {
        "tag": tag,
        "custom_load": False,
        "input_size": [3, 224, 224],
        "fixed_input_size": True,
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "crop_mode": "center",
        **IMAGENET,
        "num_classes": 0,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **extra,
    }


def _save_timm(
    folder: Path, arch: str, model_args: dict, cfg: dict, weights: str, seed: int, **create
) -> Path:
    import timm
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **model_args, **create).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(folder / "model.safetensors"))
    else:
        torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(
        json.dumps({"architecture": arch, **cfg, "model_args": model_args}, indent=2)
    )
    return folder


def make_timm_folder(folder: Path, arch: str, model_args: dict, seed: int = 4, weights: str = "bin") -> Path:
    """A timm hub folder of any architecture (``model_args`` as its config.json holds them), bicubic, crop 1."""
    cfg = {"num_classes": 0, "pretrained_cfg": _pretrained_cfg("bicubic", 1.0)}
    return _save_timm(folder, arch, model_args, cfg, weights, seed)


def make_gigapath_folder(
    folder: Path, embed_dim: int = 96, depth: int = 2, seed: int = 0, weights: str = "bin"
):
    """Prov-GigaPath's hub folder layout (``vit_giant_patch14_dinov2``, patch 16, SwiGLU), tiny widths."""
    args = {
        "img_size": 224,
        "in_chans": 3,
        "patch_size": 16,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": 2,
        "init_values": 1e-05,
        "mlp_ratio": 5.33334,
        "num_classes": 0,
    }
    cfg = {
        "num_classes": 0,
        "num_features": embed_dim,
        "global_pool": "token",
        "pretrained_cfg": _pretrained_cfg("bicubic", 0.875, license="prov-gigapath"),
    }
    return _save_timm(folder, "vit_giant_patch14_dinov2", args, cfg, weights, seed)


def make_uni_folder(folder: Path, embed_dim: int = 64, seed: int = 1, weights: str = "bin") -> Path:
    """UNI's hub folder layout (``vit_large_patch16_224``, bilinear, crop_pct 1), tiny widths."""
    args = {
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": embed_dim,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1e-5,
        "num_classes": 0,
        "dynamic_img_size": True,
    }
    cfg = {
        "num_classes": 0,
        "num_features": embed_dim,
        "global_pool": "token",
        "pretrained_cfg": _pretrained_cfg("bilinear", 1.0, tag="uni_mass100k"),
    }
    return _save_timm(folder, "vit_large_patch16_224", args, cfg, weights, seed)


def make_virchow_folder(folder: Path, embed_dim: int = 96, seed: int = 2) -> Path:
    """Virchow's hub folder layout: token output (``global_pool: ""``), SwiGLU MLP passed at create time."""
    import torch
    from timm.layers import SwiGLUPacked

    args = {
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": embed_dim,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1e-5,
        "num_classes": 0,
        "mlp_ratio": 5.3375,
        "global_pool": "",
        "dynamic_img_size": True,
    }
    cfg = {"num_classes": 0, "num_features": embed_dim, "pretrained_cfg": _pretrained_cfg("bicubic", 1.0)}
    return _save_timm(
        folder,
        "vit_huge_patch14_224",
        args,
        cfg,
        "safetensors",
        seed,
        mlp_layer=SwiGLUPacked,
        act_layer=torch.nn.SiLU,
    )


def make_slide_encoder_pth(
    path: Path, in_dim: int, embed_dim: int = 64, depth: int = 2, seed: int = 3
) -> Path:
    """Prov-GigaPath's ``slide_encoder.pth``: ``{"model": state_dict}`` in its key layout."""
    import torch

    from wsi_llava.slide_encoder.config import SlideEncoderConfig
    from wsi_llava.slide_encoder.longnet import LongNetViT

    torch.manual_seed(seed)
    cfg = SlideEncoderConfig.gigapath(in_dim=in_dim, embed_dim=embed_dim, depth=depth, num_heads=4)
    net = LongNetViT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict()}, path)
    return path


def make_llava_merged(folder: Path, mm_hidden: int = 1024, seed: int = 5) -> Path:
    """A merged LLaVA-1.5 folder: ``LlavaLlamaForCausalLM`` config, two safetensors shards + index, tokenizer."""
    import torch
    from safetensors.torch import save_file

    from kits.llava import llava_config
    from kits.llm import make_tiny_llama, make_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    llm = make_tiny_llama(tok, seed=seed)
    hidden = llm.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.half().contiguous() for k, v in llm.state_dict().items()}
    sd["model.mm_projector.0.weight"] = (torch.randn(hidden, mm_hidden, generator=g) * 0.03).half()
    sd["model.mm_projector.0.bias"] = torch.zeros(hidden).half()
    sd["model.mm_projector.2.weight"] = (torch.randn(hidden, hidden, generator=g) * 0.1).half()
    sd["model.mm_projector.2.bias"] = torch.zeros(hidden).half()
    cfg = llava_config(len(tok))
    cfg["mm_hidden_size"] = mm_hidden
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(folder)
    keys = sorted(sd)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    for name, ks in zip(names, halves, strict=True):
        save_file({k: sd[k] for k in ks}, str(folder / name))
    weight_map = {k: n for n, ks in zip(names, halves, strict=True) for k in ks}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": sum(v.numel() * 2 for v in sd.values())}, "weight_map": weight_map}
        )
    )
    return folder


def make_paper_parts(root: Path, mm_hidden: int = 1024) -> dict[str, Path]:
    """A Prov-GigaPath folder with ``slide_encoder.pth`` beside its weights, and a merged LLaVA folder."""
    gp = make_gigapath_folder(root / "prov-gigapath")
    make_slide_encoder_pth(gp / "slide_encoder.pth", in_dim=96)
    return {"tile_encoder": gp, "llava": make_llava_merged(root / "wsi-llava-7b", mm_hidden=mm_hidden)}


def put_in_hub_cache(
    cache: Path, repo_id: str, src: Path, revision: str = "0123456789abcdef0123456789abcdef01234567"
):
    """Place ``src``'s files in a hub cache as ``huggingface_hub`` does: blobs named by sha256, symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snap = repo / "snapshots" / revision
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        if f.suffix in LFS_SUFFIXES:  # LFS files: blob named by the content's sha256
            digest = hashlib.sha256(data).hexdigest()
        else:  # plain git files: blob named by the git object id (sha1 of "blob <size>\0" + content)
            digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap
