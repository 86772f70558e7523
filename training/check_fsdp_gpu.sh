#!/usr/bin/env bash
# FSDP vs DDP on 2 GPUs: stage 3 (LoRA + projector) on a tiny Llama built from a config, offline.
#
# Four launches at the same global batch (2 GPUs x batch_size 2):
#   ddp  fp32 (torchrun)  vs fsdp fp32 (torchrun):          loss curves should agree to ~1e-4
#   ddp  bf16 (torchrun)  vs fsdp bf16 (accelerate launch): agree to bf16 noise (~1e-2);
#   the bf16 pair uses model.dtype bfloat16 and grad_checkpointing, as configs/paper/stage3_fsdp.yaml
# then the fsdp run's final/ is loaded with load_checkpoint. Writes $OUT/fsdp_vs_ddp.json.
#
# Needs: python3 with torch + transformers + peft (+ accelerate for the accelerate launch) and
# PYTHONPATH with pydantic/pluggy/click and $PWD/core (see .notes/COMMON.md). Nothing is downloaded:
# the tokenizer is a small byte-level BPE trained here, the data are random visual tokens in the
# WSI-Bench layout (jsonl + .pt). DEVICE=cpu runs the same on CPU with gloo (for a dry run).
set -euo pipefail
OUT=${OUT:-/tmp/fsdp_check_out}
WORK=${WORK:-/tmp/fsdp_check}
DEVICE=${DEVICE:-cuda}
NPROC=${NPROC:-2}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"

