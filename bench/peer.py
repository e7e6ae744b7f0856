"""The peer beside `xlstm bench`: NX-AI's xLSTM-7B runtimes on the same GPU, random bf16 weights of
the xLSTM-7B shape, timed the way `xlstm bench` times us. Needs torch and the `xlstm` and
`mlstm-kernels` packages (2.0.6); `--runtime transformers` also needs `transformers`.

  python3 bench/peer.py --runtime nxai            # NX-AI's xLSTMLarge, decode step in a CUDA graph
  python3 bench/peer.py --runtime transformers    # Hugging Face xLSTMForCausalLM with NX-AI's kernels

--runtime nxai is the strongest setup we know: fused weights, the Triton chunkwise prefill
(`chunkwise--triton_limit_chunk`) and Triton step kernel, the whole decode step (model, state copy,
greedy pick) captured in a CUDA graph and replayed. --runtime transformers runs `generate()` with
`chunkwise--triton_limit_chunk`, `native_sequence__triton` and the Triton step kernel.

Prints one JSON object per line: {"peer", "what": "prefill", "tokens", "ms" (best), "median_ms",
"tok_s" (from the best), "rest_ms"} and {"peer", "what": "decode", "batch", "ms_per_step", "tok_s",
"peak_gb"}. Prefills run back to back unless --prefill-rest-ms idles before each timed one, as
`xlstm bench --prefill-rest-ms` does (several values: each in turn).
"""
import argparse
import json
import sys
import time

import torch

VOCAB = 50304


def log(**kw):
    print(json.dumps(kw), flush=True)


def nxai_model():
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    cfg = xLSTMLargeConfig(embedding_dim=4096, num_heads=8, num_blocks=32, vocab_size=VOCAB, mode="inference",
                           chunkwise_kernel="chunkwise--triton_limit_chunk", sequence_kernel="native_sequence__triton",
                           step_kernel="triton", weight_mode="fused", return_last_states=True,
                           inference_state_dtype="float32", autocast_kernel_dtype="bfloat16")
    with torch.device("cuda"):
        m = xLSTMLarge(cfg)
    return m


def transformers_model():
    from transformers import xLSTMConfig, xLSTMForCausalLM

    # (NX-AI's TFLA `chunkwise--triton_xl_chunk` crashes Triton 3.6's compiler: the limit-chunk kernel)
    cfg = xLSTMConfig(chunkwise_kernel="chunkwise--triton_limit_chunk", sequence_kernel="native_sequence__triton", step_kernel="triton")
    with torch.device("cuda"):
        m = xLSTMForCausalLM(cfg)
    return m


def synced(fn):
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.no_grad()
def prefill(args, m, tokens, rest_ms):
    ids = torch.randint(0, VOCAB, (1, tokens), device="cuda")
    run = (lambda: m(ids, None)) if args.runtime == "nxai" else (lambda: m(ids, use_cache=True))
    synced(run)  # warm-up: Triton compiles, allocator fills
    times = []
    for _ in range(args.prefill_reps):
        time.sleep(rest_ms / 1e3)
        times.append(synced(run))
    best, median = min(times), sorted(times)[len(times) // 2]
    log(peer=args.runtime, what="prefill", tokens=tokens, ms=best * 1e3, median_ms=median * 1e3, tok_s=tokens / best, rest_ms=rest_ms)


@torch.no_grad()
def decode_nxai(args, m, batch):
    prompt = torch.randint(0, VOCAB, (batch, 128), device="cuda")
    _, state = m(prompt, None)
    tok = prompt[:, -1:].clone()

    def step():
        logits, new = m(tok, state)
        for k in state:
            for a, b in zip(state[k], new[k]):
                a.copy_(b)
        tok.copy_(logits[:, -1].argmax(-1, keepdim=True))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        graph.replay()
    n = args.steps
    per = synced(lambda: [graph.replay() for _ in range(n)]) / n
    log(peer=args.runtime, what="decode", batch=batch, ms_per_step=per * 1e3, tok_s=batch / per, peak_gb=torch.cuda.max_memory_allocated() / 1e9)


@torch.no_grad()
def decode_transformers(args, m, batch):
    ids = torch.randint(0, VOCAB, (batch, 128), device="cuda")
    kw = dict(do_sample=False, pad_token_id=m.config.pad_token_id, eos_token_id=None)
    gen = lambda n: m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    synced(lambda: gen(8))
    # the prompt and first token cancel out: (n new tokens) - (1 new token)
    one, many = synced(lambda: gen(1)), synced(lambda: gen(args.steps + 1))
    per = (many - one) / args.steps
    log(peer=args.runtime, what="decode", batch=batch, ms_per_step=per * 1e3, tok_s=batch / per, peak_gb=torch.cuda.max_memory_allocated() / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", choices=["nxai", "transformers"], default="nxai")
    p.add_argument("--prompt-len", type=int, nargs="*", default=[2048, 8192], help="prefill lengths (none: skip)")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 16, 64], help="decode batch sizes (none: skip)")
    p.add_argument("--prefill-reps", type=int, default=3, help="timed prefills after one warm-up; the best is `ms`")
    p.add_argument("--prefill-rest-ms", type=int, nargs="+", default=[0], help="idle before each timed prefill (each value in turn)")
    p.add_argument("--steps", type=int, default=200, help="timed decode steps")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("peer.py: no CUDA device: the peer runs on an NVIDIA GPU")
    if args.prefill_reps < 1 or args.steps < 1:
        sys.exit("peer.py: --prefill-reps and --steps must be at least 1")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        m = nxai_model() if args.runtime == "nxai" else transformers_model()
    except ImportError as e:
        sys.exit(f"peer.py: --runtime {args.runtime} needs the xlstm and mlstm-kernels packages (2.0.6)"
                 f"{' and transformers' if args.runtime == 'transformers' else ''}: install them or their wheels ({e})")
    m.eval()
    with torch.no_grad():
        for w in m.parameters():
            w.normal_(0, 0.02)
    log(peer=args.runtime, what="model", parameters=sum(w.numel() for w in m.parameters()), device=torch.cuda.get_device_name())
    decode = decode_nxai if args.runtime == "nxai" else decode_transformers
    for b in args.batch:
        try:
            decode(args, m, b)
        except Exception as e:  # (out of memory at a large batch: report it and go on)
            log(peer=args.runtime, what="decode", batch=b, error=repr(e)[:300])
    for n in args.prompt_len:
        for rest_ms in args.prefill_rest_ms:
            try:
                prefill(args, m, n, rest_ms)
            except Exception as e:
                log(peer=args.runtime, what="prefill", tokens=n, rest_ms=rest_ms, error=repr(e)[:300])


if __name__ == "__main__":
    main()
