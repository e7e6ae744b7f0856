#!/usr/bin/env python3
"""Writes an xLSTM-7B-shaped checkpoint (HF names, float32, 6 shards + index, like NX-AI/xLSTM-7b) with
constant values, to measure loading memory without the 27.5 GB download.

  python3 dev/make_7b_checkpoint.py OUT_DIR [--dtype float32|bfloat16]
Writes tensors one at a time (never more than one tensor in memory)."""
import json, os, struct, sys
import numpy as np

out = sys.argv[1]
dtype = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--dtype" else "float32"
os.makedirs(out, exist_ok=True)
D, L, NH, V, QK, VD, F = 4096, 32, 8, 50304, 2048, 4096, 10944
names = [("backbone.embeddings.weight", [V, D])]
for i in range(L):
    p, m = f"backbone.blocks.{i}", f"backbone.blocks.{i}.mlstm_layer"
    names += [(f"{p}.norm_mlstm.weight", [D]), (f"{m}.q.weight", [QK, D]), (f"{m}.k.weight", [QK, D]),
              (f"{m}.v.weight", [VD, D]), (f"{m}.ogate_preact.weight", [VD, D]), (f"{m}.igate_preact.weight", [NH, D]),
              (f"{m}.igate_preact.bias", [NH]), (f"{m}.fgate_preact.weight", [NH, D]), (f"{m}.fgate_preact.bias", [NH]),
              (f"{m}.multihead_norm.weight", [VD]), (f"{m}.out_proj.weight", [D, VD]), (f"{p}.norm_ffn.weight", [D]),
              (f"{p}.ffn.proj_up_gate.weight", [F, D]), (f"{p}.ffn.proj_up.weight", [F, D]), (f"{p}.ffn.proj_down.weight", [D, F])]
names += [("backbone.out_norm.weight", [D]), ("lm_head.weight", [V, D])]
esize = 4 if dtype == "float32" else 2
st_dtype = "F32" if dtype == "float32" else "BF16"
total = sum(int(np.prod(s)) * esize for _, s in names)
shards, cur, size, target = [], [], 0, total / 6
for n, s in names:
    cur.append((n, s)); size += int(np.prod(s)) * esize
    if size >= target and len(shards) < 5:
        shards.append(cur); cur, size = [], 0
shards.append(cur)
wmap = {}
for si, part in enumerate(shards):
    fn = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
    header, off = {}, 0
    for n, s in part:
        nb = int(np.prod(s)) * esize
        header[n] = {"dtype": st_dtype, "shape": s, "data_offsets": [off, off + nb]}; off += nb; wmap[n] = fn
    hb = json.dumps(header).encode(); hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(os.path.join(out, fn), "wb") as f:
        f.write(struct.pack("<Q", len(hb))); f.write(hb)
        for n, s in part:
            val = 1.0 if "norm" in n else 0.01
            a = np.full(s, val, dtype=np.float32)
            if dtype != "float32":
                a = (a.view(np.uint32) >> 16).astype(np.uint16)
            f.write(a.tobytes())
    print("wrote", fn, flush=True)
json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
cfg = {"model_type": "xlstm", "vocab_size": V, "hidden_size": D, "embedding_dim": D, "num_hidden_layers": L, "num_blocks": L,
       "num_heads": NH, "qk_dim_factor": 0.5, "v_dim_factor": 1.0, "ffn_proj_factor": 2.667, "ffn_round_up_to_multiple_of": 64,
       "mlstm_round_up_to_multiple_of": 64, "gate_soft_cap": 15.0, "output_logit_soft_cap": 30.0, "norm_eps": 1e-6, "eps": 1e-6,
       "use_bias": False, "add_out_norm": True, "tie_word_embeddings": False, "weight_mode": "single", "chunk_size": 64,
       "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "force_bos_token_insert": True,
       "architectures": ["xLSTMForCausalLM"], "torch_dtype": dtype}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