python3 - "$WORK" "$DEVICE" <<'PY'
"""Tokenizer, tiny Llama, base checkpoint (projector 32 -> hidden), bench jsonl + .pt tokens, 4 configs."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from wsi_llava.model.checkpoint import save_checkpoint
from wsi_llava.model.projector import build_projector
from wsi_llava.model.spec import LLMSpec, ModelSpec, ProjectorSpec
from wsi_llava.model.templates import VICUNA_SYSTEM as SYSTEM

work = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
organs = ["lung", "breast", "colon", "kidney", "liver", "skin", "stomach", "prostate"]
rows, texts = [], []
(work / "features").mkdir()
for i in range(32):
    organ = organs[i % len(organs)]
    torch.save(torch.randn(8, 32, generator=g) + (i % len(organs)), work / "features" / f"s{i:03d}.pt")
    for j, (q, a) in enumerate(
        [
            ("What organ is this slide from?", f"This slide shows {organ} tissue."),
            ("Describe the slide.", f"A section of {organ} with glands, stroma and scattered lymphocytes."),
        ]
    ):
        rows.append({"question_id": f"Description_{i}{j}_1", "image": f"s{i:03d}.pt",
                     "question": "<image>\n" + q, "T-answer": a, "metadata": "description"})
        texts += [q, a]
(work / "bench").mkdir()
with open(work / "bench" / "train.jsonl", "w") as fh:
    fh.writelines(json.dumps(r) + "\n" for r in rows)

tk = Tokenizer(models.BPE(unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
specials = ["<unk>", "<s>", "</s>", "<pad>"]
tk.train_from_iterator(
    texts * 4 + [SYSTEM] * 8 + ["USER: ASSISTANT: </s>"] * 8,
    trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
)
tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                              pad_token="<pad>")
hidden = 256
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(work / "llm")
tok.save_pretrained(work / "llm")
spec = ModelSpec(llm=LLMSpec(source=str(work / "llm")), projector=ProjectorSpec(in_dim=32, out_dim=hidden),
                 slide_encoder=None, n_visual_tokens=8, template="vicuna_v1", name="fsdp-check")
torch.manual_seed(1)
proj = build_projector(spec.projector.type, 32, hidden)
save_checkpoint(SimpleNamespace(spec=spec, projector=proj, slide_encoder=None, tile_encoder=None, llm=None,
                                tokenizer=None, checkpoint_dir=None), work / "base")
for name, strategy, bf16 in [("ddp_fp32", "ddp", False), ("fsdp_fp32", "fsdp", False),
                             ("ddp_bf16", "ddp", True), ("fsdp_bf16", "fsdp", True)]:
    dtype = "bfloat16" if bf16 and sys.argv[2] == "cuda" else "float32"  # CPU: no bf16 compute
    (work / f"{name}.yaml").write_text(
        f"data: {{bench: [{work / 'bench'}], features: {work / 'features'}, max_length: 192}}\n"
        f"model: {{base: {work / 'base'}, dtype: {dtype}}}\n"
        "lora: {r: 8, alpha: 16, dropout: 0.0}\n"
        "optim: {lr: 1.0e-3, projector_lr: 1.0e-3, warmup_ratio: 0.0, scheduler: constant}\n"
        f"train: {{max_steps: 6, epochs: 1, batch_size: 2, bf16: {str(bf16).lower()}, save_every: 3, "
        f"grad_checkpointing: {str(bf16).lower()}, "  # as the paper config (bf16 runs only)
        f"group_by_length: false, strategy: {strategy}}}\n"
    )
print("prepared", work)
PY

run_torchrun() {  # name
  local t0=$SECONDS
  python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m wsi_llava.train stage3 \
    --config "$WORK/$1.yaml" --out "$WORK/$1" --device "$DEVICE" > "$OUT/$1.log" 2>&1 \
    || { tail -40 "$OUT/$1.log"; exit 1; }
  echo "$1 (torchrun): $((SECONDS - t0)) s"
}
run_accelerate() {  # name
  local t0=$SECONDS
  python3 -m accelerate.commands.launch --multi_gpu --num_processes "$NPROC" --num_machines 1 \
    --mixed_precision no --dynamo_backend no -m wsi_llava.train stage3 \
    --config "$WORK/$1.yaml" --out "$WORK/$1" --device "$DEVICE" > "$OUT/$1.log" 2>&1 \
    || { tail -40 "$OUT/$1.log"; exit 1; }
  echo "$1 (accelerate launch): $((SECONDS - t0)) s"
}
run_torchrun ddp_fp32
run_torchrun fsdp_fp32
run_torchrun ddp_bf16
run_accelerate fsdp_bf16

python3 - "$WORK" "$OUT" "$DEVICE" <<'PY'
"""Compare the loss curves, check the sharded checkpoint and load the fsdp final/; write the JSON."""
import json
import sys
from pathlib import Path

import torch

from wsi_llava.model.checkpoint import load_checkpoint
from wsi_llava.train.loop import read_log

work, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
runs = {}
for name in ("ddp_fp32", "fsdp_fp32", "ddp_bf16", "fsdp_bf16"):
    rows = read_log(work / name / "log.jsonl")
    steps = [r for r in rows if "loss" in r and "event" not in r]
    ck = sorted((work / name / "checkpoints").glob("step_*"))
    runs[name] = {
        "launcher": "accelerate launch" if name == "fsdp_bf16" else "torchrun",
        "world_size": rows[0]["world_size"], "global_batch": rows[0]["global_batch"],
        "loss": [r["loss"] for r in steps], "grad_norm": [r.get("grad_norm") for r in steps],
        "seconds": steps[-1]["time"],
        "checkpoint": ck[-1].name if ck else None,
        "checkpoint_sharded_files": len(list(ck[-1].glob("dcp/*.distcp"))) if ck else 0,
    }

def max_rel(a, b):
    return max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b, strict=True))

fp32 = max_rel(runs["ddp_fp32"]["loss"], runs["fsdp_fp32"]["loss"])
bf16 = max_rel(runs["ddp_bf16"]["loss"], runs["fsdp_bf16"]["loss"])
model = load_checkpoint(work / "fsdp_bf16" / "final", device=device, dtype="bfloat16" if device == "cuda" else "float32")
text = model.generate_text("What organ is this slide from?", torch.zeros(8, 32), max_new_tokens=4)
result = {
    "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    "torch": torch.__version__, "runs": runs,
    "max_rel_loss_diff_fp32": fp32, "max_rel_loss_diff_bf16": bf16,
    "fp32_match": fp32 <= 1e-3, "bf16_match": bf16 <= 3e-2,
    "fsdp_final_loads": True, "fsdp_final_lora": model.spec.lora, "generated": text,
}
(out / "fsdp_vs_ddp.json").write_text(json.dumps(result, indent=1))
print(f"{'step':>4} " + " ".join(f"{n:>11}" for n in runs))
for i in range(len(runs["ddp_fp32"]["loss"])):
    print(f"{i + 1:>4} " + " ".join(f"{r['loss'][i]:11.5f}" for r in runs.values()))
print(f"max relative loss difference fsdp vs ddp: fp32 {fp32:.2e}, bf16 {bf16:.2e}")
print("sharded checkpoint files:", {n: r["checkpoint_sharded_files"] for n, r in runs.items()})
print("fsdp final/ loads; lora:", model.spec.lora, "| wrote", out / "fsdp_vs_ddp.json")
sys.exit(0 if result["fp32_match"] and result["bf16_match"] else 1)
PY
